"""Names of a transformer's components, one scheme for every output and input
(docs/naming.md).

A node the sweeps patch is one attention head's output (TL's ``hook_result`` for that
head, ``z_h @ W_O[h]``, without the layer's output bias) or one MLP's output
(``hook_mlp_out``); the attribution sweep also scores the embeddings. Canonical names:

- ``L9H6`` a head, ``mlp9`` an MLP, ``embed`` the embeddings;
- readers (the downstream end of an edge): a head's ``L9H6``, a shared key/value head's
  ``L9KV1``, an MLP's ``mlp9``, the final residual stream ``resid_final``;
- an edge ``L9H6->L10H7.q``: upstream node, ``->``, reader, and the reader's input when it has
  several (``.q``, ``.k``, ``.v``); ``L9H6->mlp10`` and ``L9H6->resid_final`` need none.

Every name an output prints parses back (``parse_node_pattern``, ``parse_edge``), and so do
the older spellings: ``9.6`` and ``9:6``, ``MLP9``, zero-padded layers, edges as
``9:6 -> 10:7 (q)`` or ``L9H6->L10H7:q``. Shard names are ranges of these (``L05H0-8``: heads
0-8 of layer 5; ``L05H0-8M_S0-11``: those and ``mlp5``, at scales 0-11) and parse back to
their nodes too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMBED = "embed"
FINAL = "resid_final"
INPUTS_NAMED = ("q", "k", "v")  # a reader's input is part of an edge's name only where it has several


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


_RANGES = r"\d+(?:-\d+)?(?:\.\d+(?:-\d+)?)*"  # 0-2.5.7-8, as shard names write a set of heads
_NODE = re.compile(
    rf"""^(?:
        L(?P<l1>\d+)H(?P<h1>\*|{_RANGES})(?P<m1>M)?(?:_S{_RANGES})?   # L9H6, L9H*, shard names L05H0-8M_S0-11
      | L(?P<l4>\d+)M(?:_S{_RANGES})?                               # a shard of only the MLP: L05M_S0-11
      | (?P<l2>\d+)[.:](?P<h2>\d+|\*)                               # 9.6, 9:6, 9.*
      | MLP(?P<m>\d+)                                               # mlp9
      | L(?P<l3>\d+)                                                # L9: a layer's heads and its MLP
    )$""",
    re.IGNORECASE | re.VERBOSE,
)


def _expand(text: str) -> list[int]:
    """``"0-2.5"`` -> [0, 1, 2, 5]."""
    values: list[int] = []
    for part in text.split("."):
        first, _, last = part.partition("-")
        values.extend(range(int(first), int(last or first) + 1))
    return values


def parse_node_pattern(item: str, n_layers: int, n_heads: int, has_mlp: bool = True, what: str = "node") -> list[Node]:
    """``L9H6``/``9.6``/``9:6`` -> one head; ``mlp9`` -> an MLP; ``L9H*``/``9.*`` -> a layer's heads;
    ``L9`` -> a layer's heads and its MLP; a shard name (``L05H0-8``, ``L05H0-3M_S0-11``) -> its nodes."""
    text = item.strip()
    if text.lower() in (EMBED, FINAL) or re.match(r"^L\d+KV\d+$", text, re.IGNORECASE):
        raise NodeError(
            f"{what} {item!r} is scored by the attribution sweep but is not a head or an MLP, "
            "which are what this command patches"
        )
    m = _NODE.match(text)
    if not m:
        raise NodeError(f"{what} {item!r} is not a node; write L9H6, 9.6 or mlp9 (L9 or L9H* for a whole layer)")
    layer = int(m["l1"] or m["l2"] or m["m"] or m["l3"] or m["l4"])
    if not 0 <= layer < n_layers:
        raise NodeError(f"{what} {item!r}: layer {layer} is out of range (the model has layers 0-{n_layers - 1})")
    mlp = [Node(layer, None)] if has_mlp else []
    if m["m"] is not None or m["l4"] is not None:
        if not has_mlp:
            raise NodeError(f"{what} {item!r}: the model is attention-only (no MLPs)")
        return mlp
    if m["l3"] is not None:
        return [Node(layer, h) for h in range(n_heads)] + mlp
    head_text = m["h1"] or m["h2"]
    if head_text == "*":
        return [Node(layer, h) for h in range(n_heads)]
    heads = _expand(head_text)
    for head in heads:
        if not 0 <= head < n_heads:
            raise NodeError(f"{what} {item!r}: head {head} is out of range (the model has heads 0-{n_heads - 1})")
    return [Node(layer, h) for h in heads] + (mlp if m["m1"] else [])


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
    """One head or MLP from any of its names (``L9H6``, ``9.6``, ``9:6``, ``mlp9``, ``MLP09``);
    the inverse of ``Node.name``, without a range check."""
    m = _NODE.match(name.strip())
    if not m or m["l3"] is not None or m["l4"] is not None or m["m1"] or "*" in name:
        raise NodeError(f"not a node name: {name!r}")
    if m["m"] is not None:
        return Node(int(m["m"]), None)
    head_text = m["h1"] or m["h2"]
    if not head_text.isdigit():
        raise NodeError(f"not a node name: {name!r}")
    return Node(int(m["l1"] or m["l2"]), int(head_text))


_KV = re.compile(r"^L(\d+)KV(\d+)$", re.IGNORECASE)


def canonical_name(name: str) -> str:
    """The canonical spelling of a node or reader name: ``9:6`` -> ``L9H6``, ``MLP09`` -> ``mlp9``,
    ``l8kv1`` -> ``L8KV1``; ``embed`` and ``resid_final`` as they are."""
    text = name.strip()
    if text.lower() in (EMBED, FINAL):
        return text.lower()
    kv = _KV.match(text)
    if kv:
        return f"L{int(kv[1])}KV{int(kv[2])}"
    return node_from_name(text).name


def edge_name(upstream: str, downstream: str, input: str | None = None) -> str:
    """``L23H3->L24H4.q``: the input is named where the reader has several (q, k, v)."""
    return f"{upstream}->{downstream}" + (f".{input}" if input in INPUTS_NAMED else "")


_NAME = r"(?:\d+[.:]\d+|[A-Za-z_]\w*)"
_EDGE = re.compile(rf"^\s*(?P<up>{_NAME})\s*->\s*(?P<down>{_NAME})\s*(?:[.:]\s*(?P<i1>\w+)|\(\s*(?P<i2>\w+)\s*\))?\s*$")


def parse_edge(text: str) -> tuple[str, str, str]:
    """``(upstream, downstream, input)`` of an edge name, canonical: ``L23H3->L24H4.q`` and the
    older ``23:3 -> 24:4 (q)`` and ``L23H3->L24H4:q`` give ``("L23H3", "L24H4", "q")``; a reader
    with one input (an MLP, ``resid_final``) needs none written (``mlp``, ``resid``)."""
    m = _EDGE.match(text)
    if not m:
        raise NodeError(f"{text!r} is not an edge; write e.g. L23H3->L24H4.q or L20H0->mlp20")
    up, down = canonical_name(m["up"]), canonical_name(m["down"])
    given = (m["i1"] or m["i2"] or "").lower() or None
    implied = "resid" if down == FINAL else "mlp" if down.startswith("mlp") else None
    if implied is not None:
        if given not in (None, implied):
            raise NodeError(f"edge {text!r}: {down} reads only its {implied} input, not {given!r}")
        return up, down, implied
    if given not in INPUTS_NAMED:
        raise NodeError(f"edge {text!r}: name the input of {down} it feeds: .q, .k or .v")
    return up, down, given
