"""Reduced precision: the dtypes a model may run in, and what a sum in each can be trusted to.

A model runs in one dtype (``--dtype``): its weights and the activations of its forward.
Everything that sums many terms is read in float32 (``reading``): direct effects are
projected onto ``u / s`` in float32, norms take their mean squares in float32 and the
metric (logit differences, log-probabilities) is formed in float32, as the Hugging Face
implementations do for norms and softmax. So the sums the sweeps rely on (components add
up to the logit difference; own change + heads + MLPs + final norm = total effect; the
empty and full circuits are the corrupt and clean runs) hold to float32's precision over
values that each carry one rounding of the model's dtype: their tolerance is
``unit_roundoff(dtype)`` times the size of the values summed (``sum_tolerance``).

Plain functions; no Ray, no I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,  # the exact reference (the default)
    "bfloat16": torch.bfloat16,  # float32's range, 8 bits of mantissa: what large models ship in
    "float16": torch.float16,  # 11 bits of mantissa, a range of ±65504
}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def name_of(dtype: torch.dtype) -> str:
    """The ``--dtype`` name of a torch dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no --dtype runs in {dtype}")


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the gap between 1 and the next number: the largest relative error of one rounding."""
    return float(torch.finfo(dtype).eps) / 2


def sum_tolerance(dtype: torch.dtype, scale: float, depth: int) -> float:
    """A bound on how far a sum identity may miss in ``dtype``: ``depth`` roundings (the
    layers a value passed through, each adding its own) of values of size ``scale``. In
    float32 this is far below what any test needs; in bfloat16 it is what one rounding per
    layer of the stream explains."""
    return unit_roundoff(dtype) * scale * max(1, depth)


def reading(x: Tensor) -> Tensor:
    """``x`` in float32 for a sum (the same tensor when it is float32 already)."""
    return x.float()
