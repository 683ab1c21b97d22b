"""How close ``interp-sweeps plan``'s memory estimate is to the peak a worker really reaches.

Each measurement is its own process (``python -m benchmarks.planner MODEL PROMPTS DTYPE``):
it imports everything, loads the model, runs the backup sweep's clean state and one layer's
shard, and reports the weights' bytes plus its peak resident memory (``VmHWM``, reset after
loading) above what it held once loaded, beside the planner's ``per_replica_bytes`` for the
same run. What loading leaves resident beyond the weights (a model with no cache entry is
built through the Hugging Face model and TransformerLens's copy) is the loader's, reported
apart. Once loaded, the process keeps freed memory for reuse as a CPU worker does
(``allocator.py``), so the resident peak is the peak of what it allocated. Nothing is timed; nothing here is asserted by the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import Ratio, print_table
from benchmarks.memory import _status_kb


def _resident(field: str = "VmRSS") -> int:
    return _status_kb(field) * 1024


def measure(name: str, n_prompts: int, dtype: str, seq_len: int = 64, batch_size: int = 32) -> dict:
    """In this process: the planned and the measured peak of a backup sweep's worker."""
    import torch

    from sweeps.core import footprint as F
    from sweeps.jobs.backup import BackupJob
    from sweeps.jobs.plan import Shard
    from sweeps.runtime import loading, models, shapes
    from sweeps.runtime.allocator import keep_freed_memory
    from sweeps.runtime.chunking import tokens_per_pass
    from tasks import TaskSpec, build_task

    info = models.describe_model(name)
    task = build_task(TaskSpec("text"), loading.load_tokenizer(info), n_prompts, 0, seq_len=seq_len)
    before = _resident()
    model = loading.load_model(info, "cpu", dtype)
    loaded = _resident()
    # As a worker: malloc keeps freed memory from here on (the load's own transients, which a
    # model without a cache entry makes, are given back to the system first).
    keep_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:  # from here on, VmHWM is this run's peak
        f.write("5")
    job = BackupJob(task, "resample", batch_size).bind(model)
    shape = shapes.model_shape(name)
    job.run_shard(Shard(shape.n_layers // 2, tuple(range(shape.n_heads))))
    weights = sum(v.nbytes for v in vars(model.weights).values() if isinstance(v, torch.Tensor))
    # the sweep's peak above the loaded model, plus the weights themselves: what the loader
    # leaves resident beyond the weights (a model without a cache entry builds the Hugging
    # Face model and TransformerLens's copy first) is the loader's, reported apart
    peak = _resident("VmHWM") - loaded + weights
    T = int(task.clean.shape[1])
    fp = F.backup(shape, task.n_prompts, T, batch_size, F.DTYPE_BYTES[dtype], tokens_per_pass(torch.device("cpu")),
                  shape.n_heads, points_per_prompt=T - 1)
    return {"model": name, "prompts": task.n_prompts, "tokens": T, "dtype": dtype, "measured": peak,
            "planned": fp.per_replica_bytes, "load_leftover": loaded - before - weights}


def run(quick: bool) -> list[Ratio]:
    cases = [("tiny-llama", 8, "float32")] if quick else [
        ("smollm2-135m", 32, "float32"), ("smollm2-135m", 64, "float32"), ("smollm2-135m", 32, "bfloat16"),
        ("random-gpt2-small", 32, "float32"), ("random-gpt2-small", 32, "bfloat16"),
    ]
    rows, ratios = [], []
    for name, n, dtype in cases:
        done = subprocess.run([sys.executable, "-m", "benchmarks.planner", name, str(n), dtype],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "measurement failed")
        m = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = m["planned"] / m["measured"]
        rows.append([m["model"], f"{m['prompts']} x {m['tokens']}", m["dtype"], f"{m['planned'] / 1e9:.2f} GB",
                     f"{m['measured'] / 1e9:.2f} GB", f"{ratio:.2f}", f"{m['load_leftover'] / 1e9:.2f} GB"])
        ratios.append(Ratio("planner", f"{name} {n} prompts {dtype}: planned / measured peak", ratio))
    print("## planner: a backup worker's planned memory against its measured peak (one layer's shard: the "
          "weights plus the resident peak above the loaded model; 'load leftover': what loading left resident "
          "beyond the weights, the loader's and not the plan's)")
    print_table(["model", "prompts x tokens", "dtype", "planned", "measured", "planned / measured",
                 "load leftover"], rows)
    return ratios


if __name__ == "__main__":
    name, n_prompts, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    print(json.dumps(measure(name, n_prompts, dtype)))
