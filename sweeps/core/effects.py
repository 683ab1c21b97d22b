"""The backup sweep's math on one batch: direct effects, ablations, the fit.

Plain functions on tensors; no Ray, no I/O.

A *point* is one (prompt, position) where a direct effect is read:
- logit-difference tasks: each prompt's answer position, direction
  ``u = W_U[:, correct] - W_U[:, incorrect]``;
- next-token tasks: every real position ``t`` but the last, direction
  ``u = W_U[:, X[t+1]]`` (a hooked notebook loop drops the first target and the last
  prediction so they align).
The direct effect of a component writing ``r`` is ``(r / s) · u`` with ``s`` the
final norm's scale of the **clean** run. For LayerNorm models the norm also
centres ``r``; ``(r - mean r) · u = r · (u - mean u)``, so we centre ``u`` once.

Heads are never materialised as ``[L, H, B, T, D]`` results: a head's direct
effect is ``z · (W_O u / s)``, contracting ``W_O`` with the direction first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.core import transformer as tf
from sweeps.core.transformer import ModelWeights
from tasks.base import TaskData

ABLATIONS = ("resample", "zero", "mean")


@dataclass
class Points:
    """Where direct effects are read, and in which direction."""

    batch: Int[Tensor, " P"]  # prompt index within the batch
    pos: Int[Tensor, " P"]
    u: Float[Tensor, "P D"]  # unembedding direction (centred for LayerNorm models)
    bias: Float[Tensor, " P"]  # the unembedding bias's share of the logit (difference)

    @property
    def n(self) -> int:
        return self.batch.shape[0]


def point_positions(task: TaskData) -> tuple[Int[Tensor, " P"], Int[Tensor, " P"]]:
    """(prompt, position) of every point the task's metric reads: each prompt's answer (a
    logit difference), or every position but its last (next-token prediction)."""
    if task.kind == "logit_diff":
        return torch.arange(task.n_prompts), task.answer_pos
    rows = [(b, t) for b in range(task.n_prompts) for t in range(int(task.lengths[b]) - 1)]
    return torch.tensor([b for b, _ in rows], dtype=torch.long), torch.tensor([t for _, t in rows], dtype=torch.long)


def effect_points(w: ModelWeights, task: TaskData) -> Points:
    """The points and directions of a (sub-)batch of a task; the directions in float32 (every
    direct effect is a float32 projection onto them, ``precision.py``)."""
    device = w.device
    batch, pos = point_positions(task)
    if task.kind == "logit_diff":
        assert task.correct is not None and task.incorrect is not None  # a logit-difference task has both
        correct, incorrect = task.correct.to(device), task.incorrect.to(device)
        u = (w.W_U[:, correct].float() - w.W_U[:, incorrect].float()).T
        bias = w.b_U[correct].float() - w.b_U[incorrect].float()
    else:
        targets = task.clean[batch, pos + 1].to(device)
        u = w.W_U[:, targets].T.float()
        bias = w.b_U[targets].float()
    if w.cfg.norm == "layernorm":
        u = u - u.mean(-1, keepdim=True)
    return Points(batch.to(device), pos.to(device), u.contiguous(), bias)


def first_difference(clean: Int[Tensor, "B T"], corrupt: Int[Tensor, "B T"]) -> Int[Tensor, " B"]:
    """Each minimal pair's first position where the clean and corrupt tokens differ (``T``
    where none does): before it the corrupt run's every activation is the clean run's."""
    differ = clean != corrupt
    first = differ.to(torch.uint8).argmax(1)
    return torch.where(differ.any(1), first, torch.full_like(first, clean.shape[1]))


# The widest window worth its own cost (the earlier positions' keys and values computed again
# from the clean stream, an explicit mask instead of the fused causal kernel's): a fraction of
# the prompt. Wider, the restart computes every position.
WINDOW_WORTH = 0.8


def window_span(
    first_change: Int[Tensor, " B"], batch: Int[Tensor, " P"], pos: Int[Tensor, " P"], T: int
) -> tuple[Int[Tensor, " B"], int] | None:
    """(each prompt's first position, the width) a restart whose patches change nothing before
    ``first_change[b]`` must compute, reading points ``(batch, pos)``: each prompt's positions
    from there (or from its first point, if earlier: its values are read there) to its last
    point; positions after the last point feed no point (attention is causal). None when that
    is more than ``WINDOW_WORTH`` of the positions."""
    B, device = first_change.shape[0], pos.device
    first_point = torch.full((B,), T, device=device).scatter_reduce(0, batch, pos, "amin")
    last_point = torch.full((B,), -1, device=device).scatter_reduce(0, batch, pos, "amax")
    starts = torch.minimum(first_change.to(device), first_point)
    width = int((last_point + 1 - starts).max())
    if width > WINDOW_WORTH * T:
        return None
    return torch.minimum(starts, torch.full_like(starts, T - width)), max(width, 1)


def restart_window(first_change: Int[Tensor, " B"], points: Points, clean: tf.Streams, copies: int) -> tf.Window | None:
    """``window_span`` as the ``Window`` of a restart of ``copies`` copies of the prompts."""
    span = window_span(first_change, points.batch, points.pos, int(clean[0].shape[1]))
    return None if span is None else tf.Window(span[0], span[1], clean, copies)


def pair_window(w: ModelWeights, task: TaskData, clean: tf.Streams, copies: int = 1) -> tf.Window | None:
    """``restart_window`` of a patch by the corrupt prompts' values: minimal pairs share every
    position before their first difference (``first_difference``)."""
    first = first_difference(task.clean, task.corrupt)
    return restart_window(first, effect_points(w, task), clean, copies)


def window_points(points: Points, window: tf.Window) -> Points:
    """The points at their positions within the window (a restart's activations are the window's)."""
    return Points(points.batch, points.pos - window.starts.to(points.pos.device)[points.batch], points.u, points.bias)


def restart_notes(batches: Sequence[TaskData], prefix_shared: bool = True) -> dict[str, Any]:
    """What a job's manifest entry says of its patched runs (``Job.notes``): prefix-shared (each
    batch's pairs restarted from their first difference, where that saves enough) or full, and
    the fraction of the batches' positions a patched run computes."""
    computed = total = 0
    for task in batches:
        B, T = task.clean.shape
        span = (
            window_span(first_difference(task.clean, task.corrupt), *point_positions(task), T)
            if prefix_shared
            else None
        )
        computed += B * (T if span is None else span[1])
        total += B * T
    fraction = computed / max(total, 1)
    return {"restarts": "prefix-shared" if fraction < 1 else "full", "positions_recomputed": round(fraction, 4)}


def gather(x: Float[Tensor, "... B T *rest"], points: Points, batch_dim: int) -> Tensor:
    """Pick the points out of a ``[..., B, T, ...]`` activation: ``[..., P, ...]``."""
    x = x.movedim((batch_dim, batch_dim + 1), (0, 1))
    picked = x[points.batch, points.pos]
    return picked.movedim(0, batch_dim)


def head_direct_effects(
    w: ModelWeights,
    layer: int,
    z: Float[Tensor, "*G B T H E"],
    points: Points,
    scale: Float[Tensor, " P"],
) -> Float[Tensor, "*G P H"]:
    """Direct effect of each head of ``layer`` at each point.

    Under a post-norm (Gemma 2/3, OLMo 2) a head writes its share
    ``(z_h W_O[h]) / rms(y) ⊙ w`` of the layer's output ``y``, with the ``rms(y)`` of the
    run that ``z`` comes from: the shares sum exactly to the sublayer's write."""
    zp = gather(z, points, z.ndim - 4)  # [*G P H E], the model's dtype
    u = points.u
    if w.cfg.post_norm:
        assert w.ln_attn_post is not None
        u = u * w.ln_attn_post[layer].float()
    dirs = torch.einsum("hed,pd->phe", w.W_O[layer].float(), u) / scale[:, None, None]
    effects = torch.einsum("...phe,phe->...ph", zp.float(), dirs)
    if w.cfg.post_norm:
        effects = effects * attention_inv_rms(w, layer, zp)[..., None]
    return effects


def attention_inv_rms(w: ModelWeights, layer: int, zp: Float[Tensor, "*G P H E"]) -> Float[Tensor, "*G P"]:
    """``1 / rms(y)`` of layer ``layer``'s attention output at the points (post-norm models)."""
    return tf.post_norm_inv_rms(w.cfg, tf.attention_sum(w, layer, zp))[..., 0]


def attention_bias_effects(
    w: ModelWeights, layer: int, z: Float[Tensor, "*G B T H E"], points: Points, scale: Float[Tensor, " P"]
) -> Float[Tensor, "*G P"]:
    """Direct effect of the layer's output bias ``b_O`` (which holds the folded value biases);
    under a post-norm its share divides by the run's own ``rms(y)``."""
    if not w.cfg.post_norm:
        return (points.u @ w.b_O[layer].float()) / scale
    inv = attention_inv_rms(w, layer, gather(z, points, z.ndim - 4))
    assert w.ln_attn_post is not None
    return ((points.u * w.ln_attn_post[layer].float()) @ w.b_O[layer].float()) * inv / scale


def vector_direct_effects(
    r: Float[Tensor, "*G B T D"], points: Points, scale: Float[Tensor, " P"]
) -> Float[Tensor, "*G P"]:
    """Direct effect of any residual-stream write (an MLP's output, an embedding)."""
    rp = gather(r, points, r.ndim - 3).float()
    return torch.einsum("...pd,pd->...p", rp, points.u) / scale


def final_scale(w: ModelWeights, run: tf.CleanRun, points: Points) -> Float[Tensor, " P"]:
    """The clean run's final norm scale ``s`` at each point (``ln_final.hook_scale``)."""
    return gather(tf.norm_scale(w.cfg, run.resid_final)[..., 0], points, 0)


def neuron_directions(w: ModelWeights, points: Points, scale: Float[Tensor, " P"]) -> Float[Tensor, "P M"]:
    """``(W_out[n] · u) / s`` of each neuron of the last layer's MLP at each point (``s`` the
    clean scale): a neuron with activation ``a_n`` writes ``a_n W_out[n]``, so its direct
    effect is ``a_n`` times this. Under a post-norm the MLP writes ``w ⊙ m / rms(m)`` and a
    neuron's share is ``a_n W_out[n] ⊙ w / rms(m)``: ``u`` is multiplied by ``w`` here and
    ``neuron_direct_effects`` divides by the run's own ``rms(m)``."""
    layer = w.cfg.n_layers - 1
    assert w.W_out is not None
    u = _post_norm_weighted(w, points.u, layer)
    return torch.einsum("md,pd->pm", w.W_out[layer].float(), u) / scale[:, None]


def _post_norm_weighted(w: ModelWeights, u: Float[Tensor, "P D"], layer: int) -> Float[Tensor, "P D"]:
    """``u ⊙ w`` of the layer's MLP post-norm, or ``u`` without one."""
    if not w.cfg.post_norm:
        return u
    assert w.ln_mlp_post is not None
    return u * w.ln_mlp_post[layer].float()


def neuron_direct_effects(
    directions: Float[Tensor, "P M"], hidden: Float[Tensor, "*G P M"], inv_rms: Float[Tensor, "*G P"] | None
) -> Float[Tensor, "*G P M"]:
    """Each neuron's direct effect from its activations at the points (``hidden``) and the
    ``1 / rms(m)`` of the run's MLP output under a post-norm (None without): with the bias's
    share (``mlp_bias_effects``) they sum exactly to the MLP's direct effect."""
    out = hidden.float() * directions
    return out if inv_rms is None else out.mul_(inv_rms[..., None])


def mlp_bias_direction(w: ModelWeights, points: Points, scale: Float[Tensor, " P"]) -> Float[Tensor, " P"]:
    """``(b_out · u) / s`` of the last layer's MLP (``⊙ w`` under a post-norm, whose share
    divides by the run's ``rms(m)``: it moves only there)."""
    layer = w.cfg.n_layers - 1
    assert w.b_out is not None
    u = _post_norm_weighted(w, points.u, layer)
    return (u @ w.b_out[layer].float()) / scale


@dataclass
class Decomposition:
    """Every component's direct effect; they sum to the logit (difference)."""

    embed: Float[Tensor, " P"]  # token (scaled, for Gemma) + position embedding
    heads: Float[Tensor, "L P H"]
    attn_bias: Float[Tensor, "L P"]  # b_O of each layer (holds the folded value biases)
    mlps: Float[Tensor, "L P"]
    unembed_bias: Float[Tensor, " P"]
    scale: Float[Tensor, " P"]  # the clean final-norm scale every effect above is divided by

    def total(self) -> Float[Tensor, " P"]:
        return self.embed + self.heads.sum((0, 2)) + self.attn_bias.sum(0) + self.mlps.sum(0) + self.unembed_bias

    def magnitude(self) -> Float[Tensor, " P"]:
        """Σ|terms| at each point: what ``total`` can miss the model's own sum by, in roundings
        of its dtype (``precision.py``)."""
        return (
            self.embed.abs()
            + self.heads.abs().sum((0, 2))
            + self.attn_bias.abs().sum(0)
            + self.mlps.abs().sum(0)
            + self.unembed_bias.abs()
        )


def decompose(w: ModelWeights, tokens: Int[Tensor, "B T"], run: tf.CleanRun, points: Points) -> Decomposition:
    scale = final_scale(w, run, points)
    L = w.cfg.n_layers
    heads = torch.stack([head_direct_effects(w, l, run.z[l], points, scale) for l in range(L)])
    bias = torch.stack([attention_bias_effects(w, l, run.z[l], points, scale) for l in range(L)])
    if run.mlp_out is None:
        mlps = torch.zeros(L, points.n, device=scale.device)
    else:
        mlps = vector_direct_effects(run.mlp_out, points, scale)
    return Decomposition(
        embed=vector_direct_effects(tf.embed(w, tokens), points, scale),
        heads=heads,
        attn_bias=bias,
        mlps=mlps,
        unembed_bias=points.bias,
        scale=scale,
    )


# --------------------------------------------------------------------------- #
# Ablation values
# --------------------------------------------------------------------------- #


def mean_z(runs: list[tuple[tf.CleanRun, Int[Tensor, " B"]]]) -> Float[Tensor, "L H E"]:
    """Mean of each head's ``z`` over every real token of the dataset (mean ablation)."""
    total: Tensor | None = None
    count = 0
    for run, lengths in runs:
        T = run.z.shape[2]
        z = run.z.float()  # summed over every token: in float32
        real = (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).to(z.dtype)
        s = torch.einsum("lbthe,bt->lhe", z, real.to(z.device))
        total = s if total is None else total + s
        count += int(real.sum())
    assert total is not None, "no runs to average"
    return (total / count).to(runs[0][0].z.dtype)


@dataclass
class LayerAblation:
    """Direct effects after ablating each head of a group, all in one layer ``l*``.

    ``heads``/``mlps``/``attn_bias`` cover layers ``l*..L-1`` only: earlier layers cannot
    change. ``final_dot`` and ``final_scale`` are the ablated run's own final stream at the
    points (``x′ · u`` and its final-norm scale ``s′``): its logit (difference) is
    ``final_dot / final_scale`` plus the unembedding bias (the self-repair decomposition).
    """

    layer: int
    upstream: list[int]
    heads: Float[Tensor, "G L_rest P H"]
    mlps: Float[Tensor, "G L_rest P"]
    attn_bias: Float[Tensor, "G L_rest P"] | None = None  # b_O's share (moves with rms(y) under post-norms)
    final_dot: Float[Tensor, "G P"] | None = None
    final_scale: Float[Tensor, "G P"] | None = None
    final_normed: Float[Tensor, "G P D"] | None = (
        None  # normalised x′ at the points (soft-capped models, or keep_normed)
    )
    last_hidden: Float[Tensor, "G P M"] | None = None  # the last MLP's neuron activations at the points
    last_inv_rms: Float[Tensor, "G P"] | None = None  # 1 / rms of the last MLP's output (post-norm models)
    # The same pass's un-ablated copy (``baseline=True``): what the changes are taken from.
    baseline: "LayerAblation | None" = None

    def rows(self, index: slice | int) -> "LayerAblation":
        """The copies ``index`` of every per-copy field (an int keeps its dimension)."""
        pick = slice(index, index + 1) if isinstance(index, int) else index
        cut = lambda t: None if t is None else t[pick]  # noqa: E731
        return LayerAblation(
            self.layer,
            self.upstream[pick] if isinstance(index, slice) else [],
            self.heads[pick],
            self.mlps[pick],
            cut(self.attn_bias),
            cut(self.final_dot),
            cut(self.final_scale),
            cut(self.final_normed),
            cut(self.last_hidden),
            cut(self.last_inv_rms),
        )


@dataclass
class BatchState:
    """What one batch's clean (and corrupt) runs leave behind for the backup sweep's ablations
    (built by an engine's ``backup_state``)."""

    start: int  # index of the batch's first prompt in the task
    points: Points
    scale: torch.Tensor  # [P] clean final-norm scale
    resid_pre: torch.Tensor | None  # [L, B, T, D] (the fast path's restarts start here)
    tokens: torch.Tensor  # [B, T] clean tokens (the bridge path's full forwards start here)
    replacement_z: torch.Tensor | None  # [L, B, T, H, E] corrupt z (resample only)
    de_heads: torch.Tensor  # [L, P, H] clean direct effects
    de_mlps: torch.Tensor  # [L, P]
    de_bias: torch.Tensor | None = None  # [L, P] each layer's b_O share (fast path)
    clean_dot: torch.Tensor | None = None  # [P] x · u of the clean final stream (its logit is this / s + bias)
    clean_normed: torch.Tensor | None = None  # [P, D] the clean final stream, normalised (soft-capped models)
    # The last MLP split per neuron (None where it is not computed: no MLP, no neurons the bridge exposes)
    neuron_dirs: torch.Tensor | None = None  # [P, M] (W_out[n]·u)/s, ⊙ the post-norm's weight under one
    de_neurons: torch.Tensor | None = None  # [P, M] each neuron's clean direct effect
    last_bias_dir: torch.Tensor | None = None  # [P] (b_out·u)/s of the last MLP (post-norm models)
    last_inv_rms: torch.Tensor | None = None  # [P] 1 / rms of the last MLP's clean output (post-norm models)
    # Resample ablation: each prompt's first position where the corrupt run differs from the clean
    # one, before which the replacement is the clean z (prefix-shared restarts); None otherwise.
    first_change: torch.Tensor | None = None  # [B]


def final_read(w: tf.WithNormSpec, resid_final: Float[Tensor, "*G B T D"], points: Points):
    """(``x · u``, ``s``, normalised ``x``) of a run's final stream at the points; ``x`` centred
    for LayerNorm models (``u`` is)."""
    x = gather(resid_final, points, resid_final.ndim - 3).float()
    s = tf.norm_scale(w.cfg, x)
    if w.cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x * points.u).sum(-1), s[..., 0], x / s


