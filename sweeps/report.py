#!/usr/bin/env python
"""Task report: direct logit attribution, logit lens and attention patterns.

The entry script `ray submit` uploads; the sweep itself (options, spec, shards, job, report)
is ``ReportSweep`` in sweeps/registry/report.py. ``python sweeps/report.py --help`` explains it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.registry import ReportSweep

main = ReportSweep.main

if __name__ == "__main__":
    sys.exit(main())
