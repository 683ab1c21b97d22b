"""The task report on tensors: direct logit attribution, logit lens, attention patterns.

Plain functions; no Ray, no I/O. Everything reads one clean run (``tf.run``)
at a task's points (``effects.effect_points``): each prompt's answer position
with the direction ``W_U[:, correct] − W_U[:, incorrect]``, or every
next-token position with ``W_U[:, next token]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from sweeps.core import transformer as tf
from sweeps.core.effects import Decomposition, Points, decompose, effect_points, gather
from sweeps.core.scaling import running_max_and_exp_sum
from sweeps.core.transformer import ModelWeights
from tasks.base import TaskData


@dataclass
class TaskReport:
    points: Points
    metric: Float[Tensor, " P"]  # the real logit difference (or next-token logit) at each point
    correct: Float[Tensor, " P"]  # 1 where the model gets the point right (ld > 0, or top-1 = next token)
    parts: Decomposition  # every component's direct effect; sums to ``metric``
    lens_labels: list[str]
    lens_final_scale: Float[Tensor, "C P"]  # accumulated stream, divided by the final norm's scale
    lens_own_scale: Float[Tensor, "C P"]  # accumulated stream, normalised by its own scale (the logit lens)
    patterns: Float[Tensor, "L H T T"] | None  # attention of one prompt, every head


def attention_patterns(w: ModelWeights, run: tf.CleanRun, prompt: int, length: int) -> Float[Tensor, "L H T T"]:
    """Every head's attention pattern on one prompt's real tokens (``tf.attention_pattern``:
    causal, windowed and soft-capped as the model is), in float32 whatever the model's dtype."""
    rope = tf.rotary_tables(w, length)
    return torch.stack(
        [
            tf.attention_pattern(w, layer, run.resid_pre[layer][prompt : prompt + 1, :length], rope)[0]
            for layer in range(w.cfg.n_layers)
        ]
    ).float()


@torch.no_grad()
def task_report(w: ModelWeights, task: TaskData, prompt: int | None = 0) -> TaskReport:
    tokens = task.clean.to(w.device)
    run = tf.run(w, tokens)
    points = effect_points(w, task)
    parts = decompose(w, tokens, run, points)
    # The pre-cap logits the direct effects sum to, read at the points only, and the top-1
    # token in blocks of the vocabulary: [P, V] logits are never held (262k tokens for Gemma).
    x = tf.normalize(w.cfg, run.resid_final[points.batch, points.pos])  # [P, D]
    if task.kind == "logit_diff":
        metric = (x * points.u).sum(-1) + points.bias
        correct = (metric > 0).float()
    else:
        targets = tokens[points.batch, points.pos + 1]
        metric = (x * points.u).sum(-1) + points.bias
        _, top1, _ = running_max_and_exp_sum(w, x, False, None, 8192)
        correct = (top1 == targets).float()

    # The accumulated stream after each piece, read two ways.
    cfg = w.cfg
    labels, final_scale, own_scale = ["embed"], [parts.embed], [_read(w, tf.embed(w, tokens), points)]
    running = parts.embed
    for layer in range(cfg.n_layers):
        running = running + parts.heads[layer].sum(-1) + parts.attn_bias[layer]
        z = run.z[layer]
        resid_mid = run.resid_pre[layer] + tf.attention_out(w, layer, z)
        labels.append(f"{layer}_attn")
        final_scale.append(running.clone())
        own_scale.append(_read(w, resid_mid, points))
        if not cfg.attn_only:
            running = running + parts.mlps[layer]
            after = run.resid_pre[layer + 1] if layer + 1 < cfg.n_layers else run.resid_final
            labels.append(f"{layer}_mlp")
            final_scale.append(running.clone())
            own_scale.append(_read(w, after, points))
    patterns = None
    if prompt is not None:
        patterns = attention_patterns(w, run, prompt, int(task.lengths[prompt]))
    return TaskReport(
        points=points,
        metric=metric,
        correct=correct,
        parts=parts,
        lens_labels=labels,
        lens_final_scale=torch.stack(final_scale) + points.bias,
        lens_own_scale=torch.stack(own_scale),
        patterns=patterns,
    )


def _read(w: ModelWeights, resid: Float[Tensor, "B T D"], points: Points) -> Float[Tensor, " P"]:
    """The logit (difference) if the model stopped here: normalise this stream, unembed."""
    x = tf.normalize(w.cfg, gather(resid, points, 0))
    return (x * points.u).sum(-1) + points.bias
