"""The sweep commands: one registered class per sweep (``base.Sweep``), and what they share
(``cli``: options and their checks; ``driver``: input checks, locking, the loop that runs shards).

A module of this package that defines a ``Sweep`` subclass with a ``name`` registers it just
by being here: this package imports every module in it. ``SWEEPS`` (every sweep, in
``--help`` order) is what ``interp-sweeps``, ``python -m sweeps``, ``interp-sweeps analyze``
and the entry scripts (``sweeps/backup.py``, ...) are built from.
"""

from __future__ import annotations

import importlib
import pkgutil

from sweeps.registry import base
from sweeps.registry.base import SWEEPS, Sweep, ordered
from sweeps.registry.cli import UserError, did_you_mean

# The modules that are not sweeps: the machinery every sweep shares.
SHARED = {"base", "cli", "driver", "analyze"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")  # defining its Sweep registers it

_in_order = ordered(SWEEPS.values())
SWEEPS.clear()
SWEEPS.update({cls.name: cls for cls in _in_order})

from sweeps.registry.attribution import AttributionSweep  # noqa: E402
from sweeps.registry.backup import BackupSweep  # noqa: E402
from sweeps.registry.circuit import CircuitSweep  # noqa: E402
from sweeps.registry.report import ReportSweep  # noqa: E402
from sweeps.registry.scale import ScaleSweep  # noqa: E402

__all__ = [
    "SWEEPS",
    "Sweep",
    "UserError",
    "sweep_named",
    "base",
    "AttributionSweep",
    "BackupSweep",
    "CircuitSweep",
    "ReportSweep",
    "ScaleSweep",
]


def sweep_named(name: str) -> type[Sweep]:
    """The sweep called ``name``; a ``UserError`` naming the closest one otherwise."""
    try:
        return SWEEPS[name]
    except KeyError:
        raise UserError(f"unknown sweep {name!r}{did_you_mean(name, SWEEPS)}; sweeps: {', '.join(SWEEPS)}") from None
