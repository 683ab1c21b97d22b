"""Speed on the newer families, at real shapes with random weights.

The backup sweep's cost per upstream head and the scale sweep's cost per (node, scale,
pair), each over a forward timed just before it, on SmolLM2 beside random-weight models of
Gemma-3-270M's shape (18 layers, 4 query heads of dimension 256 sharing 1 key/value head,
d_model 640, a 262,144-token vocabulary, sliding windows of 512 on five layers of six) and
Qwen2.5-0.5B's (24 layers, 14 heads, 2 key/value heads, d_model 896, 151,936 tokens).

The unit is a forward to the log-probability of every next token, read out in blocks of the
vocabulary (``scaling.readout``): what a sweep on a text task pays at least once per prompt.
A 262k vocabulary is never held as [prompts, positions, vocabulary] at once, in the unit or
in the sweeps.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import Ratio, print_table, timed
from sweeps.core import scaling
from sweeps.core import transformer as tf
from sweeps.core.nodes import Node
from sweeps.jobs.backup import BackupJob
from sweeps.jobs.scale import ScaleJob, make_pairs
from sweeps.runtime import loading, models
from tasks import TaskSpec, build_task

MODELS = ("smollm2-135m", "random-gemma3-270m", "random-qwen2.5-0.5b")
QUICK_MODELS = ("tiny-llama", "tiny-gemma3", "tiny-qwen2")
SCALES = [0.0, 0.5, 1.0, 2.0, 5.0, 10.0]


def forward_log_probs(w: tf.ModelWeights, tokens: torch.Tensor) -> torch.Tensor:
    """The unit: tokens to the log-probability of each next token, every position."""
    T = tokens.shape[1]
    resid = tf.run_blocks(w, 0, tf.embed(w, tokens), tf.rotary_tables(w, T))
    return scaling.readout(w, resid, torch.arange(T - 1), tokens[:, 1:], None).metric


def measure(name: str, n_prompts: int, seq_len: int) -> tuple[list[str], list[Ratio]]:
    loaded = loading.load_model(models.describe_model(name))
    w = loaded.weights
    task = build_task(TaskSpec("text"), loading.load_tokenizer(loaded.info), n_prompts=n_prompts, seq_len=seq_len)
    L, H = w.cfg.n_layers, w.cfg.n_heads
    layer = L // 2

    backup = BackupJob(task, "resample", batch_size=n_prompts).bind(w)
    backup.batches()  # the clean state: once per sweep
    forward_log_probs(w, task.clean)  # warm-up
    forwards, heads = [], []
    for _ in range(2):
        forwards.append(timed(lambda: forward_log_probs(w, task.clean)))
        heads.append(timed(lambda: backup.run_heads(layer, list(range(H)))) / H)
    backup_ratio = statistics.mean(h / f for h, f in zip(heads, forwards))

    pairs = make_pairs(task, "all", n_prompts // 2, 0, False)
    rows = len(SCALES) * len(pairs)
    scale = ScaleJob(task, pairs, batch_size=n_prompts).bind(w)
    scale.groups()
    ratios = []
    for node in (Node(layer, 0), Node(layer, None)):
        forward = timed(lambda: forward_log_probs(w, task.clean)) / n_prompts
        ratios.append(timed(lambda nd=node: scale.run_node(nd, SCALES)) / rows / forward)
    scale_ratio = statistics.mean(ratios)
    shape = f"{L}x{H} (kv {w.cfg.n_kv_heads}), d {w.cfg.d_model}, vocab {w.cfg.d_vocab:,}"
    row = [name, loaded.info.family, shape, f"{statistics.median(forwards):.3f}", f"{backup_ratio:.3f}",
           f"{scale_ratio:.3f}"]
    return row, [
        Ratio("families", f"{name}: backup per head / forward", backup_ratio, "<= 0.5"),
        Ratio("families", f"{name}: scale per (node, scale, pair) / one prompt's forward", scale_ratio),
    ]


def run(quick: bool, n_prompts: int = 8, seq_len: int = 64) -> list[Ratio]:
    names = QUICK_MODELS if quick else MODELS
    if quick:
        n_prompts, seq_len = 4, 16
    table, out = [], []
    for name in names:
        row, ratios = measure(name, n_prompts, seq_len)
        table.append(row)
        out += ratios
    print(f"## families: text task, {n_prompts} prompts x {seq_len} tokens; backup at the middle layer "
          f"(every head), scale at its head 0 and MLP over {len(SCALES)} scales")
    print_table(["model", "family", "layers x heads, width, vocabulary", "forward (s)", "backup per head / forward",
                 "scale per row / forward"], table)
    print()
    return out
