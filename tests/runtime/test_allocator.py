"""``allocator.keep_freed_memory``: a CPU worker's passes reuse freed memory instead of fresh pages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In a child process (the setting is process-wide): allocate what an autograd forward keeps
# (200 tensors of 2 MB), free it all, and count the page faults of doing it again.
CHILD = """
import json, resource, sys, torch
from sweeps.runtime.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False

def cycle():
    tensors = [torch.ones(512 * 1024) for _ in range(200)]
    del tensors

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _second_cycle(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_not_faulted_in_again():
    default, kept = _second_cycle("default"), _second_cycle("keep")
    if not kept["kept"]:
        pytest.skip("this C library has no mallopt (not glibc)")
    # 400 MB is ~100,000 pages: by default they come back from the kernel; kept, almost none do.
    assert default["faults"] > 50_000
    assert kept["faults"] < default["faults"] / 4
