"""Split big batched passes into chunks that fit: halve on out-of-memory, grow to fill a GPU.

Every sweep runs many copies of a batch as one forward (G ablations × B prompts,
S scales × P pairs, a block of prompts). How many fit depends on the device.
``map_chunks`` starts from ``tokens_per_pass``; on a GPU it then measures what a
chunk allocated and grows the next chunks to fill the free memory (a
``MemoryGauge``), and on any device it halves a chunk that runs out of memory
instead of failing the shard.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator, Protocol, TypeVar

import torch

R = TypeVar("R")


def out_of_memory(err: BaseException) -> bool:
    """A GPU OOM, or the CPU allocator (torch's or Python's) failing to allocate."""
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


def tokens_per_pass(device: torch.device) -> int:
    """How many tokens (copies × prompts × positions) the first restart pass processes.

    On a CPU that stays the pass size: a pass that fits the caches is faster than a
    larger one (``python -m benchmarks --only backup`` measures it). A GPU wants
    large batches: 65,536 tokens to start with, and ``map_chunks`` grows the passes
    after it to fill the memory that is free.
    """
    return 1 << 16 if device.type == "cuda" else 1 << 13


class MemoryGauge(Protocol):
    """What ``map_chunks`` needs to size chunks to a device's memory."""

    def budget(self) -> int:
        """Bytes the next chunk may allocate."""

    def begin(self) -> None:
        """Start measuring a chunk."""

    def used(self) -> int:
        """Peak bytes allocated since ``begin``, over what was allocated then."""


class CudaGauge:
    """A GPU's free memory and a chunk's peak allocation, from torch's caching allocator.

    The budget is ``fraction`` of what is free: the driver's free memory plus what
    torch holds cached but unused. The rest is slack for what the caller keeps of
    each chunk's result and for the estimate being linear in the chunk's size.
    """

    def __init__(self, device: torch.device, fraction: float = 0.8) -> None:
        self.device, self.fraction, self._base = device, fraction, 0

    def budget(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(self.fraction * (free + cached))

    def begin(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def used(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self._base


def memory_gauge(device: torch.device) -> MemoryGauge | None:
    """A gauge for a GPU; None on a CPU, where the first pass size stays the most a pass
    holds (see ``tokens_per_pass``) and the passes are ``balanced``."""
    return CudaGauge(device) if device.type == "cuda" else None


def balanced(n: int, most: int) -> int:
    """The size of the next chunk when ``n`` units go in as few chunks of at most ``most``
    as possible, all within one unit of each other: 9 heads at most 8 a pass go as 5 and 4,
    not 8 and 1: on a CPU, passes of equal size run faster per head than one full pass and
    a small remainder."""
    chunks = -(-n // most)
    return -(-n // chunks)


def map_chunks(
    n: int,
    per_pass: int,
    compute: Callable[[int, int], R],
    advice: Callable[[], str],
    gauge: MemoryGauge | None = None,
    max_growth: int = 4,
) -> Iterator[tuple[int, int, R]]:
    """Yield ``(start, stop, compute(start, stop))`` over ``[0, n)``, in chunks of ``per_pass`` at first.

    Without a ``gauge`` (a CPU) the chunk size is fixed, so the chunks are ``balanced``:
    as few as ``per_pass`` allows, of equal size.

    With a ``gauge``, each chunk's peak allocation gives the bytes one unit costs
    (the largest seen so far), and the next chunk is made as large as the gauge's
    budget allows, at most ``max_growth`` times the last. A chunk that runs out of
    memory is retried at half its size (the console says so, once), and chunks stop growing; at size 1 the
    error becomes a RuntimeError carrying ``advice()`` (e.g. which ``--batch-size``
    to use). ``compute`` must have no side effects: the caller accumulates what
    is yielded.
    """
    per_pass, start, per_unit, halved = max(1, per_pass), 0, 0.0, False
    while start < n:
        stop = min(n, start + (per_pass if gauge is not None else balanced(n - start, per_pass)))
        if gauge is not None:
            budget = gauge.budget()
            gauge.begin()
        try:
            result = compute(start, stop)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as err:
            if not out_of_memory(err):
                raise
            if stop - start == 1:
                raise RuntimeError(advice()) from None
            # half the pass that failed (what fits is now known: stop growing), and say so once
            per_pass, gauge = max(1, (stop - start) // 2), None
            if not halved:
                print(
                    f"note: a pass of {stop - start} ran out of memory; passes of {per_pass} from here on",
                    file=sys.stderr,
                )
                halved = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        if gauge is not None:
            per_unit = max(per_unit, gauge.used() / (stop - start))
            if per_unit > 0:
                per_pass = max(per_pass, min(max_growth * per_pass, int(budget / per_unit)))
        yield start, stop, result
        start = stop
