#!/usr/bin/env python
"""Backup-slope sweep: ablate every upstream head, measure how later heads compensate.

The entry script `ray submit` uploads; the sweep itself (options, spec, shards, job, report)
is ``BackupSweep`` in sweeps/registry/backup.py. ``python sweeps/backup.py --help`` explains it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.registry import BackupSweep

main = BackupSweep.main

if __name__ == "__main__":
    sys.exit(main())
