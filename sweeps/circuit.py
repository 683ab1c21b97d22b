#!/usr/bin/env python
"""Circuit evaluation: how faithful is a circuit, and how fast does a ranking find one?

The entry script `ray submit` uploads; the sweep itself (options, spec, shards, job, report)
is ``CircuitSweep`` in sweeps/registry/circuit.py. ``python sweeps/circuit.py --help`` explains it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.registry import CircuitSweep

main = CircuitSweep.main

if __name__ == "__main__":
    sys.exit(main())
