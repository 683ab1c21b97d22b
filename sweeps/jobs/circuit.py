"""The circuit sweep on one worker: shards are circuits (one size of one curve).

A ``CircuitShard`` (``C1_0000360``: curve 1, its 360 top edges or nodes) evaluates one circuit
over every prompt of the task, in passes sized for the device, and returns raw sums (the
circuit's metric, the clean and corrupt metric, the number of points), so faithfulness is
exact however the prompts were split. A curve is a ranking (an attribution result's
scores, top by |score|) or one fixed circuit (a file).

MIB's evaluation (``--sizes mib``) evaluates each ranking twice, top by score (``signed``)
and by |score| (``absolute``), at MIB's ten fractions, each circuit pruned as MIB prunes it
(``C1_mib_signed_0.001``: curve 1's signed circuit at 0.1 %; ``circuit_eval``).

No Ray here: the executors (``sweeps/runtime/executors.py``) run ``CircuitJob``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from sweeps.core import effects, footprint
from sweeps.jobs.base import Job
from sweeps.runtime.chunking import map_chunks, memory_gauge
from tasks.base import TaskData


@dataclass(frozen=True)
class Curve:
    """One faithfulness curve: circuits of growing size from one ranking, or one fixed circuit.

    ``scores`` (graph order: edges at edge level, upstream nodes at node level) ranks the
    candidates by |score|; ``fixed`` is a circuit's membership in the same order."""

    label: str  # the method of an attribution result, or the circuit file's name
    source: str  # the attribution results directory or the circuit file
    level: str  # "node" | "edge"
    scores: tuple[float, ...] = ()
    fixed: tuple[bool, ...] = ()

    @property
    def n_candidates(self) -> int:
        return len(self.scores or self.fixed)


RANKINGS = ("absolute", "signed")  # top by |score| (ours, MIB's CMD); top by score (MIB's CPR)


@dataclass(frozen=True)
class CircuitShard:
    curve: int  # index into the job's curves
    size: float  # fraction of the candidates (1.0 for a fixed circuit)
    k: int  # candidates in the circuit
    ranking: str = "absolute"  # one of RANKINGS
    mib: bool = False  # MIB's circuit: pruned to the paths from the embeddings to the logits

    @property
    def id(self) -> str:
        if self.mib:  # one shard per fraction: two fractions can share a k on a small graph
            return f"C{self.curve}_mib_{self.ranking}_{self.size:g}"
        return f"C{self.curve}_{self.k:07d}"


def sizes_to_k(sizes: list[float], n: int) -> list[tuple[float, int]]:
    """(fraction, number of candidates) for each size: at least one candidate, distinct k."""
    seen, out = set(), []
    for size in sorted(sizes):
        k = min(n, max(1, round(size * n)))
        if k not in seen:
            seen.add(k)
            out.append((size, k))
    return out


def plan_circuits(curves: list[Curve], sizes: list[float], done: set[str], mib: bool = False) -> list[CircuitShard]:
    """The circuits to run: each ranking at each size (``mib``: at MIB's ten fractions with
    MIB's counts, top by score and by |score|), each fixed circuit once."""
    shards = []
    for i, curve in enumerate(curves):
        if curve.fixed:
            shards.append(CircuitShard(i, 1.0, int(sum(curve.fixed))))
        elif mib:
            shards += [
                CircuitShard(i, p, CE.mib_count(p, curve.n_candidates), ranking, mib=True)
                for ranking in RANKINGS
                for p in CE.MIB_FRACTIONS
            ]
        else:
            shards += [CircuitShard(i, size, k) for size, k in sizes_to_k(sizes, curve.n_candidates)]
    return [s for s in shards if s.id not in done]


def circuit_mask(
    graph: A.Graph, curve: Curve, k: int, ranking: str = "absolute", prune: bool = False
) -> tuple[torch.Tensor, int, int]:
    """(edge mask, n_nodes, n_edges) of curve's circuit with ``k`` candidates, top by |score|
    (``ranking="signed"``: by score), pruned to the paths from the embeddings to the logits
    when ``prune`` (MIB's circuits). ``n_nodes`` counts the upstream nodes with at least one
    edge in the circuit, ``n_edges`` its edges (after pruning: the count MIB reports)."""
    if curve.fixed:
        chosen = torch.tensor(curve.fixed, dtype=torch.bool)
    else:
        chosen = CE.top_mask(torch.tensor(curve.scores, dtype=torch.float64), k, absolute=ranking == "absolute")
    if curve.level == "node":
        mask = CE.node_edge_mask(graph, {u for u, c in zip(graph.upstream, chosen.tolist()) if c})
    else:
        mask = chosen
    if prune:
        mask = CE.prune_mask(graph, mask)
    upstream = torch.cat([torch.arange(p) for p in graph.prefix])
    n_nodes = int(torch.unique(upstream[mask]).numel())
    return mask, n_nodes, int(mask.sum())


