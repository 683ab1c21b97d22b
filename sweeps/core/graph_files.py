"""EAP-IG graph files: our attribution graph written and read as the EAP-IG library's
``Graph.to_json`` / ``Graph.from_json`` file (hannamw/EAP-IG, ``src/eap/graph.py``), the
format MIB's circuit track exchanges circuits in.

Plain functions; no Ray, no weights. The file is one JSON object::

    {"cfg": {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D},
     "nodes": {"input": {"in_graph": b}, "a0.h0": {...}, ..., "m0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": s, "in_graph": b}, ..., "a11.h11->logits": {...}}}

Names (ours in docs/naming.md): ``input`` is ``embed``, ``a{l}.h{h}`` is ``L{l}H{h}``,
``m{l}`` is ``mlp{l}``, ``logits`` is ``resid_final``; an edge into a head names the head's
input, ``parent->a{l}.h{h}<q>`` (``<k>``, ``<v>``), any other ``parent->child``. Nodes and
edges are written in the order ``Graph.from_model`` makes them, so the file is the one the
library writes for the same scores.

EAP-IG's graph has an MLP in every layer, and k and v edges per **query** head: it
ungroups grouped-query attention (each query head reads its own copy of its key/value
head's input). That graph is our graph of the same model with one key/value head per
query head (``eap_graph``), edge for edge. Ours scores one k and one v input per key/value
head (``L9KV1``); the attribution sweep's ``--split-kv`` scores each query head's copy
(``attribution.query_head_kv_edges``), which is what an export of a grouped-query model
writes: a group's per-head scores add up to our edge's score, never an even split.

Reading a file back as our graph: a score of ours is the file's score, and for a shared
k/v input the sum over the query heads of its group. A circuit (the edges with ``in_graph``
true) is first pruned as EAP-IG's ``evaluate_graph`` prunes it (``circuit_eval.prune_mask``
on EAP-IG's graph), then a shared k/v edge of ours is in the circuit when **any** query
head of its group has it: our circuits cannot keep an input clean for one query head and
corrupt for another, and keeping it for all keeps every path the file's circuit has.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from sweeps.core.attribution import Graph, GraphConfig, build_graph
from sweeps.core.circuit_eval import prune_mask, top_mask
from sweeps.core.circuits import CircuitError
from sweeps.core.nodes import EMBED, FINAL


class GraphFileError(CircuitError):
    """A graph file that cannot be read for this model; one line that says why."""


@dataclass(frozen=True)
class ModelShape:
    """What a graph file's shape depends on (``d_model`` 0: unknown, not checked)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_attn_mlp: bool = False
    attn_only: bool = False
    d_model: int = 0

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def cfg(self) -> dict:
        """The file's ``cfg``, the keys ``Graph.from_model`` reads from a HookedTransformer."""
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "parallel_attn_mlp": self.parallel_attn_mlp,
            "d_model": self.d_model,
        }

    def graph(self) -> Graph:
        """Our attribution graph of the model."""
        return build_graph(
            GraphConfig(self.n_layers, self.n_heads, self.n_kv_heads, self.attn_only, self.parallel_attn_mlp)
        )

    def describe(self) -> str:
        return f"n_layers={self.n_layers}, n_heads={self.n_heads}, parallel_attn_mlp={self.parallel_attn_mlp}" + (
            f", d_model={self.d_model}" if self.d_model else ""
        )


def check_shape(shape: ModelShape, what: str) -> None:
    """EAP-IG's graph has an MLP node in every layer: an attention-only model has no such file."""
    if shape.attn_only:
        raise GraphFileError(f"{what}: EAP-IG's graph has an MLP in every layer; an attention-only model has none")


# --------------------------------------------------------------------------- #
# Names and the edge order of ``Graph.from_model``
# --------------------------------------------------------------------------- #


def eap_node(name: str) -> str:
    """EAP-IG's name of one of our nodes: ``embed`` -> ``input``, ``L3H2`` -> ``a3.h2``,
    ``mlp3`` -> ``m3``, ``resid_final`` -> ``logits``."""
    if name == EMBED:
        return "input"
    if name == FINAL:
        return "logits"
    if name.startswith("mlp"):
        return f"m{int(name[3:])}"
    layer, head = name[1:].split("H")
    return f"a{int(layer)}.h{int(head)}"


def eap_graph(shape: ModelShape) -> Graph:
    """EAP-IG's graph of the model as one of ours: one key/value input per query head (the
    ungrouped model), so its edges are EAP-IG's one for one (``eap_order``)."""
    return build_graph(GraphConfig(shape.n_layers, shape.n_heads, shape.n_heads, False, shape.parallel_attn_mlp))


def input_offsets(graph: Graph) -> dict[tuple[str, str], int]:
    """(downstream name, input) -> the index of its first edge in the graph's edge order."""
    starts = [0, *itertools.accumulate(graph.prefix)][:-1]
    return {(d.name, d.input): at for d, at in zip(graph.downstream, starts)}


