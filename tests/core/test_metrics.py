"""The metrics chosen with --metric, against the Hugging Face model's own logits by hand, and
attribution under them against autograd on full forwards (tests/reference.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from sweeps.core.metrics import MetricError, check_metric
from sweeps.runtime import loading
from tasks import build_task, check_task
from tests import reference

METRICS = ["logit_diff", "prob_diff", "kl", "greater_than", "accuracy"]


def _task(tokenizer, name, metric, n=4, **kw):
    task = build_task(check_task(name), tokenizer, n, 0, **kw)
    return dataclasses.replace(task, metric=metric)


@pytest.fixture(scope="module")
def hf_llama(tiny_llama):
    model, _, _ = loading.load_hf_model(tiny_llama.info)
    return model


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("task_name", ["greater-than", "mcqa"])
def test_each_metric_equals_a_computation_by_hand_from_the_hf_models_logits(tiny_llama, hf_llama, metric, task_name):
    """The clean run's metric at each point and the corrupt run's sum, as the sweeps read them
    (``patch_targets``, ``CircuitRunner``), against softmax/KL written out by hand on the Hugging
    Face model's full forwards."""
    task = _task(tiny_llama.tokenizer, task_name, metric)
    with torch.no_grad():
        clean_logits = hf_llama(task.clean).logits
        corrupt_logits = hf_llama(task.corrupt).logits
    want_clean = reference.metric_by_hand(clean_logits, task, lambda: clean_logits)
    want_corrupt = reference.metric_by_hand(corrupt_logits, task, lambda: clean_logits).sum()
    graph = A.build_graph(tiny_llama.weights.cfg)
    ours = A.patch_targets(tiny_llama.weights, graph, task, [])
    np.testing.assert_allclose(ours.clean_terms.numpy(), want_clean.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.corrupt_metric, float(want_corrupt), rtol=1e-4, atol=1e-6)
    runner = CE.CircuitRunner(tiny_llama.weights, graph, task)
    assert runner.clean_metric == pytest.approx(float(want_clean.sum()), rel=1e-4, abs=1e-6)
    assert runner.corrupt_metric == pytest.approx(float(want_corrupt), rel=1e-4, abs=1e-6)
    if metric == "kl":
        np.testing.assert_allclose(want_clean.numpy(), 0.0, atol=1e-6)  # -KL of the clean run to itself


def test_the_set_metrics_read_every_answer_of_the_set(tiny_llama, hf_llama):
    """greater_than is not prob_diff on greater-than (the sets have several answers)."""
    task = _task(tiny_llama.tokenizer, "greater-than", "greater_than")
    assert (task.correct_set >= 0).sum() > task.n_prompts
    graph = A.build_graph(tiny_llama.weights.cfg)
    sets = A.patch_targets(tiny_llama.weights, graph, task, []).clean_terms
    pair = A.patch_targets(tiny_llama.weights, graph, dataclasses.replace(task, metric="prob_diff"), []).clean_terms
    assert not torch.allclose(sets, pair)


def test_text_task_kl_equals_the_hand_computation(tiny_llama, hf_llama):
    task = _task(tiny_llama.tokenizer, "text", "kl", n=2, seq_len=8)
    with torch.no_grad():
        clean_logits, corrupt_logits = hf_llama(task.clean).logits, hf_llama(task.corrupt).logits
    graph = A.build_graph(tiny_llama.weights.cfg)
    ours = A.patch_targets(tiny_llama.weights, graph, task, [])
    want = reference.metric_by_hand(corrupt_logits, task, lambda: clean_logits).sum()
    assert ours.corrupt_metric == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("metric", ["prob_diff", "greater_than"])
