"""The engines a job runs on (``base.Engine``), and ``engine_for``, which picks one.

``engine_for`` is called once, when a job binds to its model replica: fast-path weights
get the ``FastEngine``, a model with no fast path (only a TransformerLens bridge) gets the
``BridgeEngine``. Nothing after that asks which one it has.
"""

from __future__ import annotations

from typing import Any

from sweeps.core import transformer as tf
from sweeps.core.engines.base import Engine, Patcher
from sweeps.core.engines.bridge import BridgeEngine
from sweeps.core.engines.fast import FastEngine

__all__ = ["Engine", "Patcher", "FastEngine", "BridgeEngine", "engine_for"]


def engine_for(model: Any) -> Engine:
    """The engine of ``model``: an engine (returned as is), a loaded model
    (``loading.LoadedModel``: its fast-path weights, else its bridge), fast-path
    ``ModelWeights``, or a bridge."""
    if isinstance(model, (FastEngine, BridgeEngine)):
        return model
    if isinstance(model, tf.ModelWeights):
        return FastEngine(model)
    if hasattr(model, "weights"):  # a LoadedModel, or any holder of weights (and maybe a bridge)
        if model.weights is not None:
            return FastEngine(model.weights)
        return BridgeEngine(model.bridge)
    return BridgeEngine(model)
