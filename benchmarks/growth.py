"""How a backup sweep's cost grows with layers, heads, prompts and tokens.

Per-head cost is measured as the sweep runs it (all heads of a layer in one
batched restart) at the two middle layers, whose mean is a whole sweep's mean
(a restart from layer l costs about L - l blocks). A whole sweep is
then about: clean state + per-head cost x L x H, i.e. it grows as L^2 x H in
the model's shape and linearly in prompts x tokens.
"""

from __future__ import annotations

import statistics

from benchmarks.backup import middle_layers
from benchmarks.common import Ratio, forward_logits, print_table, timed
from sweeps.jobs.backup import BackupJob
from sweeps.runtime import loading, models
from tasks import TaskSpec, build_task


def per_head(w, task) -> tuple[float, float]:
    """(clean-state seconds, mean seconds per upstream head)."""
    H = w.cfg.n_heads
    computer = BackupJob(task, "resample", batch_size=task.n_prompts).bind(w)
    state = timed(computer.batches)
    head = statistics.mean(timed(lambda l=l: computer.run_heads(l, list(range(H)))) / H
                           for l in middle_layers(w.cfg.n_layers))
    return state, head


def run(weights_by_name: dict, tokenizer, shape: tuple[int, int], prompts: list[int], tokens: list[int],
        grow_on: str) -> list[Ratio]:
    n0, t0 = shape
    print(f"## cost growth: backup sweep, text task ({n0} prompts x {t0} tokens unless varied)")
    rows = []
    for name, w in weights_by_name.items():
        c = w.cfg
        task = build_task(TaskSpec("text"), tokenizer, n_prompts=n0, seq_len=t0)
        forward = timed(lambda: forward_logits(w, task.clean), warmup=True)
        state, head = per_head(w, task)
        rows.append([name, c.n_layers, c.n_heads, c.d_model, f"{forward:.3f}", f"{head:.4f}", f"{head / forward:.2f}",
                     c.n_layers * c.n_heads, f"{state + head * c.n_layers * c.n_heads:.1f}"])
    print_table(["model", "layers", "heads", "d_model", "forward s", "per head s", "x forward", "heads",
                 "sweep s (est.)"], rows)

    w = weights_by_name[grow_on]
    table, seconds = [], {}
    for n, t in [*((p, t0) for p in prompts), *((n0, t) for t in tokens if t != t0)]:
        task = build_task(TaskSpec("text"), tokenizer, n_prompts=n, seq_len=t)
        _, head = per_head(w, task)
        seconds[n, t] = head
        table.append([f"{n} x {t}", n * t, f"{head:.4f}"])
    base = seconds[n0, t0]
    for row, key in zip(table, seconds):
        row.append(f"{seconds[key] / base:.2f}")
        row.append(f"{row[1] / (n0 * t0):.2f}")
    print(f"\n{grow_on}, per-head cost against prompts x tokens:")
    print_table(["prompts x tokens", "tokens", "per head s", "growth", "tokens growth"], table)
    print()
    n_big, t_big = max(prompts), max(tokens)
    ratios = []
    if (n_big, t0) in seconds:
        ratios.append(Ratio("growth", f"per-head cost growth / prompts growth ({n0}->{n_big})",
                            seconds[n_big, t0] / base / (n_big / n0)))
    if (n0, t_big) in seconds:
        ratios.append(Ratio("growth", f"per-head cost growth / tokens growth ({t0}->{t_big})",
                            seconds[n0, t_big] / base / (t_big / t0)))
    return ratios


def load_weights(names: list[str]) -> dict:
    out = {}
    for name in names:
        bridge, unfoldable = loading.load_bridge(models.describe_model(name), with_spec=True)
        out[name] = loading.weights_from_bridge(bridge, unfoldable)
        del bridge
    return out
