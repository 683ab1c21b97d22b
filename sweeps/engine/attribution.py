"""Attribution patching (DESIGN §1.4, seed 001): node and edge scores on one batch.

Plain functions on tensors; no Ray, no I/O.

One clean forward + backward and one corrupt forward give, to first order,
what patching each component's corrupt value into the clean run would do:

    score(u)     = Σ_{b,t} ∂m/∂(stream after u) · (clean_u − corrupt_u)
    score(u → d) = Σ_{b,t} ∂m/∂(input of d)     · (clean_u − corrupt_u)

``m`` is summed over the batch's points (each prompt's answer position for
logit-difference tasks; every next-token position for text); the driver adds
the batches and divides by the task's normaliser, so a score is in units of
the normalised metric: > 0 means the component carries the clean behaviour
(patching its corrupt value in lowers the metric by about that much).

Upstream nodes ``u``: the embeddings, each head's output ``z_h W_O[h]``, each
MLP's output. Downstream inputs ``d``: the query input of each head, the key
and value inputs of each **key/value head** (in grouped-query models several
query heads share one; its edge is counted once, never split or padded),
each MLP's input, and the final residual stream. The gradient at ``d``'s
input is the gradient that flows through ``d`` alone: for q/k/v we take the
gradient at the head's (pre-rotary) q/k/v and pull it back through ``W_Q``
and the normalisation by hand (``downstream_rows``), which never materialises a
``[B, T, H, D]`` copy of the residual stream in the autograd graph. The backward
runs block by block (``block_backward``), and the gradient at a block's input is
built from those rows, so autograd never runs the q/k/v projections' backward
beside them.

Exactness (tested): the residual stream after ``u`` is read only by the
downstream inputs listed above, so by the chain rule the edge scores of ``u``
summed over every ``d`` it feeds equal ``score(u)`` exactly, in sequential,
parallel (GPT-NeoX) and grouped-query models alike; so node scores are taken
as those sums (``node_scores``), and the tests check them against the
gradients at the stream taken directly.

The forward here is ``transformer.py``'s, written out with the q/k/v and MLP
input tensors exposed, and with one optional ``Edit`` (an additive change at
one site) so that the same code runs the real patching that ``--verify-top``
compares the scores against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.engine import transformer as tf
from sweeps.engine.effects import effect_points
from sweeps.engine.nodes import EMBED, FINAL, Node, edge_name, node_from_name
from sweeps.engine.transformer import ModelConfig, ModelWeights
from tasks.base import TaskData

INPUTS = ("q", "k", "v", "mlp", "resid")


# --------------------------------------------------------------------------- #
# The graph: which upstream node feeds which downstream input
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Downstream:
    name: str  # L8H6 (a query head, or a key/value head without GQA), L8KV1 (a shared k/v head), mlp8, resid_final
    input: str  # one of INPUTS
    layer: int  # n_layers for the final residual stream
    head: int | None  # query head for q, key/value head for k and v


@dataclass(frozen=True)
class Graph:
    """Upstream nodes and downstream inputs in a fixed order.

    Upstream rows: ``embed``, then per layer its heads and its MLP. Downstream
    ``d`` reads the first ``prefix[d]`` upstream rows (everything written before it).
    """

    upstream: tuple[str, ...]
    downstream: tuple[Downstream, ...]
    prefix: tuple[int, ...]

    @property
    def n_edges(self) -> int:
        return sum(self.prefix)


def upstream_row(cfg: ModelConfig, layer: int, head: int | None) -> int:
    """Row of a head (or the MLP, ``head=None``) of ``layer`` in ``Graph.upstream``."""
    stride = cfg.n_heads + (0 if cfg.attn_only else 1)
    return 1 + layer * stride + (cfg.n_heads if head is None else head)


def build_graph(cfg: ModelConfig) -> Graph:
    H, K = cfg.n_heads, cfg.n_kv_heads
    upstream = [EMBED]
    for layer in range(cfg.n_layers):
        upstream += [Node(layer, h).name for h in range(H)] + ([] if cfg.attn_only else [Node(layer, None).name])
    downstream, prefix = [], []
    for layer in range(cfg.n_layers):
        before = upstream_row(cfg, layer, 0)  # everything of earlier layers
        for h in range(H):
            downstream.append(Downstream(f"L{layer}H{h}", "q", layer, h))
        kv_name = (lambda k: f"L{layer}H{k}") if K == H else (lambda k: f"L{layer}KV{k}")
        for letter in "kv":
            downstream += [Downstream(kv_name(k), letter, layer, k) for k in range(K)]
        prefix += [before] * (H + 2 * K)
        if not cfg.attn_only:  # a sequential MLP also reads its own layer's heads
            downstream.append(Downstream(f"mlp{layer}", "mlp", layer, None))
            prefix.append(before if cfg.parallel_attn_mlp else before + H)
    downstream.append(Downstream(FINAL, "resid", cfg.n_layers, None))
    prefix.append(len(upstream))
    return Graph(tuple(upstream), tuple(downstream), tuple(prefix))


# --------------------------------------------------------------------------- #
# The forward, with its inputs exposed and one optional edit
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Edit:
    """Add ``delta`` at one site: where a node writes (``embed``, ``attn_out``,
    ``mlp_out``) or at one downstream input only (``q``/``k``/``v`` of one head,
    ``mlp`` input, ``resid`` = the final residual stream)."""

    site: str
    layer: int
    delta: Float[Tensor, "B T D"]
    head: int | None = None


@dataclass
class Trace:
    """The tensors attribution differentiates at or patches with, per layer run."""

    resid_pre: list[Tensor] = field(default_factory=list)  # [B T D] each block's input
    q: list[Tensor] = field(default_factory=list)  # [B T H E] before the rotary embedding
    k: list[Tensor] = field(default_factory=list)  # [B T K E]
    v: list[Tensor] = field(default_factory=list)  # [B T K E]
    z: list[Tensor] = field(default_factory=list)  # [B T H E]
    mlp_in: list[Tensor] = field(default_factory=list)  # [B T D] what the MLP reads, before its norm
    mlp_normed: list[Tensor] = field(default_factory=list)  # [B T D] normalize(mlp_in)
    mlp_out: list[Tensor] = field(default_factory=list)  # [B T D]
    resid_post: list[Tensor] = field(default_factory=list)  # [B T D] each block's output (a cut forward only)
    resid_final: Tensor | None = None


def _qkv(w: ModelWeights, layer: int, x: Float[Tensor, "B T D"], edit: Edit | None):
    q, k, v = tf.qkv(w, layer, tf.sublayer_input(w.cfg, x))
    if edit is not None and edit.layer == layer and edit.site in ("q", "k", "v"):
        # Only this head's input sees the change (path patching of one edge).
        W, b = {"q": (w.W_Q, w.b_Q), "k": (w.W_K, w.b_K), "v": (w.W_V, w.b_V)}[edit.site]
        h = edit.head
        one = torch.einsum("btd,de->bte", tf.sublayer_input(w.cfg, x + edit.delta), W[layer, h]) + b[layer, h]
        mask = torch.zeros(W.shape[1], dtype=one.dtype, device=one.device)
        mask[h] = 1.0
        mask = mask[:, None]
        if edit.site == "q":
            q = q * (1 - mask) + one[:, :, None] * mask
        elif edit.site == "k":
            k = k * (1 - mask) + one[:, :, None] * mask
        else:
            v = v * (1 - mask) + one[:, :, None] * mask
    return q, k, v


def forward(
    w: ModelWeights,
    resid: Float[Tensor, "B T D"],
    start: int = 0,
    edit: Edit | None = None,
    cut: bool = False,
) -> Trace:
    """Blocks ``start..L-1`` from the stream entering block ``start``, recording a Trace.

    ``cut`` (attribution's clean run, with autograd on): each block's graph is its own.
    The block's input and its q, k and v are leaves, so that ``block_backward`` can run
    the backward one block at a time, and never through the q/k/v projections: the
    downstream rows are those products, head by head, and the gradient at the block's
    input is their sum (plus the skip and MLP paths)."""
    cfg = w.cfg
    rope = tf.rotary_tables(w, resid.shape[1])

    def at(site: str, layer: int) -> Tensor | None:
        return edit.delta if edit is not None and edit.site == site and edit.layer == layer else None

    trace = Trace()
    if (d := at("embed", start)) is not None:
        resid = resid + d
    for layer in range(start, cfg.n_layers):
        x = resid.detach().requires_grad_(True) if cut else resid
        trace.resid_pre.append(x)
        if cut:
            with torch.no_grad():
                q, k, v = (t.requires_grad_(True) for t in _qkv(w, layer, x, edit))
        else:
            q, k, v = _qkv(w, layer, x, edit)
        trace.q.append(q), trace.k.append(k), trace.v.append(v)
        z = tf.attend(w, layer, q, k, v, rope)
        trace.z.append(z)
        attn = tf.attention_out(w, layer, z)
        if (d := at("attn_out", layer)) is not None:
            attn = attn + d
        resid = after_heads = x + attn
        if not cfg.attn_only:
            mlp_in = x if cfg.parallel_attn_mlp else after_heads
            trace.mlp_in.append(mlp_in)
            if (d := at("mlp", layer)) is not None:
                mlp_in = mlp_in + d
            normed = tf.sublayer_input(cfg, mlp_in)
            if normed is mlp_in:  # no pre-norm (OLMo 2): a node of its own, so its gradient is the MLP's alone
                normed = mlp_in.view_as(mlp_in)
            trace.mlp_normed.append(normed)
            out = tf.mlp_write(w, layer, tf.mlp_from_normalized(w, layer, normed))
            if (d := at("mlp_out", layer)) is not None:
                out = out + d
            trace.mlp_out.append(out)
            resid = after_heads + out
        if cut:
            trace.resid_post.append(resid)
    if (d := at("resid", cfg.n_layers)) is not None:
        resid = resid + d
    trace.resid_final = resid
    return trace


# --------------------------------------------------------------------------- #
# The metric, summed over a batch's points
# --------------------------------------------------------------------------- #


def metric_terms(w: ModelWeights, resid_final: Float[Tensor, "B T D"], task: TaskData,
                 scratch: Scratch | None = None) -> Float[Tensor, "P"]:
    """The metric at each point: the logit difference (correct − incorrect) at each
    prompt's answer position, or the log-probability of each next token."""
    points = effect_points(w, task)
    x = tf.normalize(w.cfg, resid_final[points.batch, points.pos])
    cap = w.cfg.final_softcap  # the metric is on the model's real, capped logits
    if task.kind == "logit_diff" and cap:
        def capped(tokens: Tensor) -> Tensor:
            raw = torch.einsum("pd,dp->p", x, w.W_U[:, tokens]) + w.b_U[tokens] + x @ w.W_U_mean + w.b_U_mean
            return cap * torch.tanh(raw / cap)

        return capped(task.correct.to(w.device)) - capped(task.incorrect.to(w.device))
    if task.kind == "logit_diff":
        return (x * points.u).sum(-1) + points.bias
    targets = task.clean.to(w.device)[points.batch, points.pos + 1]
    if cap:
        return NextTokenLogProb.apply(x, w.W_U, w.b_U, targets, scratch or Scratch(), cap, w.W_U_mean, w.b_U_mean)
    return NextTokenLogProb.apply(x, w.W_U, w.b_U, targets, scratch or Scratch())


class Scratch:
    """Large buffers reused from one call to the next (the upstream changes, the block of
    downstream rows, the read-out's logits), each grown to the largest size asked for.

    Why: on a CPU a tensor over 32 MB is fresh memory from the kernel every time, and
    touching fresh memory is slow (measured on this VM: 0.11 s for a first pass over
    400 MB, 0.01 s for a second). One attribution pass asks for about 700 MB of them.
    A worker's ``AttributionJob`` keeps one for all its shards, so only its first pass
    pays for fresh memory (profiled on IOI, one pass a shard: the products that write
    the upstream changes took 0.78 s a shard with fresh buffers, 0.18 s with kept ones,
    of about 4 s). Nothing here is a result.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of ``shape``; the same memory as the last ``get`` of ``name``."""
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


class NextTokenLogProb(torch.autograd.Function):
    """``log softmax(x W_U + b_U)[target]`` per row, by chunks of rows, with its gradient
    in ``x`` computed in the same pass.

    Autograd's ``log_softmax(...).gather`` keeps two ``[P, V]`` tensors (logits and
    log-probabilities) for the backward and writes two more in it; at 576 positions
    and SmolLM2's 49,152 tokens each is 113 MB. Here each chunk's logits are written
    into one reused buffer (``Scratch``) and turned in place into ``softmax − onehot``,
    whose product with ``W_Uᵀ`` is the gradient: ``d logp / dx = W_U[:, t] − W_U softmax``.
    Only ``[P, D]`` is kept. The log-sum-exp is taken by hand (max, in-place exp, sum)
    because ``logsumexp`` writes a ``[c, V]`` temporary: profiled, it took 40 % of the
    read-out. Chunks are large: each one reads all of ``W_U`` twice, and on a CPU
    chunks of 64 rows were slower than autograd's one pass. ``W_U`` and ``b_U`` get no
    gradient (weights are constants here).
    """

    MAX_LOGITS = 1 << 25  # floats of logits per chunk (128 MB): 682 rows of SmolLM2's vocabulary

    @staticmethod
    def forward(ctx, x: Float[Tensor, "P D"], W_U: Float[Tensor, "D V"], b_U: Float[Tensor, "V"],
                targets: Int[Tensor, "P"], scratch: Scratch, cap: float = 0.0,
                W_U_mean: Float[Tensor, "D"] | None = None, b_U_mean: Tensor | None = None) -> Float[Tensor, "P"]:
        """With ``cap`` (Gemma 2's final soft-cap) the logits are ``cap · tanh(raw / cap)`` of the
        raw (uncentred) logits ``x W_U + b_U + x·W_U_mean + b_U_mean``, and the gradient gains
        the cap's derivative ``1 − tanh²`` and the mean's direction."""
        need_grad = ctx.needs_input_grad[0]
        out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        grad = torch.empty_like(x) if need_grad else None
        V = W_U.shape[1]
        chunk = max(1, min(x.shape[0], max(64, NextTokenLogProb.MAX_LOGITS // V)))
        buffer = scratch.get("logits", (chunk, V), x.dtype, x.device)
        slope = scratch.get("cap_slope", (chunk, V), x.dtype, x.device) if cap else None
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            n = min(chunk, x.shape[0] - start)
            logits = torch.addmm(b_U, x[rows], W_U, out=buffer[:n])  # [n, V]
            if cap:
                offset = x[rows] @ W_U_mean + b_U_mean  # [n]
                th = torch.tanh(logits.add_(offset[:, None]).div_(cap), out=slope[:n])
                logits.copy_(th).mul_(cap)
                th.square_().neg_().add_(1.0)  # d capped / d raw = 1 − tanh²
            t = targets[rows, None]
            picked = logits.gather(-1, t)[:, 0]
            top = logits.amax(-1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place: exp(logit − max)
            total = e.sum(-1, keepdim=True)
            out[rows] = picked - top[:, 0] - total.log()[:, 0]
            if need_grad:
                p = e.div_(total)  # softmax, in place
                p.scatter_add_(-1, t, torch.full_like(t, -1, dtype=p.dtype))  # softmax − onehot
                if cap:
                    p.mul_(slope[:n])
                    torch.mm(p, W_U.T, out=grad[rows]).add_(p.sum(-1, keepdim=True) * W_U_mean).neg_()
                else:
                    torch.mm(p, W_U.T, out=grad[rows]).neg_()
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, g: Float[Tensor, "P"]):
        (grad,) = ctx.saved_tensors
        return g[:, None] * grad, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# Attribution of one batch
# --------------------------------------------------------------------------- #


def norm_vjp_(cfg: ModelConfig, x: Float[Tensor, "B T D"], g: Float[Tensor, "N B T D"]) -> Float[Tensor, "N B T D"]:
    """``J^T g`` for ``y = normalize(x)`` (weight-free LayerNorm/RMSNorm), for N cotangents
    at once, **in place** in ``g`` (which is returned).

    With ``y = c / s`` (``c`` the centred input for LayerNorm, ``x`` for RMSNorm,
    ``s = sqrt(mean c² + eps)``): ``J^T g = P (g − y (y·g) / D) / s`` where ``P``
    centres (LayerNorm only). In place because ``g`` is a slice of the block of
    downstream rows: no ``[N B T D]`` temporary is made.
    """
    if cfg.norm == "none" or not cfg.pre_norm:
        return g
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
        g.sub_(g.mean(-1, keepdim=True))
    inv_s = (x.pow(2).mean(-1, keepdim=True) + cfg.eps).rsqrt()
    y = x * inv_s
    y_dot_g = torch.einsum("btd,nbtd->nbt", y, g) / x.shape[-1]  # (y·g)/D without a [N B T D] product
    return g.addcmul_(y, y_dot_g[..., None], value=-1.0).mul_(inv_s)


@dataclass
class BatchAttribution:
    """Raw sums over one batch (not yet divided by the task's normaliser)."""

    nodes: Float[Tensor, "U"]
    edges: Float[Tensor, "n_edges"]  # in Graph order: each downstream's prefix of upstream rows
    clean_metric: float  # Σ metric over the batch's points, clean run
    corrupt_metric: float
    n_points: int


def upstream_deltas(
    w: ModelWeights, clean: Trace, corrupt: Trace, d_embed: Float[Tensor, "B T D"], scratch: Scratch | None = None
) -> Float[Tensor, "U B T D"]:
    """``clean_u − corrupt_u`` of every upstream node, in ``Graph.upstream`` order
    (in ``scratch``'s buffer when one is given)."""
    cfg = w.cfg
    B, T, D = d_embed.shape
    n_upstream = upstream_row(cfg, cfg.n_layers, 0)  # one past the last layer's rows
    out = (scratch or Scratch()).get("deltas", (n_upstream, B, T, D), d_embed.dtype, d_embed.device)
    out[0] = d_embed
    for layer in range(cfg.n_layers):
        row = upstream_row(cfg, layer, 0)
        heads = out[row : row + cfg.n_heads]
        if cfg.post_norm:  # each head's write is its share of the layer's post-normed output
            shares = tf.head_writes(w, layer, clean.z[layer]) - tf.head_writes(w, layer, corrupt.z[layer])
            heads.copy_(shares.permute(2, 0, 1, 3))
        else:
            dz = (clean.z[layer] - corrupt.z[layer]).reshape(B * T, cfg.n_heads, -1).transpose(0, 1)
            torch.bmm(dz, w.W_O[layer], out=heads.view(cfg.n_heads, B * T, D))
        if not cfg.attn_only:
            torch.sub(clean.mlp_out[layer], corrupt.mlp_out[layer], out=out[row + cfg.n_heads])
    return out


def edge_products(
    deltas: Float[Tensor, "U N"], rows: Float[Tensor, "R N"], prefix: list[int]
) -> Float[Tensor, "n_edges"]:
    """``rows[i] · deltas[j]`` for every ``j < prefix[i]``, row-major (Graph order).

    ``prefix`` never decreases along the rows, so one matrix product of the first
    ``prefix[-1]`` deltas against every row covers every edge, and the prefixes are
    kept from it. For a block of four layers (``ROWS_PER_PRODUCT``) the corner
    outside the prefixes is about 15 % more multiply-adds than the edges, but one
    large product reads each delta once and runs near the forward's speed: measured
    on SmolLM2's blocks (8 prompts × 64 tokens, 2 cores), 0.37–0.44 s a pass against
    0.48–0.57 s for one product over the common prefix plus one small product per run
    of equal prefixes (15 rows against at most 39 deltas: a third of the speed). The
    product is taken delta-major (``deltas @ rowsᵀ``), which ran 15–25 % faster than
    ``rows @ deltasᵀ`` for these shapes (a long contraction, few rows).
    """
    n = prefix[-1]
    scores = torch.mm(deltas[:n], rows.T)  # [n, R]
    keep = torch.arange(n, device=rows.device)[:, None] < torch.tensor(prefix, device=rows.device)[None, :]
    return scores.T[keep.T]


def node_scores(graph: Graph, edges: Float[Tensor, "n_edges"]) -> Float[Tensor, "U"]:
    """Each upstream node's score, the sum of its edges' scores.

    Exact (up to the order of a float sum): the stream right after a node is read only
    by the downstream inputs of the graph, so by the chain rule the gradient there is
    the sum of the gradients through each of them. The tests check the sums against
    ``grad(stream after the node) · change`` taken directly, with hooks, in sequential,
    parallel and grouped-query models. Summing the edges saves the direct products: two
    more passes over every upstream change (400 MB for a pass of 9 prompts on SmolLM2).
    """
    upstream = torch.cat([torch.arange(p, device=edges.device) for p in graph.prefix])
    return torch.zeros(len(graph.upstream), dtype=edges.dtype, device=edges.device).index_add_(0, upstream, edges)


def rows_per_layer(cfg: ModelConfig) -> int:
    """Downstream inputs of one layer: q per head, k and v per key/value head, the MLP's input."""
    return cfg.n_heads + 2 * cfg.n_kv_heads + (0 if cfg.attn_only else 1)


def downstream_rows(
    w: ModelWeights, layer: int, clean: Trace, g_q: Tensor, g_k: Tensor, g_v: Tensor, g_mlp: Tensor | None,
    out: Float[Tensor, "n B T D"],
) -> Float[Tensor, "n B T D"]:
    """The gradient at each downstream input of ``layer`` (q per head, k and v per key/value
    head, then the MLP's input), pulled back through its own projection and norm, written
    into ``out`` (``rows_per_layer`` rows).

    A q/k/v row is ``J_normᵀ (W g)`` for the head's gradient ``g`` (``E`` wide) and its
    projection ``W`` (``D × E``). With ``y = normalize(x) = P x / s`` (``P`` centres, for
    LayerNorm only) ``J_normᵀ r = (P r − y (y·r) / D) / s``, and every part of it but the
    last rank-one term is taken in the head's ``E`` dimensions: ``P W g`` is ``W`` centred
    over ``D`` times ``g``; ``y·(W g) = (y W)·g`` is the head's own (bias-free) q, k or v
    dotted with ``g``; ``1/s`` scales ``g``. So a row is one product written straight into
    ``out`` and one pass over it (``− y ⊗ a``), not a product and three passes
    (``norm_vjp_``: a quarter of a layer's rows' time on SmolLM2, 1.8 of 7.2 ms).
    """
    cfg = w.cfg
    B, T, H, E = g_q.shape
    K = g_k.shape[2]
    x = clean.resid_pre[layer]
    if cfg.norm == "none" or not cfg.pre_norm:
        inv_s, y = None, None
    else:
        inv_s, y = tf.norm_scale(cfg, x).reciprocal(), tf.normalize(cfg, x)  # [B T 1], [B T D]
    # [H or K, B·T, E] @ [H or K, E, D], written straight into the rows.
    g_in = out[: H + 2 * K].view(H + 2 * K, B * T, cfg.d_model)
    coefs = []
    for g, W, b, act, rows in ((g_q, w.W_Q, w.b_Q, clean.q, g_in[:H]), (g_k, w.W_K, w.b_K, clean.k, g_in[H : H + K]),
                               (g_v, w.W_V, w.b_V, clean.v, g_in[H + K :])):
        W = W[layer]  # [n, D, E]
        if cfg.norm == "layernorm":
            W = W - W.mean(1, keepdim=True)
        if inv_s is not None:
            coefs.append(((act[layer] - b[layer]) * g).sum(-1) * (inv_s / cfg.d_model))  # [B T n]: (y·W g) / (D s)
            g = g * inv_s[..., None]
        torch.bmm(g.reshape(B * T, -1, E).transpose(0, 1), W.transpose(1, 2), out=rows)
    if y is not None:
        a = torch.cat(coefs, dim=-1).reshape(B * T, H + 2 * K).T[..., None]  # [n, B·T, 1]
        g_in.addcmul_(y.reshape(B * T, cfg.d_model), a, value=-1.0)
    if g_mlp is not None:
        out[H + 2 * K].copy_(g_mlp)
        norm_vjp_(cfg, clean.mlp_in[layer], out[H + 2 * K :])
    return out


# Downstream rows per edge product: enough that each product reads the deltas once
# for many rows, few enough that a block of rows stays small next to the deltas.
ROWS_PER_PRODUCT = 64


def block_backward(
    w: ModelWeights, layer: int, clean: Trace, g_post: Float[Tensor, "B T D"], rows: Float[Tensor, "n B T D"]
) -> Float[Tensor, "B T D"] | None:
    """One block of the clean run's backward (a ``cut`` forward): from the gradient at the
    block's output, write its downstream rows into ``rows`` (``downstream_rows``) and
    return the gradient at its input (None for block 0, whose input nothing reads back).

    Autograd runs the block from its output down to its q, k, v, its MLP's normalised input
    and its input's skip and MLP paths; the q/k/v paths to the input are the sum of the
    q/k/v rows (the rows are ``J_normᵀ W g`` head by head, and a sum of vector-Jacobian
    products is the product of the sum). So the q/k/v projections' backward, which plain
    autograd would run beside the rows, is never run: 0.12 of a forward on SmolLM2.
    """
    cfg = w.cfg
    wanted = [clean.q[layer], clean.k[layer], clean.v[layer]] + ([] if cfg.attn_only else [clean.mlp_normed[layer]])
    if layer > 0:
        wanted.append(clean.resid_pre[layer])
    grads = torch.autograd.grad(clean.resid_post[layer], wanted, g_post)
    downstream_rows(w, layer, clean, *grads[:3], None if cfg.attn_only else grads[3], rows)
    if layer == 0:
        return None
    n_qkv = cfg.n_heads + 2 * cfg.n_kv_heads
    return grads[-1] + rows[:n_qkv].sum(0)


def attribute(w: ModelWeights, graph: Graph, task: TaskData, scratch: Scratch | None = None) -> BatchAttribution:
    """Node and edge scores of one batch: one clean forward+backward, one corrupt forward.

    Pass the same ``scratch`` to consecutive calls (passes of one shard) to reuse their
    large buffers."""
    cfg, device = w.cfg, w.device
    scratch = scratch or Scratch()
    clean_tokens, corrupt_tokens = task.clean.to(device), task.corrupt.to(device)
    with torch.no_grad():
        corrupt_embedded = tf.embed(w, corrupt_tokens)
        corrupt = forward(w, corrupt_embedded)
        corrupt_metric = metric_terms(w, corrupt.resid_final, task, scratch).sum()
        embedded = tf.embed(w, clean_tokens)
    with torch.enable_grad():
        clean = forward(w, embedded, cut=True)
        final = clean.resid_final.detach().requires_grad_(True)
        terms = metric_terms(w, final, task, scratch)
        (g_final,) = torch.autograd.grad(terms.sum(), final)
    L = cfg.n_layers
    with torch.no_grad():
        deltas = upstream_deltas(w, clean, corrupt, embedded - corrupt_embedded, scratch)
        flat = deltas.flatten(1)  # [U, B·T·D]

        # Edge scores: the gradient at each downstream input, pulled back through that
        # input's own projection and norm, against every upstream change written before it.
        # The backward runs block by block from the last, writing each block's rows; the
        # rows of consecutive layers (and, with the last layer, the final stream's) go into
        # one product (edge_products), written into one block of rows that every product
        # reuses (fresh memory is slow to touch).
        per_layer = rows_per_layer(cfg)
        layers_per_block = max(1, -(-ROWS_PER_PRODUCT // per_layer))
        block = scratch.get("rows", (min(L, layers_per_block) * per_layer + 1, *clean_tokens.shape, cfg.d_model),
                            flat.dtype, device)
        firsts = range(0, L, layers_per_block)
        edges: list[Tensor] = [torch.empty(0)] * len(firsts)
        g = g_final
        for b in reversed(range(len(firsts))):
            layers = range(firsts[b], min(L, firsts[b] + layers_per_block))
            n = len(layers) * per_layer
            prefix = list(graph.prefix[layers[0] * per_layer : layers[0] * per_layer + n])
            if layers[-1] == L - 1:  # the final stream reads every upstream node
                block[n].copy_(g_final)
                n, prefix = n + 1, [*prefix, graph.prefix[-1]]
            for i in reversed(range(len(layers))):
                g = block_backward(w, layers[i], clean, g, block[i * per_layer : (i + 1) * per_layer])
            edges[b] = edge_products(flat, block[:n].flatten(1), prefix)
        edge_scores = torch.cat(edges).double().cpu()
        assert edge_scores.numel() == graph.n_edges
    return BatchAttribution(
        nodes=node_scores(graph, edge_scores), edges=edge_scores,
        clean_metric=float(terms.detach().sum()), corrupt_metric=float(corrupt_metric), n_points=int(terms.shape[0]),
    )


# --------------------------------------------------------------------------- #
# Real patching of single nodes and edges (what --verify-top checks against)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Target:
    """A node (``downstream`` None) or an edge to patch with its corrupt value."""

    upstream: str
    downstream: str | None = None
    input: str | None = None

    @property
    def label(self) -> str:
        """Its name (docs/naming.md): ``L23H3``, or an edge ``L23H3->L24H4.q``."""
        return self.upstream if self.downstream is None else edge_name(self.upstream, self.downstream, self.input)


def _upstream_delta(w: ModelWeights, name: str, clean: Trace, corrupt: Trace, d_embed: Tensor) -> tuple[str, int, Tensor]:
    """(write site, layer, corrupt − clean) of one upstream node."""
    if name == EMBED:
        return "embed", 0, -d_embed
    node = node_from_name(name)
    if node.head is None:
        return "mlp_out", node.layer, corrupt.mlp_out[node.layer] - clean.mlp_out[node.layer]
    if w.cfg.post_norm:
        l, h = node.layer, node.head
        return "attn_out", l, tf.head_writes(w, l, corrupt.z[l])[:, :, h] - tf.head_writes(w, l, clean.z[l])[:, :, h]
    dz = corrupt.z[node.layer][:, :, node.head] - clean.z[node.layer][:, :, node.head]
    return "attn_out", node.layer, dz @ w.W_O[node.layer, node.head]


def _downstream(graph: Graph, name: str, input: str) -> Downstream:
    for d in graph.downstream:
        if d.name == name and d.input == input:
            return d
    raise ValueError(f"no downstream input {name}:{input} in this model")


@torch.no_grad()
def patch_metric(w: ModelWeights, graph: Graph, task: TaskData, targets: list[Target]) -> Float[Tensor, "n"]:
    """Σ metric over the batch with each target's corrupt value patched into the clean run.

    A node: its output is replaced by its corrupt output for every reader.
    An edge ``u → d``: only ``d``'s input sees ``u``'s corrupt value (path
    patching of that input); every other reader sees the clean one. The run
    restarts at the edit's layer from the clean stream.
    """
    device = w.device
    clean_tokens, corrupt_tokens = task.clean.to(device), task.corrupt.to(device)
    clean_embed = tf.embed(w, clean_tokens)
    corrupt_embed = tf.embed(w, corrupt_tokens)
    d_embed = clean_embed - corrupt_embed
    clean, corrupt = forward(w, clean_embed), forward(w, corrupt_embed)
    L = w.cfg.n_layers
    scratch = Scratch()
    out = []
    for target in targets:
        site, layer, delta = _upstream_delta(w, target.upstream, clean, corrupt, d_embed)
        if target.downstream is not None:
            d = _downstream(graph, target.downstream, target.input)
            site, layer = d.input, d.layer
            head = d.head
        else:
            head = None
        if site == "resid":
            final = clean.resid_final + delta
        else:
            resid = clean.resid_pre[layer] if layer < L else clean.resid_final
            final = forward(w, resid, layer, Edit(site, layer, delta, head)).resid_final
        out.append(metric_terms(w, final, task, scratch).sum())
    return torch.stack(out).double().cpu() if out else torch.zeros(0, dtype=torch.float64)
