"""Attribution patching (docs/circuits.md): node and edge scores on one batch.

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

The forward is the engine's own (``transformer.forward``): the clean run records
the q/k/v and MLP inputs it differentiates at, and real patching (what
``--verify-top`` compares the scores against) is that forward with one ``Edit``,
an additive change at one named site.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.core import metrics
from sweeps.core import transformer as tf
from sweeps.core.effects import effect_points, pair_window
from sweeps.core.nodes import EMBED, FINAL, Node, edge_name, node_from_name
from sweeps.core.transformer import Edit, ModelConfig, ModelWeights, Trace, forward
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


class GraphShape(Protocol):
    """What ``build_graph`` reads of a model's shape: a ``ModelConfig`` or a ``GraphConfig``."""

    @property
    def n_layers(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def n_kv_heads(self) -> int: ...

    @property
    def attn_only(self) -> bool: ...

    @property
    def parallel_attn_mlp(self) -> bool: ...


@dataclass(frozen=True)
class GraphConfig:
    """What ``build_graph`` reads of a model's shape, where it is not a ``ModelConfig`` (the
    bridge's configuration, or a config file before any weights load)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    attn_only: bool = False
    parallel_attn_mlp: bool = False


def upstream_row(cfg: GraphShape, layer: int, head: int | None) -> int:
    """Row of a head (or the MLP, ``head=None``) of ``layer`` in ``Graph.upstream``."""
    stride = cfg.n_heads + (0 if cfg.attn_only else 1)
    return 1 + layer * stride + (cfg.n_heads if head is None else head)


def build_graph(cfg: GraphShape) -> Graph:
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


# The records attribution reads from the engine's forward (``transformer.forward``):
# its clean run differentiates at q, k, v, the MLP's normalised input and each block's
# input; real patching reads where each node writes.
CLEAN_RECORD = ("resid_pre", "q", "k", "v", "z", "mlp_in", "mlp_normed", "mlp_out", "resid_post")
WRITES_RECORD = ("resid_pre", "z", "mlp_out")

# The forward's intervention site at each downstream input.
INPUT_SITE = {"q": "q", "k": "k", "v": "v", "mlp": "mlp_in", "resid": "resid_final"}


# --------------------------------------------------------------------------- #
# The metric, summed over a batch's points
# --------------------------------------------------------------------------- #


def metric_terms(
    w: ModelWeights,
    resid_final: Float[Tensor, "B T D"],
    task: TaskData,
    scratch: Scratch | None = None,
    reference: Float[Tensor, "P V"] | None = None,
) -> Float[Tensor, " P"]:
    """The metric at each point: the task's own (the logit difference, correct − incorrect, at
    each prompt's answer position, or the log-probability of each next token), or the one
    ``task.metric`` names (``sweeps/core/metrics.py``), read off the model's real logits there.
    ``reference``: the clean run's log-probabilities at the points (``reference_logprobs``),
    for the metrics that compare with it (``kl``)."""
    points = effect_points(w, task)
    name = task.metric_name
    if name not in ("logit_diff", "log_prob"):
        at = resid_final[points.batch, points.pos]  # [P, D]
        logits = tf.logits(w, at)  # [P, V] float32, soft-capped where the model caps
        if name in metrics.NEEDS_REFERENCE and reference is None:
            raise ValueError(f"metric {name} needs the clean run's log-probabilities (reference_logprobs)")
        if task.kind != "logit_diff":
            return metrics.metric_from_logits(name, logits, reference=reference)
        correct, incorrect = task.answer_sets()
        return metrics.metric_from_logits(
            name,
            logits,
            correct.to(w.device)[points.batch],
            incorrect.to(w.device)[points.batch],
            reference,
        )
    x = tf.normalize(w.cfg, resid_final[points.batch, points.pos])  # the model's dtype
    cap = w.cfg.final_softcap  # the metric is on the model's real, capped logits
    if task.kind == "logit_diff" and cap:
        assert w.W_U_mean is not None and w.b_U_mean is not None  # kept for soft-capped models
        assert task.correct is not None and task.incorrect is not None
        W_U_mean, b_U_mean = w.W_U_mean, w.b_U_mean

        xf = x.float()

        def capped(tokens: Tensor) -> Tensor:
            W_t, b_t = w.W_U[:, tokens].float(), w.b_U[tokens].float()
            raw = torch.einsum("pd,dp->p", xf, W_t) + b_t + xf @ W_U_mean.float() + b_U_mean.float()
            return cap * torch.tanh(raw / cap)

        return capped(task.correct.to(w.device)) - capped(task.incorrect.to(w.device))
    if task.kind == "logit_diff":
        return (x.float() * points.u).sum(-1) + points.bias
    targets = task.clean.to(w.device)[points.batch, points.pos + 1]
    if cap:
        return NextTokenLogProb.apply(x, w.W_U, w.b_U, targets, scratch or Scratch(), cap, w.W_U_mean, w.b_U_mean)
    return NextTokenLogProb.apply(x, w.W_U, w.b_U, targets, scratch or Scratch())


@torch.no_grad()
def reference_logprobs(
    w: ModelWeights, clean_final: Float[Tensor, "B T D"], task: TaskData
) -> Float[Tensor, "P V"] | None:
    """The clean run's next-token log-probabilities at the task's points, where its metric
    compares with them (``kl``); None otherwise."""
    if task.metric_name not in metrics.NEEDS_REFERENCE:
        return None
    points = effect_points(w, task)
    return torch.log_softmax(tf.logits(w, clean_final[points.batch, points.pos]), -1)


class Scratch:
    """Large buffers reused from one call to the next (the upstream changes, the block of
    downstream rows, the read-out's logits), each grown to the largest size asked for.

    Why: on a CPU a tensor over 32 MB is fresh memory from the kernel every time, and
    touching fresh memory is several times slower than touching it again. One attribution
    pass asks for about 700 MB of them. A worker's ``AttributionJob`` keeps one for all its
    shards, so only its first pass pays for fresh memory. Nothing here is a result.
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
    because ``logsumexp`` writes a ``[c, V]`` temporary as large as the chunk's logits.
    Chunks are large: each one reads all of ``W_U`` twice, so small chunks would read it
    many times over. ``W_U`` and ``b_U`` get no
    gradient (weights are constants here).
    """

    MAX_LOGITS = 1 << 25  # floats of logits per chunk (128 MB): 682 rows of SmolLM2's vocabulary

    @staticmethod
    def forward(
        ctx,
        x: Float[Tensor, "P D"],
        W_U: Float[Tensor, "D V"],
        b_U: Float[Tensor, " V"],
        targets: Int[Tensor, " P"],
        scratch: Scratch,
        cap: float = 0.0,
        W_U_mean: Float[Tensor, " D"] | None = None,
        b_U_mean: Tensor | None = None,
    ) -> Float[Tensor, " P"]:
        """With ``cap`` (Gemma 2's final soft-cap) the logits are ``cap · tanh(raw / cap)`` of the
        raw (uncentred) logits ``x W_U + b_U + x·W_U_mean + b_U_mean``, and the gradient gains
        the cap's derivative ``1 − tanh²`` and the mean's direction."""
        need_grad = ctx.needs_input_grad[0]
        # The logits in the model's dtype; their softmax, the output and the gradient's
        # softmax − onehot in float32 (the same buffers when the model is float32).
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad = torch.empty_like(x) if need_grad else None
        V = W_U.shape[1]
        chunk = max(1, min(x.shape[0], max(64, NextTokenLogProb.MAX_LOGITS // V)))
        buffer = scratch.get("logits", (chunk, V), x.dtype, x.device)
        slope = scratch.get("cap_slope", (chunk, V), torch.float32, x.device) if cap else None
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, start + chunk)
            n = min(chunk, x.shape[0] - start)
            logits = torch.addmm(b_U, x[rows], W_U, out=buffer[:n]).float()  # [n, V]
            if cap:
                assert W_U_mean is not None and b_U_mean is not None and slope is not None
                offset = x[rows].float() @ W_U_mean.float() + b_U_mean.float()  # [n]
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
                assert grad is not None
                p = e.div_(total)  # softmax, in place
                p.scatter_add_(-1, t, torch.full_like(t, -1, dtype=p.dtype))  # softmax − onehot
                if cap:
                    assert W_U_mean is not None and slope is not None
                    p.mul_(slope[:n])
                    torch.mm(p.to(W_U.dtype), W_U.T, out=grad[rows]).add_(p.sum(-1, keepdim=True) * W_U_mean).neg_()
                else:
                    torch.mm(p.to(W_U.dtype), W_U.T, out=grad[rows]).neg_()
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, g: Float[Tensor, " P"]):
        (grad,) = ctx.saved_tensors
        return (g[:, None] * grad).to(grad.dtype), None, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# Attribution of one batch
# --------------------------------------------------------------------------- #


def norm_vjp_(cfg: tf.NormSpec, x: Float[Tensor, "B T D"], g: Float[Tensor, "N B T D"]) -> Float[Tensor, "N B T D"]:
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

    nodes: Float[Tensor, " U"]
    edges: Float[Tensor, " n_edges"]  # in Graph order: each downstream's prefix of upstream rows
    clean_metric: float  # Σ metric over the batch's points, clean run
    corrupt_metric: float
    n_points: int
    # ``split_kv``: each query head's own copy of its shared k/v input (``query_head_kv_edges`` order)
    kv_heads: Float[Tensor, " n_kv_head_edges"] | None = None


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
) -> Float[Tensor, " n_edges"]:
    """``rows[i] · deltas[j]`` for every ``j < prefix[i]``, row-major (Graph order).

    ``prefix`` never decreases along the rows, so one matrix product of the first
    ``prefix[-1]`` deltas against every row covers every edge, and the prefixes are
    kept from it. For a block of four layers (``ROWS_PER_PRODUCT``) the corner
    outside the prefixes is about 15 % more multiply-adds than the edges, but one
    large product reads each delta once and runs near the forward's speed per FLOP,
    where one product per run of equal prefixes (15 rows against at most 39 deltas) is
    small and slow. The product is taken delta-major (``deltas @ rowsᵀ``), the faster
    order for these shapes (a long contraction, few rows).
    """
    n = prefix[-1]
    scores = torch.mm(deltas[:n], rows.T).float()  # [n, R]: one rounding of the model's dtype each
    keep = torch.arange(n, device=rows.device)[:, None] < torch.tensor(prefix, device=rows.device)[None, :]
    return scores.T[keep.T]


def node_scores(graph: Graph, edges: Float[Tensor, " n_edges"]) -> Float[Tensor, " U"]:
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
    w: ModelWeights,
    layer: int,
    clean: Trace,
    g_q: Tensor,
    g_k: Tensor,
    g_v: Tensor,
    g_mlp: Tensor | None,
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
        inv_s, y = tf.norm_scale(cfg, x).reciprocal().to(x.dtype), tf.normalize(cfg, x)  # [B T 1], [B T D]
    # [H or K, B·T, E] @ [H or K, E, D], written straight into the rows.
    g_in = out[: H + 2 * K].view(H + 2 * K, B * T, cfg.d_model)
    coefs = []
    for g, W, b, act, rows in (
        (g_q, w.W_Q, w.b_Q, clean.q, g_in[:H]),
        (g_k, w.W_K, w.b_K, clean.k, g_in[H : H + K]),
        (g_v, w.W_V, w.b_V, clean.v, g_in[H + K :]),
    ):
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
    w: ModelWeights,
    layer: int,
    clean: Trace,
    g_post: Float[Tensor, "B T D"],
    rows: Float[Tensor, "n B T D"],
    split: Callable[[int, Tensor], None] | None = None,
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
    if split is not None:  # the gradient at the heads' mixed values, for ``query_head_kv_grads``
        wanted.append(clean.z[layer])
    if layer > 0:
        wanted.append(clean.resid_pre[layer])
    grads = torch.autograd.grad(clean.resid_post[layer], wanted, g_post)
    g_q, g_k, g_v = grads[:3]
    if split is not None:
        split(layer, grads[4 - cfg.attn_only])
    downstream_rows(w, layer, clean, g_q, g_k, g_v, None if cfg.attn_only else grads[3], rows)
    if layer == 0:
        return None
    n_qkv = cfg.n_heads + 2 * cfg.n_kv_heads
    return grads[-1] + rows[:n_qkv].sum(0)


METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations", "exact")


def _metric_gradient(
    w: ModelWeights, trace: Trace, task: TaskData, scratch: Scratch, reference: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(the metric's terms, their summed gradient at the final stream) of a ``cut`` trace."""
    final = trace.resid_final.detach().requires_grad_(True)
    terms = metric_terms(w, final, task, scratch, reference)
    (g_final,) = torch.autograd.grad(terms.sum(), final)
    return terms.detach(), g_final


def _gradient_rows(
    w: ModelWeights,
    graph: Graph,
    trace: Trace,
    g_final: Tensor,
    scratch: Scratch,
    consume,
    first: int = 0,
    split: Callable[[int, Tensor], None] | None = None,
) -> None:
    """The clean run's backward, block by block from the last down to block ``first``
    (``trace`` recorded from block 0, or padded so that ``trace.q[layer]`` is that layer's):
    calls ``consume(layers, rows, prefix)`` with each block of consecutive layers' downstream
    rows (the final stream's row after the last layer's) and their prefixes in ``graph``;
    ``split(layer, g_z)``, if given, with each layer's gradient at its heads' mixed values."""
    L = w.cfg.n_layers
    per_layer = rows_per_layer(w.cfg)
    layers_per_block = max(1, -(-ROWS_PER_PRODUCT // per_layer))
    B, T, D = g_final.shape
    block = scratch.get("rows", (min(L, layers_per_block) * per_layer + 1, B, T, D), g_final.dtype, g_final.device)
    g: Tensor | None = g_final
    for b in reversed(range(first, L, layers_per_block)):
        layers = range(b, min(L, b + layers_per_block))
        n = len(layers) * per_layer
        prefix = list(graph.prefix[layers[0] * per_layer : layers[0] * per_layer + n])
        if layers[-1] == L - 1:  # the final stream reads every upstream node
            block[n].copy_(g_final)
            n, prefix = n + 1, [*prefix, graph.prefix[-1]]
        for i in reversed(range(len(layers))):
            assert g is not None  # only block 0 returns None, and it is the last
            g = block_backward(w, layers[i], trace, g, block[i * per_layer : (i + 1) * per_layer], split)
        consume(layers, block[:n], prefix)


def _edge_scores_of_run(w, graph, trace, g_final, flat, scratch, kv_heads: list[Tensor] | None = None) -> Tensor:
    """Every edge's ``gradient at d · (clean_u − corrupt_u)`` for one ``cut`` run (Graph order);
    with ``kv_heads`` (a list, filled here), each query head's own k/v edges too
    (``query_head_kv_edges`` order)."""
    parts: list[Tensor] = []

    def consume(layers, rows, prefix):
        parts.append(edge_products(flat, rows.flatten(1), prefix))

    split = None
    if kv_heads is not None:
        rope = tf.rotary_tables(w, g_final.shape[1])
        by_layer: dict[int, Tensor] = {}

        def split(layer: int, g_z: Tensor) -> None:
            g_k, g_v = query_head_kv_grads(w, layer, trace, g_z, rope)
            rows = query_head_kv_rows(w, layer, trace, g_k, g_v)  # [2H, B, T, D]
            before = upstream_row(w.cfg, layer, 0)
            by_layer[layer] = edge_products(flat, rows.flatten(1), [before] * rows.shape[0])

    _gradient_rows(w, graph, trace, g_final, scratch, consume, split=split)
    if kv_heads is not None:
        kv_heads.append(torch.cat([by_layer[layer] for layer in sorted(by_layer)]))
    return torch.cat(parts[::-1])


# --------------------------------------------------------------------------- #
# Each query head's own copy of a shared key/value input (grouped-query models)
# --------------------------------------------------------------------------- #


def query_head_kv_edges(graph: Graph) -> list[tuple[str, str, str]]:
    """(upstream, query head, ``k`` or ``v``) of every edge into a query head's own copy of its
    key/value input, in the order ``attribute(split_kv=True)`` scores them: layer by layer,
    ``k`` then ``v``, query head by query head, each the upstream nodes its layer reads.

    EAP-IG's graph (and MIB's) has these edges: it ungroups grouped-query attention, so each
    query head reads its own k and v. Ours scores one k and one v input per key/value head;
    a group's edges here add up to that edge (chain rule: the shared input's gradient is the
    sum of the gradients through each query head that reads it)."""
    heads = sorted({(d.layer, d.head) for d in graph.downstream if d.input == "q"})
    before = {d.layer: p for d, p in zip(graph.downstream, graph.prefix) if d.input == "q"}
    out = []
    for layer in sorted(before):
        for letter in "kv":
            for lh, h in heads:
                if lh == layer:
                    out += [(u, f"L{layer}H{h}", letter) for u in graph.upstream[: before[layer]]]
    return out


def query_head_kv_grads(
    w: ModelWeights, layer: int, trace: Trace, g_z: Float[Tensor, "B T H E"], rope
) -> tuple[Float[Tensor, "B T H E"], Float[Tensor, "B T H E"]]:
    """The metric's gradient at each query head's own copy of its (pre-QK-norm, pre-rotary)
    key and value: the layer's attention run again with k and v repeated per query head (the
    same forward: query head ``h`` reads copy ``h`` of key/value head ``h // group``), and
    differentiated from ``g_z``, the gradient at the heads' mixed values. Summed over a
    group, these are the gradients at the shared k and v (the autograd of the grouped run)."""
    cfg = w.cfg
    if cfg.qk_norm == "all" and cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(
            "per-query-head k/v scores: a QK-norm over all key heads at once couples the key/value "
            "heads, so a query head's copy of one is not defined"
        )
    ungrouped = copy.copy(w.local())
    ungrouped.cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
    with torch.enable_grad():
        q = trace.q[layer].detach()
        k = trace.k[layer].detach().repeat_interleave(cfg.group_size, dim=2).requires_grad_(True)
        v = trace.v[layer].detach().repeat_interleave(cfg.group_size, dim=2).requires_grad_(True)
        z = tf.attend(ungrouped, layer, q, k, v, rope)
        g_k, g_v = torch.autograd.grad(z, (k, v), g_z)
    return g_k, g_v


def query_head_kv_rows(
    w: ModelWeights, layer: int, trace: Trace, g_k: Float[Tensor, "B T H E"], g_v: Float[Tensor, "B T H E"]
) -> Float[Tensor, "2H B T D"]:
    """Each query head's k/v gradient pulled back through its key/value head's projection and
    the pre-norm to the stream: ``J_normᵀ W_K[h // group] g_k[h]`` (k rows, then v rows)."""
    cfg = w.cfg
    G = cfg.group_size
    W_K = w.W_K[layer].repeat_interleave(G, dim=0)  # [H, D, E]
    W_V = w.W_V[layer].repeat_interleave(G, dim=0)
    rows = torch.cat([torch.einsum("bthe,hde->hbtd", g_k, W_K), torch.einsum("bthe,hde->hbtd", g_v, W_V)]).contiguous()
    return norm_vjp_(cfg, trace.resid_pre[layer].detach(), rows)


def ig_alphas(steps: int) -> list[float]:
    """The interpolation points ``k / steps``, k = 1..steps (a right Riemann sum that ends at
    the clean run: one step is plain EAP), the clean end first."""
    return [k / steps for k in range(steps, 0, -1)]


def attribute(
    w: ModelWeights,
    graph: Graph,
    task: TaskData,
    scratch: Scratch | None = None,
    method: str = "eap",
    steps: int = 1,
    split_kv: bool = False,
) -> BatchAttribution:
    """Node and edge scores of one batch (raw sums), by ``method``:

    - ``eap``: the gradient at each downstream input of the clean run, times each upstream
      node's change ``clean_u − corrupt_u``: one clean forward+backward, one corrupt forward.
    - ``eap-ig-inputs``: the gradient averaged over ``steps`` runs whose input embeddings lie
      on the line from the corrupt to the clean ones (``k / steps``, k = 1..steps), times the
      same changes (Hanna et al. 2024): ``steps`` forwards+backwards.
    - ``eap-ig-activations``: for the edges out of each group of upstream nodes (the
      embeddings, one layer's heads, one MLP), the gradient averaged over ``steps`` runs in
      which that group's output alone lies on the line from its corrupt to its clean value;
      each run restarts at the group's layer.
    - ``exact``: see ``exact_scores`` (real patching; not here).

    With one step both IG methods equal ``eap`` (tested). Node scores are the sums of their
    edges (exact, see ``node_scores``). Pass the same ``scratch`` to consecutive calls
    (passes of one shard) to reuse their large buffers.

    ``split_kv`` (``eap`` and ``eap-ig-inputs``): also score each query head's own copy of its
    key/value input (``kv_heads``, ``query_head_kv_edges`` order), the edges EAP-IG's
    ungrouped graph has; 2H more downstream rows a layer."""
    if method not in METHODS[:3]:
        raise ValueError(f"attribute: unknown gradient method {method!r}")
    if split_kv and method == "eap-ig-activations":
        raise ValueError("per-query-head k/v scores (split_kv) are made by eap and eap-ig-inputs")
    device = w.device
    scratch = scratch or Scratch()
    clean_tokens, corrupt_tokens = task.clean.to(device), task.corrupt.to(device)
    with torch.no_grad():
        corrupt_embedded = tf.embed(w, corrupt_tokens)
        corrupt = forward(w, corrupt_embedded, record=("z", "mlp_out"))
        embedded = tf.embed(w, clean_tokens)
        d_embed = embedded - corrupt_embedded
    kv_heads: Tensor | None = None
    with torch.enable_grad():
        clean = forward(w, embedded, record=CLEAN_RECORD, cut=True)
        reference = reference_logprobs(w, clean.resid_final.detach(), task)
        terms, g_final = _metric_gradient(w, clean, task, scratch, reference)
    with torch.no_grad():
        corrupt_metric = metric_terms(w, corrupt.resid_final, task, scratch, reference).sum()
    with torch.no_grad():
        deltas = upstream_deltas(w, clean, corrupt, d_embed, scratch)
        flat = deltas.flatten(1)  # [U, B·T·D]
        if method == "eap-ig-activations":
            edge_scores = _ig_activation_edges(w, graph, task, clean, corrupt, d_embed, flat, steps, scratch, reference)
        else:
            # The gradient at each downstream input, pulled back through that input's own
            # projection and norm, against every upstream change written before it; the
            # backward runs block by block from the last (``_gradient_rows``).
            kv_parts: list[Tensor] | None = [] if split_kv else None
            edge_scores = _edge_scores_of_run(w, graph, clean, g_final, flat, scratch, kv_parts)
            for alpha in ig_alphas(steps)[1:] if method == "eap-ig-inputs" else ():
                with torch.enable_grad():
                    run = forward(w, corrupt_embedded + alpha * d_embed, record=CLEAN_RECORD, cut=True)
                    _, g = _metric_gradient(w, run, task, scratch, reference)
                edge_scores += _edge_scores_of_run(w, graph, run, g, flat, scratch, kv_parts)
                del run
            if method == "eap-ig-inputs":
                edge_scores /= steps
            if kv_parts is not None:
                kv_heads = (torch.stack(kv_parts).sum(0) / len(kv_parts)).double().cpu()
        edge_scores = edge_scores.double().cpu()
        assert edge_scores.numel() == graph.n_edges
    return BatchAttribution(
        nodes=node_scores(graph, edge_scores),
        edges=edge_scores,
        clean_metric=float(terms.sum()),
        corrupt_metric=float(corrupt_metric),
        n_points=int(terms.shape[0]),
        kv_heads=kv_heads,
    )


def _edge_offsets(graph: Graph) -> Tensor:
    """Index of each downstream input's first edge in the Graph-order edge vector."""
    return torch.tensor([0, *torch.tensor(graph.prefix).cumsum(0)[:-1].tolist()])


def _toward(change: Tensor, a: float) -> Callable[[Tensor], Tensor]:
    """``x ↦ x − (1 − a)·change``: the value ``a`` of the way from corrupt to clean, when
    ``x`` is the clean value and ``change`` is clean − corrupt."""
    return lambda x: x - (1 - a) * change


def _ig_activation_edges(
    w, graph, task, clean: Trace, corrupt: Trace, d_embed, flat, steps, scratch, reference=None
) -> Tensor:
    """EAP-IG-activations: edges out of each group (the embeddings; one layer's heads; one
    MLP) score against the gradient averaged over ``steps`` runs with the group's output
    interpolated ``corrupt + α (clean − corrupt)``, restarted from the clean stream at the
    group's layer (nothing before it changes)."""
    cfg = w.cfg
    L = cfg.n_layers
    edges = torch.zeros(graph.n_edges, dtype=torch.float32, device=flat.device)
    offsets = _edge_offsets(graph).to(flat.device)
    groups = [("embed", 0, [0])]
    for layer in range(L):
        groups.append(("heads", layer, [upstream_row(cfg, layer, h) for h in range(cfg.n_heads)]))
        if not cfg.attn_only:
            groups.append(("mlp", layer, [upstream_row(cfg, layer, None)]))
    for kind, layer, upstream in groups:
        first_row = upstream[0]
        for alpha in ig_alphas(steps):
            if kind == "embed":
                edit = tf.Edit("resid_pre", 0, replace=_toward(d_embed, alpha))
            elif kind == "heads":
                dz = clean.z[layer] - corrupt.z[layer]
                edit = tf.Edit("z", layer, replace=_toward(dz, alpha))
            else:
                dm = clean.mlp_out[layer] - corrupt.mlp_out[layer]
                edit = tf.Edit("mlp_out", layer, replace=_toward(dm, alpha))
            with torch.enable_grad():
                run = forward(w, clean.resid_pre[layer].detach(), layer, [edit], record=CLEAN_RECORD, cut=True)
                for name in CLEAN_RECORD:  # index the restarted run's records by absolute layer
                    setattr(run, name, [None] * layer + getattr(run, name))
                _, g = _metric_gradient(w, run, task, scratch, reference)

            def consume(layers, rows, prefix, upstream=upstream, first_row=first_row):
                # Only the downstream inputs that read this group: prefix beyond its rows.
                start = layers[0] * rows_per_layer(cfg)
                reads = [i for i, p in enumerate(prefix) if p > first_row]
                if not reads:
                    return
                sel = torch.tensor(reads, device=rows.device)
                scores = (flat[upstream] @ rows.flatten(1)[sel].T).float()  # [n_group, n_reads]
                at = offsets[start + sel][None, :] + torch.tensor(upstream, device=rows.device)[:, None]
                edges.index_add_(0, at.flatten(), scores.flatten())

            _gradient_rows(w, graph, run, g, scratch, consume, first=layer)
            del run
    return edges / steps


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


def _upstream_delta(
    w: ModelWeights, name: str, clean: Trace, corrupt: Trace, d_embed: Tensor
) -> tuple[str, int, Tensor]:
    """(write site, layer, corrupt − clean) of one upstream node."""
    if name == EMBED:
        return "resid_pre", 0, -d_embed
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


@dataclass
class Patched:
    """What ``patch_targets`` measured on one batch: the patched runs and the two it patches between."""

    metric: Float[Tensor, " n"]  # Σ metric with each target patched
    clean_terms: Float[Tensor, " P"]  # the clean run's metric at each point
    corrupt_metric: float  # Σ metric of the corrupt run


def patch_metric(w: ModelWeights, graph: Graph, task: TaskData, targets: list[Target]) -> Float[Tensor, " n"]:
    """Σ metric over the batch with each target's corrupt value patched into the clean run
    (``patch_targets``)."""
    return patch_targets(w, graph, task, targets).metric


@torch.no_grad()
def patch_targets(w: ModelWeights, graph: Graph, task: TaskData, targets: list[Target]) -> Patched:
    """Σ metric over the batch with each target's corrupt value patched into the clean run,
    and the clean and corrupt runs' own metric (read off the forwards the patches start from).

    A node: its output is replaced by its corrupt output for every reader.
    An edge ``u → d``: only ``d``'s input sees ``u``'s corrupt value (path
    patching of that input); every other reader sees the clean one. The run
    restarts at the edit's layer from the clean stream, and (minimal pairs) computes only
    each prompt's positions from its first difference on (``effects.pair_window``).
    """
    device = w.device
    clean_tokens, corrupt_tokens = task.clean.to(device), task.corrupt.to(device)
    clean_embed = tf.embed(w, clean_tokens)
    corrupt_embed = tf.embed(w, corrupt_tokens)
    d_embed = clean_embed - corrupt_embed
    clean, corrupt = forward(w, clean_embed, record=WRITES_RECORD), forward(w, corrupt_embed, record=WRITES_RECORD)
    reference = reference_logprobs(w, clean.resid_final, task)
    L = w.cfg.n_layers
    scratch = Scratch()
    window = pair_window(w, task, clean.resid_pre)  # corrupt values change nothing before a pair differs
    out = []
    for target in targets:
        site, layer, delta = _upstream_delta(w, target.upstream, clean, corrupt, d_embed)
        if target.downstream is not None:
            assert target.input is not None  # an edge names the input it reaches
            d = _downstream(graph, target.downstream, target.input)
            site, layer = INPUT_SITE[d.input], d.layer
            head = d.head
        else:
            head = None
        resid = clean.resid_pre[layer] if layer < L else clean.resid_final
        if window is None:
            final = forward(w, resid, layer, [Edit(site, layer, delta, head)]).resid_final
        else:  # only the window's positions restarted; the others are the clean run's
            edit = Edit(site, layer, window.take(delta), head)
            part = forward(w, window.take(resid), layer, [edit], window=window).resid_final
            final = window.put(clean.resid_final, part)
        out.append(metric_terms(w, final, task, scratch, reference).sum())
    return Patched(
        metric=torch.stack(out).double().cpu() if out else torch.zeros(0, dtype=torch.float64),
        clean_terms=metric_terms(w, clean.resid_final, task, scratch, reference),
        corrupt_metric=float(metric_terms(w, corrupt.resid_final, task, scratch, reference).sum()),
    )


# Above this many edges ``--method exact`` patches nodes only: one restarted forward an edge.
MAX_EXACT_EDGES = 5000


def every_target(graph: Graph, with_edges: bool) -> list[Target]:
    """Every node, then (``with_edges``) every edge in Graph order."""
    targets = [Target(u) for u in graph.upstream]
    if with_edges:
        targets += [
            Target(u, d.name, d.input) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]
        ]
    return targets


@torch.no_grad()
def exact_scores(w: ModelWeights, graph: Graph, task: TaskData, with_edges: bool) -> BatchAttribution:
    """``--method exact``: each node's (and, ``with_edges``, each edge's) score is the real
    change of the metric when it alone is patched to its corrupt value, ``m(clean) −
    m(patched)`` summed over the batch's points (``patch_metric``). Without edges the edge
    scores are NaN."""
    p = patch_targets(w, graph, task, every_target(graph, with_edges))
    return exact_attribution(
        graph, p.metric, float(p.clean_terms.sum()), p.corrupt_metric, int(p.clean_terms.shape[0]), with_edges
    )


def exact_attribution(
    graph: Graph, patched: Float[Tensor, " n"], clean: float, corrupt: float, n_points: int, with_edges: bool
) -> BatchAttribution:
    """Exact scores ``m(clean) − m(patched)`` from the patched metric of ``every_target``'s
    targets (either path); without edges the edge scores are NaN."""
    U = len(graph.upstream)
    edges = clean - patched[U:] if with_edges else torch.full((graph.n_edges,), float("nan"), dtype=torch.float64)
    return BatchAttribution(
        nodes=clean - patched[:U], edges=edges, clean_metric=clean, corrupt_metric=corrupt, n_points=n_points
    )
