"""EAP-IG graph files (sweeps/core/graph_files.py) against the format as the EAP-IG library
writes it (hannamw/EAP-IG, src/eap/graph.py: Graph.from_model's node and edge order,
Graph.to_json's keys), rebuilt here from its documented loops, not from our code."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from sweeps.core.graph_files import (
    GraphFileError,
    ModelShape,
    circuit_of_size,
    eap_scores,
    graph_json,
    read_graph_file,
)


def eap_ig_file(cfg: dict, score, in_graph) -> dict:
    """What ``Graph.from_model(cfg)`` then ``to_json`` writes: nodes ``input``, per layer its
    heads ``a{l}.h{h}`` and ``m{l}``, then ``logits``; edges layer by layer, every node
    already in the residual stream into each head's q, k, v (``parent->a{l}.h{h}<x>``), then
    into the MLP (a sequential MLP after the layer's heads join the stream), and every node into
    the logits. ``score(name)``, ``in_graph(name)`` give each edge's values."""
    L, H, parallel = cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"]
    nodes = {"input": {"in_graph": False}}
    edges = {}
    stream = ["input"]
    for layer in range(L):
        heads = [f"a{layer}.h{h}" for h in range(H)]
        mlp = f"m{layer}"
        for name in heads:
            nodes[name] = {"in_graph": False}
        nodes[mlp] = {"in_graph": False}
        if parallel:
            for node in stream:
                for head in heads:
                    for letter in "qkv":
                        edges[f"{node}->{head}<{letter}>"] = None
                edges[f"{node}->{mlp}"] = None
            stream += heads + [mlp]
        else:
            for node in stream:
                for head in heads:
                    for letter in "qkv":
                        edges[f"{node}->{head}<{letter}>"] = None
            stream += heads
            for node in stream:
                edges[f"{node}->{mlp}"] = None
            stream.append(mlp)
    for node in stream:
        edges[f"{node}->logits"] = None
    nodes["logits"] = {"in_graph": True}
    for name in edges:
        edges[name] = {"score": score(name), "in_graph": bool(in_graph(name))}
    for name in edges:  # a node is in the graph when one of its edges out is
        if edges[name]["in_graph"]:
            nodes[name.split("->")[0]]["in_graph"] = True
    return {"cfg": dict(cfg), "nodes": nodes, "edges": edges}


def our_edge(name: str, group: int) -> tuple[str, str, str]:
    """Our (upstream, reader, input) of an EAP-IG edge name, written out from docs/naming.md."""
    parent, child = name.split("->")

    def node(n: str) -> str:
        if n == "input":
            return "embed"
        if n[0] == "m":
            return f"mlp{n[1:]}"
        layer, head = n[1:].split(".h")
        return f"L{layer}H{head}"

    if child == "logits":
        return node(parent), "resid_final", "resid"
    if child[0] == "m":
        return node(parent), f"mlp{child[1:]}", "mlp"
    head, letter = child[:-3], child[-2]
    layer, h = head[1:].split(".h")
    if letter in "kv" and group > 1:
        return node(parent), f"L{layer}KV{int(h) // group}", letter
    return node(parent), f"L{layer}H{h}", letter


def _triples(graph):
    return [(u, d.name, d.input) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]


GPT2_TINY = ModelShape(3, 4, 4, False, False, 64)  # tiny-gpt2's graph (GPT-2's shape, smaller)


@pytest.mark.parametrize("shape", [GPT2_TINY, ModelShape(2, 3, 3, True, False, 32), ModelShape(12, 12, 12, False, False, 768)])
def test_our_file_is_the_one_eap_ig_writes(shape):
    """Same keys, same node and edge names in the same order, same cfg; GPT-2 small's graph
    has 32,491 edges (MIB's count)."""
    graph = shape.graph()
    scores = torch.randn(graph.n_edges, dtype=torch.float64)
    ours = graph_json(shape, eap_scores(shape, scores, None), None)
    by = dict(zip(_triples(graph), scores.tolist()))
    theirs = eap_ig_file(shape.cfg(), lambda n: by[our_edge(n, 1)], lambda n: False)
    assert list(ours) == ["cfg", "nodes", "edges"]
    assert ours["cfg"] == theirs["cfg"] == {"n_layers": shape.n_layers, "n_heads": shape.n_heads,
                                            "parallel_attn_mlp": shape.parallel_attn_mlp, "d_model": shape.d_model}
    assert list(ours["nodes"].items()) == list(theirs["nodes"].items())
    assert list(ours["edges"]) == list(theirs["edges"])
    assert ours["edges"] == theirs["edges"]
    if shape.n_layers == 12:
        assert len(ours["edges"]) == 32491


def test_a_file_written_by_eap_ig_imports_as_scores_and_a_pruned_circuit(tmp_path):
    """A GPT-2-shaped file as EAP-IG writes it: its scores land on the edges of the same names,
    and its in_graph edges are the circuit after EAP-IG's prune (a dangling edge goes)."""
    rng = random.Random(0)
    score = {}
    kept = {"input->a0.h1<q>", "input->a0.h1<v>", "a0.h1->m1", "m1->logits", "input->m0", "m0->a2.h3<k>",
            "a2.h3->logits",
            "a1.h2->m2"}  # dangling: a1.h2 has no edge in, so prune drops it
    data = eap_ig_file(GPT2_TINY.cfg(), lambda n: score.setdefault(n, rng.uniform(-1, 1)), lambda n: n in kept)
    path = tmp_path / "eap.json"
    path.write_text(json.dumps(data))
    gf = read_graph_file(path, GPT2_TINY)
    graph = GPT2_TINY.graph()
    triples = _triples(graph)
    expected = {our_edge(n, 1): s for n, s in score.items()}
    assert gf.scores.tolist() == [expected[t] for t in triples]
    circuit = {t for t, m in zip(triples, gf.circuit.tolist()) if m}
    assert circuit == {our_edge(n, 1) for n in kept - {"a1.h2->m2"}}
    assert gf.eap_edges_in == len(kept) - 1 and gf.node_scores is None


def test_unscored_nodes_and_null_edge_scores_still_import(tmp_path):
    """EAP-IG writes NaN for the nodes it did not score: the node ranking falls back to each
    node's summed edges. An edge whose score is null still reads as a circuit (it needs only
    in_graph); its score is NaN, which a ranking refuses."""
    kept = {"input->m0", "m0->logits"}
    data = eap_ig_file(GPT2_TINY.cfg(), lambda n: 0.5, lambda n: n in kept)
    for node in data["nodes"].values():
        node["score"] = float("nan")
    data["edges"]["input->a0.h0<q>"]["score"] = None
    path = tmp_path / "eap.json"
    path.write_text(json.dumps(data))
    gf = read_graph_file(path, GPT2_TINY)
    assert gf.node_scores is None and int(gf.circuit.sum()) == 2
    assert int(torch.isnan(gf.scores).sum()) == 1


def test_a_file_for_another_shape_is_refused_in_one_line(tmp_path):
    data = eap_ig_file(GPT2_TINY.cfg(), lambda n: 0.0, lambda n: False)
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    for shape in (ModelShape(3, 4, 2, False, False, 64), ModelShape(4, 4, 4), ModelShape(3, 4, 4, True),
                  ModelShape(3, 4, 4, False, False, 128)):
        if shape.n_kv_heads == 2:  # grouped: same cfg, so it reads (k/v edges per query head)
            read_graph_file(path, shape)
            continue
        with pytest.raises(GraphFileError, match="is for another model shape") as err:
            read_graph_file(path, shape)
        assert "\n" not in str(err.value)
    with pytest.raises(GraphFileError, match="attention-only"):
        read_graph_file(path, ModelShape(3, 4, 4, False, True))
    del data["edges"]["m2->logits"]
    path.write_text(json.dumps(data))
    with pytest.raises(GraphFileError, match="1 of this model's EAP-IG edges missing"):
        read_graph_file(path, GPT2_TINY)
    path.write_text('{"nodes": []}')
    with pytest.raises(GraphFileError, match="not an EAP-IG graph"):
        read_graph_file(path, GPT2_TINY)


@pytest.mark.parametrize("shape", [GPT2_TINY, ModelShape(3, 6, 2, False, False, 48), ModelShape(2, 4, 1, True, False, 32)])
def test_round_trip_gives_the_same_ranking_and_circuit(tmp_path, shape):
    """Export, read back: our scores again (a shared k/v edge: the sum of its query heads'
    scores, which is what attribution's per-head scores add up to), and the circuit EAP-IG's
    apply_topn + prune chose, mapped onto our edges (a shared k/v edge in when any head's is).
    Without grouped queries, that circuit is our own top int(size × N) by |score|, pruned."""
    torch.manual_seed(0)
    graph = shape.graph()
    names = A.query_head_kv_edges(graph)
    per_head = torch.randn(len(names), dtype=torch.float64) if shape.group > 1 else None
    edges = torch.randn(graph.n_edges, dtype=torch.float64)
    triples = _triples(graph)
    index = {t: i for i, t in enumerate(triples)}
    if per_head is not None:  # our k/v edges are their groups' sums
        for i, t in enumerate(triples):
            if t[2] in "kv":
                edges[i] = 0.0
        for (u, head, letter), s in zip(names, per_head.tolist()):
            layer, h = (int(x) for x in head[1:].split("H"))
            edges[index[(u, f"L{layer}KV{h // shape.group}", letter)]] += s
    scores = eap_scores(shape, edges, per_head)
    for size in (0.2, 0.5):
        chosen = circuit_of_size(shape, scores, size)
        path = tmp_path / f"g{size}.json"
        data = graph_json(shape, scores, chosen)
        path.write_text(json.dumps(data))
        gf = read_graph_file(path, shape)
        torch.testing.assert_close(gf.scores, edges)
        in_file = {our_edge(n, shape.group) for n, e in data["edges"].items() if e["in_graph"]}
        assert {t for t, m in zip(triples, gf.circuit.tolist()) if m} == in_file
        assert gf.eap_edges_in == int(chosen.sum()) > 0
        if shape.group == 1:
            expected = CE.prune_mask(graph, CE.top_mask(edges, int(size * graph.n_edges)))
            assert torch.equal(gf.circuit, expected)
    with pytest.raises(GraphFileError, match="--split-kv") if shape.group > 1 else _nothing():
        eap_scores(shape, edges, None)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_eap_ig_library_loads_our_files_and_we_load_its(tmp_path):
    """Where the EAP-IG library is installed (hannamw/EAP-IG; not a dependency): its
    ``Graph.from_json`` loads our file with the same scores and flags, its ``apply_topn`` +
    ``prune`` pick the circuit ``circuit_of_size`` picks, and its ``to_json`` reads back here.
    (Run against its source at 795f560 while writing this module: all three hold.)"""
    eap_graph = pytest.importorskip("eap.graph")
    from sweeps.core.graph_files import ours_of_eap_edges

    for shape in (GPT2_TINY, ModelShape(2, 3, 3, True, False, 32), ModelShape(3, 6, 2, False, False, 48)):
        torch.manual_seed(0)
        graph = shape.graph()
        per_head = torch.randn(len(A.query_head_kv_edges(graph)), dtype=torch.float64) if shape.group > 1 else None
        scores = eap_scores(shape, torch.randn(graph.n_edges, dtype=torch.float64), per_head)
        data = graph_json(shape, scores, circuit_of_size(shape, scores, 0.2))
        ours = tmp_path / "ours.json"
        ours.write_text(json.dumps(data))
        g = eap_graph.Graph.from_json(str(ours))
        for name, e in data["edges"].items():
            assert g.edges[name].score == pytest.approx(e["score"], rel=1e-6, abs=1e-6)
            assert bool(g.edges[name].in_graph) == e["in_graph"]
        again = eap_graph.Graph.from_json(str(ours))
        again.apply_topn(int(0.2 * len(again.edges)), absolute=True)
        assert torch.equal(again.in_graph, g.in_graph) and torch.equal(again.nodes_in_graph, g.nodes_in_graph)
        theirs = tmp_path / "theirs.json"
        g.to_json(str(theirs))
        expected = torch.zeros(graph.n_edges, dtype=torch.float64).index_add_(0, ours_of_eap_edges(shape, graph), scores)
        torch.testing.assert_close(read_graph_file(theirs, shape).scores, expected, rtol=1e-5, atol=1e-5)
