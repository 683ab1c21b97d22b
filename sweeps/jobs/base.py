"""``Job``: what every sweep's job shares, binding to one model replica.

A job is built by the driver (a dataclass holding the task and the sweep's settings),
pickled to every worker, and bound there to that worker's model: ``bind`` takes a loaded
model, fast-path weights, a bridge or an engine, and sets ``engine``
(``core/engines``: the fast engine, or the bridge engine for a model with no fast path).
It first checks that the definitions hold for this model (``Engine.check``: on the bridge,
the components must add up to the metric), so a model they do not fit fails with one
clear error, not wrong numbers. What a job builds from its model (graphs, buffers) goes in
``on_bind``. A job never asks which engine it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sweeps.core.engines import Engine, engine_for


@dataclass
class Job:
    """Subclasses are dataclasses with a ``task`` field; they implement ``run_shard`` and may
    override ``on_bind``."""

    engine: Engine = field(default=None, repr=False, kw_only=True)  # type: ignore[assignment]  # set by bind

    def bind(self, model: Any) -> Any:
        """Use ``model`` (a loaded model, fast-path weights, a bridge or an engine) from now on;
        returns the job."""
        self.engine = engine_for(model)
        self.engine.check(self.task)  # type: ignore[attr-defined]  # every job has a task
        self.on_bind()
        return self

    def on_bind(self) -> None:
        """What the job builds from its model, forgetting what it built from an earlier one."""

    def run_shard(self, shard: Any) -> dict:
        """The shard's tables, ``{dataset: pyarrow.Table}``."""
        raise NotImplementedError
