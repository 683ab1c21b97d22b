"""Sweep throughput on this machine's accelerator (goal 7): upstream heads per second for
the backup sweep, and (node, scale) pairs per second for the scale sweep (each over every
pair of the batch), for the embedded model and GPT-2 small's shape with random weights.

On a GPU it also reports the GPU's name, its utilisation sampled every 0.2 s during each
sweep (``nvidia-smi``, or ``torch.cuda.utilization`` when pynvml is there), and the most
memory torch held during a sweep against the GPU's total. The pass size is the engines'
own: 65,536 tokens for the first pass, then grown to fill 80 % of the free memory from
what that pass allocated (``chunking.map_chunks`` with a ``CudaGauge``), halved on
out-of-memory.

Per-head cost is averaged over the first, middle and last layer (a restart's cost is linear
in the layers after it, so that is a whole sweep's mean); scale nodes are head 0 of the
same layers and the middle layer's MLP. It runs on a CPU too, so the section is tested
there, but only a GPU run measures goal 7; ``python -m benchmarks`` includes it when a GPU
is present, ``--only throughput`` runs it anywhere.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from typing import Callable

import torch

from benchmarks.backup import sample_layers
from benchmarks.common import Ratio, print_table, timed
from benchmarks.scale import SCALES
from sweeps.core.nodes import Node
from sweeps.jobs.backup import BackupJob
from sweeps.jobs.scale import ScaleJob, make_pairs
from tasks import TaskSpec, build_task


class UtilisationSampler:
    """The GPU's utilisation (%), sampled in a thread while the ``with`` block runs; ``mean``
    is None on a CPU or where neither ``nvidia-smi`` nor pynvml answers. ``peak_held``: the
    most memory torch held on the GPU meanwhile (None on a CPU)."""

    def __init__(self, device: torch.device, every: float = 0.2) -> None:
        self.read = _utilisation_reader(device)
        self.device, self.every, self.samples, self.peak_held = device, every, [], None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            value = self.read()
            if value is not None:
                self.samples.append(value)
            self._held()

    def _held(self) -> None:
        # What torch's caching allocator holds: it keeps what a pass reserved, so this is the
        # sweep's high-water mark (the engines reset the allocator's own peak for every pass).
        if self.device.type == "cuda":
            self.peak_held = max(self.peak_held or 0, torch.cuda.memory_reserved(self.device))

    def __enter__(self) -> "UtilisationSampler":
        if self.read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._held()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _utilisation_reader(device: torch.device) -> Callable[[], float | None] | None:
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch.cuda.utilization(index)
        return lambda: float(torch.cuda.utilization(index))
    except Exception:  # no pynvml: ask nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None

    def read() -> float | None:
        out = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)],
                             capture_output=True, text=True)
        try:
            return float(out.stdout.strip().splitlines()[0])
        except (IndexError, ValueError):
            return None

    return read


def _sweep(device: torch.device, label: str, work: Callable[[], object]) -> dict:
    """Seconds, mean utilisation and peak memory held of ``work`` (after one untimed warm-up call)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the last sweep held is not this one's
    work()
    with UtilisationSampler(device) as sampler:
        seconds = timed(work)
    return {"label": label, "seconds": seconds, "util": sampler.mean, "peak": sampler.peak_held}


def measure(name: str, w, tokenizer, n_prompts: int, seq_len: int, device: torch.device) -> list[dict]:
    """Backup heads per second and scale (node, scale) pairs per second for one model."""
    w = w.to(device)
    L, H = w.cfg.n_layers, w.cfg.n_heads
    task = build_task(TaskSpec("text"), tokenizer, n_prompts=n_prompts, seq_len=seq_len)
    layers = sample_layers(L, 3)

    backup = BackupJob(task, "resample", batch_size=n_prompts).bind(w)
    backup.batches()  # the clean state, once per sweep: not per head
    backup_row = _sweep(device, "backup", lambda: [backup.run_heads(layer, list(range(H))) for layer in layers])
    backup_row.update(model=name, unit="heads/s", rate=len(layers) * H / backup_row["seconds"])

    pairs = make_pairs(task, "all", n_prompts // 2, 0, False)
    scale = ScaleJob(task, pairs, batch_size=n_prompts).bind(w)
    scale.groups()
    nodes = [Node(layer, 0) for layer in layers] + [Node(layers[len(layers) // 2], None)]
    if w.cfg.attn_only:
        nodes = nodes[:-1]
    scale_row = _sweep(device, "scale", lambda: [scale.run_node(node, SCALES) for node in nodes])
    scale_row.update(model=name, unit=f"(node, scale)/s over {len(pairs)} pairs",
                     rate=len(nodes) * len(SCALES) / scale_row["seconds"])
    return [backup_row, scale_row]


def run(weights_by_name: dict, tokenizer, n_prompts: int, seq_len: int, device: torch.device) -> list[Ratio]:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (goal 7 needs a GPU)"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    print(f"## throughput on {where}: text task, {n_prompts} prompts x {seq_len} tokens, scales {SCALES}")
    rows, ratios = [], []
    for name, w in weights_by_name.items():
        for r in measure(name, w, tokenizer, n_prompts, seq_len, device):
            util = "n/a" if r["util"] is None else f"{r['util']:.0f} %"
            peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.1f} of {total / 2**30:.0f} GiB"
            rows.append([r["model"], r["label"], f"{r['rate']:.2f}", r["unit"], f"{r['seconds']:.2f}", util, peak])
            ratios.append(Ratio("throughput", f"{r['model']}: {r['label']} {r['unit']}", r["rate"]))
    print_table(["model", "sweep", "rate", "unit", "seconds", "GPU util", "memory held (peak)"], rows)
    print()
    return ratios
