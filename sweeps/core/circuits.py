"""Circuit specifications: which nodes a sweep labels ``in_circuit``.

``--circuit`` takes one of:
- a named preset (``PRESETS``; e.g. ``ioi-gpt2-small``, Wang et al. 2022);
- a JSON or YAML file: a list of node names, or ``{"nodes": [...]}``
  (names as ``L9H6``, ``9.6``, ``mlp9``; ``L9H*`` for a layer's heads);
- ``top:K@DIR``: the K nodes with the largest |score| in the ``nodes/``
  dataset of an attribution sweep's results directory.

Everything is checked against the model's shape before any weights load.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from sweeps.core.nodes import Node, NodeError, edge_name, node_from_name, parse_edge, parse_node_pattern

_IOI_GPT2_SMALL = {
    "name movers": "9.6 9.9 10.0",
    "backup name movers": "9.0 9.7 10.1 10.2 10.6 10.10 11.2 11.9",
    "negative name movers": "10.7 11.10",
    "S-inhibition": "7.3 7.9 8.6 8.10",
    "induction": "5.5 6.9",
    "duplicate token": "0.1 3.0",
    "previous token": "2.2 4.11",
}

PRESETS: dict[str, dict] = {
    "ioi-gpt2-small": {
        "about": "the IOI circuit of GPT-2 small (Wang et al. 2022): 23 heads in 7 classes",
        "model": "gpt2-small",
        "nodes": [n for group in _IOI_GPT2_SMALL.values() for n in group.split()],
    },
}
ALIASES = {"ioi": "ioi-gpt2-small"}


class CircuitError(ValueError):
    """A ``--circuit`` that cannot be used; the message says why and what to write."""


@dataclass(frozen=True)
class Circuit:
    label: str  # what the user gave (preset name, file, top:K@DIR)
    nodes: frozenset[Node]
    model: str | None = None  # the model a preset describes

    def status(self, node: Node) -> str:
        return "in_circuit" if node in self.nodes else "not_in_circuit"

    def names(self) -> list[str]:
        return [n.name for n in sorted(self.nodes, key=Node.sort_key)]


def _nodes(items: list, where: str, n_layers: int, n_heads: int, has_mlp: bool) -> frozenset[Node]:
    if not items:
        raise CircuitError(f"{where} lists no nodes")
    nodes: set[Node] = set()
    for item in items:
        if not isinstance(item, (str, int, float)):
            raise CircuitError(f"{where}: entry {item!r} is not a node name like L9H6, 9.6 or mlp9")
        try:
            nodes.update(parse_node_pattern(str(item), n_layers, n_heads, has_mlp, f"{where}: entry"))
        except NodeError as err:
            raise CircuitError(str(err)) from None
    return frozenset(nodes)


def _parse(path: Path):
    """A circuit file's JSON (``.json``) or YAML (anything else) content."""
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as err:  # json/yaml parse errors
        raise CircuitError(f"cannot parse circuit file {path}: {str(err).splitlines()[0]}") from None


def _read_file(path: Path) -> list:
    data = _parse(path)
    if isinstance(data, dict):
        data = data.get("nodes")
    if not isinstance(data, list):
        raise CircuitError(f'circuit file {path} must hold a list of nodes or {{"nodes": [...]}}')
    return data


def _top_k(text: str, model: str, n_layers: int, n_heads: int, has_mlp: bool) -> tuple[frozenset[Node], str]:
    """``top:K@DIR``: the K highest-|score| head/MLP nodes of an attribution sweep."""
    body = text[len("top:") :]
    k_text, _, directory = body.partition("@")
    if not k_text.isdigit() or int(k_text) <= 0 or not directory:
        raise CircuitError(f"--circuit {text!r}: write top:K@DIR, e.g. top:20@results/attribution/gpt2-small__ioi")
    out = Path(directory)
    if not (out / "nodes").is_dir():
        raise CircuitError(
            f"--circuit {text!r}: {out} holds no attribution results (no nodes/ dataset); "
            "run sweeps/attribution.py first"
        )
    spec_path = out / "sweep.json"
    if spec_path.is_file():
        their_model = json.loads(spec_path.read_text()).get("model")
        if their_model and their_model != model:
            raise CircuitError(f"--circuit {text!r}: those attribution results are for {their_model}, not {model}")
    import pandas as pd

    scores = pd.read_parquet(out / "nodes", columns=["node", "score"])
    scores = scores.groupby("node", as_index=False)["score"].sum()
    ranked = []
    for name, score in zip(scores["node"], scores["score"]):
        try:
            node = node_from_name(name)
        except NodeError:
            continue  # embeddings and other nodes the scale sweep does not patch
        if node.layer < n_layers and (node.head is None and has_mlp or node.head is not None and node.head < n_heads):
            ranked.append((-abs(score), node.sort_key(), node))
    if not ranked:
        raise CircuitError(f"--circuit {text!r}: no head or MLP scores in {out / 'nodes'}")
    ranked.sort()
    return frozenset(node for *_, node in ranked[: int(k_text)]), str(out)


