"""The bridge path (``sweeps/core/bridge_path.py``): models with no fast path, through
TransformerLens's own forward and hooks.

Checked two ways: equal to the fast path (an independent computation: our own forward and
restarts) on families that have both, forcing the bridge path on them; and run end to end,
every command, on families that have no fast path at all.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sweeps.core import attribution as A
from sweeps.core import bridge_path
from sweeps.core.lens import task_report
from sweeps.core.nodes import Node
from sweeps.jobs.backup import BackupJob
from sweeps.jobs.scale import ScaleJob, make_pairs
from sweeps.runtime import loading, models
from tasks import TaskSpec, build_task

BOTH_PATHS = ["tiny-llama3", "tiny-pythia"]  # sequential grouped-query; parallel attention + MLP
BRIDGE_ONLY = ["tiny-stablelm", "tiny-falcon", "tiny-cohere", "tiny-mixtral"]


@pytest.fixture(scope="module")
def both():
    """name -> (fast-path model, the same model on the bridge path, task)."""
    out = {}
    for name in BOTH_PATHS:
        info = models.describe_model(name)
        task = build_task(TaskSpec("ioi"), loading.load_tokenizer(info), 6, 0)
        out[name] = (loading.load_model(info), loading.load_model(dataclasses.replace(info, path="bridge")), task)
    return out


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_backup_through_the_bridge_equals_the_fast_path(both, name):
    fast, bridge, task = both[name]
    for ablation in ("resample", "mean"):
        ours = BackupJob(task, ablation, 4).bind(fast.weights).run_heads(1, [0, 2])
        theirs = BackupJob(task, ablation, 4).bind(bridge.bridge).run_heads(1, [0, 2])
        for a, b in zip(ours, theirs):
            assert np.abs(a.backup).max() > 1e-3
            np.testing.assert_allclose(b.backup, a.backup, atol=1e-5)
            np.testing.assert_allclose(b.de_clean, a.de_clean, atol=1e-5)
            np.testing.assert_allclose(b.mean_delta_mlps, a.mean_delta_mlps, atol=1e-5)
            for term in ("total_effect", "own_change", "heads", "mlps", "last_mlp", "final_norm"):  # the self-repair split
                np.testing.assert_allclose(b.repair[term], a.repair[term], atol=1e-5, err_msg=term)
            for selection in ("all", "top"):  # the last MLP per neuron, through mlp.hook_post
                x, y = a.neurons[selection], b.neurons[selection]
                assert np.abs(x.delta).max() > 1e-4 and y.n_points == x.n_points
                np.testing.assert_allclose(y.delta, x.delta, atol=1e-5)
                np.testing.assert_allclose(y.clean, x.clean, atol=1e-5)


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_scale_sweep_through_the_bridge_equals_the_fast_path(both, name):
    fast, bridge, task = both[name]
    pairs = make_pairs(task, "all", 6, 0, False)
    for subspace in ("full", "high_variance"):
        ours = ScaleJob(task, pairs, subspace=subspace, batch_size=4).bind(fast.weights)
        theirs = ScaleJob(task, pairs, subspace=subspace, batch_size=4).bind(bridge.bridge)
        for node in (Node(1, 1), Node(0, None)):
            a, b = ours.run_node(node, [0.0, 2.0]), theirs.run_node(node, [0.0, 2.0])
            np.testing.assert_array_equal(b.changed, a.changed)
            np.testing.assert_allclose(b.metric_drop, a.metric_drop, atol=1e-4)
        assert theirs.normaliser() == pytest.approx(ours.normaliser(), abs=1e-5)


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_attribution_and_real_patching_through_the_bridge_equal_the_fast_path(both, name):
    fast, bridge, task = both[name]
    graph = A.build_graph(fast.weights.cfg)
    assert A.build_graph(bridge_path.graph_config(bridge.bridge)) == graph
    ours, theirs = A.attribute(fast.weights, graph, task), bridge_path.attribute(bridge.bridge, graph, task)
    torch.testing.assert_close(theirs.edges, ours.edges, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs.nodes, ours.nodes, atol=1e-5, rtol=1e-4)
    assert theirs.clean_metric == pytest.approx(ours.clean_metric, abs=1e-4)
    k = [d.name for d in graph.downstream if d.input == "k"][-1]
    targets = [A.Target("embed"), A.Target("L1H2"), A.Target("mlp0"), A.Target("L0H1", "L2H3", "q"),
               A.Target("mlp0", k, "k"), A.Target("embed", "mlp1", "mlp"), A.Target("L1H0", "resid_final", "resid")]
    torch.testing.assert_close(bridge_path.patch_metric(bridge.bridge, graph, task, targets),
                               A.patch_metric(fast.weights, graph, task, targets), atol=1e-4, rtol=1e-5)


@pytest.mark.slow  # real patching of every node and edge, twice
@pytest.mark.parametrize("name", BOTH_PATHS)
def test_exact_attribution_through_the_bridge_equals_the_fast_path(both, name):
    """``--method exact`` on both paths (the job's own shard code): every node and edge."""
    from sweeps.jobs.attribution import AttributionJob, AttributionShard

    fast, bridge, task = both[name]
    tables = []
    for model in (fast, bridge):
        job = AttributionJob(task, "exact", exact_edges=True)
        job.bind(model)
        tables.append(job.run_shard(AttributionShard(0, task.n_prompts)))
    for name_ in ("node_sums", "edge_sums"):
        ours, theirs = (t[name_].column("raw").to_numpy() for t in tables)
        assert np.abs(ours).max() > 1e-3
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_eap_ig_inputs_through_the_bridge_equals_the_fast_path(both, name):
    """``--method eap-ig-inputs`` on both paths (the job's own shard code): the bridge
    interpolates its block-0 input by a hook, the fast path its embedded tokens; three steps
    move the scores away from plain EAP, and both paths move them the same way."""
    from sweeps.jobs.attribution import AttributionJob, AttributionShard

    fast, bridge, task = both[name]
    shard = AttributionShard(0, task.n_prompts)
    edges = {}
    for path, model in (("fast", fast), ("bridge", bridge)):
        for steps in (1, 3):
            tables = AttributionJob(task, "eap-ig-inputs", steps).bind(model).run_shard(shard)
            edges[path, steps] = tables["edge_sums"].column("raw").to_numpy()
    assert np.abs(edges["fast", 3] - edges["fast", 1]).max() > 1e-3 * np.abs(edges["fast", 1]).max()
    for steps in (1, 3):
        np.testing.assert_allclose(edges["bridge", steps], edges["fast", steps], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="fast path's families only"):
        AttributionJob(task, "eap-ig-activations", 3).bind(bridge)


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_circuit_evaluation_through_the_bridge_equals_the_fast_path(both, name):
    """The same edge and node circuits (random, a third of the graph) evaluated by hooks on
    the bridge's forward and by the fast path's edge masks give the same metric; the bridge's
    empty and full circuits are its corrupt and clean runs."""
    from sweeps.core import circuit_eval as CE

    fast, bridge, task = both[name]
    graph = A.build_graph(bridge_path.graph_config(bridge.bridge))
    ours, theirs = CE.CircuitRunner(fast.weights, graph, task), bridge_path.CircuitRunner(bridge.bridge, graph, task)
    generator = torch.Generator().manual_seed(0)
    nodes = {u for u in graph.upstream if torch.rand((), generator=generator) < 0.5}
    masks = [torch.rand(graph.n_edges, generator=generator) < 0.3, CE.node_edge_mask(graph, nodes),
             torch.zeros(graph.n_edges, dtype=torch.bool), torch.ones(graph.n_edges, dtype=torch.bool)]
    values = [(theirs.metric(m), ours.metric(m)) for m in masks]
    for got, expected in values:
        assert got == pytest.approx(expected, abs=1e-4, rel=1e-4)
    assert values[2][0] == pytest.approx(theirs.corrupt_metric, abs=1e-4)
    assert values[3][0] == pytest.approx(theirs.clean_metric, abs=1e-4)
    assert abs(values[0][0] - theirs.clean_metric) > 1e-3 and abs(values[0][0] - theirs.corrupt_metric) > 1e-3


@pytest.mark.parametrize("name", BOTH_PATHS)
def test_task_report_through_the_bridge_equals_the_fast_path(both, name):
    fast, bridge, task = both[name]
    ours, theirs = task_report(fast.weights, task), bridge_path.task_report(bridge.bridge, task)
    for field in ("metric", "correct", "lens_final_scale", "lens_own_scale", "patterns"):
        torch.testing.assert_close(getattr(theirs, field), getattr(ours, field), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs.parts.heads, ours.parts.heads, atol=1e-5, rtol=1e-4)


def test_a_model_whose_components_do_not_add_up_is_refused(both):
    """The sum check: the bridge path sweeps a model only if its components' direct effects
    add up to its own logits; logits scaled after the unembedding (what an unfolded logit
    scale would do) break that, and the model is refused."""
    _, bridge, task = both["tiny-llama3"]
    assert bridge_path.sum_check(bridge.bridge, task) < 1e-4
    with pytest.raises(bridge_path.BridgePathError, match="do not add up"):
        bridge_path.sum_check(_ScaledLogits(bridge.bridge), task)


class _ScaledLogits:
    """A bridge whose logits are its own times 1.5: what an unfolded logit scale would do."""

    def __init__(self, bridge):
        self._bridge = bridge

    def __getattr__(self, name):
        return getattr(self._bridge, name)

    def hooks(self, *args, **kwargs):
        return self._bridge.hooks(*args, **kwargs)

    def run_with_cache(self, *args, **kwargs):
        logits, cache = self._bridge.run_with_cache(*args, **kwargs)
        return logits * 1.5, cache


@pytest.mark.slow
@pytest.mark.parametrize("name", BRIDGE_ONLY)
def test_every_command_runs_on_a_family_without_a_fast_path(tmp_path, name, capsys):
    """StableLM, Falcon, Cohere and Mixtral: backup, scale, attribution (with real patching of
    its top scores, and EAP-IG), circuit evaluation and the report, from the command line; the
    manifest and the rows say which path ran."""
    from sweeps import attribution, backup, circuit, report, scale

    info = models.describe_model(name)
    assert info.path == "bridge"
    common = ["--model", name, "--n-prompts", "4", "--wandb", "disabled"]
    assert backup.main([*common, "--heads", "L1", "--executor", "local", "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "bridge path" in err and ("neurons/ stays empty" in err) == (name == "tiny-mixtral")
    assert scale.main([*common, "--nodes", "L1H0,mlp0", "--scales", "0,2", "--pairs", "task", "--executor", "local",
                       "--out", str(tmp_path / "s")]) == 0
    assert attribution.main([*common, "--verify-top", "2", "--executor", "local", "--out", str(tmp_path / "a")]) == 0
    assert attribution.main([*common, "--method", "eap-ig-inputs", "--ig-steps", "2", "--verify-top", "0",
                             "--executor", "local", "--out", str(tmp_path / "ig")]) == 0
    ig = pq.read_table(tmp_path / "ig" / "edges").to_pandas()
    assert set(ig["method"]) == {"eap-ig-inputs"} and np.isfinite(ig["score"]).all() and (ig["score"] != 0).any()
    capsys.readouterr()
    assert attribution.main([*common, "--method", "eap-ig-activations", "--out", str(tmp_path / "no")]) == 2
    assert "fast path's families" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert circuit.main(["--from", str(tmp_path / "ig"), "--sizes", "0.05,1", "--wandb", "disabled",
                         "--executor", "local", "--out", str(tmp_path / "c")]) == 0
    faith = pq.read_table(tmp_path / "c" / "faithfulness").to_pandas().sort_values("size")
    assert len(faith) == 2 and faith.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-4)  # all edges: clean
    assert report.main([*common, "--out", str(tmp_path / "r")]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"]["path"] == "bridge"
    slopes = pq.read_table(next((tmp_path / "b" / "slopes").glob("*.parquet"))).to_pandas()
    assert set(slopes["engine_path"]) == {"bridge"} and np.isfinite(slopes["slope"]).all()
    neurons = pq.read_table(tmp_path / "b" / "neurons").to_pandas()  # a mixture of experts has no one W_out
    assert len(neurons) == (0 if name == "tiny-mixtral" else 4 * 2 * 20)
    verify = pq.read_table(tmp_path / "a" / "verify").to_pandas() if (tmp_path / "a" / "verify").exists() else None
    assert verify is None or len(verify) > 0


@pytest.mark.parametrize("model_type, config, message", [
    ("mamba", dict(hidden_size=64, num_hidden_layers=2), "no attention heads"),
    ("bert", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4), "not a causal"),
    ("jamba", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4), "state-space"),
])
def test_models_without_heads_or_not_causal_are_refused_before_loading(tmp_path, model_type, config, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **config}))
    with pytest.raises(models.ModelNameError, match=message):
        models.describe_model(str(tmp_path))


