"""Attribution sweep: the whole dataset's node and edge scores against one clean forward of it.

- forward: one plain forward of the dataset to logits (the unit);
- floor: what any gradient attribution needs, one clean forward and backward (to the
  embeddings, through every block) and one corrupt forward, with plain autograd, in
  passes of as many prompts as the engine's (one pass of the whole dataset is slower
  on a CPU: its activations stop fitting the caches);
- engine: ``AttributionJob`` over every prompt, every node and every edge (q, k, v per
  head, MLP inputs, the final stream), as the sweep runs it.

Beside the timings, the FLOPs torch counts (``counted_flops``) for the floor and the
engine over a forward's, on two of the prompts (every count is linear in prompts):
what each timing ratio would be if every operation ran as fast as the forward's.
The engine's count is the floor's 3 forwards plus the edge products, the downstream
rows and the upstream changes (about 0.5 of a forward on SmolLM2).
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import Ratio, Setup, counted_flops, forward_logits, print_timings, timed
from sweeps.engine import transformer as tf
from sweeps.engine.attribution import build_graph
from sweeps.engine.attribution_sweep import AttributionJob, AttributionShard, prompts_per_pass


class _Model:
    def __init__(self, weights):
        self.weights = weights


def _floor(w: tf.ModelWeights, task, per_pass: int) -> None:
    for start in range(0, task.n_prompts, per_pass):
        _floor_pass(w, task.select(slice(start, start + per_pass)))


def _floor_pass(w: tf.ModelWeights, task) -> None:
    with torch.no_grad():
        forward_logits(w, task.corrupt)
    with torch.enable_grad():
        embedded = tf.embed(w, task.clean).requires_grad_(True)
        logits = tf.unembed(w, tf.run_blocks(w, 0, embedded, tf.rotary_tables(w, task.clean.shape[1])))
        logits.log_softmax(-1).amax(-1).sum().backward()


def run(s: Setup, rounds: int = 3) -> list[Ratio]:
    w, task = s.weights, s.task
    graph = build_graph(w.cfg)
    per_pass = prompts_per_pass(task, graph, w.cfg, w.device)
    job = AttributionJob(task)
    job.bind(_Model(w))
    # Each of the floor and the engine is timed right after a forward of the dataset, and
    # the ratios are taken per pair (this machine's speed drifts over a minute).
    forward_logits(w, task.clean)  # warm-up
    pairs: dict[str, list[tuple[float, float]]] = {"floor": [], "engine": []}
    for _ in range(rounds):
        for name, fn in (("floor", lambda: _floor(w, task, per_pass)),
                         ("engine", lambda: job.run_shard(AttributionShard(0, task.n_prompts)))):
            pairs[name].append((timed(lambda: forward_logits(w, task.clean)), timed(fn)))
    two = task.select(slice(0, min(2, task.n_prompts)))
    unit = counted_flops(lambda: forward_logits(w, two.clean))
    floor_flops = counted_flops(lambda: _floor_pass(w, two)) / unit
    engine_flops = counted_flops(lambda: job.run_shard(AttributionShard(0, two.n_prompts))) / unit
    forward = statistics.median(f for pair in pairs.values() for f, _ in pair)
    floor, engine = (statistics.median(t for _, t in pairs[name]) for name in ("floor", "engine"))
    floor_ratio, engine_ratio = (statistics.median(t / f for f, t in pairs[name]) for name in ("floor", "engine"))
    print(f"## attribution sweep: {s.name}, text task, {s.shape}; {len(graph.upstream)} upstream nodes, "
          f"{graph.n_edges} edges; passes of {per_pass} prompts")
    print_timings([
        ("forward of the dataset to logits (the unit)", forward),
        ("floor: clean forward + backward, corrupt forward", floor),
        ("engine: every node and edge, whole dataset", engine),
    ], forward)
    each = {name: ", ".join(f"{t / f:.2f}" for f, t in pairs[name]) for name in pairs}
    print(f"ratios to the forward timed just before each, median of {rounds} rounds: floor {floor_ratio:.2f} "
          f"({each['floor']}), engine {engine_ratio:.2f} ({each['engine']})")
    print(f"FLOPs torch counts, over a forward's: floor {floor_flops:.2f}, engine {engine_flops:.2f}; time over "
          f"FLOPs: floor {floor_ratio / floor_flops:.2f}, engine {engine_ratio / engine_flops:.2f}\n")
    return [
        Ratio("attribution", "engine, whole sweep / forward of the dataset", engine_ratio, "<= 3.5"),
        Ratio("attribution", "engine's counted FLOPs / forward's", engine_flops),
        Ratio("attribution", "floor (2 forwards + 1 backward) / forward", floor_ratio),
        Ratio("attribution", "engine / floor", engine_ratio / floor_ratio),
    ]
