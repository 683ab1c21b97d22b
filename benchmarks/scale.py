"""Scale sweep: cost per (node, scale, pair) against one pair's forward, and against seed 004's loop.

- forward: one plain forward of the batch to logits, divided by its prompts (one pair's forward);
- engine: ``ScaleComputer.run_node`` over every scale and pair, nodes at evenly spaced layers;
- seed-style: seed 004's loop, one source ``run_with_cache`` and one hooked full forward
  per node, scale and batch of pairs.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.backup import sample_layers
from benchmarks.common import Ratio, Setup, forward_logits, print_timings, timed
from sweeps.engine.nodes import Node
from sweeps.engine.scale_sweep import ScaleComputer, make_pairs

SCALES = [0.0, 0.5, 1.0, 2.0, 5.0, 10.0]


def seed_style_node(bridge, task, pairs: torch.Tensor, node: Node, scale: float) -> torch.Tensor:
    """Seed 004's recipe for one (node, scale) and one batch of pairs: the source batch's
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


def floor_ratio(cfg, nodes: list[Node]) -> float:
    """Multiply-adds of a restart at ``nodes`` (replayed blocks + the full read-out) over a forward's:
    what restarting from the node, with every position read out, cannot go under."""
    block, unembed = macs_per_token(cfg)
    replayed = sum(cfg.n_layers - n.layer - (0.5 if n.head is None else 0) for n in nodes) / len(nodes)
    return (replayed * block + unembed) / (cfg.n_layers * block + unembed)


def run(s: Setup) -> list[Ratio]:
    w, task, bridge = s.weights, s.task, s.bridge
    n = task.n_prompts
    pairs = make_pairs(task, "all", n, 0, False)  # as many pairs as prompts: one batch
    forward = timed(lambda: forward_logits(w, task.clean), s.repeat, warmup=True) / n
    computer = ScaleComputer(w, task, pairs, batch_size=n)
    computer.groups()  # the clean state: once per sweep
    layers = sample_layers(w.cfg.n_layers)
    nodes = [Node(l, 0) for l in layers] + [Node(layers[len(layers) // 2], None)]
    engine = statistics.mean(timed(lambda nd=nd: computer.run_node(nd, SCALES)) for nd in nodes)
    engine /= len(SCALES) * len(pairs)
    batch = torch.as_tensor(pairs)
    seed = statistics.mean(timed(lambda nd=nd: seed_style_node(bridge, task, batch, nd, 2.0))
                           for nd in (nodes[0], nodes[len(layers) // 2])) / len(pairs)
    print(f"## scale sweep: {s.name}, {len(pairs)} pairs of {task.clean.shape[1]}-token prompts, "
          f"{len(SCALES)} scales, heads and MLPs at layers {layers}")
    print_timings([
        ("forward of one pair to logits (the unit)", forward),
        ("engine, per (node, scale, pair)", engine),
        ("seed-style, per (node, scale, pair)", seed),
    ], forward, digits=5)
    floor = floor_ratio(w.cfg, nodes)
    print(f"multiply-adds of these restarts (replayed blocks + read-out of every position) over a forward's: "
          f"{floor:.2f} (the design's floor)")
    print(f"engine speed-up over seed-style per (node, scale, pair): {seed / engine:.2f}x\n")
    return [
        Ratio("scale", "engine per (node, scale, pair) / forward of a pair", engine / forward, "<= 0.6"),
        Ratio("scale", "same restarts' multiply-adds / a forward's (floor)", floor),
        Ratio("scale", "seed-style / engine, per (node, scale, pair)", seed / engine),
    ]
