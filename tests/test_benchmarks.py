"""``python -m benchmarks --quick`` runs every section (CI checks that it runs and that the fast and
seed-style paths agree, never its timings). Its own process: the Ray section starts a private Ray."""

import subprocess
import sys
from pathlib import Path

from benchmarks.__main__ import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_every_section_and_the_paths_agree():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    summary = out[out.index("## summary"):].splitlines()[2:]
    assert {line.split()[0] for line in summary} == set(SECTIONS)
    agreement = next(line for line in summary if "max |engine - seed-style| / max |backup|" in line)
    assert float(agreement.split()[-4]) < 1e-4, agreement  # the same numbers from both paths
    assert "engine speed-up over seed-style per (node, scale, pair)" in out
    assert "throughput, 2 workers over 1" in out