def test_eap_scores_equal_hooked_gradients_of_the_metric(tiny_llama, metric):
    """EAP under a probability metric: every node and edge score against the gradient of the
    metric (by hand, on the bridge's full forward) cached at each split input, times the change."""
    task = _task(tiny_llama.tokenizer, "greater-than", metric, n=3)
    graph = A.build_graph(tiny_llama.weights.cfg)
    ours = A.attribute(tiny_llama.weights, graph, task)
    nodes, edges = reference.attribution_by_hooks(tiny_llama.bridge, task, graph)
    assert np.abs(edges).max() > 1e-5
    scale = np.abs(edges).max()
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("metric", ["kl", "prob_diff"])
def test_eap_ig_inputs_equal_hooked_interpolated_gradients_of_the_metric(tiny_llama, metric):
    """EAP-IG (inputs) under kl, whose gradient at the clean run is 0, and prob_diff: against
    the gradient of the metric by hand on full forwards with the embeddings interpolated."""
    task = _task(tiny_llama.tokenizer, "mcqa", metric, n=2)
    graph = A.build_graph(tiny_llama.weights.cfg)
    ours = A.attribute(tiny_llama.weights, graph, task, method="eap-ig-inputs", steps=3)
    edges = reference.ig_attribution_by_hooks(tiny_llama.bridge, task, graph, steps=3)
    scale = np.abs(edges).max()
    assert scale > 1e-7
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=1e-5 * scale)


def test_exact_scores_under_accuracy_are_real_patching(tiny_llama):
    """accuracy is not differentiable; --method exact reads it: a node's score is the clean
    accuracy minus the accuracy with it patched, by hooks on full forwards."""
    task = _task(tiny_llama.tokenizer, "mcqa", "accuracy", n=6)
    graph = A.build_graph(tiny_llama.weights.cfg)
    ours = A.exact_scores(tiny_llama.weights, graph, task, with_edges=False)
    clean = float(reference.ld_or_logp_sum(tiny_llama.bridge, tiny_llama.bridge(task.clean), task))
    for i, node in enumerate(graph.upstream[:6]):
        patched = reference.patched_metric_by_hooks(tiny_llama.bridge, task, node)
        assert float(ours.nodes[i]) == pytest.approx(clean - patched)


@pytest.mark.parametrize("name,kind,method,message", [
    ("logit_dif", "logit_diff", None, "unknown metric 'logit_dif'. Did you mean logit_diff"),
    ("prob_diff", "next_token", None, "needs answers"),
    ("accuracy", "logit_diff", "eap-ig-inputs", "not differentiable"),
    ("kl", "logit_diff", "eap", "zero gradient at the clean run"),
    ("log_prob", "logit_diff", None, "text task's own"),
])
def test_bad_metrics_are_one_line_errors(name, kind, method, message):
    with pytest.raises(MetricError, match=message):
        check_metric(name, kind, method)
    check_metric("accuracy", "logit_diff", "exact")
    check_metric("kl", "next_token", "eap-ig-inputs")


