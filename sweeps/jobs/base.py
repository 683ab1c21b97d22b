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
from sweeps.jobs import sizing
from sweeps.runtime.chunking import tokens_per_pass


@dataclass
class Job:
    """Subclasses are dataclasses with a ``task`` field; they implement ``run_shard`` and may
    override ``on_bind``."""

    engine: Engine = field(default=None, repr=False, kw_only=True)  # type: ignore[assignment]  # set by bind
    memory_budget: float | None = field(default=None, kw_only=True)  # bytes (``--memory-budget``), weights included
    # the jobs' passes, as a fraction of their default size: set by ``bind`` from the estimate
    pass_fraction: float = field(default=1.0, kw_only=True)

    def bind(self, model: Any) -> Any:
        """Use ``model`` (a loaded model, fast-path weights, a bridge or an engine) from now on,
        with passes sized to fit its device (``jobs.sizing``); returns the job."""
        self.engine = engine_for(model)
        self.engine.check(self.task)  # type: ignore[attr-defined]  # every job has a task
        self.on_bind()
        self._size_passes()
        return self

    def sizing(self) -> tuple[str, dict[str, Any]] | None:
        """(the sweep's name, its settings as ``sizing.estimate`` reads them), or None: a job
        that does not size its passes from the estimate."""
        return None

    def pass_tokens(self, device) -> int:
        """Tokens the first restart pass of this job holds on ``device``."""
        return max(1, int(tokens_per_pass(device) * self.pass_fraction))

    def _size_passes(self) -> None:
        wanted = self.sizing()
        if wanted is None:
            return
        sweep, options = wanted
        engine, task = self.engine, self.task  # type: ignore[attr-defined]
        size = engine.dtype.itemsize
        weights = engine.shape.parameters * size
        budget = sizing.device_budget(engine.device, self.memory_budget, weights)
        n, T = int(task.n_prompts), int(task.clean.shape[1])

        def footprint_at(fraction: float):
            return sizing.estimate(sweep, engine.shape, n, T, size, engine.device.type, options, fraction)

        fraction = sizing.fit_fraction(footprint_at, budget)
        if fraction != self.pass_fraction:
            sizing.note(fraction, budget)
        self.pass_fraction = fraction

    def on_bind(self) -> None:
        """What the job builds from its model, forgetting what it built from an earlier one."""

    def run_shard(self, shard: Any) -> dict:
        """The shard's tables, ``{dataset: pyarrow.Table}``."""
        raise NotImplementedError

    def notes(self) -> dict[str, Any]:
        """What the manifest records beside each shard about how it was computed (JSON values)."""
        return {}
