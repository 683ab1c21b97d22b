"""What every benchmark shares: timing, the unit (one forward pass to logits), the summary rows."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.core import transformer as tf
from sweeps.runtime import loading, models
from tasks import TaskSpec, build_task
from tasks.base import TaskData


@dataclass
class Ratio:
    """One line of the summary table: a measured ratio and the goal it is held to."""

    section: str
    measure: str
    value: float
    goal: str = ""  # e.g. "<= 0.5"; empty when the figure is reported, not held to a goal

    @property
    def verdict(self) -> str:
        if not self.goal:
            return ""
        op, bound = self.goal.split()
        ok = self.value <= float(bound) if op == "<=" else self.value >= float(bound)
        return "ok" if ok else "MISSED"


@dataclass
class Setup:
    """The model and batch every in-process section measures on."""

    name: str
    bridge: object
    weights: tf.ModelWeights
    task: TaskData
    repeat: int

    @property
    def shape(self) -> str:
        return f"{self.task.n_prompts} prompts x {self.task.clean.shape[1]} tokens"


def load_setup(name: str, n_prompts: int, seq_len: int, repeat: int) -> Setup:
    bridge, unfoldable = loading.load_bridge(models.describe_model(name), with_spec=True)
    bridge.set_use_attn_result(True)
    weights = loading.weights_from_bridge(bridge, unfoldable)
    task = build_task(TaskSpec("text"), bridge.tokenizer, n_prompts=n_prompts, seq_len=seq_len)
    return Setup(name, bridge, weights, task, repeat)


def timed(fn: Callable[[], object], repeat: int = 1, warmup: bool = False) -> float:
    """Median wall-clock seconds of ``repeat`` calls (after one untimed call if ``warmup``),
    each until the GPU, if there is one, has finished what the call queued."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def counted_flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call of ``fn`` as torch's ``FlopCounterMode`` counts
    them (matrix products and attention, forward and backward): what the code does, not
    what a formula says it should, so a ratio of two counts is a timing ratio's floor."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def forward_logits(w: tf.ModelWeights, tokens: Int[Tensor, "B T"]) -> Float[Tensor, "B T V"]:
    """The unit every ratio is measured against: one plain forward pass, tokens to logits,
    with our forward (the bridge's own forward is slower; it is printed beside it)."""
    resid = tf.run_blocks(w, 0, tf.embed(w, tokens), tf.rotary_tables(w, tokens.shape[1]))
    return tf.unembed(w, resid)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def print_timings(rows: list[tuple[str, float]], unit: float, digits: int = 4) -> None:
    """A section's table: each measure in seconds and as a multiple of ``unit`` (the forward)."""
    print_table(["measure", "seconds", "x forward"],
                [[label, f"{sec:.{digits}f}", f"{sec / unit:.2f}"] for label, sec in rows])
