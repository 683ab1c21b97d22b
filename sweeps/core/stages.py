"""A model replica larger than one device: its layers in contiguous stages, one per device.

``stage(weights, devices)`` splits the layers into ``len(devices)`` contiguous stages balanced
by bytes (``footprint.stages``, the planner's placement: the embedding with the first stage,
the unembedding with the last) and moves each stage's layers to its device. The forward
(``transformer.blocks``) then computes each block where its layer lives, moving the residual
stream from stage to stage; a restart from layer ``l`` touches only the stages from ``l``'s on.
Everything outside the blocks (the clean state a job keeps, direct effects, the metric) lives
on the last stage's device, the model's ``device``, and a layer's weight read there comes to
it (``transformer.LayerStack``).

The stages can share a device (every stage on the CPU): the numbers are then those of the
unstaged model exactly, which is how this is tested on a machine without GPUs.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from sweeps.core import footprint
from sweeps.core.transformer import END_FIELDS, LAYER_FIELDS, LayerStack, ModelWeights

# Where the ends of the model go: the embedding with the first stage, the rest with the last.
FIRST_STAGE = ("W_E", "W_pos")


def layer_ranges(w: ModelWeights, k: int) -> list[range]:
    """The layers of each of ``k`` stages, balanced by bytes as ``interp-sweeps plan`` places them."""
    n_ctx = 0 if w.W_pos is None else int(w.W_pos.shape[0])
    shape = footprint.shape_of_config(w.cfg, n_ctx)
    size = w.dtype.itemsize
    return [layers for layers, _ in footprint.stages(shape, k, size)]


def stage(w: ModelWeights, devices: Sequence[torch.device | str]) -> ModelWeights:
    """``w`` over ``len(devices)`` stages, stage ``s`` on ``devices[s]`` (one device: ``w`` moved there)."""
    places = [torch.device(d) for d in devices]
    if len(places) == 1:
        return w.to(places[0])
    if len(places) > w.cfg.n_layers:
        raise ValueError(f"{len(places)} stages for a model of {w.cfg.n_layers} layers")
    ranges = layer_ranges(w, len(places))
    first, home = places[0], places[-1]
    staged = copy.copy(w)
    starts = [r.start for r in ranges]
    for name in LAYER_FIELDS:
        value = getattr(w, name)
        if value is not None:
            parts = [value[r.start : r.stop].to(d) for r, d in zip(ranges, places)]
            setattr(staged, name, LayerStack(parts, starts, home))
    for name in END_FIELDS:
        value = getattr(w, name)
        if value is not None:
            setattr(staged, name, value.to(first if name in FIRST_STAGE else home))
    return staged


def placement(w: ModelWeights) -> list[tuple[range, torch.device]]:
    """Each stage's layers and device (one stage: every layer on the model's device)."""
    if not w.staged:
        return [(range(w.cfg.n_layers), w.device)]
    stack = w.W_Q
    assert isinstance(stack, LayerStack)
    ends = [*stack.starts[1:], stack.n_layers]
    return [(range(a, b), part.device) for a, b, part in zip(stack.starts, ends, stack.parts)]
