#!/usr/bin/env python
"""All-nodes × all-scales ablation sweep: patch every head and MLP at many scales.

The entry script `ray submit` uploads; the sweep itself (options, spec, shards, job, report)
is ``ScaleSweep`` in sweeps/registry/scale.py. ``python sweeps/scale.py --help`` explains it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.registry import ScaleSweep

main = ScaleSweep.main

if __name__ == "__main__":
    sys.exit(main())
