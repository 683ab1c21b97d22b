"""Reduced precision (``--dtype``; ``sweeps/core/precision.py``): every sweep runs in bfloat16
and float16, and its sum identities hold to what the dtype explains.

A model in bfloat16 keeps its residual stream as a bfloat16 running sum, so the stream at the
end differs from the float32 sum of the component writes the decompositions read by a few
roundings of the terms summed. The bound every test here uses is therefore
``2 · unit_roundoff(dtype) · Σ|terms|``: twice one rounding of the sum of the magnitudes of
the terms (measured: at most 0.9 of one rounding on every family). A wrong definition, or a
float32 value leaking into a bfloat16 forward, misses by the size of the terms themselves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from sweeps.core import effects, precision
from sweeps.core import transformer as tf
from sweeps.jobs.backup import BackupJob
from sweeps.runtime import loading, models
from sweeps.runtime.tiny_models import FAMILY_TINY_MODELS
from tasks import TaskSpec, build_task

def _load(name: str, dtype: str, path: str | None = None):
    info = models.describe_model(name)
    if path:
        info = dataclasses.replace(info, path=path)
    task = build_task(TaskSpec("ioi"), loading.load_tokenizer(info), 8, 0)
    return loading.load_model(info, "cpu", dtype), task


# bfloat16 on every family; float16 on three (RMSNorm, post-norms with soft-caps, LayerNorm)
CASES = [(n, "bfloat16") for n in FAMILY_TINY_MODELS] + [(n, "float16") for n in ("tiny-llama3", "tiny-gemma2", "tiny-gpt2")]


@pytest.mark.parametrize("name, dtype", CASES)
def test_direct_effects_add_up_to_the_logit_difference_in_reduced_precision(name, dtype):
    """Every component's direct effect, read in float32 from the reduced-precision run, sums to
    the logit difference the same run's unembedding gives, within two roundings of Σ|terms|."""
    m, task = _load(name, dtype)
    w = m.weights
    assert w.dtype == precision.dtype_of(dtype) and w.W_Q.dtype == w.dtype
    run = tf.run(w, task.clean)
    assert run.resid_final.dtype == w.dtype  # the forward stays in the model's dtype
    points = effects.effect_points(w, task)
    parts = effects.decompose(w, task.clean, run, points)
    logits = tf.unembed(w, run.resid_final)
    real = logits[points.batch, points.pos, task.correct] - logits[points.batch, points.pos, task.incorrect]
    bound = 2 * precision.unit_roundoff(w.dtype) * parts.magnitude()
    error = (parts.total() - real).abs()
    assert parts.total().dtype == torch.float32
    assert (error <= bound).all(), f"missed by {float((error / bound).max()):.2f} of the bound"
    # and it is the model: within a few percent of the same model's float32 logit difference
    w32 = loading.load_model(models.describe_model(name)).weights
    logits32 = tf.unembed(w32, tf.run(w32, task.clean).resid_final)
    real32 = logits32[points.batch, points.pos, task.correct] - logits32[points.batch, points.pos, task.incorrect]
    assert float((real - real32).abs().max()) <= 0.05 * float(real32.abs().max())


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gemma2", "tiny-stablelm"])
def test_self_repair_terms_add_up_in_bfloat16(name):
    """own change + other heads + MLPs + final norm = total effect at every point, in bfloat16
    (the bridge path's tiny StableLM too), within two roundings of Σ|clean direct effects|."""
    m, task = _load(name, "bfloat16")
    job = BackupJob(task, "resample", 8).bind(m)
    (state,) = job.batches()
    magnitude = (state.de_heads.abs().sum((0, 2)) + state.de_mlps.abs().sum(0)).double().numpy()
    bound = 2 * precision.unit_roundoff(torch.bfloat16) * magnitude
    results = job.run_heads(1, [0, 1, 2])
    for r in results:
        parts = r.repair["own_change"] + r.repair["heads"] + r.repair["mlps"] + r.repair["final_norm"]
        assert np.abs(r.repair["total_effect"]).max() > 1e-3  # the ablation changed something
        assert (np.abs(parts - r.repair["total_effect"]) <= bound).all()
    # the same model in float32: the backup of every head within a few percent of its range
    ours = np.concatenate([r.backup for r in results])
    exact = np.concatenate([r.backup for r in BackupJob(task, "resample", 8).bind(_load(name, "float32")[0]).run_heads(1, [0, 1, 2])])
    assert np.abs(ours - exact).max() <= 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gemma2", "tiny-gpt2"])
def test_empty_and_full_circuits_are_the_corrupt_and_clean_runs_in_bfloat16(name):
    """Circuit evaluation in bfloat16: the full circuit is the clean run exactly, the empty one
    the corrupt run within two roundings of Σ|terms| over the batch; attribution's clean metric
    is the same run's, and its top edges are float32's."""
    m, task = _load(name, "bfloat16")
    w = m.weights
    graph = A.build_graph(w.cfg)
    runner = CE.CircuitRunner(w, graph, task)
    assert runner.metric(torch.ones(graph.n_edges, dtype=torch.bool)) == runner.clean_metric
    corrupt_run = tf.run(w, task.corrupt)
    points = effects.effect_points(w, task)
    magnitude = float(effects.decompose(w, task.corrupt, corrupt_run, points).magnitude().sum())
    empty = runner.metric(torch.zeros(graph.n_edges, dtype=torch.bool))
    assert abs(empty - runner.corrupt_metric) <= 2 * precision.unit_roundoff(torch.bfloat16) * magnitude
    ours = A.attribute(w, graph, task)
    assert ours.clean_metric == pytest.approx(runner.clean_metric, abs=1e-5)
    exact = A.attribute(_load(name, "float32")[0].weights, graph, task)
    top = lambda e: set(np.argsort(-np.abs(e.numpy()))[:20].tolist())  # noqa: E731
    assert len(top(ours.edges) & top(exact.edges)) >= 17
    assert float((ours.edges - exact.edges).abs().max()) <= 0.1 * float(exact.edges.abs().max())


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="bfloat16"):
        precision.dtype_of("bf16")
    assert precision.name_of(precision.dtype_of("float16")) == "float16"


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gemma2"])
def test_an_ablation_that_changes_nothing_changes_nothing_in_bfloat16(name):
    """Replacing heads' ``z`` by their own clean ``z``: every change is exactly zero. In
    bfloat16 a restart of several copies rounds differently from the clean run of one, so the
    changes are taken from an un-ablated copy in the same pass (``ablate_heads_of_layer``'s
    baseline); without it they are a rounding of every direct effect."""
    m, task = _load(name, "bfloat16")
    w = m.weights
    run = tf.run(w, task.clean)
    points = effects.effect_points(w, task)
    clean = effects.decompose(w, task.clean, run, points)
    heads = [0, 1, 2]
    same = torch.stack([run.z[1, :, :, h] for h in heads])
    result = effects.ablate_heads_of_layer(w, 1, heads, run.resid_pre[1], same, points, clean.scale, baseline=True)
    assert result.baseline is not None and result.heads.shape[0] == len(heads)
    assert torch.equal(result.heads, result.baseline.heads.expand_as(result.heads))
    assert torch.equal(result.final_dot, result.baseline.final_dot.expand_as(result.final_dot))
    job = BackupJob(task, "zero", 8).bind(m)
    job._replacement = lambda state, layer, chunk: torch.stack([run.z[layer, :, :, h] for h in chunk])
    for r in job.run_heads(1, heads):
        assert not r.backup.any() and not r.repair["total_effect"].any() and not r.mean_delta_heads.any()
