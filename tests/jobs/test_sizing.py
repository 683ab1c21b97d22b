"""Jobs size their passes from the memory estimate: smaller passes where the default would not
fit the budget, the same numbers either way, and the console says so."""

from __future__ import annotations

import numpy as np

from sweeps.core import footprint as F
from sweeps.jobs import backup as backup_job
from sweeps.jobs import sizing
from sweeps.jobs.backup import BackupJob
from sweeps.jobs.plan import Shard
from tasks import TaskSpec, build_task


def _fp(pass_bytes: int, least: int = 10, clean: int = 100) -> F.Footprint:
    return F.Footprint(0, clean, pass_bytes, least, 0.0, 1)


def test_the_fraction_is_the_largest_halving_that_fits():
    # a pass costs 1000 bytes at full size, in proportion to its size, at least 10
    at = lambda f: _fp(max(10, int(1000 * f)))  # noqa: E731
    assert sizing.fit_fraction(at, 100 + 1000) == 1.0
    assert sizing.fit_fraction(at, 100 + 999) == 0.5
    assert sizing.fit_fraction(at, 100 + 260) == 0.25
    assert sizing.fit_fraction(at, 100 + 10) == 1 / 128  # 1000/128 < 10: the least pass
    # not even the least pass fits: the default stays (halving cannot help)
    assert sizing.fit_fraction(at, 100 + 9) == 1.0


def _shards(job, layer: int) -> dict:
    tables = job.run_shard(Shard(layer, tuple(range(job.engine.cfg.n_heads))))
    return {name: table.to_pandas() for name, table in tables.items()}


def test_a_budget_below_the_default_pass_makes_passes_smaller_with_the_same_numbers(tiny_llama, monkeypatch, capsys):
    task = build_task(TaskSpec("text"), tiny_llama.tokenizer, n_prompts=8, seq_len=24)
    weights = tiny_llama.weights
    free = BackupJob(task, "resample", 8, n_boot=0).bind(weights)
    assert free.pass_fraction == 1.0

    size = F.DTYPE_BYTES["float32"]
    shape, n, T = free.engine.shape, task.n_prompts, int(task.clean.shape[1])
    options = free.sizing()[1]
    full = sizing.estimate("backup", shape, n, T, size, "cpu", options)
    # a budget that holds the weights, the clean state and a pass of a quarter of a layer's heads
    quarter = sizing.estimate("backup", shape, n, T, size, "cpu", options, 1 / 64)
    assert quarter.pass_bytes < full.pass_bytes
    budget = shape.parameters * size + quarter.clean_bytes + quarter.pass_bytes

    seen = []
    real = backup_job.map_chunks
    monkeypatch.setattr(
        backup_job, "map_chunks", lambda n, per_pass, *a, **k: seen.append(per_pass) or real(n, per_pass, *a, **k)
    )
    sized = BackupJob(task, "resample", 8, n_boot=0, memory_budget=budget).bind(weights)
    assert sized.pass_fraction < 1.0
    assert "note: passes at 1/" in capsys.readouterr().err

    got = _shards(sized, 1)
    small = seen[:]
    seen.clear()
    expected = _shards(free, 1)
    assert max(small) < max(seen), (small, seen)  # the sized job's passes held fewer heads
    for name, table in expected.items():
        numeric = table.select_dtypes("number").columns
        np.testing.assert_allclose(
            got[name][numeric].to_numpy(float), table[numeric].to_numpy(float), rtol=1e-5, atol=1e-6
        )
