"""How large a job's passes are: the planner's estimate (``core/footprint.py``) against the
memory its device has, before the first pass.

Every job sizes its passes from a default (``chunking.tokens_per_pass``: tokens a restart
pass holds; attribution's bytes a pass holds) times a ``pass_fraction``. At bind time a job
estimates, from its model's shape and its own settings, the clean state it will keep and the
transient memory of one pass, and halves the fraction until they fit what its device has
beside the weights: ``--memory-budget`` when given, else a GPU's free memory or a CPU's
available memory. Out-of-memory halving (``chunking.map_chunks``) stays as the safety net
for what the estimate misses.

``estimate`` is the one mapping from a sweep's settings to its footprint: ``interp-sweeps
plan`` calls it with the command's options, a job with its own fields.
"""

from __future__ import annotations

import sys
from typing import Any

from sweeps.core import footprint as F

# Attribution's bytes a pass holds, at pass_fraction 1 (``jobs.attribution.prompts_per_pass``).
ATTRIBUTION_PASS_BYTES = {"cuda": 8 << 30, "cpu": 2 << 30}
# Of a device's free memory, what a job plans to use: the rest is slack for what the estimate
# does not count (the allocator's rounding, a worker's fixed costs).
USABLE = 0.85
# A pass is never made smaller than this fraction of the default (one copy of a batch is
# already the least a pass can be; the halving stops there).
LEAST_FRACTION = 1 / 1024


def estimate(
    sweep: str,
    shape: F.ModelShape,
    n_prompts: int,
    seq_len: int,
    dtype_bytes: int,
    device_type: str,
    options: dict[str, Any],
    fraction: float = 1.0,
) -> F.Footprint:
    """The footprint of ``sweep`` with ``options`` (its command's option names), its passes at
    ``fraction`` of their default size on a ``device_type`` ("cuda" or "cpu") device."""
    import torch

    from sweeps.runtime.chunking import tokens_per_pass

    tokens = max(1, int(tokens_per_pass(torch.device(device_type)) * fraction))
    L, H = shape.n_layers, shape.n_heads
    if sweep == "backup":
        return F.backup(
            shape,
            n_prompts,
            seq_len,
            int(options.get("batch_size", 32)),
            dtype_bytes,
            tokens,
            int(options.get("heads", L * H)),
            str(options.get("ablation", "resample")),
            points_per_prompt=int(options.get("points_per_prompt", 1)),
        )
    if sweep == "scale":
        return F.scale(
            shape,
            n_prompts,
            seq_len,
            dtype_bytes,
            tokens,
            int(options.get("nodes", L * (H + 1))),
            int(options.get("rows_per_node", 1)),
            bool(options.get("corrupt_source", False)),
        )
    if sweep == "attribution":
        budget = int(ATTRIBUTION_PASS_BYTES.get(device_type, ATTRIBUTION_PASS_BYTES["cpu"]) * fraction)
        return F.attribution(
            shape,
            n_prompts,
            seq_len,
            int(options.get("batch_size", 32)),
            dtype_bytes,
            int(options.get("steps", 1)),
            max(1, budget),
        )
    if sweep == "circuit":
        return F.circuit(shape, n_prompts, seq_len, dtype_bytes, int(options.get("circuits", 16)), tokens)
    raise ValueError(f"no estimate for sweep {sweep!r}")


def device_budget(device, memory_budget: float | None, weight_bytes: int) -> int:
    """Bytes a job may use beside its weights: ``memory_budget`` (bytes, the weights included)
    when given, else ``USABLE`` of a GPU's free memory (its weights are already allocated) or
    of a CPU's available memory."""
    if memory_budget is not None:
        return int(memory_budget) - weight_bytes
    if device.type == "cuda":  # free memory and what torch holds cached but unused, as the chunks' gauge reads it
        from sweeps.runtime.chunking import CudaGauge

        return CudaGauge(device, USABLE).budget()
    return int(USABLE * available_memory())


def available_memory() -> int:
    """This machine's available memory (``MemAvailable``), or 8 GB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 10**9


def fit_fraction(footprint_at, budget: int) -> float:
    """The largest ``1 / 2**k`` at which the clean state and one pass fit ``budget``
    (``footprint_at(fraction) -> Footprint``): 1 when the default fits, and also when not even
    the least pass fits (halving cannot help; out-of-memory halving is left to say so); else
    halved until it fits or the pass is the least there is."""
    fp = footprint_at(1.0)
    if fp.clean_bytes + fp.pass_bytes <= budget or fp.clean_bytes + fp.least_pass_bytes > budget:
        return 1.0
    fraction = 1.0
    while fraction > LEAST_FRACTION:
        fraction /= 2
        fp = footprint_at(fraction)
        if fp.clean_bytes + fp.pass_bytes <= budget or fp.pass_bytes <= fp.least_pass_bytes:
            break
    return fraction


def note(fraction: float, budget: int) -> None:
    """Say, once, that the passes were made smaller to fit."""
    if fraction < 1.0:
        print(
            f"note: passes at 1/{round(1 / fraction)} of their default size, to fit the {budget / 1e9:.2f} GB "
            "this run has beside its weights (the plan's estimate)",
            file=sys.stderr,
        )
