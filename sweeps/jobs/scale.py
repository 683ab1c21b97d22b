"""The all-nodes × all-scales sweep on one worker.

``ScaleJob`` holds one task, its pairs and the sweep's settings (picklable:
that is what the executors send to a worker); ``bind`` gives it one model
replica. Once, it runs every
prompt (and its corrupt partner) and keeps, per group of prompts of equal
length, each block's input, every head's ``z``, every MLP's output and the
clean read-out. A node's patches then restart from the node (``scaling.py``; the
bridge engine runs one full forward a row instead):
every (scale, pair) combination of one node is a row of one batched pass, the
base and source activations gathered by index. No Python loop over pairs. Rows
whose patches are provably equal share one restart (``scaling.distinct_restarts``:
scale 0 ignores the source; a self-patch at scale 1 changes nothing).

Pairs are formed among prompts of equal token length, because a patch is
position by position (prompts of one length align position by position). ``make_pairs`` builds them.
No Ray here: the executors (``sweeps/runtime/executors.py``) run ``ScaleJob``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.core import metrics, scaling
from sweeps.core import transformer as tf
from sweeps.core.circuits import Circuit
from sweeps.core.nodes import Node
from sweeps.jobs.base import Job
from sweeps.jobs.plan import ScaleShard
from sweeps.runtime.chunking import map_chunks, memory_gauge
from tasks.base import TaskData

PAIR_MODES = ("all", "task")


class PairsError(ValueError):
    """No usable (base, source) pairs; the message says what to change."""


def make_pairs(task: TaskData, mode: str, max_pairs: int | None, seed: int, self_patch: bool) -> np.ndarray:
    """``[P, 2]`` (base, source) prompt indices; the source's row is a clean prompt
    (mode ``all``), the base's own corrupt prompt (``task``), or the base itself
    (``self_patch``: pure scaling, the source is not used).

    ``all``: every ordered pair of distinct prompts of equal length (the usual scale-ablation loop:
    every combination of unique inputs), then a deterministic sample of
    ``max_pairs`` if there are more.
    """
    n = task.n_prompts
    if self_patch or mode == "task":
        pairs = np.stack([np.arange(n), np.arange(n)], axis=1)
    elif mode == "all":
        lengths = task.lengths.numpy()
        rows = task.clean.numpy()
        base, source = np.nonzero(lengths[:, None] == lengths[None, :])
        distinct = np.array([not np.array_equal(rows[b], rows[s]) for b, s in zip(base, source)], dtype=bool)
        pairs = np.stack([base[distinct], source[distinct]], axis=1)
        if len(pairs) == 0:
            raise PairsError(
                "no two distinct prompts have the same token length, so no (base, source) pair can be "
                "patched position by position; use more --n-prompts or --pairs task"
            )
    else:
        raise PairsError(f"unknown --pairs {mode!r}; choose one of {', '.join(PAIR_MODES)}")
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False))
        pairs = pairs[keep]
    return pairs.astype(np.int64)


@dataclass
class LengthGroup:
    """The prompts of one token length and what their patches need."""

    prompts: Int[Tensor, " n"]  # global prompt indices
    tokens: Int[Tensor, "n T"]  # their clean tokens
    source_tokens: Int[Tensor, "n T"]  # the tokens of the run patches come from (``source``)
    clean: tf.CleanRun
    source: tf.CleanRun  # where patches come from: `clean` itself, or the corrupt prompts' run
    positions: Int[Tensor, " Q"]  # answer position(s), shared by the whole group
    correct: Int[Tensor, "n Q"]
    incorrect: Int[Tensor, "n Q"] | None
    clean_out: scaling.Readout  # [n, Q]
    pairs: Int[Tensor, "P 2"]  # (base, source) rows within the group
    # With --metric: each prompt's answer sets, and (kl) the clean run's log-probabilities [n, Q, V]
    sets: tuple[Int[Tensor, "n Kc"], Int[Tensor, "n Ki"]] | None = None
    reference: Float[Tensor, "n Q V"] | None = None


@dataclass
class NodeStats:
    """One node's outcome at each scale, summed over every pair and answer position."""

    node: Node
    scales: list[float]
    changed: np.ndarray  # [S] points whose top-1 token differs from the clean one
    metric_drop: np.ndarray  # [S] summed clean metric − patched metric
    n_points: int
    n_pairs: int
    n_restarts: int  # of the S × n_pairs rows, how many needed a restart (scaling.distinct_restarts)


