"""One name per component (docs/naming.md): every name an output prints parses back to the
same component, in every place that takes names as input."""

from __future__ import annotations

import json

import pytest

from analysis.attribution import load_attribution_results, summary_text, top_edges_table, top_nodes_table
from analysis.backup import compensation_by_layer, load_results, summary_table
from sweeps import attribution, backup
from sweeps.core.attribution import Target, build_graph
from sweeps.core.circuits import load_circuit
from sweeps.runtime.models import describe_model
from sweeps.core.nodes import (
    EMBED,
    Node,
    NodeError,
    all_nodes,
    canonical_name,
    edge_name,
    node_from_name,
    parse_edge,
    parse_node_pattern,
    parse_nodes,
)
from sweeps.core.transformer import ModelConfig
from sweeps.jobs.plan import parse_heads, plan_backup, plan_scale

L, H = 30, 9  # SmolLM2's shape


def test_every_node_name_parses_back_to_its_node():
    for node in all_nodes(L, H):
        assert node_from_name(node.name) == node
        assert parse_node_pattern(node.name, L, H) == [node]
        assert canonical_name(node.name) == node.name


@pytest.mark.parametrize("spelling,name", [
    ("9.6", "L9H6"), ("9:6", "L9H6"), ("l09h6", "L9H6"), ("MLP9", "mlp9"), ("mlp09", "mlp9"),
    ("l8kv1", "L8KV1"), ("EMBED", "embed"), ("resid_final", "resid_final"),
])
def test_older_spellings_still_name_the_same_component(spelling, name):
    assert canonical_name(spelling) == name


def test_shard_names_parse_back_to_the_nodes_they_hold():
    heads = [(l, h) for l in (0, 5) for h in (0, 1, 2, 5, 7, 8)]
    for shard in plan_backup(heads, heads_per_shard=4):
        assert parse_heads(shard.id, L, H) == [(shard.layer, h) for h in shard.heads]
    nodes = [Node(5, h) for h in (0, 1, 2, 3)] + [Node(5, None), Node(7, None)]
    for shard in plan_scale(nodes, 12, set(), scales_per_shard=5):
        assert parse_node_pattern(shard.id, L, H) == shard.nodes, shard.id


def test_every_edge_of_a_grouped_query_model_round_trips():
    """SmolLM2's graph: query heads, shared key/value heads, MLPs, the final stream."""
    cfg = ModelConfig(n_layers=3, n_heads=4, n_kv_heads=2, d_model=16, d_head=4, d_mlp=32, d_vocab=10,
                      norm="rmsnorm", eps=1e-6, positional="rotary", act_fn="silu", gated_mlp=True)
    graph = build_graph(cfg)
    names = set()
    for d, prefix in zip(graph.downstream, graph.prefix):
        for up in graph.upstream[:prefix]:
            name = edge_name(up, d.name, d.input)
            assert parse_edge(name) == (up, d.name, d.input), name
            assert Target(up, d.name, d.input).label == name
            names.add(name)
    assert len(names) == graph.n_edges  # one name per edge, none shared
    assert {"L0H1->L1KV0.k", "embed->mlp0", "mlp2->resid_final", "L0H3->L2H1.q"} <= names


@pytest.mark.parametrize("old", ["23:3 -> 24:4 (q)", "L23H3->L24H4:q", "23.3->24.4.q", " L23H3 -> L24H4 . q "])
def test_older_edge_spellings_parse_to_the_same_edge(old):
    assert parse_edge(old) == ("L23H3", "L24H4", "q")


@pytest.mark.parametrize("bad,message", [
    ("L23H3->L24H4", "name the input of L24H4"), ("L20H0->mlp20.q", "reads only its mlp input"),
    ("L23H3", "is not an edge"),
])
def test_an_edge_that_does_not_parse_says_why(bad, message):
    with pytest.raises(NodeError, match=message):
        parse_edge(bad)


def test_components_the_scale_sweep_cannot_patch_are_named_as_such():
    for name in (EMBED, "L8KV1", "resid_final"):
        with pytest.raises(NodeError, match="not a head or an MLP"):
            parse_nodes(name, L, H)


def test_names_in_the_backup_sweeps_output_are_accepted_back(tmp_path, capsys):
    out = tmp_path / "o"
    assert backup.main(["--model", "tiny-gpt2", "--executor", "local", "--n-prompts", "8", "--no-report",
                        "--out", str(out)]) == 0
    results = load_results(out)
    n_layers, n_heads = results.n_layers, results.n_heads
    printed = summary_table(results, min_de_fraction=0.0)["head"]
    assert len(printed) > 0
    for name in printed:  # --heads takes what the table printed
        [head] = parse_heads(name, n_layers, n_heads)
        assert f"L{head[0]}H{head[1]}" == name
    by_layer = compensation_by_layer(results.responses, n_layers, n_heads)
    for column in by_layer.columns:  # L2H* (a layer's heads) and mlp2
        nodes = parse_node_pattern(column, n_layers, n_heads)
        assert {n.layer for n in nodes} == {int(column.strip("LmlpH*"))}
        assert all(n.head is None for n in nodes) == column.startswith("mlp")
    manifest = json.loads((out / "manifest.json").read_text())
    assert parse_heads(",".join(manifest["shards"]), n_layers, n_heads) == sorted(
        zip(results.slopes.layer, results.slopes["head"]))


def test_names_in_the_attribution_sweeps_output_are_accepted_back(tmp_path, capsys):
    out = tmp_path / "o"
    assert attribution.main(["--model", "tiny-llama", "--executor", "local", "--n-prompts", "6", "--verify-top", "4",
                             "--no-report", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = load_attribution_results(out)
    edges = top_edges_table(results, 10)
    for name, row in zip(edges.edge, results.edges.head(10).itertuples()):
        assert f" {name} " in printed  # the console prints these very names
        assert parse_edge(name) == (row.upstream, row.downstream, row.input)
    every_edge = {edge_name(u, d, i) for u, d, i in zip(results.edges.upstream, results.edges.downstream,
                                                         results.edges.input)}
    assert set(results.verify.target) <= set(results.nodes.node) | every_edge
    nodes = top_nodes_table(results, len(results.nodes))
    assert set(nodes.kind) == {"head", "MLP", "embeddings"}  # every kind, not only heads
    assert list(top_nodes_table(results, 10).node) == list(results.nodes.node.head(10))
    info = describe_model("tiny-llama")
    patchable = [n for n in nodes.node if n != EMBED]
    circuit_file = tmp_path / "circuit.json"
    circuit_file.write_text(json.dumps(patchable))  # a circuit file made of the printed names
    circuit = load_circuit(str(circuit_file), "tiny-llama", info.n_layers, info.n_heads)
    assert sorted(n.name for n in circuit.nodes) == sorted(patchable)
    assert summary_text(results, 10) in printed
