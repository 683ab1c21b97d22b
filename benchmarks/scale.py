"""Scale sweep: cost per (node, scale, pair) against one pair's forward, and against the usual scale-ablation loop's loop.

- forward: one plain forward of the batch to logits, divided by its prompts (the forward of
  one pair's patched prompt);
- engine: ``ScaleJob.run_node`` over every scale and pair, nodes at evenly spaced layers,
  on the text task (every position is an answer: the read-out needs the whole vocabulary
  at every position) and on IOI (one answer position per prompt). Rows with equal patches
  share a restart (scale 0 ignores the source), so the restarts a row are reported too:
  the engine's cost per row is about the cost per restart times that;
- notebook-style: the usual scale-ablation loop's loop, one source ``run_with_cache`` and one hooked full forward
  per node, scale and batch of pairs.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from benchmarks.backup import sample_layers
from benchmarks.common import Ratio, Setup, counted_flops, forward_logits, print_timings, timed
from sweeps.core.nodes import Node
from sweeps.jobs.scale import ScaleJob, make_pairs
from tasks import TaskSpec, build_task
from tasks.base import TaskData

SCALES = [0.0, 0.5, 1.0, 2.0, 5.0, 10.0]


def hooked_loop_node(bridge, task, pairs: torch.Tensor, node: Node, scale: float) -> torch.Tensor:
    """The hooked reference recipe for one (node, scale) and one batch of pairs: the source batch's
    full activation cache, then a hooked full forward of the base batch; top-1 tokens."""
    name = f"blocks.{node.layer}.hook_mlp_out" if node.head is None else f"blocks.{node.layer}.attn.hook_result"
    _, cache = bridge.run_with_cache(task.clean[pairs[:, 1]])
    source = cache[name]

    def patch(act, hook):
        act = act.clone()
        if node.head is None:
            act[:] = scale * source
        else:
            act[:, :, node.head] = scale * source[:, :, node.head]
        return act

    with bridge.hooks(fwd_hooks=[(name, patch)]):
        logits = bridge(task.clean[pairs[:, 0]])
    return logits[:, :-1].argmax(-1)


def macs_per_token(cfg) -> tuple[float, float]:
    """(one block's, the unembedding's) multiply-adds per token, from the model's shape."""
    attn = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # q, o; k, v
    mlp = 0 if cfg.attn_only else (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp
    return attn + mlp, cfg.d_model * cfg.d_vocab


def floor_ratio(cfg, nodes: list[Node], read_out: float = 1.0) -> float:
    """Multiply-adds of a restart at ``nodes`` (replayed blocks + the read-out of a
    ``read_out`` fraction of the positions) over a forward's: what restarting from the
    node cannot go under."""
    block, unembed = macs_per_token(cfg)
    replayed = sum(cfg.n_layers - n.layer - (0.5 if n.head is None else 0) for n in nodes) / len(nodes)
    return (replayed * block + read_out * unembed) / (cfg.n_layers * block + unembed)


def _per_node_scale_pair(w, task: TaskData, nodes: list[Node]) -> tuple[float, float, float, np.ndarray, int]:
    """(one prompt's forward to logits, the engine per (node, scale, pair), their ratio, the
    pairs, the restarts a node needed: rows with equal patches share one, see
    scaling.distinct_restarts).

    Each node's restarts are timed right after a forward of the batch and the ratio is taken
    per node, then averaged: this machine's speed drifts over a minute, and a forward timed
    once for all four nodes made the ratio swing with it (0.45 to 0.65 across runs)."""
    n = task.n_prompts
    pairs = make_pairs(task, "all", n // 2, 0, False)  # 6 scales x n/2 pairs: one restart pass a node
    rows = len(SCALES) * len(pairs)
    computer = ScaleJob(task, pairs, batch_size=n).bind(w)
    computer.groups()  # the clean state: once per sweep
    forward_logits(w, task.clean)  # warm-up
    forwards, engines, restarts = [], [], []
    for node in nodes:
        forwards.append(timed(lambda: forward_logits(w, task.clean)) / n)
        engines.append(timed(lambda nd=node: restarts.append(computer.run_node(nd, SCALES).n_restarts)) / rows)
    ratio = statistics.mean(e / f for f, e in zip(forwards, engines))
    return statistics.median(forwards), statistics.mean(engines), ratio, pairs, restarts[0]


def counted_ratio(w, task: TaskData, nodes: list[Node]) -> float:
    """The engine's FLOPs per restart over one prompt's forward's, as torch counts them, on
    the first 4 prompts (2 pairs; every count is linear in restarts)."""
    small = task.select(slice(0, min(4, task.n_prompts)))
    computer = ScaleJob(small, make_pairs(small, "all", 2, 0, False), batch_size=small.n_prompts).bind(w)
    computer.groups()  # the clean state: not per (node, scale, pair)
    restarts = []
    engine = sum(counted_flops(lambda nd=nd: restarts.append(computer.run_node(nd, SCALES).n_restarts))
                 for nd in nodes)
    forward = counted_flops(lambda: forward_logits(w, small.clean)) / small.n_prompts
    return engine / sum(restarts) / forward


def run(s: Setup) -> list[Ratio]:
    w, task, bridge = s.weights, s.task, s.bridge
    layers = sample_layers(w.cfg.n_layers, 3)  # first, middle, last: their mean restart is a sweep's
    nodes = [Node(l, 0) for l in layers] + [Node(layers[len(layers) // 2], None)]
    forward, engine, ratio, pairs, restarts = _per_node_scale_pair(w, task, nodes)
    batch = torch.as_tensor(pairs)
    # The hooked loop costs two full forwards whatever the node: one node is enough to time.
    hooked = timed(lambda: hooked_loop_node(bridge, task, batch, nodes[0], 2.0)) / len(pairs)
    # A task with one answer position per prompt: the read-out is that position only.
    ioi = build_task(TaskSpec("ioi"), bridge.tokenizer, n_prompts=task.n_prompts)
    ioi_forward, ioi_engine, ioi_ratio, ioi_pairs, ioi_restarts = _per_node_scale_pair(w, ioi, nodes)
    ioi_tokens = ioi.lengths.float().mean().item()
    print(f"## scale sweep: {s.name}, {len(pairs)} pairs of {task.clean.shape[1]}-token prompts (text: every "
          f"position is read out), {len(SCALES)} scales, heads and MLPs at layers {layers}")
    print_timings([
        ("forward of one prompt to logits (the unit)", forward),
        ("engine, per (node, scale, pair)", engine),
        ("notebook-style, per (node, scale, pair)", hooked),
    ], forward, digits=5)
    rows = len(SCALES) * len(pairs)
    print(f"engine per (node, scale, pair) / the forward timed just before it, mean over the nodes: {ratio:.3f}")
    floor, counted = floor_ratio(w.cfg, nodes), counted_ratio(w, task, nodes)
    print(f"restarts per node: {restarts} for its {rows} (scale, pair) rows: at scale 0 the patch ignores the source, "
          f"so the pairs of one base share a restart (scaling.distinct_restarts)")
    print(f"per restart, over a forward's: multiply-adds (replayed blocks + read-out of every position) {floor:.2f}, "
          f"the engine's FLOPs as torch counts them {counted:.2f}; times {restarts}/{rows} restarts a row: "
          f"{floor * restarts / rows:.2f} and {counted * restarts / rows:.2f}")
    print(f"engine speed-up over notebook-style per (node, scale, pair): {hooked / engine:.2f}x")
    print(f"\nthe same nodes on IOI: {len(ioi_pairs)} pairs of equal-length prompts ({ioi_tokens:.1f} tokens on "
          f"average), one answer position each")
    print_timings([
        ("forward of one prompt to logits (the unit)", ioi_forward),
        ("engine, per (node, scale, pair)", ioi_engine),
    ], ioi_forward, digits=5)
    print(f"engine per (node, scale, pair) / the forward timed just before it, mean over the nodes: {ioi_ratio:.3f}")
    ioi_rows = len(SCALES) * len(ioi_pairs)
    ioi_floor = floor_ratio(w.cfg, nodes, read_out=1 / ioi_tokens)
    print(f"restarts per node: {ioi_restarts} for its {ioi_rows} rows; multiply-adds per restart (replayed blocks "
          f"+ read-out of the answer position) over a forward's: {ioi_floor:.2f}, times the restarts a row: "
          f"{ioi_floor * ioi_restarts / ioi_rows:.2f}\n")
    return [
        Ratio("scale", "text: engine per (node, scale, pair) / forward", ratio, "<= 0.6"),
        Ratio("scale", "text: restarts per (node, scale, pair)", restarts / rows),
        Ratio("scale", "text: multiply-adds per restart / forward's", floor),
        Ratio("scale", "text: engine's counted FLOPs per restart / forward's", counted),
        Ratio("scale", "IOI: engine per (node, scale, pair) / forward", ioi_ratio, "<= 0.6"),
        Ratio("scale", "IOI: restarts per (node, scale, pair)", ioi_restarts / ioi_rows),
        Ratio("scale", "IOI: multiply-adds per restart / forward's", ioi_floor),
        Ratio("scale", "notebook-style / engine, per (node, scale, pair)", hooked / engine),
    ]
