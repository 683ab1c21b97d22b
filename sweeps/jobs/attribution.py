"""The attribution sweep on one worker: shards are batches of prompts.

An ``AttributionShard`` (``B00032-00063``: prompts 32..63) returns the raw
sums of its batch (``attribution.attribute``): per node, per edge, and the
batch's clean and corrupt metric. They add up exactly across batches, so the
driver sums the shards and divides by the task's normaliser once
(``analysis/attribution.py``); no batch ever needs the whole dataset.

A ``VerifyShard`` (``V00032-00063_<targets>``) patches each of a list of
top-ranked nodes and edges for real on its batch (``attribution.patch_metric``),
again as raw sums. The driver plans these after every attribution shard is
in, from the aggregated ranking.

No Ray here: the executors (``sweeps/runtime/executors.py``) run ``AttributionJob``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from sweeps.core import attribution as A
from sweeps.core import effects
from sweeps.jobs import sizing
from sweeps.jobs.base import Job
from sweeps.runtime.chunking import map_chunks, memory_gauge
from tasks.base import TaskData


@dataclass(frozen=True)
class AttributionShard:
    start: int
    stop: int  # exclusive

    @property
    def id(self) -> str:
        return f"B{self.start:05d}-{self.stop - 1:05d}"


@dataclass(frozen=True)
class VerifyShard:
    start: int
    stop: int
    targets: tuple[A.Target, ...]

    @property
    def tag(self) -> str:
        text = "|".join(t.label for t in self.targets)
        return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()

    @property
    def id(self) -> str:
        return f"V{self.start:05d}-{self.stop - 1:05d}_{self.tag}"


def batch_ranges(n_prompts: int, batch_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + batch_size, n_prompts)) for i in range(0, n_prompts, batch_size)]


def plan_attribution(n_prompts: int, batch_size: int, done: set[str]) -> list[AttributionShard]:
    """One shard per batch of ``batch_size`` prompts that no finished shard holds."""
    shards = [AttributionShard(a, b) for a, b in batch_ranges(n_prompts, batch_size)]
    return [s for s in shards if s.id not in done]


def plan_verify(n_prompts: int, batch_size: int, targets: list[A.Target], done: set[str]) -> list[VerifyShard]:
    if not targets:
        return []
    shards = [VerifyShard(a, b, tuple(targets)) for a, b in batch_ranges(n_prompts, batch_size)]
    return [s for s in shards if s.id not in done]


def prompts_per_pass(task: TaskData, graph: A.Graph, cfg, device: torch.device, fraction: float = 1.0) -> int:
    """Prompts per pass. A token costs the upstream changes ``[U, D]`` plus what autograd
    keeps, roughly 40 ``D``-sized tensors a layer. The budget is 2 GiB on a CPU (9 prompts
    of 64 tokens of SmolLM2 a pass: larger passes stop fitting the allocator's kept memory
    and run slower, smaller ones pay their fixed costs more often), and 8 GiB for a GPU's
    first pass (``map_chunks`` then grows the passes to fill its free memory); ``fraction`` of
    that where the job's estimate says less fits (``jobs.sizing``)."""
    budget_floats = int(sizing.ATTRIBUTION_PASS_BYTES[device.type if device.type == "cuda" else "cpu"] * fraction) // 4
    per_token = (len(graph.upstream) + 40 * cfg.n_layers) * cfg.d_model
    return max(1, budget_floats // (per_token * int(task.clean.shape[1])))


def attribution_tables(graph: A.Graph, result: A.BatchAttribution, shard: AttributionShard) -> dict[str, pa.Table]:
    node_sums = pa.table({"node": list(graph.upstream), "raw": result.nodes.numpy()})
    ups: list[str] = []
    downs: list[str] = []
    inputs: list[str] = []
    for d, p in zip(graph.downstream, graph.prefix):
        ups.extend(graph.upstream[:p])
        downs.extend([d.name] * p)
        inputs.extend([d.input] * p)
    edge_sums = pa.table(
        {
            "upstream": pa.array(ups).dictionary_encode(),
            "downstream": pa.array(downs).dictionary_encode(),
            "input": pa.array(inputs).dictionary_encode(),
            "raw": result.edges.numpy(),
        }
    )
    batches = pa.table(
        {
            "start": [shard.start],
            "stop": [shard.stop],
            "prompts": [shard.stop - shard.start],
            "n_points": [result.n_points],
            "clean_metric": [result.clean_metric],
            "corrupt_metric": [result.corrupt_metric],
        }
    )
    tables = {"node_sums": node_sums, "edge_sums": edge_sums, "batches": batches}
    if result.kv_heads is not None:  # --split-kv: each query head's own k/v edges (EAP-IG's graph)
        kv = A.query_head_kv_edges(graph)
        tables["kv_head_sums"] = pa.table(
            {
                "upstream": pa.array([u for u, _, _ in kv]).dictionary_encode(),
                "head": pa.array([h for _, h, _ in kv]).dictionary_encode(),
                "input": pa.array([i for _, _, i in kv]).dictionary_encode(),
                "raw": result.kv_heads.numpy(),
            }
        )
    return tables


def add(a: A.BatchAttribution | None, b: A.BatchAttribution) -> A.BatchAttribution:
    if a is None:
        return b
    return A.BatchAttribution(
        a.nodes + b.nodes,
        a.edges + b.edges,
        a.clean_metric + b.clean_metric,
        a.corrupt_metric + b.corrupt_metric,
        a.n_points + b.n_points,
        None if a.kv_heads is None or b.kv_heads is None else a.kv_heads + b.kv_heads,
    )


@dataclass
class AttributionJob(Job):
    """The attribution sweep as a worker sees it (picklable: the task's tensors)."""

    task: TaskData
    method: str = "eap"  # attribution.METHODS
    steps: int = 1  # interpolation steps of the EAP-IG methods
    exact_edges: bool = False  # --method exact: patch every edge too (small models only)
    split_kv: bool = False  # --split-kv: also score each query head's own copy of its k/v input
    _graph: A.Graph | None = field(default=None, repr=False)
    _patched: list[TaskData] = field(default_factory=list, repr=False)  # the last shard's patched sub-batches

    def sizing(self):
        return "attribution", {"batch_size": self.task.n_prompts, "steps": self.steps}

    def on_bind(self) -> None:
        if self.method not in self.engine.attribution_methods:
            raise ValueError(f"{self.method} runs on the fast path's families only")
        self._graph = self.engine.graph()

    @property
    def graph(self) -> A.Graph:
        """The model's attribution graph (``on_bind`` builds it)."""
        assert self._graph is not None, "bind the job to a model first"
        return self._graph

    def _chunked(self, batch: TaskData, per_pass: int, one_pass, advice: str):
        """``one_pass(sub-batch)`` over ``batch`` in passes of ``per_pass`` prompts (halved on
        out of memory), as an iterator of the passes' results."""
        for _, _, part in map_chunks(
            batch.n_prompts,
            per_pass,
            lambda a, b: one_pass(batch.select(slice(a, b))),
            lambda: advice,
            memory_gauge(self.engine.device),
        ):
            yield part

    def _patches_per_pass(self, batch: TaskData) -> int:
        """Prompts a patching pass holds: the clean and corrupt runs' writes, and one patched run."""
        return max(1, self.pass_tokens(self.engine.device) // (4 * int(batch.clean.shape[1])))

    def notes(self) -> dict:
        """How the last shard's patched runs ran (``effects.restart_notes``); nothing for a
        gradient shard, which patches nothing."""
        patched = self._patched
        return effects.restart_notes(patched, prefix_shared=self.engine.name == "fast") if patched else {}

    def _patching(self, batch: TaskData) -> TaskData:
        """``batch``, noted as patched in this shard."""
        self._patched.append(batch)
        return batch

    def run_shard(self, shard) -> dict[str, pa.Table]:
        batch = self.task.select(slice(shard.start, shard.stop))
        self._patched = []
        if isinstance(shard, VerifyShard):
            return {"verify_sums": self._verify(batch, shard)}
        if self.method == "exact":
            return attribution_tables(self.graph, self._exact(batch), shard)
        engine, graph = self.engine, self.graph
        total = None
        for part in self._chunked(
            batch,
            prompts_per_pass(batch, graph, engine.cfg, engine.device, self.pass_fraction),
            lambda sub: engine.attribute(graph, sub, self.method, self.steps, self.split_kv),
            f"out of memory attributing one prompt of {batch.clean.shape[1]} tokens; "
            "use shorter prompts or a machine with more memory",
        ):
            total = add(total, part)
        assert total is not None  # a shard has at least one prompt
        return attribution_tables(graph, total, shard)

    def _exact(self, batch: TaskData) -> A.BatchAttribution:
        """Real patching of every node (and edge): raw sums ``m(clean) − m(patched)``, like the
        gradient methods' (``attribution.exact_scores``)."""
        total = None
        for part in self._chunked(
            batch,
            self._patches_per_pass(batch),
            lambda sub: self.engine.exact_scores(self.graph, self._patching(sub), self.exact_edges),
            "out of memory patching one prompt; use shorter prompts",
        ):
            total = add(total, part)
        assert total is not None  # a shard has at least one prompt
        return total

    def _verify(self, batch: TaskData, shard: VerifyShard) -> pa.Table:
        patched = torch.zeros(len(shard.targets), dtype=torch.float64)
        clean = 0.0
        for metric, sums in self._chunked(
            batch,
            self._patches_per_pass(batch),
            lambda sub: self.engine.patched_metric(self.graph, self._patching(sub), list(shard.targets)),
            "out of memory patching one prompt; use shorter prompts",
        ):
            clean += metric
            patched += sums
        return _verify_table(shard, patched, clean)


def _verify_table(shard: VerifyShard, patched: torch.Tensor, clean: float) -> pa.Table:
    return pa.table(
        {
            "target": [t.label for t in shard.targets],
            "upstream": [t.upstream for t in shard.targets],
            "downstream": [t.downstream for t in shard.targets],
            "input": [t.input for t in shard.targets],
            "patched_metric": patched.numpy(),
            "clean_metric": [clean] * len(shard.targets),
        }
    )
