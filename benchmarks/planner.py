"""How close ``interp-sweeps plan``'s memory estimate is to the peak a worker really reaches.

Each measurement is its own process (``python -m benchmarks.planner MODEL PROMPTS DTYPE SWEEP``):
it imports everything, loads the model, runs one shard of the sweep's job (the backup sweep:
its clean state and one layer's heads; scale: one node at two scales; attribution: one
batch; circuit: one circuit of a tenth of the edges), and reports the weights' bytes plus its peak resident memory (``VmHWM``, reset after
loading) above what it held once loaded, beside the planner's ``per_replica_bytes`` for the
same run. What loading leaves resident beyond the weights (a model with no cache entry is
built through the Hugging Face model and TransformerLens's copy) is the loader's, reported
apart. Once loaded, the process keeps freed memory for reuse as a CPU worker does
(``allocator.py``), so the resident peak is the peak of what it allocated. Nothing is timed; nothing here is asserted by the tests.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from benchmarks.common import Ratio, print_table
from benchmarks.memory import _status_kb


def _resident(field: str = "VmRSS") -> int:
    return _status_kb(field) * 1024


def _model_and_task(name: str, n_prompts: int, dtype: str, seq_len: int):
    """(weights or a loaded model, the task, its shape) for a model name; "random-llama3.2-1b"
    is built from its shape straight into ModelWeights (``benchmarks.gpu``), without the
    Hugging Face model a tiny model's load makes (it would not fit this machine)."""
    import torch

    from sweeps.core import precision
    from sweeps.runtime import loading, models, shapes
    from tasks import TaskSpec, build_task

    if name == "random-llama3.2-1b":
        from benchmarks.gpu import SHAPES, random_task, random_weights

        shape = SHAPES["Llama-3.2-1B"]
        weights = random_weights(shape, precision.dtype_of(dtype), torch.device("cpu"))
        return weights, random_task(shape, n_prompts, seq_len), shape
    info = models.describe_model(name)
    task = build_task(TaskSpec("text"), loading.load_tokenizer(info), n_prompts, 0, seq_len=seq_len)
    return loading.load_model(info, "cpu", dtype), task, shapes.model_shape(name)


def measure(name: str, n_prompts: int, dtype: str, sweep: str = "backup", seq_len: int = 64) -> dict:
    """In this process: the planned and the measured peak of one shard of ``sweep``'s worker."""
    import torch

    from sweeps.core import footprint as F
    from sweeps.jobs import sizing
    from sweeps.jobs.attribution import AttributionJob, AttributionShard
    from sweeps.jobs.backup import BackupJob
    from sweeps.jobs.circuit import CircuitJob, CircuitShard, Curve
    from sweeps.jobs.plan import ScaleShard, Shard
    from sweeps.jobs.scale import ScaleJob, make_pairs
    from sweeps.runtime.allocator import give_back_freed_memory, keep_freed_memory

    torch.set_grad_enabled(False)
    before = _resident()
    model, task, shape = _model_and_task(name, n_prompts, dtype, seq_len)
    # The load's own transients (a model without a cache entry builds the Hugging Face model
    # and TransformerLens's copy) are given back to the system first: else the sweep would
    # reuse them unseen. Then, as a worker, malloc keeps what it frees.
    gc.collect()
    give_back_freed_memory()
    loaded = _resident()
    keep_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:  # from here on, VmHWM is this run's peak
        f.write("5")
    middle = shape.n_layers // 2
    heads = tuple(range(min(shape.n_heads, 4 if name == "random-llama3.2-1b" else shape.n_heads)))
    if sweep == "backup":
        job = BackupJob(task, "resample", 32).bind(model)
        job.run_shard(Shard(middle, heads))
    elif sweep == "scale":
        job = ScaleJob(task, make_pairs(task, "all", 16, 0, False), scales=(0.0, 2.0), batch_size=32).bind(model)
        job.run_shard(ScaleShard(middle, (0,), True, (0, 1)))
    elif sweep == "attribution":
        job = AttributionJob(task).bind(model)
        with torch.enable_grad():
            job.run_shard(AttributionShard(0, task.n_prompts))
    else:
        graph = AttributionJob(task).bind(model).graph
        curve = Curve("rank", "-", "edge", scores=tuple(float(i) for i in range(graph.n_edges)))
        job = CircuitJob(task, [curve]).bind(model)
        job.run_shard(CircuitShard(0, 0.1, graph.n_edges // 10))
    weights = getattr(model, "weights", model)
    weight_bytes = sum(v.nbytes for v in vars(weights).values() if isinstance(v, torch.Tensor))
    # the sweep's peak above the loaded model, plus the weights themselves: what the loader
    # leaves resident beyond the weights is the loader's, reported apart
    peak = _resident("VmHWM") - loaded + weight_bytes
    wanted = job.sizing()
    assert wanted is not None
    fp = sizing.estimate(wanted[0], shape, task.n_prompts, int(task.clean.shape[1]), F.DTYPE_BYTES[dtype], "cpu",
                         wanted[1], job.pass_fraction)
    return {"model": name, "sweep": sweep, "prompts": task.n_prompts, "tokens": int(task.clean.shape[1]),
            "dtype": dtype, "measured": peak, "planned": fp.per_replica_bytes,
            "load_leftover": loaded - before - weight_bytes}


def run(quick: bool) -> list[Ratio]:
    cases = [("tiny-llama", 8, "float32", "backup")] if quick else [
        ("smollm2-135m", 32, "float32", "backup"), ("smollm2-135m", 64, "float32", "backup"),
        ("smollm2-135m", 32, "bfloat16", "backup"), ("random-gpt2-small", 32, "float32", "backup"),
        ("random-gpt2-small", 32, "bfloat16", "backup"), ("random-llama3.2-1b", 8, "float32", "backup"),
        ("smollm2-135m", 16, "float32", "scale"), ("smollm2-135m", 16, "float32", "attribution"),
        ("smollm2-135m", 16, "float32", "circuit"), ("random-gpt2-small", 16, "float32", "attribution"),
    ]
    rows, ratios = [], []
    for name, n, dtype, sweep in cases:
        done = subprocess.run([sys.executable, "-m", "benchmarks.planner", name, str(n), dtype, sweep],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "measurement failed")
        m = json.loads(done.stdout.strip().splitlines()[-1])
        ratio = m["planned"] / m["measured"]
        rows.append([m["model"], m["sweep"], f"{m['prompts']} x {m['tokens']}", m["dtype"],
                     f"{m['planned'] / 1e9:.2f} GB", f"{m['measured'] / 1e9:.2f} GB", f"{ratio:.2f}",
                     f"{m['load_leftover'] / 1e9:.2f} GB"])
        ratios.append(Ratio("planner", f"{name} {sweep} {n} prompts {dtype}: planned / measured peak", ratio))
    print("## planner: a worker's planned memory against its measured peak (one shard: the weights plus the "
          "resident peak above the loaded model; 'load leftover': what loading left resident beyond the "
          "weights, the loader's and not the plan's)")
    print_table(["model", "sweep", "prompts x tokens", "dtype", "planned", "measured", "planned / measured",
                 "load leftover"], rows)
    return ratios


if __name__ == "__main__":
    name, n_prompts, dtype, sweep = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    print(json.dumps(measure(name, n_prompts, dtype, sweep)))