@dataclass
class ScaleJob(Job):
    """The scale sweep on one worker, bound (``Job.bind``) to its model's engine there: the
    executors send the job unbound."""

    task: TaskData
    pairs: np.ndarray  # [P, 2] global (base, source), from make_pairs
    scales: tuple[float, ...] = ()  # the sweep's sorted scales; a shard names indices into them
    source: str = "clean"  # "clean" (other prompts, or self) | "corrupt" (each base's corrupt prompt)
    subspace: str = "full"
    self_patch: bool = False
    pca_k: int = 2
    batch_size: int = 32
    circuit: Circuit | None = None  # labels the rows in_circuit / not_in_circuit
    _groups: list[LengthGroup] | None = field(default=None, repr=False)
    _normaliser: float | None = field(default=None, repr=False)
    _subspaces: dict[Node, scaling.Subspace] = field(default_factory=dict, repr=False)
    _positions: list[int] = field(default_factory=lambda: [0, 0], repr=False)  # computed, of a full restart's

    def sizing(self):
        rows = max(1, len(self.scales)) * self.task.n_prompts  # at most: (scale, pair) rows of one node
        return "scale", {"rows_per_node": rows, "corrupt_source": self.source == "corrupt"}

    def on_bind(self) -> None:
        self._groups, self._normaliser, self._subspaces = None, None, {}

    def run_shard(self, shard: ScaleShard) -> dict[str, pa.Table]:
        scales = [self.scales[i] for i in shard.scales]
        self._positions = [0, 0]
        stats = [self.run_node(node, scales) for node in shard.nodes]
        return {"effects": effects_table(stats, self.normaliser(), self.subspace, self.self_patch, self.circuit)}

    def notes(self) -> dict:
        """How the last shard's restarts ran: prefix-shared where a (scale 1) patch by another
        prompt's values shares that prompt's prefix (``scaling.WindowedPatcher``), and the
        fraction of positions they computed."""
        computed, total = self._positions
        if total == 0:
            return {}
        fraction = computed / total
        return {"restarts": "prefix-shared" if fraction < 1 else "full", "positions_recomputed": round(fraction, 4)}

    def _run(self, tokens: Int[Tensor, "N T"]) -> tf.CleanRun:
        return self.engine.clean_run(tokens, self.batch_size)

    # -- clean state, once per worker -------------------------------------------

    @torch.no_grad()
    def groups(self) -> list[LengthGroup]:
        if self._groups is not None:
            return self._groups
        w, task, device = self.engine.readout, self.task, self.engine.device
        lengths = task.lengths
        pairs = torch.as_tensor(self.pairs)
        groups, drops = [], []
        for T in sorted(set(lengths.tolist())):
            prompts = torch.nonzero(lengths == T)[:, 0]
            local = torch.full((task.n_prompts,), -1, dtype=torch.long)
            local[prompts] = torch.arange(len(prompts))
            mine = pairs[local[pairs[:, 0]] >= 0]
            group_pairs = local[mine]
            if (group_pairs[:, 1] < 0).any():
                raise ValueError("a (base, source) pair joins prompts of different lengths")
            clean_tokens = task.clean[prompts, :T].to(device)
            corrupt_tokens = task.corrupt[prompts, :T].to(device)
            clean = self._run(clean_tokens)
            corrupt = self._run(corrupt_tokens)
            if task.kind == "logit_diff":
                assert task.correct is not None and task.incorrect is not None
                positions = torch.tensor([T - 1], device=device)
                correct = task.correct[prompts, None].to(device)
                incorrect = task.incorrect[prompts, None].to(device)
            else:
                positions = torch.arange(T - 1, device=device)
                correct, incorrect = clean_tokens[:, 1:], None
            sets: tuple[Tensor, Tensor] | None = None
            reference, metric = None, task.metric
            if metric is not None and task.kind == "logit_diff":
                right_set, wrong_set = task.answer_sets()
                sets = (right_set[prompts].to(device), wrong_set[prompts].to(device))
            if metric in metrics.NEEDS_REFERENCE:
                x = clean.resid_final[:, positions]
                reference = torch.log_softmax(tf.logits(w, x), -1)  # [n, Q, V]
            clean_out = scaling.readout(
                w, clean.resid_final, positions, correct, incorrect, metric=metric, sets=sets, reference=reference
            )
            corrupt_out = scaling.readout(
                w, corrupt.resid_final, positions, correct, incorrect, metric=metric, sets=sets, reference=reference
            )
            drops.append((clean_out.metric - corrupt_out.metric).double().flatten().cpu())
            groups.append(
                LengthGroup(
                    prompts=prompts,
                    tokens=clean_tokens,
                    source_tokens=corrupt_tokens if self.source == "corrupt" else clean_tokens,
                    clean=clean,
                    source=corrupt if self.source == "corrupt" else clean,
                    positions=positions,
                    correct=correct,
                    incorrect=incorrect,
                    clean_out=clean_out,
                    pairs=group_pairs.to(device),
                    sets=sets,
                    reference=reference,
                )
            )
        self._groups = groups
        self._normaliser = float(torch.cat(drops).mean())
        return groups

    def normaliser(self) -> float:
        """Mean clean − corrupt metric over the task: ``metric_change`` = 1 means that much."""
        self.groups()
        assert self._normaliser is not None  # set by groups()
        return self._normaliser

    @torch.no_grad()
    def subspace_of(self, node: Node) -> scaling.Subspace:
        """The node's per-position PCA over every clean prompt (fitted once, kept)."""
        if node not in self._subspaces:
            groups = self.groups()
            T = max(int(g.clean.resid_final.shape[1]) for g in groups)
            acts, real = [], []
            for g in groups:
                a = scaling.node_activation(self.engine.readout, node, g.clean)  # [n, t, D]
                n, t, D = a.shape
                acts.append(torch.cat([a, a.new_zeros(n, T - t, D)], 1))
                real.append(torch.arange(T, device=a.device)[None, :].expand(n, T) < t)
            self._subspaces[node] = scaling.fit_subspace(torch.cat(acts), torch.cat(real), self.pca_k)
        return self._subspaces[node]

    # -- one node at many scales ------------------------------------------------

    @torch.no_grad()
    def run_node(self, node: Node, scales: list[float]) -> NodeStats:
        w = self.engine.readout
        sub = self.subspace_of(node) if self.subspace != "full" else None
        scale_values = torch.tensor(scales, dtype=torch.float32, device=self.engine.device)
        S = len(scales)
        changed = torch.zeros(S, dtype=torch.float64)
        metric_drop = torch.zeros(S, dtype=torch.float64)
        n_points = n_pairs = n_restarts = 0
        for g in self.groups():
            P, T, Q = g.pairs.shape[0], g.clean.resid_final.shape[1], g.positions.shape[0]
            if P == 0:
                continue
            part_base = scaling.patched_part(scaling.node_activation(w, node, g.clean), self.subspace, sub)
            part_source = (
                part_base
                if g.source is g.clean
                else scaling.patched_part(scaling.node_activation(w, node, g.source), self.subspace, sub)
            )
            final_of = self.engine.patcher(node, g.clean, g.tokens, g.positions)
            todo = scaling.distinct_restarts(g.pairs, scale_values, source_is_base_run=g.source is g.clean)

            def patch(
                start: int,
                stop: int,
                g=g,
                part_source=part_source,
                part_base=part_base,
                final_of=final_of,
                todo=todo,
            ) -> tuple[Tensor, Tensor, Tensor]:
                s, p, count = todo.scale[start:stop], todo.pair[start:stop], todo.count[start:stop]
                base, source = g.pairs[p, 0], g.pairs[p, 1]
                delta = scaling.patch_delta(part_base, part_source, base, source, scale_values[s])
                final = final_of(
                    base, delta, scaling.first_change(g.tokens, g.source_tokens, base, source, scale_values[s])
                )
                out = scaling.readout(
                    w,
                    final,
                    torch.arange(Q, device=final.device),
                    g.correct[base],
                    None if g.incorrect is None else g.incorrect[base],
                    metric=self.task.metric,
                    sets=None if g.sets is None else (g.sets[0][base], g.sets[1][base]),
                    reference=None if g.reference is None else g.reference[base],
                )
                flips = (out.top1 != g.clean_out.top1[base]).sum(-1) * count
                drop = (g.clean_out.metric[base] - out.metric).sum(-1) * count
                return s, flips, drop

            def advice(T=T) -> str:
                return (
                    f"out of memory patching {node.name} with one (scale, pair) row of {T} tokens; "
                    f"use a smaller model or shorter prompts"
                )

            device = self.engine.device
            per_pass = self.pass_tokens(device) // T
            restarts = todo.count.shape[0]
            # scale-1 rows may share their pair's prefix (a window); the others change every
            # position: each kind in passes of its own, so that no pass mixes them
            at_one = scale_values[todo.scale] == 1
            for part in (todo.select(at_one), todo.select(~at_one)):
                n = part.count.shape[0]
                for _, _, (s, flips, drop) in map_chunks(
                    n, per_pass, partial(patch, todo=part), advice, memory_gauge(device)
                ):
                    changed.index_add_(0, s.cpu(), flips.double().cpu())
                    metric_drop.index_add_(0, s.cpu(), drop.double().cpu())
            if isinstance(final_of, scaling.WindowedPatcher):
                self._positions[0] += final_of.computed
                self._positions[1] += final_of.total
            else:  # every position of every restart
                self._positions[0] += restarts * T
                self._positions[1] += restarts * T
            n_points += P * Q
            n_pairs += P
            n_restarts += restarts
        return NodeStats(node, list(scales), changed.numpy(), metric_drop.numpy(), n_points, n_pairs, n_restarts)


