"""The scale sweep's math on tensors: subspaces, patches, restarts, read-outs.

Plain functions; no Ray, no I/O. A *node* is a head's output or an MLP's output
(``nodes.py``); its activation ``a`` is a ``[B, T, D]`` residual-stream write.

Patching node ``n`` of a base input with a source input at scale ``s``:

- ``full``: ``a ← s · a_src`` (the usual scale-ablation loop's first half);
- ``high_variance``: write ``a = μ + P(a − μ) + R`` with ``P`` the projection on
  the node's top-``k`` principal directions at that position; replace only
  ``P(a − μ)`` by ``s · P(a_src − μ)``;
- ``low_variance``: replace only the rest ``R = (a − μ) − P(a − μ)``.

With ``self_patch`` the source is the base itself (pure scaling). A common
shortcut sums the coefficients ``a · v_k`` without multiplying them by the
directions; the projection here is the intended ``Σ_k ((a − μ) · v_k) v_k``.

A patch changes the residual stream by ``Δ = a_new − a`` exactly where the
node writes, so the model restarts from there: a head's patch from the
clean residual after block ``l``'s attention (its MLP and later blocks run
again), an MLP's patch from block ``l+1``. Nothing before the node reruns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sweeps.core import effects, metrics
from sweeps.core import transformer as tf
from sweeps.core.nodes import Node
from sweeps.core.transformer import ModelWeights

SUBSPACES = ("full", "high_variance", "low_variance")


# --------------------------------------------------------------------------- #
# Per-position PCA of a node's activations
# --------------------------------------------------------------------------- #


@dataclass
class Subspace:
    """A node's activation mean and top-k principal directions, at each position."""

    mean: Float[Tensor, "T D"]
    basis: Float[Tensor, "T K D"]  # orthonormal rows

    def project(self, a: Float[Tensor, "*B T D"]) -> Float[Tensor, "*B T D"]:
        """``P(a − μ) = Σ_k ((a − μ) · v_k) v_k`` at each position."""
        T = a.shape[-2]
        centred = a - self.mean[:T]
        coef = torch.einsum("...td,tkd->...tk", centred, self.basis[:T])
        return torch.einsum("...tk,tkd->...td", coef, self.basis[:T])

    def split(self, a: Float[Tensor, "*B T D"]) -> tuple[Tensor, Tensor, Tensor]:
        """``(μ, P(a − μ), R)`` with ``a = μ + P(a − μ) + R``."""
        T = a.shape[-2]
        high = self.project(a)
        return self.mean[:T].expand_as(a), high, a - self.mean[:T] - high


def fit_subspace(acts: Float[Tensor, "N T D"], real: Bool[Tensor, "N T"], k: int) -> Subspace:
    """PCA with ``k`` components per position over the prompts that reach it (centred).

    Prompts shorter than a position contribute a zero row to that position's
    centred matrix, which changes neither its singular values nor its right
    singular vectors, so one batched SVD covers every position. In float32 whatever the
    activations' dtype.
    """
    acts = acts.float()
    weight = real.to(acts.dtype)[..., None]  # [N, T, 1]
    count = weight.sum(0).clamp(min=1)  # [T, 1]
    mean = (acts * weight).sum(0) / count  # [T, D]
    centred = ((acts - mean) * weight).transpose(0, 1)  # [T, N, D]
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # [T, min(N, D), D]
    return Subspace(mean, vh[:, :k].contiguous())


# --------------------------------------------------------------------------- #
# Patches
# --------------------------------------------------------------------------- #


def patched_part(a: Float[Tensor, "N T D"], subspace: str, sub: Subspace | None) -> Float[Tensor, "N T D"]:
    """The part of ``a`` a patch in ``subspace`` mode replaces."""
    if subspace == "full":
        return a
    if sub is None:
        raise ValueError(f"subspace {subspace!r} needs a fitted Subspace")
    _, high, rest = sub.split(a.float())
    if subspace == "high_variance":
        return high
    if subspace == "low_variance":
        return rest
    raise ValueError(f"unknown subspace {subspace!r}; choose one of {', '.join(SUBSPACES)}")


def patch_delta(
    part_base: Float[Tensor, "N T D"],
    part_source: Float[Tensor, "N T D"],
    base: Int[Tensor, " G"],
    source: Int[Tensor, " G"],
    scale: Float[Tensor, " G"],
) -> Float[Tensor, "G T D"]:
    """``Δ = s · part(a_source) − part(a_base)`` for G (base, source, scale) rows at once."""
    return scale[:, None, None] * part_source[source] - part_base[base]


