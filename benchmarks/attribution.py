"""Attribution sweep: the whole dataset's node and edge scores against one clean forward of it.

- forward: one plain forward of the dataset to logits (the unit);
- floor: what any gradient attribution needs, one clean forward and backward (to the
  embeddings, through every block) and one corrupt forward, each to the task's metric
  (the read-out over the vocabulary only where the metric needs it), with plain autograd, in
  passes of as many prompts as the engine's (one pass of the whole dataset is slower
  on a CPU: its activations stop fitting the caches);
- engine: ``AttributionJob`` over every prompt, every node and every edge (q, k, v per
  head, MLP inputs, the final stream), as the sweep runs it.

Both on the text task at the benchmark's batch (every position's next token: the
read-out over the vocabulary is a fifth of a forward, in both forwards and the
backward) and on IOI (the design's metric, a logit difference at one position).

Beside the timings, the FLOPs torch counts (``counted_flops``) for the floor and the
engine over a forward's, on two of the prompts (every count is linear in prompts):
what each timing ratio would be if every operation ran as fast as the forward's.
The engine's count is the floor's 3 forwards plus the edge products and the upstream
changes, less the q/k/v projections' backward, which the downstream rows replace
(``block_backward``): about 0.4 of a forward on SmolLM2.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import Ratio, Setup, counted_flops, forward_logits, print_timings, timed
from sweeps.core import transformer as tf
from sweeps.core.attribution import build_graph, metric_terms
from sweeps.jobs.attribution import AttributionJob, AttributionShard, prompts_per_pass
from sweeps.runtime.chunking import map_chunks, memory_gauge
from tasks import TaskSpec, build_task



def _floor(w: tf.ModelWeights, task, per_pass: int) -> None:
    """In the engine's passes (``map_chunks`` with the engine's ``per_pass``)."""
    for _ in map_chunks(task.n_prompts, per_pass, lambda a, b: _floor_pass(w, task.select(slice(a, b))),
                        lambda: "out of memory in the floor's pass of one prompt", memory_gauge(w.device)):
        pass


def _floor_pass(w: tf.ModelWeights, task) -> None:
    rope = tf.rotary_tables(w, task.clean.shape[1])
    with torch.no_grad():
        _metric(w, tf.run_blocks(w, 0, tf.embed(w, task.corrupt), rope), task)
    with torch.enable_grad():
        embedded = tf.embed(w, task.clean).requires_grad_(True)
        _metric(w, tf.run_blocks(w, 0, embedded, rope), task).backward()


def _metric(w: tf.ModelWeights, resid, task):
    """A scalar as costly as the task's metric: the read-out over the vocabulary at every
    position for text; for a logit difference, a dot product at each answer position."""
    if task.kind == "logit_diff":
        return metric_terms(w, resid, task).sum()
    return tf.unembed(w, resid).log_softmax(-1).amax(-1).sum()


def _measure(w: tf.ModelWeights, task, rounds: int) -> dict:
    """The forward, the floor and the engine on ``task``, each of the floor and the engine
    timed right after a forward of the dataset, and the ratios taken per pair (this
    machine's speed drifts over a minute); FLOPs counted on two of the prompts."""
    graph = build_graph(w.cfg)
    per_pass = prompts_per_pass(task, graph, w.cfg, w.device)
    job = AttributionJob(task)
    job.bind(w)
    # Warm-ups: the forward, and one pass of the floor and of the engine. A worker's job
    # allocates its large buffers in its first pass and keeps them for all its shards;
    # unwarmed, the first round also timed that (IOI: 4.3 forwards against 3.2 in the
    # second round of the same run).
    forward_logits(w, task.clean)
    first = task.select(slice(0, min(per_pass, task.n_prompts)))
    _floor(w, first, per_pass)
    job.run_shard(AttributionShard(0, first.n_prompts))
    pairs: dict[str, list[tuple[float, float]]] = {"floor": [], "engine": []}
    for _ in range(rounds):
        for name, fn in (("floor", lambda: _floor(w, task, per_pass)),
                         ("engine", lambda: job.run_shard(AttributionShard(0, task.n_prompts)))):
            pairs[name].append((timed(lambda: forward_logits(w, task.clean)), timed(fn)))
    two = task.select(slice(0, min(2, task.n_prompts)))
    unit = counted_flops(lambda: forward_logits(w, two.clean))
    return {
        "graph": graph, "per_pass": per_pass, "pairs": pairs,
        "forward": statistics.median(f for pair in pairs.values() for f, _ in pair),
        **{name: statistics.median(t for _, t in pairs[name]) for name in pairs},
        **{f"{name}_ratio": statistics.median(t / f for f, t in pairs[name]) for name in pairs},
        "floor_flops": counted_flops(lambda: _floor_pass(w, two)) / unit,
        "engine_flops": counted_flops(lambda: job.run_shard(AttributionShard(0, two.n_prompts))) / unit,
    }


def _report(m: dict, rounds: int) -> None:
    print_timings([
        ("forward of the dataset to logits (the unit)", m["forward"]),
        ("floor: clean forward + backward, corrupt forward", m["floor"]),
        ("engine: every node and edge, whole dataset", m["engine"]),
    ], m["forward"])
    each = {name: ", ".join(f"{t / f:.2f}" for f, t in m["pairs"][name]) for name in m["pairs"]}
    print(f"ratios to the forward timed just before each, median of {rounds} rounds: floor {m['floor_ratio']:.2f} "
          f"({each['floor']}), engine {m['engine_ratio']:.2f} ({each['engine']})")
    print(f"FLOPs torch counts, over a forward's: floor {m['floor_flops']:.2f}, engine {m['engine_flops']:.2f}; "
          f"time over FLOPs: floor {m['floor_ratio'] / m['floor_flops']:.2f}, "
          f"engine {m['engine_ratio'] / m['engine_flops']:.2f}")


def run(s: Setup, rounds: int = 3) -> list[Ratio]:
    """Three rounds: the median of three drops one round caught by a slow spell (in a run
    with two, one text round was 2.82 and the other 4.41)."""
    w, task = s.weights, s.task
    text = _measure(w, task, rounds)
    # The design's metric, the logit difference at each prompt's answer position: no
    # read-out over the vocabulary, in the forwards or the backward.
    ioi_task = build_task(TaskSpec("ioi"), s.bridge.tokenizer, n_prompts=task.n_prompts)
    ioi = _measure(w, ioi_task, rounds)
    graph = text["graph"]
    print(f"## attribution sweep: {s.name}, {len(graph.upstream)} upstream nodes, {graph.n_edges} edges")
    print(f"text task, {s.shape} (the metric: every next token's log-probability); passes of "
          f"{text['per_pass']} prompts at most")
    _report(text, rounds)
    print(f"\nIOI, {ioi_task.n_prompts} prompts ({ioi_task.lengths.float().mean().item():.1f} tokens on average; "
          f"the metric: the logit difference at the answer); passes of {ioi['per_pass']} prompts at most")
    _report(ioi, rounds)
    print()
    return [
        Ratio("attribution", "text: engine, whole sweep / forward of the dataset", text["engine_ratio"], "<= 3.5"),
        Ratio("attribution", "text: engine's counted FLOPs / forward's", text["engine_flops"]),
        Ratio("attribution", "text: floor (2 forwards + 1 backward) / forward", text["floor_ratio"]),
        Ratio("attribution", "text: engine / floor", text["engine_ratio"] / text["floor_ratio"]),
        Ratio("attribution", "IOI: engine, whole sweep / forward of the dataset", ioi["engine_ratio"], "<= 3.5"),
        Ratio("attribution", "IOI: engine's counted FLOPs / forward's", ioi["engine_flops"]),
    ]