@pytest.mark.parametrize("metric", ["prob_diff", "greater_than", "kl"])
def test_a_chosen_metric_through_the_bridge_equals_the_fast_path(metric):
    """``--metric`` on the bridge path (greater-than's answer sets, tiny Llama 3 forced onto the
    bridge): attribution by EAP-IG (its gradient; two steps, since ``kl``'s is 0 at the clean
    run), real patching, circuit evaluation, the scale sweep and the backup sweep's
    ``total_effect_metric`` read the chosen metric off the bridge's logits, and give the fast path's numbers (whose metrics are checked against the
    Hugging Face model's logits in tests/core/test_metrics.py)."""
    from sweeps.core import circuit_eval as CE

    info = models.describe_model("tiny-llama3")
    task = build_task(TaskSpec("greater-than"), loading.load_tokenizer(info), 6, 0)
    task.metric = metric
    fast, bridge = loading.load_model(info), loading.load_model(dataclasses.replace(info, path="bridge"))
    graph = A.build_graph(fast.weights.cfg)
    ours = A.attribute(fast.weights, graph, task, None, "eap-ig-inputs", 2)
    theirs = bridge_path.attribute(bridge.bridge, graph, task, 2)
    # a random model spreads its probability over 49k tokens: the probability metrics are
    # small (about 1e-5), so every comparison is relative to the sizes at hand
    scale = float(ours.edges.abs().max())
    assert scale > 0
    torch.testing.assert_close(theirs.edges, ours.edges, atol=1e-3 * scale, rtol=1e-3)
    gap = abs(ours.clean_metric - ours.corrupt_metric)
    assert gap > 0
    assert theirs.clean_metric == pytest.approx(ours.clean_metric, abs=1e-3 * gap)
    assert theirs.corrupt_metric == pytest.approx(ours.corrupt_metric, abs=1e-3 * gap)
    targets = [A.Target("embed"), A.Target("L1H2"), A.Target("mlp0"), A.Target("L0H1", "L2H3", "q")]
    torch.testing.assert_close(bridge_path.patch_metric(bridge.bridge, graph, task, targets),
                               A.patch_metric(fast.weights, graph, task, targets), atol=1e-3 * gap, rtol=1e-4)
    mask = torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(0)) < 0.3
    runners = CE.CircuitRunner(fast.weights, graph, task), bridge_path.CircuitRunner(bridge.bridge, graph, task)
    assert runners[1].metric(mask) == pytest.approx(runners[0].metric(mask), abs=1e-3 * gap)
    pairs = make_pairs(task, "task", None, 0, False)
    a, b = (ScaleJob(task, pairs, source="corrupt", batch_size=4).bind(m).run_node(Node(1, 1), [0.0, 1.0, 2.0])
            for m in (fast.weights, bridge.bridge))
    np.testing.assert_array_equal(b.changed, a.changed)
    assert np.abs(a.metric_drop).max() > 0
    np.testing.assert_allclose(b.metric_drop, a.metric_drop, atol=1e-3 * np.abs(a.metric_drop).max())
    ours, theirs = (BackupJob(task, "resample", 4).bind(m).run_heads(1, [0, 2]) for m in (fast.weights, bridge.bridge))
    for x, y in zip(ours, theirs):
        change = np.asarray(x.repair["total_effect_metric"])
        assert np.abs(change).max() > 0
        np.testing.assert_allclose(y.repair["total_effect_metric"], change, atol=1e-3 * np.abs(change).max())
