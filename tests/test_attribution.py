"""Attribution patching (seed 001) against seed 001's own recipe, run through the bridge's hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sweeps.engine import attribution as A
from sweeps.engine import transformer as tf
from tasks import build_task, check_task
from tests import reference


def _task(tokenizer, name="ioi", n=6, **kw):
    return build_task(check_task(name), tokenizer, n, 0, **kw)


def edge_sums_per_upstream(graph: A.Graph, edges: np.ndarray) -> np.ndarray:
    sums, offset = np.zeros(len(graph.upstream)), 0
    for p in graph.prefix:
        sums[:p] += edges[offset : offset + p]
        offset += p
    return sums


def test_norm_vjp_equals_autograd(tiny_gpt2, tiny_llama):
    torch.manual_seed(0)
    for w in (tiny_gpt2.weights, tiny_llama.weights):  # LayerNorm, RMSNorm
        x = torch.randn(2, 5, w.cfg.d_model)
        g = torch.randn(3, 2, 5, w.cfg.d_model)
        with torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            y = tf.normalize(w.cfg, xr)
            expected = torch.stack([torch.autograd.grad(y, xr, gi, retain_graph=True)[0] for gi in g])
        torch.testing.assert_close(A.norm_vjp(w.cfg, x, g), expected, rtol=1e-5, atol=1e-6)


def test_graph_counts_shared_key_value_heads_once(tiny_llama):
    cfg = tiny_llama.weights.cfg  # 4 query heads share 2 key/value heads
    graph = A.build_graph(cfg)
    layer1 = [d for d in graph.downstream if d.layer == 1]
    assert [d.input for d in layer1].count("q") == cfg.n_heads
    assert [d.input for d in layer1].count("k") == cfg.n_kv_heads == 2
    assert {d.name for d in layer1 if d.input == "v"} == {"L1KV0", "L1KV1"}
    # every downstream reads exactly what was written before it
    mlp1 = next(d for d in layer1 if d.input == "mlp")
    assert graph.upstream[: graph.prefix[graph.downstream.index(mlp1)]][-1] == "L1H3"


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_scores_equal_seed_001s_hooked_gradients(model_cache, name):
    """Nodes and every edge (q, k, v per head, GQA key/value heads, MLP inputs, the
    final stream) equal grad · (clean − corrupt) cached with hooks on split inputs."""
    m = model_cache(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    ours = A.attribute(m.weights, graph, task)
    nodes, edges = reference.attribution_by_hooks(m.bridge, task, graph)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=2e-5)
    assert abs(ours.clean_metric - float(reference.logit_diffs(m.bridge, task).sum())) < 1e-4


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_edges_of_a_node_sum_to_its_node_score(model_cache, name):
    """Exact in every structure we run (sequential, parallel, GQA): the stream after a node is
    read only by the downstream inputs in the graph, so the chain rule splits its gradient."""
    m = model_cache(name)
    for task in (_task(m.tokenizer), _task(m.tokenizer, "text", n=3, seq_len=12)):
        graph = A.build_graph(m.weights.cfg)
        ours = A.attribute(m.weights, graph, task)
        sums = edge_sums_per_upstream(graph, ours.edges.numpy())
        np.testing.assert_allclose(sums, ours.nodes.numpy(), rtol=1e-4, atol=1e-5)
        assert np.abs(ours.nodes.numpy()).max() > 1e-3  # not trivially zero


def test_next_token_scores_equal_hooked_gradients(tiny_gpt2):
    task = _task(tiny_gpt2.tokenizer, "text", n=3, seq_len=10)
    graph = A.build_graph(tiny_gpt2.weights.cfg)
    ours = A.attribute(tiny_gpt2.weights, graph, task)
    nodes, edges = reference.attribution_by_hooks(tiny_gpt2.bridge, task, graph)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=2e-5)


def test_unedited_forward_equals_the_engine_forward(tiny_llama):
    task = _task(tiny_llama.tokenizer)
    trace = A.forward(tiny_llama.weights, tf.embed(tiny_llama.weights, task.clean))
    torch.testing.assert_close(trace.resid_final, tf.run(tiny_llama.weights, task.clean).resid_final)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_real_patching_equals_hooked_patching(model_cache, name):
    """Node patching and path patching of single edges (q of a query head, k of a shared
    key/value head, an MLP input, the final stream) against hooks on full forwards."""
    m = model_cache(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    by = {(d.name, d.input): d for d in graph.downstream}
    kv = "L2KV1" if m.weights.cfg.group_size > 1 else "L2H1"
    targets = [
        A.Target("L0H1"), A.Target("mlp1"), A.Target("embed"),
        A.Target("L0H2", "L1H3", "q"), A.Target("mlp0", kv, "k"), A.Target("L1H0", kv, "v"),
        A.Target("embed", "mlp1", "mlp"), A.Target("L2H2", "resid_final", "resid"),
    ]
    ours = A.patch_metric(m.weights, graph, task, targets).numpy()
    expected = [
        reference.patched_metric_by_hooks(
            m.bridge, task, t.upstream, None if t.downstream is None else by[(t.downstream, t.input)]
        )
        for t in targets
    ]
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_patching_everything_upstream_of_the_end_gives_the_corrupt_run(tiny_gpt2):
    """Patching the embeddings' edge into every reader = the corrupt run (a whole-model check)."""
    w = tiny_gpt2.weights
    task = _task(tiny_gpt2.tokenizer)
    graph = A.build_graph(w.cfg)
    (patched,) = A.patch_metric(w, graph, task, [A.Target("embed")]).tolist()
    corrupt = A.metric_terms(w, tf.run(w, task.corrupt).resid_final, task).sum()
    assert abs(patched - float(corrupt)) < 1e-4
