"""Peak resident memory of a sweep worker: flat in the heads swept, linear in prompts x tokens.

Each measurement is a fresh process (``python -m benchmarks.memory MODEL HEADS PROMPTS TOKENS``)
that loads the model as a worker does, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs a backup sweep's shards through the in-process
executor, and reports its resident memory before the sweep and its peak during it.
Loading the model can peak higher than the sweep (on a model-cache miss the weights
are de-quantised and processed), which is why the counter is reset first, after the
heap that loading freed has been handed back (``malloc_trim``).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import Ratio, print_table


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def probe(model: str, n_heads: int, n_prompts: int, seq_len: int) -> dict:
    """Run in the child: the worker's memory before and during a sweep of ``n_heads`` heads."""
    import torch

    from sweeps.jobs.backup import BackupJob
    from sweeps.jobs.plan import plan_backup
    from sweeps.runtime.allocator import give_back_freed_memory
    from sweeps.runtime.executors import LocalExecutor
    from sweeps.runtime.loading import load_tokenizer
    from sweeps.runtime.models import describe_model
    from tasks import TaskSpec, build_task

    torch.set_grad_enabled(False)
    info = describe_model(model)
    task = build_task(TaskSpec("text"), load_tokenizer(info), n_prompts=n_prompts, seq_len=seq_len)
    L, H = info.n_layers, info.n_heads
    # The first heads in sweep order (10 of SmolLM2's: all of layer 0, and L1H0), so the
    # restart passes are as large as in a whole sweep: a pass's size, capped by
    # chunking.tokens_per_pass, is what sets the peak, not how many heads there are.
    heads = [(layer, head) for layer in range(L) for head in range(H)][:n_heads]
    executor = LocalExecutor(model, BackupJob(task, batch_size=n_prompts, n_boot=0))
    executor.start()
    # Hand the heap that loading freed back to the OS, so "before" is what the worker holds
    # (else the sweep reuses those pages unseen and what it adds looks smaller than it is).
    gc.collect()
    give_back_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kb("VmRSS")
    done = sum(1 for _ in executor.run(plan_backup(heads)))
    return {"heads": len(heads), "shards": done, "before_mb": before / 1024, "peak_mb": _status_kb("VmHWM") / 1024}


def measure(model: str, n_heads: int, n_prompts: int, seq_len: int) -> dict:
    """A probe in its own process (one JSON line back). One at a time: on two cores, probes
    run side by side took longer than one after another."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", model, str(n_heads), str(n_prompts),
                           str(seq_len)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"memory probe {model} {n_heads} {n_prompts} {seq_len} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model: str, all_heads: int, small: tuple[int, int], large: tuple[int, int]) -> list[Ratio]:
    few = measure(model, 10, *small)
    every = measure(model, all_heads, *small)
    bigger = measure(model, 10, *large)
    tokens = (large[0] * large[1]) / (small[0] * small[1])
    grown = (bigger["peak_mb"] - bigger["before_mb"]) / max(1e-9, few["peak_mb"] - few["before_mb"])
    print(f"## memory: peak resident memory of one worker process ({model}, backup sweep)")
    rows = [[f"{r['heads']} heads, {p} prompts x {t} tokens", f"{r['before_mb']:.0f}", f"{r['peak_mb']:.0f}",
             f"{r['peak_mb'] - r['before_mb']:.0f}"]
            for r, (p, t) in [(few, small), (every, small), (bigger, large)]]
    print_table(["sweep", "before MB", "peak MB", "sweep adds MB"], rows)
    print(f"peak, {every['heads']} heads over {few['heads']}: {every['peak_mb'] / few['peak_mb']:.3f}; what the sweep adds "
          f"grows {grown:.2f}x for {tokens:.0f}x the prompts x tokens\n")
    return [
        Ratio("memory", f"peak RSS, {every['heads']} heads / {few['heads']} heads", every["peak_mb"] / few["peak_mb"],
              "<= 1.1"),
        Ratio("memory", f"sweep's memory growth / {tokens:.0f}x prompts x tokens", grown / tokens, "<= 1.0"),
    ]


if __name__ == "__main__":
    model, n_heads, n_prompts, seq_len = sys.argv[1], *map(int, sys.argv[2:5])
    print(json.dumps(probe(model, n_heads, n_prompts, seq_len)))
