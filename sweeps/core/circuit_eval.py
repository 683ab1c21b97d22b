"""Circuit evaluation: the metric of a circuit, and faithfulness curves (MIB's CPR and CMD).

Plain functions on tensors; no Ray, no I/O.

A circuit is a set of edges of the attribution graph (``attribution.Graph``): upstream
nodes (the embeddings, each head, each MLP) to downstream inputs (q of each head, k and
v of each key/value head, each MLP's input, the final stream). Running it: the clean
prompts go through the model, and every downstream input ``d`` reads

    x_d = stream − Σ_{u → d not in the circuit} (a_u − a*_u)

where ``stream`` is what ``d`` would read in this run, ``a_u`` the output of ``u`` in this
same run and ``a*_u`` its output in the corrupt run: the edges in the circuit carry the
run's own values, the rest the corrupt ones. A node-level circuit is the edge circuit of
every edge out of its nodes: a node outside it gives its corrupt output to every reader.
The empty circuit is the corrupt run and the full one the clean run, exactly (tested).

An upstream node's output is what it adds to the stream: the embedding, ``z_h W_O[h]``
of a head, the MLP's write. Under a post-norm a sublayer writes ``P(y)``, ``y = Σ_h z_h
W_O[h] + b_O``, and a head's output is its share ``(z_h W_O[h] + b_O / H) / rms(y) ⊙ w``
(the shares sum to ``P(y)``, so the empty circuit is still the corrupt run).

Faithfulness of a circuit ``C``: ``(m(C) − m(corrupt)) / (m(clean) − m(corrupt))``, the
metric summed over the task's points. Over circuits of growing size (fractions of the
edges or nodes, top by |score|) it makes a curve; CPR is the area under it and CMD the
area between it and 1 (``|1 − f|``), both over the (linear) fraction axis (trapezoids).

MIB's own evaluation (``--sizes mib``; hannamw/MIB-circuit-track, ``evaluation.py``, with
EAP-IG's ``Graph.apply_topn`` and ``prune``) differs in four ways, each a function here:
ten fixed fractions (``MIB_FRACTIONS``), ``int(fraction × n)`` candidates (``mib_count``),
circuits pruned to the edges on a path from the embeddings to the logits (``prune_mask``),
and CPR from the signed ranking (top by score) but CMD from the absolute one, each by
trapezoids over those fractions alone (``mib_areas``). docs/circuits.md lists why.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sweeps.core import transformer as tf
from sweeps.core.attribution import Graph, metric_terms, reference_logprobs, rows_per_layer, upstream_row
from sweeps.core.effects import pair_window
from sweeps.core.transformer import ModelWeights
from tasks.base import TaskData

LEVELS = ("node", "edge")


def default_sizes() -> list[float]:
    """Log-spaced fractions from 0.1 % to 100 %, with 0 (the corrupt run) first."""
    return [0.0, *np.round(np.logspace(-3, 0, 16), 6).tolist()]


def node_edge_mask(graph: Graph, nodes: set[str]) -> Bool[Tensor, " n_edges"]:
    """The edge circuit of a node circuit: every edge out of one of ``nodes``."""
    inside = torch.tensor([u in nodes for u in graph.upstream])
    return torch.cat([inside[:p] for p in graph.prefix])


def top_mask(scores: Float[Tensor, " n"], k: int, absolute: bool = True) -> Bool[Tensor, " n"]:
    """The ``k`` entries of highest |score| (``absolute=False``: of highest score, MIB's signed
    ranking); NaN scores last, ties the first in order."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    if k > 0:
        key = scores.abs() if absolute else scores
        key = torch.where(key.isnan(), torch.tensor(-math.inf, dtype=key.dtype), key)
        order = torch.argsort(-key, stable=True)
        mask[order[:k]] = True
    return mask


# --------------------------------------------------------------------------- #
# MIB's evaluation (hannamw/MIB-circuit-track, evaluation.py; EAP-IG's graph.py)
# --------------------------------------------------------------------------- #

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # ``percentages`` there


def mib_count(fraction: float, n: int) -> int:
    """The size of MIB's circuit at ``fraction`` of ``n`` scored edges (nodes): ``int(fraction ×
    n)``, truncated as ``evaluate_area_under_curve`` does, so it can be 0 (the empty circuit)
    and two fractions can give the same circuit on a small graph."""
    return int(fraction * n)