def effects_table(
    stats: list[NodeStats], normaliser: float, subspace: str, self_patch: bool, circuit: Circuit | None
) -> pa.Table:
    """The shard's rows of ``effects/``: one per (node, scale)."""
    rows = []
    for st in stats:
        for i, scale in enumerate(st.scales):
            points = max(st.n_points, 1)
            drop = st.metric_drop[i] / points
            rows.append(
                dict(
                    node=st.node.name,
                    layer=st.node.layer,
                    head=st.node.head,
                    kind=st.node.kind,
                    scale=float(scale),
                    subspace=subspace,
                    self_patch=self_patch,
                    status="unlabelled" if circuit is None else circuit.status(st.node),
                    causal_effect=float(st.changed[i] / points) if st.n_points else float("nan"),
                    metric_change=float(drop / normaliser) if abs(normaliser) > 1e-9 else float("nan"),
                    metric_drop=float(drop),
                    n_pairs=st.n_pairs,
                    n_points=st.n_points,
                )
            )
    schema = pa.schema(
        [
            ("node", pa.string()),
            ("layer", pa.int32()),
            ("head", pa.int32()),
            ("kind", pa.string()),
            ("scale", pa.float64()),
            ("subspace", pa.string()),
            ("self_patch", pa.bool_()),
            ("status", pa.string()),
            ("causal_effect", pa.float64()),
            ("metric_change", pa.float64()),
            ("metric_drop", pa.float64()),
            ("n_pairs", pa.int64()),
            ("n_points", pa.int64()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)
