"""The benchmark runs (CI checks that it runs and that both paths agree, never its timings)."""

import re

from benchmarks.__main__ import main


def test_quick_benchmark_runs_and_paths_agree(capsys):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "engine speed-up over seed-style per head" in out
    diff = float(re.search(r"accumulated backup: ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4
    assert "engine speed-up over seed-style per (node, scale, pair)" in out