def edge_ends(graph: Graph) -> tuple[Tensor, Tensor]:
    """(upstream row, downstream index) of every edge, in graph order."""
    upstream = torch.cat([torch.arange(p) for p in graph.prefix])
    downstream = torch.repeat_interleave(torch.arange(len(graph.downstream)), torch.tensor(graph.prefix))
    return upstream, downstream


def input_readers(graph: Graph) -> Bool[Tensor, "n_inputs n_upstream_plus_1"]:
    """Which node each downstream input feeds: ``[d, u]`` is true when input ``d`` is read by the
    upstream node ``u`` (q by its head, a key/value head's k and v by every query head of its
    group, an MLP's input by the MLP); the last column is the logits, fed by the final stream.

    A graph edge ``u → d`` is MIB's edge from ``u`` into the node(s) of this row: EAP-IG's graph
    has k and v edges per query head, and a shared k (v) input here is all of them at once."""
    index = {name: i for i, name in enumerate(graph.upstream)}
    q_heads = [d for d in graph.downstream if d.input == "q" and d.layer == 0]
    kv_heads = [d for d in graph.downstream if d.input == "k" and d.layer == 0]
    group = len(q_heads) // max(1, len(kv_heads))
    readers = torch.zeros(len(graph.downstream), len(graph.upstream) + 1, dtype=torch.bool)
    for i, d in enumerate(graph.downstream):
        if d.input == "resid":
            readers[i, -1] = True
        elif d.input in ("k", "v"):
            assert d.head is not None
            for h in range(d.head * group, (d.head + 1) * group):
                readers[i, index[f"L{d.layer}H{h}"]] = True
        else:  # q (named after its head) or an MLP's input (named after the MLP)
            readers[i, index[d.name]] = True
    return readers


def prune_mask(graph: Graph, mask: Bool[Tensor, " n_edges"]) -> Bool[Tensor, " n_edges"]:
    """The edges of ``mask`` that lie on a path of ``mask``'s edges from the embeddings to the
    logits (the final stream): MIB's circuits after EAP-IG's ``Graph.prune``, which drops, until
    nothing changes, every node without an edge in (the embeddings always have one) or out
    (the logits are always kept) and every edge whose parent or child was dropped.

    Why it matters: the count. On a model without post-norms the metric cannot change (a node
    no circuit edge reaches reads only corrupt inputs, so it writes its corrupt output; a node
    that reaches no reader of the logits changes nothing the metric reads), but the edges
    MIB reports are those left after pruning."""
    mask = mask.to(torch.bool).cpu()
    if mask.shape[0] != graph.n_edges:
        raise ValueError(f"a circuit mask of {mask.shape[0]} edges for a graph of {graph.n_edges}")
    upstream, downstream = edge_ends(graph)
    readers = input_readers(graph)
    # Forward: the nodes that a path of circuit edges from the embeddings enters.
    reached = torch.zeros(readers.shape[1], dtype=torch.bool)
    reached[0] = True
    while True:
        fed = torch.zeros(readers.shape[0], dtype=torch.bool)
        fed[downstream[mask & reached[upstream]]] = True
        grown = reached | (fed[:, None] & readers).any(0)
        if torch.equal(grown, reached):
            break
        reached = grown
    # Backward: the nodes from which a path of circuit edges leads to the logits.
    useful = torch.zeros(readers.shape[1], dtype=torch.bool)
    useful[-1] = True
    while True:
        needed = (readers & useful).any(1)  # inputs read by a useful node
        grown = useful.clone()
        grown[upstream[mask & needed[downstream]]] = True
        if torch.equal(grown, useful):
            break
        useful = grown
    return mask & reached[upstream] & needed[downstream]


def mib_areas(fractions, signed, absolute) -> tuple[float, float]:
    """MIB's (CPR, CMD) at ``fractions`` (``MIB_FRACTIONS``): CPR the area under the
    faithfulness of the signed ranking's circuits, CMD the area under ``|1 − f|`` of the
    absolute ranking's, each by trapezoids over the fractions as given, on a linear axis:
    no (0, 0) point, so the areas start at the smallest fraction (0.001)."""
    return area_scores(fractions, signed)[0], area_scores(fractions, absolute)[1]