def eap_order(shape: ModelShape) -> tuple[list[str], list[int]]:
    """(EAP-IG's edge names in ``Graph.from_model``'s order, each one's index in ``eap_graph``'s
    edge order). From_model adds, layer by layer, every (parent, head, q/k/v) with the parents
    already in the stream, then every parent into the MLP (a sequential MLP also reads its
    layer's heads; a parallel one's edge follows each parent's head edges), and at the end
    every node into the logits."""
    ug = eap_graph(shape)
    offsets = input_offsets(ug)
    names: list[str] = []
    index: list[int] = []
    H = shape.n_heads
    stride = H + 1
    for layer in range(shape.n_layers):
        before = 1 + layer * stride
        for u in range(before):
            for h in range(H):
                for letter in "qkv":
                    names.append(f"{eap_node(ug.upstream[u])}->a{layer}.h{h}<{letter}>")
                    index.append(offsets[(f"L{layer}H{h}", letter)] + u)
            if shape.parallel_attn_mlp:  # each parent's MLP edge right after its head edges
                names.append(f"{eap_node(ug.upstream[u])}->m{layer}")
                index.append(offsets[(f"mlp{layer}", "mlp")] + u)
        if not shape.parallel_attn_mlp:  # the MLP also reads its own layer's heads
            for u in range(before + H):
                names.append(f"{eap_node(ug.upstream[u])}->m{layer}")
                index.append(offsets[(f"mlp{layer}", "mlp")] + u)
    for u in range(len(ug.upstream)):
        names.append(f"{eap_node(ug.upstream[u])}->logits")
        index.append(offsets[(FINAL, "resid")] + u)
    return names, index


def ours_of_eap_edges(shape: ModelShape, graph: Graph) -> Tensor:
    """For each edge of ``eap_graph`` (its order), the index of our edge it is or is part of:
    the same edge, or a query head's k/v edge's shared key/value edge."""
    ug = eap_graph(shape)
    offsets = input_offsets(graph)
    out: list[int] = []
    for d, p in zip(ug.downstream, ug.prefix):
        name = d.name
        if d.input in ("k", "v") and shape.group > 1:
            assert d.head is not None
            name = f"L{d.layer}KV{d.head // shape.group}"
        out.extend(offsets[(name, d.input)] + u for u in range(p))
    return torch.tensor(out, dtype=torch.long)


def kv_positions(shape: ModelShape) -> Tensor:
    """For each of ``attribution.query_head_kv_edges``' edges (in order), its index in
    ``eap_graph``'s edge order."""
    from sweeps.core.attribution import query_head_kv_edges

    ug = eap_graph(shape)
    offsets = input_offsets(ug)
    row = {name: i for i, name in enumerate(ug.upstream)}
    return torch.tensor([offsets[(h, letter)] + row[u] for u, h, letter in query_head_kv_edges(shape.graph())])


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #


def eap_scores(
    shape: ModelShape, edges: Float[Tensor, " n_edges"], kv_heads: Float[Tensor, " n_kv_head_edges"] | None
) -> Float[Tensor, " n_eap_edges"]:
    """Scores of EAP-IG's edges (``eap_graph`` order) from ours (our graph order) and, for a
    grouped-query model, each query head's own k/v edges (``query_head_kv_edges`` order)."""
    check_shape(shape, "export")
    scores = edges.double()[ours_of_eap_edges(shape, shape.graph())]
    if shape.group > 1:
        if kv_heads is None:
            raise GraphFileError(
                "a grouped-query model's graph file has k and v edges per query head: run the attribution "
                "sweep with --split-kv (--method eap or eap-ig-inputs), which scores each query head's own "
                "share (never an even split)"
            )
        scores[kv_positions(shape)] = kv_heads.double()
    return scores


def circuit_of_size(shape: ModelShape, scores: Float[Tensor, " n_eap_edges"], size: float) -> Bool[Tensor, " n"]:
    """EAP-IG's circuit of ``size`` (a fraction of its edges): ``apply_topn(int(size × n),
    absolute=True)``, the top edges by |score|, then ``prune``d to the paths from the input to
    the logits (``eap_graph`` order)."""
    n = int(size * scores.numel())
    return prune_mask(eap_graph(shape), top_mask(scores, n, absolute=True))


def graph_json(shape: ModelShape, scores: Float[Tensor, " n_eap_edges"], in_graph: Bool[Tensor, " n"] | None) -> dict:
    """The file ``Graph.to_json`` writes for these scores (``eap_graph`` order) and circuit.

    Without a circuit every edge and node has ``in_graph`` false but the logits (EAP-IG's
    graph right after ``attribute``, before ``apply_topn``). A node is in the graph when one of
    its edges out is (the circuit is pruned: such a node is on a path to the logits, and one
    from the input); ``logits`` always is, as in EAP-IG."""
    check_shape(shape, "export")
    ug = eap_graph(shape)
    member = torch.zeros(scores.numel(), dtype=torch.bool) if in_graph is None else in_graph.to(torch.bool)
    names, index = eap_order(shape)
    values, flags = scores.tolist(), member.tolist()
    upstream = torch.cat([torch.arange(p) for p in ug.prefix])
    node_in = torch.zeros(len(ug.upstream), dtype=torch.bool)
    node_in[upstream[member]] = True
    nodes = {eap_node(u): {"in_graph": bool(node_in[i])} for i, u in enumerate(ug.upstream)}
    nodes["logits"] = {"in_graph": True}
    return {
        "cfg": shape.cfg(),
        "nodes": nodes,
        "edges": {name: {"score": values[i], "in_graph": flags[i]} for name, i in zip(names, index)},
    }


