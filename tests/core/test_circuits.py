"""Circuit specifications: presets, files, and the top nodes of an attribution sweep."""

import json

import pandas as pd
import pytest

from sweeps.core.circuits import CircuitError, load_circuit
from sweeps.core.nodes import Node, NodeError, all_nodes, node_from_name, parse_nodes


def test_ioi_preset_is_the_23_heads_of_wang_et_al():
    circuit = load_circuit("ioi", "gpt2-small", 12, 12)
    assert circuit.label == "ioi-gpt2-small" and len(circuit.nodes) == 23
    assert {Node(9, 6), Node(9, 9), Node(10, 0), Node(10, 7), Node(11, 10), Node(2, 2)} <= circuit.nodes
    assert circuit.status(Node(9, 6)) == "in_circuit" and circuit.status(Node(9, None)) == "not_in_circuit"


def test_json_and_yaml_files_accept_every_spelling(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(["L1H2", "0.3", "mlp1", "MLP2", "L2H*"]))
    (tmp_path / "c.yaml").write_text("name: mine\nnodes: [L1H2, '0.3', mlp1, MLP2, L2H*]\n")
    expected = {Node(1, 2), Node(0, 3), Node(1, None), Node(2, None), *(Node(2, h) for h in range(4))}
    for name in ("c.json", "c.yaml"):
        assert load_circuit(str(tmp_path / name), "m", 3, 4).nodes == expected
    with pytest.raises(CircuitError, match="lists no nodes"):
        (tmp_path / "none.json").write_text("[]")
        load_circuit(str(tmp_path / "none.json"), "m", 3, 4)


def test_top_k_of_an_attribution_sweep(tmp_path):
    (tmp_path / "nodes").mkdir()
    scores = pd.DataFrame({"node": ["embed", "L0H1", "L1H3", "mlp1", "L2H0", "L1H3"],
                           "score": [9.0, 0.5, -2.0, 1.5, 0.1, -0.5]})  # L1H3 summed over shards: -2.5
    scores.to_parquet(tmp_path / "nodes" / "b0.parquet")
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "attribution", "model": "tiny-gpt2"}))
    circuit = load_circuit(f"top:2@{tmp_path}", "tiny-gpt2", 3, 4)
    assert circuit.nodes == {Node(1, 3), Node(1, None)}  # by |score|; embeddings are not patchable nodes
    with pytest.raises(CircuitError, match="are for tiny-gpt2, not tiny-llama"):
        load_circuit(f"top:2@{tmp_path}", "tiny-llama", 3, 4)


def test_node_names_round_trip_and_parse():
    for node in all_nodes(3, 4):
        assert node_from_name(node.name) == node
    assert [n.name for n in parse_nodes("L1,0.2", 3, 4)] == ["L0H2", "L1H0", "L1H1", "L1H2", "L1H3", "mlp1"]
    assert len(parse_nodes(None, 3, 4)) == 15 and len(parse_nodes(None, 3, 4, has_mlp=False)) == 12
    with pytest.raises(NodeError, match="attention-only"):
        parse_nodes("mlp1", 3, 4, has_mlp=False)
