"""``python -m tests.capped_sweep MIB SWEEP_ARGS...`` (from the repo root): sweeps/backup.py with its address space
capped at what the process uses once imported plus MIB mebibytes (a real memory limit:
allocations past it fail, as on a full GPU).

Run it with ``MALLOC_ARENA_MAX=1``: with more arenas, glibc answers a refused
allocation by trying to map a new arena on every later ``malloc``, and the
process crawls instead of failing.

NumPy's OpenBLAS allocates its work buffers on its first call and aborts the
process (no Python error) if it cannot; a worker that has run any shard has them
already, so they are allocated here, before the cap.
"""

import resource
import sys

from sweeps import backup

if __name__ == "__main__":
    # everything the sweep imports, before measuring what is in use
    import numpy
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import tokenizers  # noqa: F401
    import torch
    import transformer_lens  # noqa: F401
    import transformers  # noqa: F401

    import analysis.backup  # noqa: F401
    from sweeps.jobs import backup as backup_sweep  # noqa: F401
    from sweeps.registry import driver
    from sweeps.runtime import loading, models, executors as run  # noqa: F401

    numpy.ones((256, 256)) @ numpy.ones((256, 256))  # OpenBLAS's buffers
    torch.ones(256, 256) @ torch.ones(256, 256)

    with open("/proc/self/status") as status:
        used_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = (used_kib << 10) + (int(sys.argv[1]) << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.exit(backup.main(sys.argv[2:]))