# --------------------------------------------------------------------------- #
# Import
# --------------------------------------------------------------------------- #


def is_graph_file(path: Path) -> bool:
    """Whether ``path`` is a JSON object with EAP-IG's keys (``cfg``, ``nodes``, ``edges``)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"cfg", "nodes", "edges"} <= set(data)


@dataclass(frozen=True)
class GraphFile:
    """A graph file read as our graph (our edge order)."""

    scores: Float[Tensor, " n_edges"]  # the file's scores (a shared k/v edge: its group's sum)
    circuit: Bool[Tensor, " n_edges"]  # its in_graph edges, pruned, a shared k/v edge in if any head's is
    node_scores: Float[Tensor, " U"] | None  # the file's node scores, where it has them for every node
    eap_edges_in: int  # edges with in_graph true in the file, after pruning (EAP-IG's count)


def read_graph_file(path: Path, shape: ModelShape) -> GraphFile:
    """Read an EAP-IG graph file for a model of ``shape``: a one-line ``GraphFileError`` for a
    file that is not one, is for another shape (``cfg``), or lacks or adds edges."""
    where = f"graph file {path}"
    if not path.is_file():
        raise GraphFileError(f"{where} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GraphFileError(f"cannot parse {where}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not {"cfg", "nodes", "edges"} <= set(data):
        raise GraphFileError(f"{where} is not an EAP-IG graph (a JSON object with cfg, nodes and edges)")
    check_shape(shape, where)
    cfg = data["cfg"] if isinstance(data["cfg"], dict) else {}
    theirs = {k: cfg.get(k) for k in ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")}
    mine = shape.cfg()
    keys = ["n_layers", "n_heads", "parallel_attn_mlp"] + (["d_model"] if shape.d_model else [])
    wrong = [
        k for k in keys if theirs[k] is None or (bool(theirs[k]) if k == "parallel_attn_mlp" else theirs[k]) != mine[k]
    ]
    if wrong:
        said = ", ".join(f"{k}={theirs[k]}" for k in keys)
        raise GraphFileError(f"{where} is for another model shape ({said}); this model has {shape.describe()}")
    names, index = eap_order(shape)
    edges = data["edges"]
    if not isinstance(edges, dict):
        raise GraphFileError(f"{where}: edges is not an object of name -> {{score, in_graph}}")
    missing = [n for n in names if n not in edges]
    extra = set(edges) - set(names)
    if missing or extra:
        example = missing[0] if missing else sorted(extra)[0]
        raise GraphFileError(
            f"{where}: {len(missing)} of this model's EAP-IG edges missing and {len(extra)} unknown "
            f"(e.g. {example}); is it a graph of this model?"
        )
    n = len(names)
    scores = torch.zeros(n, dtype=torch.float64)
    member = torch.zeros(n, dtype=torch.bool)
    position = torch.tensor(index)
    try:
        # a score may be absent or null (a circuit needs only in_graph): NaN, refused only as a ranking
        values = [float(edges[name].get("score") if edges[name].get("score") is not None else "nan") for name in names]
        flags = [bool(edges[name].get("in_graph", False)) for name in names]
    except (AttributeError, TypeError, ValueError):
        raise GraphFileError(f'{where}: every edge must be {{"score": number, "in_graph": bool}}') from None
    scores[position] = torch.tensor(values, dtype=torch.float64)
    member[position] = torch.tensor(flags)
    member = prune_mask(eap_graph(shape), member)  # what evaluate_graph evaluates
    graph = shape.graph()
    ours = ours_of_eap_edges(shape, graph)
    our_scores = torch.zeros(graph.n_edges, dtype=torch.float64).index_add_(0, ours, scores)
    our_circuit = torch.zeros(graph.n_edges, dtype=torch.bool)
    our_circuit[ours[member]] = True
    node_scores = None
    nodes = data["nodes"] if isinstance(data["nodes"], dict) else {}
    given = [nodes.get(eap_node(u)) for u in graph.upstream]
    if all(isinstance(g, dict) and isinstance(g.get("score"), (int, float)) for g in given):
        node_scores = torch.tensor([float(g["score"]) for g in given], dtype=torch.float64)  # type: ignore[index]
        if not torch.isfinite(node_scores).all():  # EAP-IG writes NaN for nodes it did not score
            node_scores = None  # each node's summed edge scores instead
    return GraphFile(our_scores, our_circuit, node_scores, int(member.sum()))
