"""A sweep spec -> deterministic shards; head-list parsing.

A backup-sweep shard is a group of upstream heads of one layer (all of a
layer's requested heads by default): they share one batched restart from that
layer. Its id (``L05H0-8``) names exactly the heads it holds, so finished
shards are recognised on resume whatever the order of execution.

A scale-sweep shard is a block of nodes of one layer × a block of scales
(indices into the sweep's sorted scale list); its id (``L05H0-8M_S0-11``:
heads 0-8 and the MLP of layer 5, scales 0-11) likewise names its contents.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sweeps.core.nodes import Node, NodeError, parse_node_pattern


class PlanError(ValueError):
    """Bad sweep input (heads out of range, empty lists, ...)."""


@dataclass(frozen=True)
class Shard:
    layer: int
    heads: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"L{self.layer:02d}H{compress_ranges(self.heads)}"


def compress_ranges(values: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2.5.7-8"."""
    parts, run = [], [values[0]]
    for v in values[1:]:
        if v == run[-1] + 1:
            run.append(v)
        else:
            parts.append(run)
            run = [v]
    parts.append(run)
    return ".".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)


def parse_heads(text: str | None, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``"L23H3,23.0,L5"`` -> sorted unique (layer, head); None/"all" -> every head.

    An item is any head name or pattern ``nodes.parse_node_pattern`` reads (``L23H3``,
    ``23.3``, ``23:3``, ``L23H*``, ``L23`` for every head of a layer, a shard name such as
    ``L05H0-8``); the heads it names are taken, an MLP it names is not (heads are what the
    backup sweep ablates).
    """
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    if text is None or text.strip().lower() == "all":
        return every
    chosen: set[tuple[int, int]] = set()
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise PlanError("--heads is empty; give e.g. L5H1,9.6 or leave it out for every head")
    for item in items:
        try:
            nodes = parse_node_pattern(item, n_layers, n_heads, True, "--heads item")
        except NodeError as err:
            raise PlanError(
                str(err).replace(
                    "is not a node; write L9H6, 9.6 or mlp9 (L9 or L9H* for a whole layer)",
                    "is not a head; write L5H1, 5.1, L5H* or L5",
                )
            ) from None
        heads = [(n.layer, n.head) for n in nodes if n.head is not None]
        if not heads:
            raise PlanError(f"--heads item {item!r} is an MLP; the backup sweep ablates heads (write L5H1 or L5)")
        chosen.update(heads)
    return sorted(chosen)


def plan_backup(heads: list[tuple[int, int]], heads_per_shard: int | None = None) -> list[Shard]:
    """Group the requested heads by layer (and chunk), in a fixed order."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in sorted(heads):
        by_layer.setdefault(layer, []).append(head)
    shards: list[Shard] = []
    for layer, hs in by_layer.items():
        step = heads_per_shard or len(hs)
        shards.extend(Shard(layer, tuple(hs[i : i + step])) for i in range(0, len(hs), step))
    return shards


_SHARD_ID = re.compile(r"^L(\d+)H([\d.\-]+)$")


def shard_from_id(shard_id: str) -> Shard:
    """Inverse of ``Shard.id``."""
    m = _SHARD_ID.match(shard_id)
    if not m:
        raise PlanError(f"not a shard id: {shard_id!r}")
    return Shard(int(m[1]), _expand_ranges(m[2]))


def remaining(heads: list[tuple[int, int]], done_shard_ids: set[str]) -> list[tuple[int, int]]:
    """The requested heads that no finished shard covers yet."""
    done = {(s.layer, h) for s in map(shard_from_id, done_shard_ids) for h in s.heads}
    return [lh for lh in heads if lh not in done]


# --------------------------------------------------------------------------- #
# Scale sweep
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ScaleShard:
    layer: int
    heads: tuple[int, ...]
    mlp: bool
    scales: tuple[int, ...]  # indices into the sweep's scale list

    @property
    def nodes(self) -> list[Node]:
        return [Node(self.layer, h) for h in self.heads] + ([Node(self.layer, None)] if self.mlp else [])

    @property
    def id(self) -> str:
        heads = f"H{compress_ranges(self.heads)}" if self.heads else ""
        return f"L{self.layer:02d}{heads}{'M' if self.mlp else ''}_S{compress_ranges(self.scales)}"


_SCALE_SHARD_ID = re.compile(r"^L(\d+)(?:H([\d.\-]+))?(M)?_S([\d.\-]+)$")


def _expand_ranges(text: str) -> tuple[int, ...]:
    values: list[int] = []
    for part in text.split("."):
        lo, _, hi = part.partition("-")
        values.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(values)


def scale_shard_from_id(shard_id: str) -> ScaleShard:
    """Inverse of ``ScaleShard.id``."""
    m = _SCALE_SHARD_ID.match(shard_id)
    if not m:
        raise PlanError(f"not a scale-sweep shard id: {shard_id!r}")
    return ScaleShard(int(m[1]), _expand_ranges(m[2]) if m[2] else (), bool(m[3]), _expand_ranges(m[4]))


def plan_scale(
    nodes: list[Node],
    n_scales: int,
    done_shard_ids: set[str] | frozenset[str] = frozenset(),
    scales_per_shard: int | None = None,
) -> list[ScaleShard]:
    """Shards covering every (node, scale) that no finished shard covers.

    Per layer and block of scales, nodes with the same unfinished scales share
    a shard (normally all of the layer's nodes, one shard a layer and block).
    """
    done = {
        (node, s)
        for sid in done_shard_ids
        for shard in [scale_shard_from_id(sid)]
        for node in shard.nodes
        for s in shard.scales
    }
    step = scales_per_shard or n_scales
    blocks = [tuple(range(i, min(i + step, n_scales))) for i in range(0, n_scales, step)]
    by_layer: dict[int, list[Node]] = {}
    for node in sorted(set(nodes), key=Node.sort_key):
        by_layer.setdefault(node.layer, []).append(node)
    shards = []
    for layer, layer_nodes in by_layer.items():
        for block in blocks:
            by_todo: dict[tuple[int, ...], list[Node]] = {}
            for node in layer_nodes:
                todo = tuple(s for s in block if (node, s) not in done)
                if todo:
                    by_todo.setdefault(todo, []).append(node)
            for todo, group in by_todo.items():
                heads = tuple(n.head for n in group if n.head is not None)
                shards.append(ScaleShard(layer, heads, any(n.head is None for n in group), todo))
    return shards