@dataclass
class Restarts:
    """The restarts a node's (scale, pair) rows need: one per distinct patch."""

    scale: Int[Tensor, " R"]  # index into the scales
    pair: Int[Tensor, " R"]  # a pair whose patch this is (the first such)
    count: Int[Tensor, " R"]  # how many (scale, pair) rows share it

    def select(self, keep: Bool[Tensor, " R"]) -> "Restarts":
        return Restarts(self.scale[keep], self.pair[keep], self.count[keep])


def distinct_restarts(pairs: Int[Tensor, "P 2"], scales: Float[Tensor, " S"], source_is_base_run: bool) -> Restarts:
    """One restart per distinct ``Δ = s · part(a_source) − part(a_base)`` among the S × P rows.

    Two rules, both exact:

    - at scale 0 the patch is ``−part(a_base)`` whatever the source, so the rows of one
      base share one restart (with every ordered pair of n prompts, scale 0 costs n
      restarts instead of n(n − 1));
    - a row whose source is its own base at scale 1 patches nothing when the source
      activations are the base's own run (self-patching, or resampling from itself):
      its outcome is the clean one, no flip and no drop, so it needs no restart.

    Rows are numbered ``scale_index · P + pair_index``, as the sweep lays them out.
    """
    S, P = scales.shape[0], pairs.shape[0]
    row = torch.arange(S * P, device=pairs.device)
    s, p = row // P, row % P
    base, source = pairs[p, 0], pairs[p, 1]
    scale = scales[s]
    unchanged = (scale == 1) & (base == source) if source_is_base_run else torch.zeros_like(base, dtype=torch.bool)
    keep = torch.nonzero(~unchanged)[:, 0]
    key = torch.stack([s, base, torch.where(scale == 0, -1, source)], 1)[keep]
    distinct, which, count = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((distinct.shape[0],), S * P, device=pairs.device).scatter_reduce_(0, which, keep, "amin")
    return Restarts(first // P, first % P, count)


def first_change(
    tokens: Int[Tensor, "N T"],
    source_tokens: Int[Tensor, "N T"],
    base: Int[Tensor, " G"],
    source: Int[Tensor, " G"],
    scale: Float[Tensor, " G"],
) -> Int[Tensor, " G"]:
    """Each row's first position where its patch can be non-zero: at scale 1 the patch
    ``part(a_source) − part(a_base)`` is zero wherever the two prompts' activations are equal,
    i.e. before their first differing token (attention is causal); any other scale changes
    every position (0)."""
    first = effects.first_difference(tokens[base], source_tokens[source])
    return torch.where(scale == 1, first, torch.zeros_like(first))


def node_activation(w: ModelWeights, node: Node, run: tf.CleanRun) -> Float[Tensor, "N T D"]:
    """The node's output, as TransformerLens's hooks see it: ``hook_result`` of the head
    (``z_h W_O[h]``) or ``hook_mlp_out``; under a post-norm, before it (the sublayer's
    post-norm then runs on the patched output)."""
    if node.head is None:
        out = run.mlp_raw if w.cfg.post_norm else run.mlp_out
        assert out is not None  # a model with MLPs: a node ``mlpL`` exists
        return out[node.layer]
    return torch.einsum("nte,ed->ntd", run.z[node.layer, :, :, node.head], w.W_O[node.layer, node.head])


def restarts_after_attention(w: ModelWeights, node: Node) -> bool:
    """Whether a patch of ``node`` re-enters block ``node.layer`` before its MLP."""
    return node.head is not None and not (w.cfg.parallel_attn_mlp or w.cfg.attn_only)


@dataclass
class RestartPoint:
    """Where ``node``'s patch enters the clean run: the stream before the node's sublayer
    writes (``stream``) and, under a post-norm, the sublayer's clean output before its
    norm (``out``); without one the patch adds straight to the stream after the write."""

    stream: Float[Tensor, "N T D"]
    out: Float[Tensor, "N T D"] | None


def restart_point(w: ModelWeights, node: Node, run: tf.CleanRun) -> RestartPoint:
    """The clean state where ``node``'s patch enters (see ``resume``)."""
    l = node.layer
    if w.cfg.post_norm:
        if node.head is not None:
            return RestartPoint(run.resid_pre[l], tf.attention_sum(w, l, run.z[l]))
        assert run.mlp_raw is not None
        return RestartPoint(run.resid_pre[l] + tf.attention_out(w, l, run.z[l]), run.mlp_raw[l])
    if restarts_after_attention(w, node):
        return RestartPoint(run.resid_pre[l] + tf.attention_out(w, l, run.z[l]), None)
    return RestartPoint(run.resid_pre[l + 1] if l + 1 < w.cfg.n_layers else run.resid_final, None)


def resume(
    w: ModelWeights,
    node: Node,
    start: RestartPoint,
    base: Int[Tensor, " G"],
    delta: Float[Tensor, "G T D"],
    rope: tf.Rope,
    window: tf.Window | None = None,
) -> Float[Tensor, "G T D"]:
    """Patch rows ``base`` of the clean run by ``delta`` at ``node`` and run to the final residual.

    ``window`` (a ``Window`` over the G rows, ``copies=1``): ``delta`` is zero before each row's
    window, so only the window's positions are computed (prefix-shared restarts), and the
    final residual is the window's ``[G, W, D]``."""
    l = node.layer

    def rows(x: Float[Tensor, "N T D"]) -> Float[Tensor, "G T|W D"]:
        x = x[base]
        return x if window is None else window.take(x)

    d = delta if window is None else window.take(delta)
    after_attention = restarts_after_attention(w, node) or (start.out is not None and node.head is not None)
    if start.out is None:
        resid = rows(start.stream) + d
    elif node.head is not None:  # post-norm: the layer's norm runs again on the patched output
        resid = rows(start.stream) + tf.attention_write(w, l, rows(start.out) + d)
    else:
        resid = rows(start.stream) + tf.mlp_write(w, l, rows(start.out) + d)
    if after_attention:
        return tf.forward(w, resid, l, from_mid=True, rope=rope, window=window).resid_final
    return tf.forward(w, resid, l + 1, rope=rope, window=window).resid_final


class WindowedPatcher:
    """``resume`` for rows of one clean run at ``node``, read at ``positions``: each call takes
    rows ``base``, their patches ``delta`` and (optionally) each row's ``first_change`` (its
    patch is zero before it, ``first_change`` above), and restarts the rows in a window from
    there when that saves enough (``effects.window_span``), else at every position. Counts the
    positions it computed and those a full restart would have (the manifest's note)."""

    def __init__(self, w: ModelWeights, node: Node, clean: tf.CleanRun, T: int, positions: Int[Tensor, " Q"]):
        self.w, self.node, self.clean, self.T, self.positions = w, node, clean, T, positions
        self.start = restart_point(w, node, clean)
        self.rope = tf.rotary_tables(w, T)
        self.computed = self.total = 0

    def __call__(
        self, base: Int[Tensor, " G"], delta: Float[Tensor, "G T D"], first_change: Int[Tensor, " G"] | None = None
    ) -> Float[Tensor, "G Q D"]:
        G, Q, T, positions = base.shape[0], self.positions.shape[0], self.T, self.positions
        rows = torch.arange(G, device=base.device)
        span = None
        if first_change is not None:
            span = effects.window_span(first_change, rows.repeat_interleave(Q), positions.repeat(G), T)
        self.total += G * T
        if span is None:
            self.computed += G * T
            return resume(self.w, self.node, self.start, base, delta.to(self.w.dtype), self.rope)[:, positions]
        window = tf.Window(span[0], span[1], tf.RowStreams(self.clean.resid_pre, base))
        self.computed += G * window.width
        final = resume(self.w, self.node, self.start, base, delta.to(self.w.dtype), self.rope, window)
        return final[rows[:, None], positions[None, :] - window.starts[:, None].to(positions.device)]


# --------------------------------------------------------------------------- #
# Read-out at the answer positions
# --------------------------------------------------------------------------- #


@dataclass
class Readout:
    metric: Float[Tensor, "G Q"]  # logit difference, or log-probability of the target token
    top1: Int[Tensor, "G Q"]


def readout(
    w: ModelWeights,
    resid_final: Float[Tensor, "G T D"],
    positions: Int[Tensor, " Q"],
    correct: Int[Tensor, "G Q"],
    incorrect: Int[Tensor, "G Q"] | None,
    rows_per_block: int | None = None,
    vocab_per_block: int = 8192,
    metric: str | None = None,
    sets: tuple[Int[Tensor, "G Kc"], Int[Tensor, "G Ki"]] | None = None,
    reference: Float[Tensor, "G Q V"] | None = None,
) -> Readout:
    """Top-1 token and task metric at ``positions`` of every row.

    ``metric``: one chosen with ``--metric`` (``sweeps/core/metrics.py``) instead of the task's
    own, read off the full logits at the positions (each row's answer ``sets``, correct and
    incorrect; ``reference``: the clean run's log-probabilities there, for ``kl``).

    ``incorrect`` given: metric = logit(correct) − logit(incorrect); else the
    log-probability of ``correct`` (next-token tasks), which needs the log-sum-exp over
    the whole vocabulary at every position read out.

    The logits are never held whole: they are made a block of rows × a block of the
    vocabulary at a time, into one small buffer, and folded into a running max, argmax
    and (for log-probabilities) a running sum of ``exp(logit − max)``, rescaled when the
    max grows (the online softmax). A block is small enough that the passes over it mostly
    hit the cache; over whole rows of logits (62 MB a chunk) they went to memory and cost
    an eighth of the read-out. The chosen tokens' logits are dot products.
    """
    x = tf.normalize(w.cfg, resid_final[:, positions])  # [G, Q, D]
    G, Q, D = x.shape
    x = x.reshape(G * Q, D)
    if metric is not None and metric not in ("logit_diff", "log_prob"):
        logits = torch.addmm(w.b_U, x, w.W_U).float()  # [G·Q, V]
        if w.cfg.final_softcap:  # the model's real, capped logits
            logits = _capped(w, logits, x)
        c, i = (None, None) if sets is None else (t.repeat_interleave(Q, 0) for t in sets)
        ref = None if reference is None else reference.reshape(G * Q, -1)
        value = metrics.metric_from_logits(metric, logits, c, i, ref)
        return Readout(value.view(G, Q), logits.argmax(-1).view(G, Q))
    log_prob = incorrect is None
    top, top1, total = running_max_and_exp_sum(w, x, log_prob, rows_per_block, vocab_per_block)
    right = _token_logits(w, x, correct.reshape(-1))
    if w.cfg.final_softcap:  # the task's metric is on the model's real, capped logits
        right = _capped(w, right, x)
    if log_prob:
        assert total is not None  # the running sum is kept for log-probabilities
        value = right - top - total.log()
    else:
        assert incorrect is not None
        wrong = _token_logits(w, x, incorrect.reshape(-1))
        value = right - (_capped(w, wrong, x) if w.cfg.final_softcap else wrong)
    return Readout(value.view(G, Q), top1.view(G, Q))


def _token_logits(w: ModelWeights, x: Float[Tensor, "N D"], tokens: Int[Tensor, " N"]) -> Float[Tensor, " N"]:
    """``x · W_U[:, t] + b_U[t]`` for one token per row, in float32."""
    return torch.einsum("nd,dn->n", x.float(), w.W_U[:, tokens].float()) + w.b_U[tokens].float()


def _capped(w: ModelWeights, logits: Float[Tensor, " N *V"], x: Float[Tensor, "N D"]) -> Float[Tensor, " N *V"]:
    """The real logits of a soft-capped model from centred ones (``tf.cap_logits``), row by row."""
    assert w.W_U_mean is not None and w.b_U_mean is not None  # kept for soft-capped models
    offset = x.float() @ w.W_U_mean.float() + w.b_U_mean.float()
    offset = offset.view(-1, *([1] * (logits.ndim - 1)))
    return w.cfg.final_softcap * torch.tanh((logits + offset) / w.cfg.final_softcap)


def running_max_and_exp_sum(
    w: ModelWeights, x: Float[Tensor, "N D"], exp_sum: bool, rows: int | None, vocab: int
) -> tuple[Float[Tensor, " N"], Int[Tensor, " N"], Float[Tensor, " N"] | None]:
    """Per row: the largest logit, its token (the first, as ``argmax``), and (``exp_sum``)
    ``Σ_v exp(logit_v − largest)``, block by block over rows and vocabulary."""
    N, V = x.shape[0], w.cfg.d_vocab
    # On this 2-core CPU, 1024 × 8192 blocks (32 MB of logits) were among the fastest of those
    # tried (315 to 1260 rows × 4096 to 16384 tokens: 2.22–2.40 s against 2.59 s for whole
    # rows); a GPU wants larger products.
    rows = rows or (1024 if x.device.type == "cpu" else 8192)
    buffer = x.new_empty(min(rows, N) * min(vocab, V))
    tops, top1s, totals = [], [], []
    for r0 in range(0, N, rows):
        xr = x[r0 : r0 + rows]
        n = xr.shape[0]
        top = torch.full((n,), float("-inf"), device=x.device)  # float32, whatever the model's dtype
        top1 = torch.zeros(n, dtype=torch.long, device=x.device)
        total = torch.zeros(n, device=x.device)
        for v0 in range(0, V, vocab):
            v1 = min(V, v0 + vocab)
            logits = torch.addmm(w.b_U[v0:v1], xr, w.W_U[:, v0:v1], out=buffer[: n * (v1 - v0)].view(n, v1 - v0))
            logits = logits.float()  # the same buffer in float32; a float32 copy of the block otherwise
            if w.cfg.final_softcap:
                logits = _capped(w, logits, xr)
            block_top, block_top1 = logits.max(-1)
            top1 = torch.where(block_top > top, block_top1 + v0, top1)  # ties keep the earlier token
            new_top = torch.maximum(top, block_top)
            if exp_sum:
                total = total * (top - new_top).exp() + logits.sub_(new_top[:, None]).exp_().sum(-1)
            top = new_top
        tops.append(top)
        top1s.append(top1)
        totals.append(total)
    return torch.cat(tops), torch.cat(top1s), torch.cat(totals) if exp_sum else None
