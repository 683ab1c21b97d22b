"""Chunk sizing: passes halve on out-of-memory and, on a GPU, grow to fill free memory.

The growth is driven by a ``MemoryGauge``; here a fake one stands in for a GPU of a
given size, so the logic runs on any machine. The last test uses the real CUDA gauge
and runs only where there is a GPU.
"""

import numpy as np
import pytest
import torch

from sweeps.jobs.backup import BackupJob
from sweeps.runtime import chunking
from tasks import TaskSpec, build_task


class FakeGPU:
    """A device of ``capacity`` bytes where a chunk of k units allocates ``k * unit`` bytes.
    ``reports`` scales what the gauge sees (below 1: it under-reports, as a gauge whose
    estimate is too low would)."""

    def __init__(self, capacity: int, unit: int, reports: float = 1.0, fraction: float = 0.8) -> None:
        self.capacity, self.unit, self.reports, self.fraction = capacity, unit, reports, fraction
        self.sizes: list[int] = []
        self._last = 0

    def allocate(self, units: int) -> None:
        self.sizes.append(units)
        if units * self.unit > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self._last = int(units * self.unit * self.reports)

    # the MemoryGauge protocol
    def budget(self) -> int:
        return int(self.fraction * self.capacity)

    def begin(self) -> None:
        self._last = 0

    def used(self) -> int:
        return self._last


def run(n: int, per_pass: int, gpu: FakeGPU | None, gauge: FakeGPU | None) -> list[tuple[int, int]]:
    def compute(start: int, stop: int) -> int:
        if gpu is not None:
            gpu.allocate(stop - start)
        return stop - start

    chunks = [(a, b) for a, b, k in chunking.map_chunks(n, per_pass, compute, lambda: "advice", gauge) if k == b - a]
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a2 == b1 for (_, b1), (a2, _) in zip(chunks, chunks[1:]))  # contiguous: nothing lost or repeated
    return chunks


def test_without_a_gauge_the_passes_are_as_few_as_the_size_allows_and_balanced():
    assert [b - a for a, b in run(10, 3, None, None)] == [3, 3, 2, 2]  # not 3, 3, 3, 1
    assert [b - a for a, b in run(9, 8, None, None)] == [5, 4]  # a layer's 9 heads, 8 a pass at most
    assert [b - a for a, b in run(12, 4, None, None)] == [4, 4, 4]
    assert [b - a for a, b in run(7, 100, None, None)] == [7]


def test_passes_grow_to_fill_the_budget_at_most_fourfold_at_a_time():
    gpu = FakeGPU(capacity=1000, unit=10)  # 100 units fit; the budget is 80
    sizes = [b - a for a, b in run(400, 2, gpu, gpu)]
    assert sizes[:4] == [2, 8, 32, 80]
    assert set(sizes[3:-1]) == {80} and sum(sizes) == 400
    assert max(sizes) * gpu.unit <= gpu.capacity


def test_an_estimate_that_is_too_low_halves_once_and_then_stops_growing():
    gpu = FakeGPU(capacity=1000, unit=10, reports=0.25)  # the gauge sees a quarter of what is allocated
    sizes = gpu.sizes
    chunks = run(600, 10, gpu, gpu)
    assert sizes[:3] == [10, 40, 160]  # 160 units do not fit: out of memory
    # Halved to 80, and never grown again: the other 550 units in the fewest passes of at
    # most 80 (seven), balanced (the pass size is now fixed, as on a CPU).
    assert len(sizes[3:]) == 7 and sum(sizes[3:]) == 550 and set(sizes[3:]) == {78, 79}
    assert sum(b - a for a, b in chunks) == 600


def test_one_unit_that_does_not_fit_is_a_clear_error():
    gpu = FakeGPU(capacity=5, unit=10)
    with pytest.raises(RuntimeError, match="advice"):
        run(4, 2, gpu, gpu)


def test_a_backup_sweep_whose_passes_grow_gives_the_same_results(tiny_gpt2, monkeypatch):
    """One head a pass at first; the fake gauge then lets the rest of the layer into one pass."""
    from sweeps.jobs import backup as backup_sweep
    from sweeps.jobs import base as job_base

    task = build_task(TaskSpec("ioi"), tiny_gpt2.tokenizer, n_prompts=6, seed=0)
    H = tiny_gpt2.weights.cfg.n_heads
    expected = BackupJob(task).bind(tiny_gpt2.weights).run_heads(1, list(range(H)))

    tokens = int(task.clean.numel())
    gpu = FakeGPU(capacity=100 * tokens, unit=tokens)
    real = backup_sweep.effects.ablate_heads_of_layer

    def measured(w, layer, heads, *args, **kwargs):
        gpu.allocate(len(heads))
        return real(w, layer, heads, *args, **kwargs)

    monkeypatch.setattr(job_base, "tokens_per_pass", lambda device: tokens)  # one head a pass
    monkeypatch.setattr(backup_sweep, "memory_gauge", lambda device: gpu)
    monkeypatch.setattr(backup_sweep.effects, "ablate_heads_of_layer", measured)
    got = BackupJob(task).bind(tiny_gpt2.weights).run_heads(1, list(range(H)))
    assert gpu.sizes == [1, H - 1]
    for a, b in zip(got, expected):
        assert (a.layer, a.head) == (b.layer, b.head)
        np.testing.assert_allclose(a.backup, b.backup, atol=1e-6)
        np.testing.assert_allclose(a.mean_delta_heads, b.mean_delta_heads, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_cuda_gauge_measures_a_chunk_and_grows_passes():
    device = torch.device("cuda")
    gauge = chunking.memory_gauge(device)
    sizes = []

    def compute(start: int, stop: int) -> float:
        sizes.append(stop - start)
        block = torch.ones(stop - start, 1 << 18, device=device)  # 1 MiB a unit
        return float(block.sum())

    total = sum(r for _, _, r in chunking.map_chunks(64, 1, compute, lambda: "advice", gauge))
    assert total == 64 * (1 << 18)
    assert sizes[:3] == [1, 4, 16]  # a GPU has far more than 16 MiB free
    gauge.begin()
    torch.ones(1 << 20, device=device)
    assert gauge.used() >= 4 << 20
    assert gauge.budget() > 0