@dataclass
class CircuitJob(Job):
    """The circuit sweep as a worker sees it (picklable: the task's tensors and the curves)."""

    task: TaskData
    curves: list[Curve]
    _graph: A.Graph | None = field(default=None, repr=False)
    _runners: dict = field(default_factory=dict, repr=False)  # (start, stop) -> CircuitRunner, kept across shards
    _evaluated: list[tuple[int, int]] = field(default_factory=list, repr=False)  # the last shard's prompt ranges
    _sums: dict = field(default_factory=dict, repr=False)  # a circuit's edges -> (sums, ranges): MIB's repeats

    def sizing(self):
        return "circuit", {"circuits": 1}

    def on_bind(self) -> None:
        self._graph = self.engine.graph()
        self._runners = {}
        self._sums = {}
        for curve in self.curves:
            expected = self._graph.n_edges if curve.level == "edge" else len(self._graph.upstream)
            if curve.n_candidates != expected:
                raise ValueError(f"curve {curve.label}: {curve.n_candidates} {curve.level}s, the model has {expected}")

    @property
    def graph(self) -> A.Graph:
        """The model's attribution graph (``on_bind`` builds it)."""
        assert self._graph is not None, "bind the job to a model first"
        return self._graph

    def notes(self) -> dict:
        """How the last shard's circuit runs ran (``effects.restart_notes``)."""
        batches = [self.task.select(slice(a, b)) for a, b in self._evaluated]
        return effects.restart_notes(batches, prefix_shared=self.engine.name == "fast") if batches else {}

    def run_shard(self, shard: CircuitShard) -> dict[str, pa.Table]:
        graph, task = self.graph, self.task
        self._evaluated = []
        curve = self.curves[shard.curve]
        mask, n_nodes, n_edges = circuit_mask(graph, curve, shard.k, shard.ranking, prune=shard.mib)
        key = mask.numpy().tobytes()  # the same circuit again (MIB: k = 0 or all, or a repeated k)
        if key in self._sums:
            totals, self._evaluated = self._sums[key]
            return self._table(shard, curve, n_nodes, n_edges, totals)
        device = self.engine.device
        per_pass = footprint.circuit_prompts_per_pass(
            self.pass_tokens(device), int(task.clean.shape[1]), len(graph.upstream)
        )
        totals = np.zeros(4)

        def evaluate(a: int, b: int) -> np.ndarray:
            self._evaluated.append((a, b))
            runner = self._runners.get((a, b))
            if runner is None:
                batch = task.select(slice(a, b))
                runner = self.engine.circuit_runner(graph, batch)
                if len(self._runners) < 64:
                    self._runners[(a, b)] = runner
            return np.array([runner.metric(mask), runner.clean_metric, runner.corrupt_metric, runner.n_points])

        for _, _, part in map_chunks(
            task.n_prompts,
            per_pass,
            evaluate,
            lambda: "out of memory evaluating a circuit on one prompt; use shorter prompts",
            memory_gauge(device),
        ):
            totals += part
        self._sums[key] = (totals, list(self._evaluated))
        return self._table(shard, curve, n_nodes, n_edges, totals)

    @staticmethod
    def _table(shard: CircuitShard, curve: Curve, n_nodes: int, n_edges: int, totals) -> dict[str, pa.Table]:
        return {
            "circuit_sums": pa.table(
                {
                    "curve": [shard.curve],
                    "circuit": [curve.label],
                    "source": [curve.source],
                    "level": [curve.level],
                    # MIB's circuits only: ours are by |score|, as every table before this column
                    **({"ranking": [shard.ranking]} if shard.mib else {}),
                    "size": [shard.size],
                    "k": [shard.k],
                    "n_nodes": [n_nodes],
                    "n_edges": [n_edges],
                    "metric_sum": [totals[0]],
                    "clean_sum": [totals[1]],
                    "corrupt_sum": [totals[2]],
                    "n_points": [int(totals[3])],
                }
            )
        }
