"""``python -m benchmarks --quick`` runs every section (CI checks that it runs and that the fast and
notebook-style paths agree, never its timings). Its own process: the Ray section starts a private Ray."""

import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import throughput
from benchmarks.__main__ import default_sections

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs_every_section_and_the_paths_agree():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    summary = out[out.index("## summary"):].splitlines()[2:]
    assert {line.split()[0] for line in summary} == set(default_sections(quick=True))
    agreement = next(line for line in summary if "max |engine - notebook-style| / max |backup|" in line)
    assert float(agreement.split()[-4]) < 1e-4, agreement  # the same numbers from both paths
    peers = [line for line in summary if "max |peer - ours| / max |value|" in line]  # TransformerLens, nnsight
    assert len(peers) == 3 and all(float(line.split()[-4]) <= 1e-5 for line in peers), peers
    assert "engine speed-up over notebook-style per (node, scale, pair)" in out
    assert "throughput, 2 workers over 1" in out
    rates = [line for line in summary if line.startswith("throughput")]
    assert len(rates) == 4 and all(float(line.split()[-1]) > 0 for line in rates)  # 2 models x (backup, scale)


def test_utilisation_sampler_reads_while_the_block_runs(monkeypatch):
    readings = iter(range(1000))
    monkeypatch.setattr(throughput, "_utilisation_reader", lambda device: lambda: float(next(readings)))
    with throughput.UtilisationSampler(torch.device("cpu"), every=0.01) as sampler:
        time.sleep(0.2)
    n = len(sampler.samples)
    assert n >= 3 and sampler.mean == (n - 1) / 2  # readings 0 .. n-1
    time.sleep(0.05)
    assert len(sampler.samples) == n  # stopped with the block
    with throughput.UtilisationSampler(torch.device("cpu")) as cpu:  # the real reader: none on a CPU
        pass
    assert cpu.mean is None and cpu.peak_held is None
