"""The sweep commands: one registered class per sweep (``base.Sweep``), and what they share
(``cli``: options and their checks; ``driver``: input checks, locking, the loop that runs shards).

``SWEEPS`` lists every sweep; the entry scripts (``sweeps/backup.py``, ...), ``interp-sweeps``'s
subcommands and ``interp-sweeps analyze NAME DIR`` are all built from it.
"""

from __future__ import annotations

from sweeps.registry.attribution import AttributionSweep
from sweeps.registry.backup import BackupSweep
from sweeps.registry.base import Sweep
from sweeps.registry.circuit import CircuitSweep
from sweeps.registry.cli import UserError, did_you_mean
from sweeps.registry.report import ReportSweep
from sweeps.registry.scale import ScaleSweep

# In the order `interp-sweeps --help` lists them.
SWEEPS: dict[str, type[Sweep]] = {
    cls.name: cls for cls in (BackupSweep, ScaleSweep, AttributionSweep, CircuitSweep, ReportSweep)
}


def sweep_named(name: str) -> type[Sweep]:
    """The sweep called ``name``; a ``UserError`` naming the closest one otherwise."""
    try:
        return SWEEPS[name]
    except KeyError:
        raise UserError(f"unknown sweep {name!r}{did_you_mean(name, SWEEPS)}; sweeps: {', '.join(SWEEPS)}") from None
