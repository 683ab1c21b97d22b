"""Where the time goes: the torch profiler over one backup restart, one scale node and one
attribution batch (``python -m benchmarks --only profile``; not part of the default run).

Prints, per workload, the operators that take most of the time (self CPU or CUDA time).
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import Setup
from benchmarks.scale import SCALES
from sweeps.core.nodes import Node
from sweeps.jobs.attribution import AttributionJob, AttributionShard
from sweeps.jobs.backup import BackupJob
from sweeps.jobs.scale import ScaleJob, make_pairs


def _top(fn, title: str, rows: int = 8) -> None:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    print(f"### {title}")
    for e in events[:rows]:
        print(f"  {e.key:<38}{getattr(e, key) / total:>7.1%}  ({e.count} calls)")


def run(s: Setup) -> list:
    w, task = s.weights, s.task
    L, H = w.cfg.n_layers, w.cfg.n_heads
    backup = BackupJob(task, "resample", batch_size=task.n_prompts).bind(w)
    backup.batches()
    print(f"## profile: {s.name}, text task, {s.shape}")
    _top(lambda: backup.run_heads(L // 2, list(range(H))), f"backup: every head of layer {L // 2}, one restart")
    pairs = make_pairs(task, "all", task.n_prompts, 0, False)
    scale = ScaleJob(task, pairs, batch_size=task.n_prompts).bind(w)
    scale.groups()
    _top(lambda: scale.run_node(Node(L // 2, 0), SCALES), f"scale: head L{L // 2}H0 at {len(SCALES)} scales")
    job = AttributionJob(task)
    job.bind(w)
    _top(lambda: job.run_shard(AttributionShard(0, task.n_prompts)), "attribution: the whole dataset")
    print()
    return []
