"""Scale-sweep speed per (node, scale, pair): the engine against seed 004's loop."""

from __future__ import annotations

import statistics
import time

import torch

from sweeps.engine import transformer as tf
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


def scale_benchmark(bridge, w, task, name: str, repeat: int) -> None:
    n = task.n_prompts
    L = w.cfg.n_layers
    pairs = make_pairs(task, "all", n, 0, False)  # as many pairs as prompts: one batch
    forward = statistics.median(_time(lambda: tf.run(w, task.clean)) for _ in range(repeat)) / n
    computer = ScaleComputer(w, task, pairs, batch_size=n)
    computer.groups()  # the clean state: once per sweep
    layers = sorted({round(i * (L - 1) / 4) for i in range(5)})
    nodes = [Node(l, 0) for l in layers] + [Node(layers[len(layers) // 2], None)]
    engine = statistics.mean(_time(lambda nd=nd: computer.run_node(nd, SCALES)) for nd in nodes)
    engine /= len(SCALES) * len(pairs)
    batch = torch.as_tensor(pairs)
    seed = statistics.mean(_time(lambda nd=nd: seed_style_node(bridge, task, batch, nd, 2.0))
                           for nd in nodes[:2]) / len(pairs)
    print(f"scale sweep benchmark: {name}, {len(pairs)} pairs of {task.clean.shape[1]}-token prompts, "
          f"{len(SCALES)} scales, nodes at layers {layers}")
    print(f"{'measure':<42}{'seconds':>10}{'x forward':>11}")
    for label, seconds in [("forward of one pair (batched)", forward),
                           ("engine, per (node, scale, pair)", engine),
                           ("seed-style, per (node, scale, pair)", seed)]:
        print(f"{label:<42}{seconds:>10.5f}{seconds / forward:>11.2f}")
    print(f"engine speed-up over seed-style per (node, scale, pair): {seed / engine:.2f}x")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
