"""Ray's overhead: the same backup shards through the in-process executor, one Ray actor and two.

Start-up (Ray itself, the actors, each loading the model) is timed apart from the
sweep. The sweep time includes each worker's clean state (once per worker) and
everything Ray adds per shard: the task's tensors through the object store once,
each shard's call and its Arrow tables back. Ray here is a private local one
(``RAY_ADDRESS=local``); two workers on this machine share its cores.
"""

from __future__ import annotations

import os
import time

from benchmarks.common import Ratio, Setup, print_table
from sweeps.engine.backup_sweep import BackupJob
from sweeps.engine.plan import plan_backup
from sweeps.engine.run import LocalExecutor, RayExecutor, connect_ray


def _sweep(executor, shards) -> tuple[float, float, int]:
    """(start-up seconds, sweep seconds, shards done)."""
    start = time.perf_counter()
    executor.start()
    started = time.perf_counter()
    try:
        done = sum(1 for _ in executor.run(shards))
    finally:
        executor.shutdown()
    return started - start, time.perf_counter() - started, done


def run(s: Setup) -> list[Ratio]:
    w = s.weights
    L, H = w.cfg.n_layers, w.cfg.n_heads
    task = s.task.select(slice(0, max(1, s.task.n_prompts // 4)))
    layers = sorted({L // 3, L // 2})  # restarts from the middle: a sweep's average cost per head
    heads = [(layer, head) for layer in layers for head in range(H)]
    shards = plan_backup(heads, heads_per_shard=max(1, H // 3))
    job = BackupJob(task, batch_size=task.n_prompts, n_boot=0)

    import ray

    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"  # a private Ray: never a cluster that happens to run here
    start = time.perf_counter()
    started = connect_ray()  # once for both Ray runs: its start-up is not the executor's
    ray_start = time.perf_counter() - start
    try:
        runs = {
            "local (in-process)": _sweep(LocalExecutor(s.name, job), shards),
            "Ray, 1 worker": _sweep(RayExecutor(s.name, job, num_workers=1), shards),
            "Ray, 2 workers": _sweep(RayExecutor(s.name, job, num_workers=2), shards),
        }
    finally:
        if started:
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
    assert all(done == len(shards) for _, _, done in runs.values()), runs
    local = runs["local (in-process)"][1]
    print(f"## Ray overhead: {s.name}, backup sweep of {len(heads)} heads (layers {layers}) in {len(shards)} "
          f"shards, {task.n_prompts} prompts x {task.clean.shape[1]} tokens, {os.cpu_count()} cores")
    print(f"Ray itself started in {ray_start:.1f} s; start-up below is the workers' (each loads the model)")
    print_table(["executor", "start-up s", "sweep s", "sweep / local"], [
        [name, f"{up:.1f}", f"{sweep:.2f}", f"{sweep / local:.2f}"] for name, (up, sweep, _) in runs.items()])
    one, two = runs["Ray, 1 worker"][1], runs["Ray, 2 workers"][1]
    print(f"throughput, 2 workers over 1: {one / two:.2f}x (both share {os.cpu_count()} cores here)\n")
    return [
        Ratio("ray", "Ray 1 worker sweep / local sweep", one / local, "<= 1.1"),
        Ratio("ray", "throughput 2 workers / 1 worker", one / two),
    ]