@pytest.mark.parametrize("metric", ["greater_than", "kl"])
def test_scale_sweep_reads_the_metric_as_hooked_full_forwards_do(tiny_llama, metric):
    """The scale sweep's metric drop under --metric, node by node and scale by scale, against
    hooks on full forwards with the metric by hand (``reference.scale_patch_effects``)."""
    from sweeps.core.nodes import Node
    from sweeps.jobs.scale import ScaleJob, make_pairs

    task = _task(tiny_llama.tokenizer, "greater-than", metric, n=6)
    pairs = make_pairs(task, "task", 4, 0, False)
    job = ScaleJob(task, pairs, source="corrupt", batch_size=5).bind(tiny_llama.weights)
    scales = [0.0, 1.0, 2.5]
    for node in (Node(1, 3), Node(0, None)):
        stats = job.run_node(node, scales)
        expected = reference.scale_patch_effects(
            tiny_llama.bridge, task, pairs, node.layer, node.head, scales, source_tokens=task.corrupt
        )
        for i, (effect, drop, points) in enumerate(expected):
            assert stats.n_points == points
            assert stats.changed[i] / points == pytest.approx(effect, abs=1e-9)
            assert stats.metric_drop[i] == pytest.approx(drop, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("metric", ["prob_diff", "kl"])
def test_backup_sweep_reports_the_metric_change_of_each_ablation(tiny_llama, metric):
    """``total_effect_metric``: the chosen metric of the run with one head resampled from the
    corrupt prompts (a hook on the bridge's full forward) minus the clean run's, by hand; the
    logit-linear terms are the same as without --metric."""
    from sweeps.jobs.backup import BackupJob

    task = _task(tiny_llama.tokenizer, "mcqa", metric, n=4)
    layer, H = 1, tiny_llama.weights.cfg.n_heads
    ours = BackupJob(task, "resample", 4, n_boot=0).bind(tiny_llama.weights).run_heads(layer, list(range(H)))
    plain = BackupJob(dataclasses.replace(task, metric=None), "resample", 4, n_boot=0)
    plain_results = plain.bind(tiny_llama.weights).run_heads(layer, list(range(H)))
    clean_logits = tiny_llama.bridge(task.clean)
    clean = reference.metric_by_hand(clean_logits, task, lambda: clean_logits)
    for head, (r, p) in enumerate(zip(ours, plain_results)):
        name = f"blocks.{layer}.attn.hook_z"
        _, corrupt_cache = tiny_llama.bridge.run_with_cache(task.corrupt)

        def patch(z, hook, head=head):
            z = z.clone()
            z[:, :, head] = corrupt_cache[name][:, :, head]
            return z

        with tiny_llama.bridge.hooks(fwd_hooks=[(name, patch)]):
            logits = tiny_llama.bridge(task.clean)
        want = reference.metric_by_hand(logits, task, lambda: clean_logits) - clean
        np.testing.assert_allclose(r.repair["total_effect_metric"], want.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r.repair["total_effect"], p.repair["total_effect"])
        assert "total_effect_metric" not in p.repair  # a column only under --metric


def test_backup_sweep_on_text_reads_the_next_tokens_log_probability(tiny_llama):
    """``--task text --metric log_prob`` (the text task's own metric, named): the change of each
    point's next-token log-probability with one head zero-ablated (a hook on the bridge's full
    forward), by hand."""
    from sweeps.core import effects
    from sweeps.jobs.backup import BackupJob

    task = _task(tiny_llama.tokenizer, "text", "log_prob", n=2, seq_len=8)
    layer, head = 1, 0
    (ours,) = BackupJob(task, "zero", 2, n_boot=0).bind(tiny_llama.weights).run_heads(layer, [head])
    name = f"blocks.{layer}.attn.hook_z"

    def zero(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    def log_probs(logits):
        b, pos = effects.point_positions(task)
        return logits[b, pos].float().log_softmax(-1).gather(-1, task.clean[b, pos + 1][:, None])[:, 0]

    with torch.no_grad():
        clean = log_probs(tiny_llama.bridge(task.clean))
        with tiny_llama.bridge.hooks(fwd_hooks=[(name, zero)]):
            ablated = log_probs(tiny_llama.bridge(task.clean))
    change = np.asarray(ours.repair["total_effect_metric"]).ravel()
    assert np.abs(change).max() > 1e-4
    np.testing.assert_allclose(change, (ablated - clean).numpy(), rtol=1e-4, atol=1e-5)


def test_backup_sweeps_metric_on_a_soft_capped_model_in_bfloat16(loaded_model):
    """Gemma 2 caps its logits: under --metric in bfloat16 the capped logits are made in float32
    (the centring's vocabulary mean included) and the change follows float32's."""
    from sweeps.jobs.backup import BackupJob

    m = loaded_model("tiny-gemma2")
    task = _task(m.tokenizer, "mcqa", "kl", n=4)
    runs = [BackupJob(task, "resample", 4, n_boot=0).bind(w).run_heads(1, [0, 1]) for w in (m.weights,
            m.weights.to(torch.bfloat16))]
    for full, half in zip(*runs):
        want, got = (np.asarray(r.repair["total_effect_metric"], dtype=float) for r in (full, half))
        assert np.isfinite(got).all() and np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