def load_circuit(text: str | None, model: str, n_layers: int, n_heads: int, has_mlp: bool = True) -> Circuit | None:
    """Resolve ``--circuit`` for a model of the given shape (None: no labels)."""
    if text is None:
        return None
    name = ALIASES.get(text, text)
    if name in PRESETS:
        preset = PRESETS[name]
        nodes = _nodes(preset["nodes"], f"preset {name} ({preset['model']})", n_layers, n_heads, has_mlp)
        return Circuit(name, nodes, preset["model"])
    if text.startswith("top:"):
        nodes, directory = _top_k(text, model, n_layers, n_heads, has_mlp)
        spec_path = Path(directory) / "sweep.json"
        method = json.loads(spec_path.read_text()).get("method", "eap") if spec_path.is_file() else "eap"
        return Circuit(f"{text} ({method})", nodes)
    path = Path(text)
    if path.is_file():
        return Circuit(text, _nodes(_read_file(path), f"circuit file {path}", n_layers, n_heads, has_mlp))
    close = difflib.get_close_matches(text, [*PRESETS, *ALIASES], n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise CircuitError(
        f"--circuit {text!r} is neither a file nor a preset.{hint} Presets: {', '.join(PRESETS)}; "
        "or a JSON/YAML list of nodes (L9H6, 9.6, mlp9); or top:K@DIR of an attribution sweep"
    )


# --------------------------------------------------------------------------- #
# Circuits to evaluate (sweeps/circuit.py): nodes or edges of the attribution graph
# --------------------------------------------------------------------------- #


def read_graph_circuit(path: Path, graph) -> tuple[str, list[bool]]:
    """(level, membership in graph order) of a circuit file: a JSON/YAML list (or
    ``{"nodes": [...]}`` / ``{"edges": [...]}``) of node names (``embed``, ``L9H6``, ``9.6``,
    ``mlp9``, ``L9H*``, ``L9``) or of edges as ``docs/naming.md`` writes them (``L0H1->L2H3.q``,
    ``embed->L1KV0.k``, ``mlp3->mlp4``, ``L5H1->resid_final``; older spellings parse too).
    Every name is checked against ``graph``; a name it lacks is an error naming it."""
    if not path.is_file():
        raise CircuitError(f"circuit file {path} does not exist")
    data = _parse(path)
    if isinstance(data, dict):
        data = data.get("edges", data.get("nodes"))
    if not isinstance(data, list) or not data:
        raise CircuitError(f"circuit file {path} must hold a non-empty list of nodes or of edges")
    items = [str(item).strip() for item in data]
    edges = ["->" in item for item in items]
    if any(edges) and not all(edges):
        raise CircuitError(f"circuit file {path} mixes nodes and edges; list one kind")
    if all(edges):
        index = {(u, d.name, d.input): i for i, (u, d) in enumerate(graph_edges(graph))}
        member = [False] * graph.n_edges
        for item in items:
            try:
                key = parse_edge(item)
            except NodeError as err:
                raise CircuitError(f"circuit file {path}: {err}") from None
            if key not in index:
                wanted = edge_name(*key)
                close = difflib.get_close_matches(wanted, [edge_name(*k) for k in index], n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise CircuitError(
                    f"circuit file {path}: the model has no edge {item!r}{hint}; write "
                    "upstream->reader.input, e.g. L0H1->L2H3.q, L0H1->L2KV0.k or mlp3->resid_final"
                )
            member[index[key]] = True
        return "edge", member
    n_layers = sum(1 for d in graph.downstream if d.input == "q" and d.head == 0)
    n_heads = sum(1 for d in graph.downstream if d.input == "q" and d.layer == 0)
    has_mlp = any(d.input == "mlp" for d in graph.downstream)
    names = set()
    for item in items:
        if item == "embed":
            names.add(item)
            continue
        try:
            names.update(n.name for n in parse_node_pattern(item, n_layers, n_heads, has_mlp, f"{path}: entry"))
        except NodeError as err:
            raise CircuitError(str(err)) from None
    return "node", [u in names for u in graph.upstream]


def graph_edges(graph):
    """(upstream name, Downstream) of every edge of an attribution graph, in Graph order."""
    return [(u, d) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