def ablate_heads_of_layer(
    w: ModelWeights,
    layer: int,
    heads: list[int],
    resid_pre: Float[Tensor, "B T D"],
    replacement: Float[Tensor, "G B T E"],
    points: Points,
    scale: Float[Tensor, " P"],
    read_final: bool = True,
    baseline: bool = False,
    first_change: Int[Tensor, " B"] | None = None,
    clean: Float[Tensor, "L B T D"] | None = None,
    keep_normed: bool = False,
) -> LayerAblation:
    """Replace head ``heads[g]``'s ``z`` by ``replacement[g]`` and rerun from ``layer``.

    All G ablations run as one batch of G copies of the prompts, restarting
    from the clean residual stream entering block ``layer``. With ``first_change`` (the
    replacement equals the clean ``z`` before it: a minimal pair's corrupt run) and the clean
    streams entering every block, only each prompt's positions from there to its last point
    are recomputed (``restart_window``; prefix-shared restarts). ``read_final`` also reads what
    the self-repair decomposition needs (each layer's ``b_O`` share, the final stream, and the
    last MLP's neuron activations at the points, which its restart computes anyway).

    ``keep_normed`` keeps the normalised final stream at the points (``final_normed``: a
    ``--metric`` reads the run's full logits from it; soft-capped models always keep it).

    ``baseline`` runs one more copy, un-ablated, in the same pass (``LayerAblation.baseline``).
    In bfloat16 and float16 a product's rounding depends on the shape of the batch it runs
    in, so a restart of G copies and the clean run of one differ by a rounding in every
    activation even where nothing was ablated; summed over a model's heads that noise is of
    the order of the backup itself. Changes taken from the same pass's baseline cancel it (the
    copies' rows are computed alike). In float32 the clean run is the baseline: no copy.
    """
    n_heads = len(heads)
    G, (B, T, _) = n_heads + (1 if baseline else 0), resid_pre.shape
    rope = tf.rotary_tables(w, T)
    window = None
    if first_change is not None:
        assert clean is not None  # the window's earlier positions are read from the clean streams
        window = restart_window(first_change, points, clean, G)
    if window is not None:
        resid_pre, replacement = window.take(resid_pre), window.take(replacement, 1)
        points, T = window_points(points, window), window.width

    def edit(z: Float[Tensor, "GB T H E"]) -> Float[Tensor, "GB T H E"]:
        z = z.view(G, B, *z.shape[1:]).clone()
        for g, head in enumerate(heads):  # the baseline copy (last) keeps its own z
            z[g, :, :, head] = replacement[g]
        return z.view(G * B, *z.shape[2:])

    head_des, mlp_des, bias_des = [], [], []
    last, hidden, inv_rms = w.cfg.n_layers - 1, None, None
    edits = [tf.Edit("z", layer, replace=edit)]
    for out in tf.blocks(w, resid_pre.repeat(G, 1, 1), layer, edits, rope=rope, window=window):
        l = out.layer
        if read_final and l == last and out.mlp_hidden is not None:
            hidden = gather(out.mlp_hidden.view(G, B, T, -1), points, 1)
            if w.cfg.post_norm:
                assert out.mlp_raw is not None
                raw = gather(out.mlp_raw.view(G, B, T, -1), points, 1)
                inv_rms = tf.post_norm_inv_rms(w.cfg, raw)[..., 0]
        assert out.z is not None and out.resid_post is not None
        z = out.z.view(G, B, T, *out.z.shape[2:])
        head_des.append(head_direct_effects(w, l, z, points, scale))
        if read_final:
            bias_des.append(attention_bias_effects(w, l, z, points, scale).expand(G, points.n))
        if out.mlp_out is None:
            mlp_des.append(torch.zeros(G, points.n, device=z.device))
        else:
            mlp_des.append(vector_direct_effects(out.mlp_out.view(G, B, T, -1), points, scale))
        resid = out.resid_post
    if not read_final:
        every = LayerAblation(layer, list(heads), torch.stack(head_des, 1), torch.stack(mlp_des, 1))
    else:
        dot, s, normed = final_read(w, resid.view(G, B, T, -1), points)
        every = LayerAblation(
            layer,
            list(heads),
            torch.stack(head_des, 1),
            torch.stack(mlp_des, 1),
            torch.stack(bias_des, 1),
            dot,
            s,
            normed if w.cfg.final_softcap or keep_normed else None,
            hidden,
            inv_rms,
        )
    if not baseline:
        return every
    ablated = every.rows(slice(0, n_heads))
    ablated.upstream = list(heads)
    ablated.baseline = every.rows(n_heads)
    return ablated


