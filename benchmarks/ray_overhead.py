"""Ray's overhead: the same backup shards through the in-process executor, one Ray actor and two.

Start-up (Ray itself, the actors, each loading the model) is timed apart from the
sweep. Each started executor sweeps the shards twice: the first run includes the
worker's clean state (computed once per worker), both include everything Ray adds
per shard (each shard's call and its Arrow tables back; the task's tensors go
through the object store once, at start-up). Ray here is a private local one
(``RAY_ADDRESS=local``); two workers on this machine share its cores.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.common import Ratio, Setup, print_table
from sweeps.jobs.backup import BackupJob
from sweeps.jobs.plan import plan_backup
from sweeps.runtime.executors import LocalExecutor, RayExecutor, connect_ray


def _started(executor) -> float:
    """Start-up seconds (for Ray's executors: the actors, each loading the model)."""
    start = time.perf_counter()
    executor.start()
    return time.perf_counter() - start


def _swept(executor, shards) -> float:
    """Seconds for the whole sweep; every shard must come back."""
    start = time.perf_counter()
    done = sum(1 for _ in executor.run(shards))
    assert done == len(shards) and not executor.failures, (done, executor.failures)
    return time.perf_counter() - start


def run(s: Setup) -> list[Ratio]:
    w = s.weights
    L, H = w.cfg.n_layers, w.cfg.n_heads
    task = s.task.select(slice(0, max(1, s.task.n_prompts // 4)))
    layers = sorted({L // 3, L // 2})  # restarts from the middle: a sweep's average cost per head
    heads = [(layer, head) for layer in layers for head in range(H)]
    shards = plan_backup(heads, heads_per_shard=max(1, H // 3))

    def job() -> BackupJob:  # one per executor: a job bound to a model holds its weights and clean state
        return BackupJob(task, batch_size=task.n_prompts, n_boot=0)

    import ray

    # The in-process worker starts before Ray does: Ray's own processes, starting, would
    # share the cores with its model load.
    local = LocalExecutor(s.name, job())
    up = {"local (in-process)": _started(local)}
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"  # a private Ray: never a cluster that happens to run here
    start = time.perf_counter()
    started = connect_ray()  # once for both Ray runs: its start-up is not the executor's
    ray_start = time.perf_counter() - start
    try:
        # The local and one-worker sweeps alternate (local, Ray, local, Ray), each pair's
        # ratio taken: this machine's slow spells then hit both sides of a ratio alike.
        one = RayExecutor(s.name, job(), num_workers=1)
        up["Ray, 1 worker"] = _started(one)
        swept: dict[str, list[float]] = {name: [] for name in up}
        try:
            for _ in range(2):
                swept["local (in-process)"].append(_swept(local, shards))
                swept["Ray, 1 worker"].append(_swept(one, shards))
        finally:
            local.shutdown()
            one.shutdown()
        two = RayExecutor(s.name, job(), num_workers=2)
        up["Ray, 2 workers"] = _started(two)
        try:
            swept["Ray, 2 workers"] = [_swept(two, shards)]
        finally:
            two.shutdown()
    finally:
        if started:
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
    ray_over_local = statistics.median(r / l for r, l in zip(swept["Ray, 1 worker"], swept["local (in-process)"]))
    print(f"## Ray overhead: {s.name}, backup sweep of {len(heads)} heads (layers {layers}) in {len(shards)} "
          f"shards, {task.n_prompts} prompts x {task.clean.shape[1]} tokens, {os.cpu_count()} cores")
    print(f"Ray itself started in {ray_start:.1f} s; start-up below is the workers' (each loads the model); "
          f"the first run of each includes the worker's clean state")
    print_table(["executor", "start-up s", "sweep s, each run"], [
        [name, f"{up[name]:.1f}", ", ".join(f"{t:.2f}" for t in swept[name])] for name in up])
    print(f"Ray 1 worker over local, median of the alternating pairs: {ray_over_local:.3f}")
    one_over_two = swept["Ray, 1 worker"][0] / swept["Ray, 2 workers"][0]  # first runs: clean state in both
    print(f"throughput, 2 workers over 1: {one_over_two:.2f}x "
          f"(both share {os.cpu_count()} cores here)\n")
    return [
        Ratio("ray", "Ray 1 worker sweep / local sweep", ray_over_local, "<= 1.1"),
        Ratio("ray", "throughput 2 workers / 1 worker", one_over_two),
    ]
