"""Backup sweep: cost per upstream head against one forward pass, and against the usual hooked recipe.

Three timings on the same batch:
- forward: one plain forward of the batch to logits with our forward (the unit);
- engine: the sweep's cost per upstream head (all heads of a layer ablated in one
  batched restart from that layer), averaged over the two middle layers: a
  restart's cost is linear in the layers after it (the growth section shows it),
  so that is a whole sweep's mean; its ratio to the forward is taken against a
  forward timed just before each layer's restart;
- notebook-style: the usual hooked recipe per head: a full hooked forward through the
  TransformerLens bridge with a full activation cache, then every head's direct
  effect from the stacked ``hook_result``s.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import Ratio, Setup, forward_logits, print_timings, timed
from sweeps.jobs.backup import BackupJob


def hooked_loop_head(bridge, task, points, scale, clean_de, corrupt_z, layer: int, head: int) -> torch.Tensor:
    """One head the way a hooked notebook loop does it: full forward, full cache, stacked head results."""
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


def middle_layers(n_layers: int) -> list[int]:
    """The layers on either side of the middle, ``(L - 1) / 2``: a restart's cost is linear
    in the layers after it, so the mean over these two is the mean over a whole sweep."""
    return sorted({(n_layers - 1) // 2, n_layers // 2})


def sample_layers(n_layers: int, k: int) -> list[int]:
    """``k`` evenly spaced layers, first and last included: a restart's cost is linear in
    the layers after it, so their mean is a whole sweep's."""
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def run(s: Setup) -> list[Ratio]:
    w, task, bridge = s.weights, s.task, s.bridge
    L, H, n = w.cfg.n_layers, w.cfg.n_heads, task.n_prompts
    bridge_forward = timed(lambda: bridge(task.clean), warmup=True)

    computer = BackupJob(task, "resample", batch_size=n).bind(w)
    state_seconds = timed(computer.batches)  # the clean state: computed once per sweep, not per head
    layers = middle_layers(L)
    # Each layer's restart is timed right after a forward, and the ratio taken per pair: this
    # machine's slow spells (seconds to minutes) then hit both sides of a ratio alike. The
    # forward is warmed first: its first call after other work page-faults a fresh logits tensor.
    # The self-repair decomposition's cost: the same heads without it, timed beside each layer's.
    bare = BackupJob(task, "resample", batch_size=n, self_repair=False).bind(w)
    bare._batches = computer.batches()  # the same clean state
    paired_forwards, per_head, without = [], [], []
    for layer in layers:
        paired_forwards.append(timed(lambda: forward_logits(w, task.clean), warmup=True))
        per_head.append(timed(lambda: computer.run_heads(layer, list(range(H)))) / H)
        without.append(timed(lambda: bare.run_heads(layer, list(range(H)))) / H)
    forward = statistics.median(paired_forwards)
    engine = statistics.mean(per_head)
    engine_ratio = statistics.mean(h / f for h, f in zip(per_head, paired_forwards))
    repair_ratio = statistics.mean(h / b for h, b in zip(per_head, without))

    # the hooked reference recipe costs a full forward whatever the head, so one head is enough to time;
    # its numbers are checked against the engine's (the tests check this too).
    state = computer.batches()[0]
    layer = layers[len(layers) // 2]
    hooked_result = None

    def hooked_head():
        nonlocal hooked_result
        hooked_result = hooked_loop_head(bridge, task, state.points, state.scale, state.de_heads,
                                      state.replacement_z[layer], layer, 0)

    hooked = timed(hooked_head)
    [engine_result] = computer.run_heads(layer, [0])
    hooked_backup = hooked_result.double()
    max_diff = float((torch.as_tensor(engine_result.backup) - hooked_backup).abs().max())
    relative = max_diff / max(float(hooked_backup.abs().max()), 1e-12)

    print(f"## backup sweep: {s.name} ({L} layers x {H} heads), text task, {s.shape}")
    print_timings([
        ("forward to logits (our forward; the unit)", forward),
        ("forward to logits (TransformerLens bridge)", bridge_forward),
        ("clean state, once per sweep", state_seconds),
        ("engine, per upstream head (sweep mean)", engine),
        ("engine without the self-repair decomposition, per head", statistics.mean(without)),
        ("notebook-style, per upstream head", hooked),
    ], forward)
    print(f"engine per head / the forward timed just before it, mean over layers {layers}: {engine_ratio:.3f}")
    print(f"engine speed-up over notebook-style per head: {hooked / engine:.2f}x (a whole sweep of {L * H} heads: "
          f"~{state_seconds + engine * L * H:.0f} s vs ~{hooked * L * H:.0f} s)")
    print(f"max |engine - notebook-style| accumulated backup of L{layer}H0: {max_diff:.2e} "
          f"({relative:.1e} of the largest |backup|; float32 sums in a different order)\n")
    return [
        Ratio("backup", "engine per head / forward", engine_ratio, "<= 0.5"),
        Ratio("backup", "per head with / without the self-repair decomposition", repair_ratio, "<= 1.05"),
        Ratio("backup", "notebook-style per head / engine per head", hooked / engine, ">= 2.5"),
        Ratio("backup", "max |engine - notebook-style| / max |backup|", relative, "<= 1e-3"),
    ]