# --------------------------------------------------------------------------- #
# The backup fit
# --------------------------------------------------------------------------- #


@dataclass
class Fit:
    slope: float
    intercept: float
    r2: float
    n_points: int


def fit_line(x: np.ndarray, y: np.ndarray, threshold: float = 0.0) -> Fit:
    """Least squares ``y ≈ slope·x + intercept`` (a hooked notebook loop: lstsq with a ones column).

    ``threshold`` keeps only points with ``|x| > threshold`` (0: every point).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if threshold > 0:
        keep = np.abs(x) > threshold
        x, y = x[keep], y[keep]
    n = x.size
    if n < 2 or np.ptp(x) == 0:
        return Fit(float("nan"), float("nan"), float("nan"), n)
    A = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(A, y, rcond=None)
    residual = y - (slope * x + intercept)
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - np.sum(residual**2) / total if total > 0 else float("nan")
    return Fit(float(slope), float(intercept), float(r2), n)


def bootstrap_slope_ci(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the least-squares slope.

    Resamples whole ``groups`` (prompts): the points of one prompt of a
    next-token task are correlated, so resampling points alone would give
    intervals that are too narrow. Each replicate is a weighted least-squares
    fit with a point's weight = how often its prompt was drawn.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    group_of = np.unique(np.arange(x.size) if groups is None else groups, return_inverse=True)[1]
    n_groups = int(group_of.max()) + 1 if x.size else 0
    if n_groups < 3 or n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)  # [n_boot, G]
    w = counts[:, group_of].astype(np.float64)  # [n_boot, P]
    total = w.sum(1, keepdims=True)
    xc = x[None] - (w * x).sum(1, keepdims=True) / total
    yc = y[None] - (w * y).sum(1, keepdims=True) / total
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = (w * xc * yc).sum(1) / (w * xc**2).sum(1)
    slopes = slopes[np.isfinite(slopes)]
    if slopes.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(slopes, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
