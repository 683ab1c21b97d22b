"""Nodes of a transformer's computational graph, as the scale sweep names them.

A node is one attention head's output (TL's ``hook_result`` for that head,
``z_h @ W_O[h]``, without the layer's output bias) or one MLP's output
(``hook_mlp_out``). Canonical names: ``L9H6`` and ``mlp9``; ``9.6`` and
``MLP9`` are accepted on input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class NodeError(ValueError):
    """A node name that does not parse or is outside the model."""


@dataclass(frozen=True)
class Node:
    layer: int
    head: int | None  # None: the layer's MLP

    @property
    def kind(self) -> str:
        return "mlp" if self.head is None else "attn_head"

    @property
    def name(self) -> str:
        return f"mlp{self.layer}" if self.head is None else f"L{self.layer}H{self.head}"

    def sort_key(self) -> tuple[int, int]:
        """Layer order, a layer's heads before its MLP (the order they run in)."""
        return (self.layer, 1 << 30 if self.head is None else self.head)


_NODE = re.compile(
    r"^(?:L(?P<l1>\d+)H(?P<h1>\d+|\*)|(?P<l2>\d+)\.(?P<h2>\d+|\*)|MLP(?P<m>\d+)|L(?P<l3>\d+))$", re.IGNORECASE
)


def parse_node_pattern(item: str, n_layers: int, n_heads: int, has_mlp: bool = True, what: str = "node") -> list[Node]:
    """``L9H6``/``9.6`` -> one head; ``mlp9`` -> an MLP; ``L9H*``/``9.*`` -> a layer's heads;
    ``L9`` -> a layer's heads and its MLP."""
    m = _NODE.match(item.strip())
    if not m:
        raise NodeError(f"{what} {item!r} is not a node; write L9H6, 9.6 or mlp9 (L9 or L9H* for a whole layer)")
    layer = int(m["l1"] or m["l2"] or m["m"] or m["l3"])
    if not 0 <= layer < n_layers:
        raise NodeError(f"{what} {item!r}: layer {layer} is out of range (the model has layers 0-{n_layers - 1})")
    if m["m"] is not None:
        if not has_mlp:
            raise NodeError(f"{what} {item!r}: the model is attention-only (no MLPs)")
        return [Node(layer, None)]
    if m["l3"] is not None:
        return [Node(layer, h) for h in range(n_heads)] + ([Node(layer, None)] if has_mlp else [])
    head_text = m["h1"] or m["h2"]
    if head_text == "*":
        return [Node(layer, h) for h in range(n_heads)]
    head = int(head_text)
    if not 0 <= head < n_heads:
        raise NodeError(f"{what} {item!r}: head {head} is out of range (the model has heads 0-{n_heads - 1})")
    return [Node(layer, head)]


def all_nodes(n_layers: int, n_heads: int, has_mlp: bool = True) -> list[Node]:
    nodes = [Node(l, h) for l in range(n_layers) for h in range(n_heads)]
    if has_mlp:
        nodes += [Node(l, None) for l in range(n_layers)]
    return sorted(nodes, key=Node.sort_key)


def parse_nodes(text: str | None, n_layers: int, n_heads: int, has_mlp: bool = True) -> list[Node]:
    """``--nodes``: a comma-separated list of node patterns; None/"all" -> every node."""
    if text is None or text.strip().lower() == "all":
        return all_nodes(n_layers, n_heads, has_mlp)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise NodeError("--nodes is empty; give e.g. L9H6,mlp9,L3 or leave it out for every node")
    chosen: set[Node] = set()
    for item in items:
        chosen.update(parse_node_pattern(item, n_layers, n_heads, has_mlp, "--nodes item"))
    return sorted(chosen, key=Node.sort_key)


def node_from_name(name: str) -> Node:
    """Inverse of ``Node.name`` (no range check)."""
    m = _NODE.match(name)
    if not m or m["l3"] is not None or "*" in name:
        raise NodeError(f"not a node name: {name!r}")
    if m["m"] is not None:
        return Node(int(m["m"]), None)
    return Node(int(m["l1"] or m["l2"]), int(m["h1"] or m["h2"]))
