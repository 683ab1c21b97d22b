"""``Job``: what every sweep's job shares, binding to one model replica.

A job is built by the driver (a dataclass holding the task and the sweep's settings),
pickled to every worker, and bound there to that worker's model: ``bind`` takes a loaded
model, fast-path weights or a bridge (``bridge_path.replica``) and sets ``weights`` (the fast
path) or ``bridge`` (the bridge path, ``bridge_path.py``). On the bridge path it first checks
that the definitions hold for this model (``bridge_path.sum_check``: the components add up to
the metric), so a model they do not fit fails with one clear error, not wrong numbers. What a
job builds from its model (graphs, buffers) goes in ``on_bind``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sweeps.core import bridge_path


@dataclass
class Job:
    """Subclasses are dataclasses with a ``task`` field; they implement ``run_shard`` and may
    override ``on_bind``."""

    weights: Any = field(default=None, repr=False, kw_only=True)  # fast-path ModelWeights, once bound
    bridge: Any = field(default=None, repr=False, kw_only=True)  # the bridge, on the bridge path

    def bind(self, model) -> Any:
        """Use ``model`` (a loaded model, fast-path weights or a bridge) from now on; returns the job."""
        self.weights, self.bridge = bridge_path.replica(model)
        if self.bridge is not None:
            bridge_path.sum_check(self.bridge, self.task)  # type: ignore[attr-defined]  # every job has a task
        self.on_bind()
        return self

    def on_bind(self) -> None:
        """What the job builds from its model, forgetting what it built from an earlier one."""

    def run_shard(self, shard) -> dict:
        """The shard's tables, ``{dataset: pyarrow.Table}``."""
        raise NotImplementedError