def head_outputs(w: ModelWeights, layer: int, z: Float[Tensor, "B T H E"]) -> Float[Tensor, "B T H D"]:
    """Each head's output (see the module docstring): ``z_h W_O[h]``, or its post-norm share
    with ``b_O / H``."""
    out = torch.einsum("bthe,hed->bthd", z, w.W_O[layer])
    if w.cfg.post_norm:
        inv = tf.post_norm_inv_rms(w.cfg, tf.attention_sum(w, layer, z)).to(out.dtype)  # [B T 1]
        assert w.ln_attn_post is not None
        out = (out + w.b_O[layer] / w.cfg.n_heads) * inv[..., None, :] * w.ln_attn_post[layer]
    return out


class CircuitRunner:
    """Evaluates circuits of one batch: the corrupt run's node outputs are taken once."""

    def __init__(self, w: ModelWeights, graph: Graph, task: TaskData):
        self.w, self.graph, self.task = w, graph, task
        cfg, device = w.cfg, w.device
        self.clean_tokens = task.clean.to(device)
        with torch.no_grad():
            self.clean_embed = tf.embed(w, self.clean_tokens)
            clean = tf.forward(w, self.clean_embed, record=("resid_pre",))
            self.clean_final = clean.resid_final
            # Minimal pairs: before a pair's first difference every node's corrupt output is its
            # clean one, so a circuit's run is the clean run there and only the window is run
            # (the window keeps the clean streams its attention reads).
            self.window = pair_window(w, task, clean.resid_pre)
            take = (lambda x, dim=0: x) if self.window is None else self.window.take
            corrupt_embed = tf.embed(w, task.corrupt.to(device))
            corrupt = tf.forward(w, corrupt_embed, record=("z", "mlp_out"))
            U = len(graph.upstream)
            B, T = take(self.clean_tokens).shape
            # a*_u, and below every a_u − a*_u and their sums, in float32 whatever the model's
            # dtype (``precision.py``); an edited input goes back into the stream in its dtype.
            self.corrupt_out = torch.empty(U, B, T, cfg.d_model, device=device)  # a*_u, on the window
            self.corrupt_out[0] = take(corrupt_embed)
            for layer in range(cfg.n_layers):
                row = upstream_row(cfg, layer, 0)
                heads = head_outputs(w, layer, take(corrupt.z[layer])).permute(2, 0, 1, 3)
                self.corrupt_out[row : row + cfg.n_heads] = heads
                if not cfg.attn_only:
                    self.corrupt_out[row + cfg.n_heads] = take(corrupt.mlp_out[layer])
            self.reference = reference_logprobs(w, self.clean_final, task)  # the clean distribution (kl)
            self.corrupt_metric = float(metric_terms(w, corrupt.resid_final, task, reference=self.reference).sum())
            clean_terms = metric_terms(w, self.clean_final, task, reference=self.reference)
            self.clean_metric = float(clean_terms.sum())
            self.n_points = int(clean_terms.shape[0])  # the points the metric sums over
        self.offsets = [0, *np.cumsum(graph.prefix)[:-1].tolist()]

    @torch.no_grad()
    def metric(self, mask: Bool[Tensor, " n_edges"]) -> float:
        """Σ metric over the batch's points with the edges of ``mask`` carrying this run's values
        and every other edge its upstream node's corrupt-run value."""
        w, graph, cfg = self.w, self.graph, self.w.cfg
        if mask.shape[0] != graph.n_edges:
            raise ValueError(f"a circuit mask of {mask.shape[0]} edges for a graph of {graph.n_edges}")
        mask = mask.to(w.device)
        diff = torch.empty_like(self.corrupt_out)  # a_u − a*_u of this run: row u is written when u runs
        flat = diff.flatten(1)
        B, T, D = self.corrupt_out.shape[1:]
        per_layer = rows_per_layer(cfg)
        prefix_sums: dict[int, Tensor] = {}  # p -> Σ_{u < p} (a_u − a*_u), as the rows are written
        running = torch.zeros_like(flat[0])

        def written(upto: int) -> None:
            nonlocal running
            start = max(prefix_sums, default=0)
            running = running + flat[start:upto].sum(0)
            prefix_sums[upto] = running

        def removed(first: int, n: int) -> Float[Tensor, "n B T D"]:
            """Σ over the out-of-circuit edges of downstream rows first..first+n−1 of (a_u − a*_u).

            Taken over whichever is smaller, the edges in the circuit or those outside it (the
            first as all of the prefix minus the kept ones); when the upstream rows that take
            part are few, only they are read."""
            p = graph.prefix[first + n - 1]  # rows of one site (and q, k, v of one layer) share a prefix
            keep = torch.stack([mask[self.offsets[i] : self.offsets[i] + p] for i in range(first, first + n)])
            use_kept = bool(keep.float().mean() < 0.5)
            chosen = keep if use_kept else ~keep
            cols = chosen.any(0).nonzero()[:, 0]
            if 2 * len(cols) < p:
                part = chosen[:, cols].to(flat.dtype) @ flat[cols]
            else:
                part = chosen.to(flat.dtype) @ flat[:p]
            return (prefix_sums[p][None] - part if use_kept else part).view(n, B, T, D)

        def record_embed(x):
            diff[0] = x - self.corrupt_out[0]
            written(1)
            return x

        attention_reads: dict[int, Tensor] = {}  # layer -> the removed sums of its q, k and v rows

        def reads(layer: int, offset: int, n: int):
            """Each head's q (k, v) input: the q, k and v rows of a layer share their upstream
            nodes, so their sums are taken in one product (when q is read; k and v follow)."""

            def edit(x):  # [B T D] -> each head's own input [B T n D]
                if offset == 0:
                    attention_reads[layer] = removed(layer * per_layer, cfg.n_heads + 2 * cfg.n_kv_heads)
                part = attention_reads[layer][offset : offset + n]
                if offset + n == cfg.n_heads + 2 * cfg.n_kv_heads:
                    del attention_reads[layer]
                return (x[:, :, None] - part.permute(1, 2, 0, 3)).to(x.dtype)

            return edit

        def record_heads(layer: int):
            def edit(z):
                row = upstream_row(cfg, layer, 0)
                diff[row : row + cfg.n_heads] = (
                    head_outputs(w, layer, z).permute(2, 0, 1, 3) - self.corrupt_out[row : row + cfg.n_heads]
                )
                written(row + cfg.n_heads)
                return z

            return edit

        def record_mlp(layer: int):
            def edit(out):
                row = upstream_row(cfg, layer, None)
                diff[row] = out - self.corrupt_out[row]
                written(row + 1)
                return out

            return edit

        def read_one(index: int):
            def edit(x):
                return (x - removed(index, 1)[0]).to(x.dtype)

            return edit

        H, K = cfg.n_heads, cfg.n_kv_heads
        edits = [tf.Edit("resid_pre", 0, replace=record_embed)]
        for layer in range(cfg.n_layers):
            first = layer * per_layer
            edits += [
                tf.Edit("q", layer, replace=reads(layer, 0, H)),
                tf.Edit("k", layer, replace=reads(layer, H, K)),
                tf.Edit("v", layer, replace=reads(layer, H + K, K)),
                tf.Edit("z", layer, replace=record_heads(layer)),
            ]
            if not cfg.attn_only:
                edits += [
                    tf.Edit("mlp_in", layer, replace=read_one(first + H + 2 * K)),
                    tf.Edit("mlp_out", layer, replace=record_mlp(layer)),
                ]
        edits.append(tf.Edit("resid_final", cfg.n_layers, replace=read_one(len(graph.downstream) - 1)))
        if self.window is None:
            final = tf.forward(w, self.clean_embed, 0, edits).resid_final
        else:
            part = tf.forward(w, self.window.take(self.clean_embed), 0, edits, window=self.window).resid_final
            final = self.window.put(self.clean_final, part)
        return float(metric_terms(w, final, self.task, reference=self.reference).sum())


def faithfulness(metric: float, clean: float, corrupt: float) -> float:
    """``(m(C) − m(corrupt)) / (m(clean) − m(corrupt))``; NaN when clean = corrupt."""
    gap = clean - corrupt
    return (metric - corrupt) / gap if abs(gap) > 1e-12 else math.nan


def area_scores(fractions, faith) -> tuple[float, float]:
    """(CPR, CMD) of a faithfulness curve over circuit fractions in [0, 1] (MIB): the area
    under ``f`` and the area under ``|1 − f|``, by trapezoids over the fractions given."""
    x, f = np.asarray(fractions, dtype=float), np.asarray(faith, dtype=float)
    order = np.argsort(x)
    x, f = x[order], f[order]
    if len(x) < 2:
        return math.nan, math.nan
    return float(np.trapezoid(f, x)), float(np.trapezoid(np.abs(1.0 - f), x))
