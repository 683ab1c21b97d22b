#!/usr/bin/env python
"""Attribution sweep: attribution-patching scores of every node and every edge.

The entry script `ray submit` uploads; the sweep itself (options, spec, shards, job, report)
is ``AttributionSweep`` in sweeps/registry/attribution.py. ``python sweeps/attribution.py --help`` explains it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.registry import AttributionSweep

main = AttributionSweep.main

if __name__ == "__main__":
    sys.exit(main())
