"""``python -m analysis SWEEP DIR``: the summary, plots, tables and a W&B run from a sweep's saved
results (``sweeps/registry/analyze.py``; the same as ``interp-sweeps analyze SWEEP DIR``)."""

import sys

from sweeps.registry.analyze import main

if __name__ == "__main__":
    sys.exit(main())
