"""A small run of every sweep's job on a few models, digested: the regression record.

``python -m tests.golden`` writes ``tests/data/golden_datasets.json``: per column of every
table one shard of every job gives, a digest of its exact values (and its sum and largest
magnitude), on:

- the embedded model (SmolLM2, the fast path's Llama family, grouped-query attention);
- tiny GPT-2 (LayerNorm, learned positions), tiny Pythia (parallel attention and MLP) and
  tiny Gemma 2 (post-norms, soft-capped logits) on the fast path;
- tiny Llama 3 forced onto the bridge path, and tiny StableLM (no fast path at all).

``tests/jobs/test_golden.py`` runs the same and compares: a refactor that should not change any
number (a new engine interface, a moved module) is checked against the record made before
it, bit for bit (on a CPU of another instruction set, where float sums may round
differently, to a relative 1e-5). Regenerate the record only for a change that is meant to move numbers,
and say why in its commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

RECORD = Path(__file__).parent / "data" / "golden_datasets.json"
MODELS = ("smollm2-135m", "tiny-gpt2", "tiny-pythia", "tiny-gemma2", "tiny-llama3@bridge", "tiny-stablelm")
BRIDGE_MODELS = ("tiny-stablelm",)  # a family with no fast path
# Float sums depend on how a matmul splits its work between threads, so a run computes on the
# number of threads the record was made with, whatever the process runs on (``pytest -n``
# workers compute on one).
THREADS = 2


def _column(values: list) -> dict:
    """A column as its digest (``sha``: of its float64 bytes, or of its JSON for text and
    nulls) and, for numbers, its sum and largest magnitude (what a looser check compares)."""
    try:
        numbers = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return {"n": len(values), "sha": hashlib.sha256(json.dumps(values).encode()).hexdigest()}
    return {
        "n": len(values),
        "sha": hashlib.sha256(numbers.tobytes()).hexdigest(),
        "sum": float(np.nansum(numbers)),
        "absmax": float(np.nanmax(np.abs(numbers))) if numbers.size and not np.isnan(numbers).all() else 0.0,
    }


def _rows(table: pa.Table) -> dict[str, dict]:
    return {name: _column(table.column(name).to_pylist()) for name in table.column_names}


def small_run(name: str, stages: int = 1) -> dict[str, dict[str, dict]]:
    """``{"<job>/<dataset>": {column: values}}`` of one shard of every job on model ``name``
    (``NAME@bridge``: the model forced onto the bridge path), its layers over ``stages``
    stages on the CPU (``core/stages.py``), on ``THREADS`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _small_run(name, stages)
    finally:
        torch.set_num_threads(before)


def _small_run(name: str, stages: int) -> dict[str, dict[str, dict]]:
    import torch

    from sweeps.core import attribution as A
    from sweeps.core.nodes import Node
    from sweeps.jobs.attribution import AttributionJob, AttributionShard, VerifyShard
    from sweeps.jobs.backup import BackupJob
    from sweeps.jobs.circuit import CircuitJob, CircuitShard, Curve
    from sweeps.jobs.plan import ScaleShard, Shard
    from sweeps.jobs.scale import ScaleJob, make_pairs
    from sweeps.runtime import loading, models
    from tasks import TaskSpec, build_task

    torch.manual_seed(0)
    model_name, _, path = name.partition("@")
    info = models.describe_model(model_name)
    if path:
        info = dataclasses.replace(info, path=path)
    model = loading.load_model(info)
    if stages > 1:
        from sweeps.core import stages as staging

        model.weights = staging.stage(model.weights, ["cpu"] * stages)
    tokenizer = loading.load_tokenizer(info)
    ioi = build_task(TaskSpec("ioi"), tokenizer, 6, 0)
    text = build_task(TaskSpec("text"), tokenizer, 3, 0, seq_len=10)
    out: dict[str, dict[str, dict]] = {}

    def keep(job: str, tables: dict[str, pa.Table]) -> None:
        for dataset, table in tables.items():
            out[f"{job}/{dataset}"] = _rows(table)

    for ablation in ("resample", "mean"):
        keep(f"backup-{ablation}", BackupJob(ioi, ablation, 4, n_boot=20).bind(model).run_shard(Shard(1, (0, 1))))
    keep("backup-text", BackupJob(text, "zero", 2, n_boot=0).bind(model).run_shard(Shard(0, (1,))))
    pairs = make_pairs(ioi, "all", 6, 0, False)
    for subspace in ("full", "high_variance"):
        scale = ScaleJob(ioi, pairs, scales=(0.0, 0.5, 2.0), subspace=subspace, batch_size=4).bind(model)
        keep(f"scale-{subspace}", scale.run_shard(ScaleShard(1, (0,), True, (0, 2))))
    attribution = AttributionJob(ioi, "eap").bind(model)
    scores = attribution.run_shard(AttributionShard(0, 6))
    keep("attribution-eap", scores)
    keep("attribution-ig", AttributionJob(ioi, "eap-ig-inputs", steps=2).bind(model).run_shard(AttributionShard(0, 6)))
    graph = attribution._graph
    if len(graph.upstream) <= 64:  # real patching of every node: tiny models only
        keep("attribution-exact", AttributionJob(ioi, "exact").bind(model).run_shard(AttributionShard(2, 5)))
    targets = (A.Target(graph.upstream[1]), A.Target(graph.upstream[0], graph.downstream[-1].name, "resid"))
    keep("attribution-verify", attribution.run_shard(VerifyShard(0, 6, targets)))
    edge_scores = tuple(scores["edge_sums"].column("raw").to_pylist())
    curve = Curve("eap", "-", "edge", scores=edge_scores)
    circuit = CircuitJob(ioi, [curve]).bind(model)
    for k in (1, len(edge_scores) // 3):
        keep(f"circuit-{k}", circuit.run_shard(CircuitShard(0, k / len(edge_scores), k)))
    return out


def record() -> dict:
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": THREADS,
        "runs": {name: small_run(name) for name in MODELS},
    }


if __name__ == "__main__":
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record(), indent=0, allow_nan=True) + "\n")
    print(f"wrote {RECORD}", file=sys.stderr)
