"""Sweep speed, as ratios measured side by side in one process.

    python -m benchmarks            # SmolLM2-135M, text task, 32 prompts x 64 tokens
    python -m benchmarks --quick    # tiny-llama, 8 x 32 (a smoke test for CI)

Backup sweep, three timings on the same batch:
- forward: one clean forward of the batch with our forward (the unit);
- engine: the sweep's cost per upstream head (heads of one layer ablated in one
  batched restart from that layer), averaged over evenly spaced layers so it
  estimates the mean over a whole sweep;
- seed-style: seed 000's recipe per head: a full hooked forward through the
  TransformerLens bridge with a full activation cache, then every head's
  direct effect from the stacked ``hook_result``s.

Scale sweep (``benchmarks/scale.py``), per (node, scale, pair) on the same prompts:
- forward: one clean forward of the batch, divided by its prompts (one pair's forward);
- engine: ``ScaleComputer.run_node`` over every scale and pair, nodes at evenly
  spaced layers;
- seed-style: seed 004's loop, one source ``run_with_cache`` and one hooked full
  forward per node, scale and batch of pairs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sweeps.engine import models
from sweeps.engine import transformer as tf
from sweeps.engine.backup_sweep import BackupComputer
from tasks import TaskSpec, build_task


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seed_style_head(bridge, task, points, scale, clean_de, corrupt_z, layer: int, head: int) -> torch.Tensor:
    """One head the way seed 000 does it: full forward, full cache, stacked head results."""
    name = f"blocks.{layer}.attn.hook_z"

    def patch(z, hook):
        z = z.clone()
        z[:, :, head] = corrupt_z[:, :, head]
        return z

    with bridge.hooks(fwd_hooks=[(name, patch)]):
        _, cache = bridge.run_with_cache(task.clean)
    results = torch.stack([cache[f"blocks.{l}.attn.hook_result"] for l in range(bridge.cfg.n_layers)])
    picked = results[:, points.batch, points.pos]  # [L, P, H, D]
    ablated = torch.einsum("lphd,pd->lph", picked, points.u) / scale[None, :, None]
    return (ablated - clean_de)[layer + 1 :].sum((0, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, small batch (CI smoke test)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    name, n, T, repeat = ("tiny-llama", 8, 32, 2) if args.quick else ("smollm2-135m", 32, 64, 3)

    info = models.describe_model(name)
    bridge = models.load_bridge(info)
    bridge.set_use_attn_result(True)
    w = models.weights_from_bridge(bridge)
    task = build_task(TaskSpec("text"), bridge.tokenizer, n_prompts=n, seq_len=T)
    L, H = w.cfg.n_layers, w.cfg.n_heads

    forward = timed(lambda: tf.run(w, task.clean), repeat)

    computer = BackupComputer(w, task, "resample", batch_size=n)
    computer.batches()  # the clean state: computed once per sweep, not per head
    layers = sorted({round(i * (L - 1) / 4) for i in range(5)})
    engine = statistics.mean(timed(lambda l=l: computer.run_heads(l, list(range(H))), 1) / H for l in layers)

    state = computer.batches()[0]
    clean_de = state.de_heads
    corrupt_z = state.replacement_z
    seed_layers = [layers[0], layers[len(layers) // 2]]
    seed = statistics.mean(
        timed(lambda l=l: seed_style_head(bridge, task, state.points, state.scale, clean_de, corrupt_z[l], l, 0), 1)
        for l in seed_layers
    )
    # same numbers from both paths (the tests check this to 1e-4 too)
    [engine_result] = computer.run_heads(seed_layers[0], [0])
    seed_result = seed_style_head(bridge, task, state.points, state.scale, clean_de,
                                  corrupt_z[seed_layers[0]], seed_layers[0], 0)
    max_diff = float((torch.as_tensor(engine_result.backup) - seed_result.double()).abs().max())

    print(f"backup sweep benchmark: {name} ({L} layers x {H} heads), text task {n} prompts x {T} tokens, "
          f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")
    rows = [
        ("clean forward (our forward)", forward, 1.0),
        ("engine, per upstream head (sweep mean)", engine, engine / forward),
        ("seed-style, per upstream head", seed, seed / forward),
    ]
    print(f"{'measure':<42}{'seconds':>10}{'x forward':>11}")
    for label, seconds, ratio in rows:
        print(f"{label:<42}{seconds:>10.4f}{ratio:>11.2f}")
    print(f"engine speed-up over seed-style per head: {seed / engine:.2f}x "
          f"(whole sweep of {L * H} heads: ~{engine * L * H:.0f} s vs ~{seed * L * H:.0f} s)")
    print(f"max |engine - seed-style| accumulated backup: {max_diff:.2e}")
    print()
    from benchmarks.scale import scale_benchmark

    scale_benchmark(bridge, w, task, name, repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
