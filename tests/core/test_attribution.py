"""Attribution patching against the textbook recipe, run through the bridge's hooks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sweeps.core import attribution as A
from sweeps.core import transformer as tf
from sweeps.jobs.attribution import AttributionJob, AttributionShard
from tasks import build_task, check_task
from tests import reference


def _task(tokenizer, name="ioi", n=6, **kw):
    return build_task(check_task(name), tokenizer, n, 0, **kw)


def test_norm_vjp_equals_autograd(tiny_gpt2, tiny_llama):
    torch.manual_seed(0)
    for w in (tiny_gpt2.weights, tiny_llama.weights):  # LayerNorm, RMSNorm
        x = torch.randn(2, 5, w.cfg.d_model)
        g = torch.randn(3, 2, 5, w.cfg.d_model)
        with torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            y = tf.normalize(w.cfg, xr)
            expected = torch.stack([torch.autograd.grad(y, xr, gi, retain_graph=True)[0] for gi in g])
        torch.testing.assert_close(A.norm_vjp_(w.cfg, x, g.clone()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["none", "layernorm", "rmsnorm"])
def test_downstream_rows_equal_autograd_through_each_input(tiny_llama, norm):
    """Each q/k/v row (taken in the head's own dimensions) and the MLP row equal autograd's
    gradient of ``input · g`` at the block's stream, for weights with biases and
    projections not centred over ``D`` (the tiny models' are zero and centred)."""
    torch.manual_seed(0)
    w0 = tiny_llama.weights
    w = dataclasses.replace(
        w0, cfg=dataclasses.replace(w0.cfg, norm=norm),
        **{name: getattr(w0, name) + 0.5 * torch.randn_like(getattr(w0, name))
           for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")},
    )
    cfg, layer = w.cfg, 1
    H, K = cfg.n_heads, cfg.n_kv_heads
    clean = tf.forward(w, torch.randn(2, 5, cfg.d_model), record=A.CLEAN_RECORD)
    g_q, g_k, g_v = (torch.randn_like(t[layer]) for t in (clean.q, clean.k, clean.v))
    g_mlp = torch.randn(2, 5, cfg.d_model)
    rows = A.downstream_rows(w, layer, clean, g_q, g_k, g_v, g_mlp, torch.full((A.rows_per_layer(cfg), 2, 5, cfg.d_model), torch.nan))

    expected = []
    with torch.enable_grad():
        x = clean.resid_pre[layer].clone().requires_grad_(True)
        q, k, v = tf.qkv(w, layer, tf.sublayer_input(w.cfg, x))
        for t, g in ((q, g_q), (k, g_k), (v, g_v)):
            for h in range(t.shape[2]):
                expected.append(torch.autograd.grad((t[:, :, h] * g[:, :, h]).sum(), x, retain_graph=True)[0])
        m = clean.mlp_in[layer].clone().requires_grad_(True)
        expected.append(torch.autograd.grad((tf.normalize(cfg, m) * g_mlp).sum(), m)[0])
    assert len(expected) == H + 2 * K + 1 == rows.shape[0]
    torch.testing.assert_close(rows, torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_next_token_log_prob_and_its_gradient_equal_log_softmax(smollm, monkeypatch):
    """The chunked, fused read-out against autograd through ``log_softmax`` (in float64, so
    that float32's own rounding is not the difference): values and gradients, over more
    rows than one chunk holds, on SmolLM2's real unembedding."""
    w = smollm.weights
    torch.manual_seed(0)
    P = 2 * 64 + 5
    monkeypatch.setattr(A.NextTokenLogProb, "MAX_LOGITS", 64 * w.cfg.d_vocab)  # chunks of 64 rows
    x, targets, g = torch.randn(P, w.cfg.d_model), torch.randint(0, w.cfg.d_vocab, (P,)), torch.randn(P)
    with torch.enable_grad():
        xa, xb = x.clone().requires_grad_(True), x.double().requires_grad_(True)
        fused = A.NextTokenLogProb.apply(xa, w.W_U, w.b_U, targets, A.Scratch())
        plain = torch.log_softmax(xb @ w.W_U.double() + w.b_U.double(), dim=-1).gather(-1, targets[:, None])[:, 0]
        (fused * g).sum().backward()
        (plain * g.double()).sum().backward()

    def close(a, b):  # to 1e-5 of the largest value
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()

    close(fused, plain.detach())
    close(xa.grad, xb.grad)
    with torch.no_grad():  # without a gradient, the same values
        assert torch.equal(A.NextTokenLogProb.apply(x, w.W_U, w.b_U, targets, A.Scratch()), fused.detach())


def test_passes_sharing_a_scratch_equal_passes_with_fresh_buffers(tiny_llama):
    """A ``Scratch`` reused by passes of different sizes (a bigger pass, then smaller ones,
    so the buffers hold a bigger pass's leftovers) changes no score: every buffer is
    written before it is read."""
    task = _task(tiny_llama.tokenizer, "text", n=9, seq_len=12)
    graph = A.build_graph(tiny_llama.weights.cfg)
    scratch = A.Scratch()
    for start, stop in ((0, 5), (5, 7), (7, 9), (0, 5)):
        part = task.select(slice(start, stop))
        fresh = A.attribute(tiny_llama.weights, graph, part)
        shared = A.attribute(tiny_llama.weights, graph, part, scratch)
        assert torch.equal(shared.nodes, fresh.nodes) and torch.equal(shared.edges, fresh.edges)
        assert (shared.clean_metric, shared.corrupt_metric) == (fresh.clean_metric, fresh.corrupt_metric)
    assert set(scratch._buffers) == {"logits", "deltas", "rows"}


def test_a_job_keeps_its_buffers_from_shard_to_shard_and_its_scores_do_not_change(tiny_llama):
    """A bound job's ``Scratch`` outlives a shard (only a worker's first pass touches fresh
    memory): shards of different sizes, in any order, give the tables a fresh job gives."""
    task = _task(tiny_llama.tokenizer, "text", n=9, seq_len=12)
    kept = AttributionJob(task)
    kept.bind(tiny_llama)
    for shard in (AttributionShard(0, 9), AttributionShard(5, 7), AttributionShard(0, 9)):
        fresh = AttributionJob(task)
        fresh.bind(tiny_llama)
        got, want = kept.run_shard(shard), fresh.run_shard(shard)
        assert got.keys() == want.keys() and all(got[name].equals(want[name]) for name in want)
    assert kept.engine._scratch._buffers["deltas"].numel() > 0  # the buffers were kept, and reused


def test_edge_products_equal_one_dot_product_per_edge():
    torch.manual_seed(0)
    deltas, rows = torch.randn(12, 40), torch.randn(8, 40)
    prefix = [3, 3, 3, 5, 5, 7, 12, 12]  # runs of equal prefixes, as a layer's q/k/v then its MLP
    expected = torch.stack([rows[i] @ deltas[j] for i, p in enumerate(prefix) for j in range(p)])
    torch.testing.assert_close(A.edge_products(deltas, rows, prefix), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_blocked_edge_products_equal_one_product_per_layer(loaded_model, name, monkeypatch):
    """The products over several layers' rows at once give what one product per layer gives."""
    m = loaded_model(name)
    task = _task(m.tokenizer, "text", n=3, seq_len=12)
    graph = A.build_graph(m.weights.cfg)
    monkeypatch.setattr(A, "ROWS_PER_PRODUCT", 1)
    per_layer = A.attribute(m.weights, graph, task)
    monkeypatch.setattr(A, "ROWS_PER_PRODUCT", 10_000)
    one_block = A.attribute(m.weights, graph, task)
    # float32 sums in another order: agree to 1e-5 of the largest score
    for got, want in ((one_block.edges, per_layer.edges), (one_block.nodes, per_layer.nodes)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


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
def test_scores_equal_gradients_cached_with_hooks_on_split_inputs(loaded_model, name):
    """Nodes and every edge (q, k, v per head, GQA key/value heads, MLP inputs, the
    final stream) equal grad · (clean − corrupt) cached with hooks on split inputs."""
    m = loaded_model(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    ours = A.attribute(m.weights, graph, task)
    nodes, edges = reference.attribution_by_hooks(m.bridge, task, graph)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=2e-5)
    assert abs(ours.clean_metric - float(reference.logit_diffs(m.bridge, task).sum())) < 1e-4


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_node_scores_summed_from_edges_equal_the_direct_gradient_at_the_stream(loaded_model, name):
    """Exact in every structure we run (sequential, parallel, GQA): the stream after a node is
    read only by the downstream inputs in the graph, so the chain rule splits its gradient.
    The engine sums a node's edges; the reference takes ``grad(stream after u) · change``
    with hooks. A missing or doubled edge anywhere would show here (on IOI the
    test above checks the same on every edge too)."""
    m = loaded_model(name)
    task = _task(m.tokenizer, "text", n=3, seq_len=12)
    graph = A.build_graph(m.weights.cfg)
    ours = A.attribute(m.weights, graph, task)
    nodes, _ = reference.attribution_by_hooks(m.bridge, task, graph, lambda d: False)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=2e-5)
    assert np.abs(nodes).max() > 1e-3  # not trivially zero


def _attn_only(w):
    """The same weights run as an attention-only model (InterpBench-style checkpoints are)."""
    return dataclasses.replace(w, cfg=dataclasses.replace(w.cfg, attn_only=True))


@pytest.mark.parametrize("name, task_name", [
    ("tiny-pythia", "ioi"), ("tiny-llama", "ioi"), ("tiny-llama, attention only", "ioi"),
    ("tiny-llama, attention only", "text"),  # the text read-out's gradient; slow (a 49k vocabulary per edge)
])
def test_every_score_is_the_derivative_of_its_patched_run(loaded_model, name, task_name):
    """Independent of how the engine gets its gradients (block by block, rows summed into
    the stream's gradient): each node's and each edge's score is ``d metric / d eps`` of the
    clean run with ``eps · (clean_u − corrupt_u)`` added where ``u`` writes (a node) or at
    ``d``'s input alone (an edge), the same edit real patching applies at ``eps = −1``.
    Every edge, in a parallel, a grouped-query and an attention-only model."""
    m = loaded_model(name.split(",")[0])
    w = _attn_only(m.weights) if "attention only" in name else m.weights
    task = _task(m.tokenizer, task_name, n=2, **({"seq_len": 8} if task_name == "text" else {}))
    graph = A.build_graph(w.cfg)
    ours = A.attribute(w, graph, task)
    nodes, edges = scores_by_derivatives(w, graph, task)
    assert len(edges) == graph.n_edges and np.abs(edges).max() > 1e-2
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=1e-5)


def scores_by_derivatives(w, graph: A.Graph, task) -> tuple[list[float], list[float]]:
    """(node scores, edge scores in graph order), each ``d metric / d eps`` of the clean run with
    ``eps · (clean_u − corrupt_u)`` added where ``u`` writes (a node) or at ``d``'s input alone
    (an edge): one autograd pass per score, through an ``Edit`` of the forward."""
    clean_embed, corrupt_embed = tf.embed(w, task.clean), tf.embed(w, task.corrupt)
    clean, corrupt = (tf.forward(w, e, record=A.WRITES_RECORD) for e in (clean_embed, corrupt_embed))

    def derivative(upstream: str, site: str, layer: int, head: int | None) -> float:
        _, _, corrupt_minus_clean = A._upstream_delta(w, upstream, clean, corrupt, clean_embed - corrupt_embed)
        with torch.enable_grad():
            eps = torch.zeros((), requires_grad=True)
            delta = -eps * corrupt_minus_clean
            if site == "resid":  # the final stream: nothing to run
                final = clean.resid_final + delta
            else:
                site = {"mlp": "mlp_in"}.get(site, site)
                final = tf.forward(w, clean.resid_pre[layer], layer, [tf.Edit(site, layer, delta, head)]).resid_final
            (grad,) = torch.autograd.grad(A.metric_terms(w, final, task).sum(), eps)
        return float(grad)

    edges = [derivative(u, d.input, d.layer, d.head) for d, p in zip(graph.downstream, graph.prefix)
             for u in graph.upstream[:p]]
    nodes = [derivative(u, *A._upstream_delta(w, u, clean, corrupt, clean_embed - corrupt_embed)[:2], None)
             for u in graph.upstream]
    return nodes, edges


def test_next_token_scores_equal_hooked_gradients(tiny_gpt2):
    task = _task(tiny_gpt2.tokenizer, "text", n=3, seq_len=10)
    graph = A.build_graph(tiny_gpt2.weights.cfg)
    ours = A.attribute(tiny_gpt2.weights, graph, task)
    nodes, edges = reference.attribution_by_hooks(tiny_gpt2.bridge, task, graph)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_real_patching_equals_hooked_patching(loaded_model, name):
    """Node patching and path patching of single edges (q of a query head, k of a shared
    key/value head, an MLP input, the final stream) against hooks on full forwards."""
    m = loaded_model(name)
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


# --------------------------------------------------------------------------- #
# The embedded model: the textbook recipe, and attribution against real patching
# --------------------------------------------------------------------------- #


def test_smollm_scores_equal_hooked_gradients(smollm):
    """Every node, and every edge into the last two layers and the final stream (GQA: 3 key/value heads)."""
    task = _task(smollm.tokenizer, n=3)
    graph = A.build_graph(smollm.weights.cfg)
    ours = A.attribute(smollm.weights, graph, task)
    late = lambda d: d.layer >= smollm.weights.cfg.n_layers - 2  # noqa: E731
    nodes, edges = reference.attribution_by_hooks(smollm.bridge, task, graph, late)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-3, atol=1e-3)
    mask = np.concatenate([np.full(p, late(d)) for d, p in zip(graph.downstream, graph.prefix)])
    np.testing.assert_allclose(ours.edges.numpy()[mask], edges[mask], rtol=1e-3, atol=1e-3)


def test_smollm_attribution_predicts_real_patching_of_its_top_nodes_and_edges(smollm):
    """IOI, 8 prompts, the top 10 nodes and top 10 edges. The linear approximation fails where
    patching rewrites the model's input: the embeddings and the first MLP (mlp0, which acts
    as part of the embedding) score about -0.4 but patching them costs the whole task (1.0).
    Elsewhere, when written: signs all agree, Pearson r 0.91 (8 nodes) and 0.96 (4 edges)."""
    w = smollm.weights
    task = _task(smollm.tokenizer, n=8)
    graph = A.build_graph(w.cfg)
    scores = A.attribute(w, graph, task)
    normaliser = scores.clean_metric - scores.corrupt_metric
    node_order = np.argsort(-np.abs(scores.nodes.numpy()))[:10]
    edge_names = [(u, d) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
    edge_order = np.argsort(-np.abs(scores.edges.numpy()))[:10]
    targets = [A.Target(graph.upstream[i]) for i in node_order]
    targets += [A.Target(edge_names[i][0], edge_names[i][1].name, edge_names[i][1].input) for i in edge_order]
    effect = (scores.clean_metric - A.patch_metric(w, graph, task, targets).numpy()) / normaliser
    predicted = np.concatenate([scores.nodes.numpy()[node_order], scores.edges.numpy()[edge_order]]) / normaliser
    for t, p, e in zip(targets, predicted, effect):
        print(f"{t.label:28s} score {p:7.3f}  patched {e:7.3f}")
    linear = np.array([not ({"embed", "mlp0"} & {t.upstream, t.downstream}) for t in targets])
    for name, part in (("nodes", slice(0, 10)), ("edges", slice(10, 20))):
        keep = linear[part]
        x, y = predicted[part][keep], effect[part][keep]
        r, agree = np.corrcoef(x, y)[0, 1], np.mean(np.sign(x) == np.sign(y))
        print(f"{name} outside the input layer ({keep.sum()}): pearson {r:.3f}, sign agreement {agree:.2f}")
        assert keep.sum() >= 4 and agree >= 0.85 and r >= 0.8


# --------------------------------------------------------------------------- #
# The sweep: exact sums over shards, executors agree, resume, top:K circuits
# --------------------------------------------------------------------------- #


def run_attribution(out, *extra, model="tiny-llama", executor="local", n=12):
    from sweeps import attribution

    args = ["--model", model, "--executor", executor, "--n-prompts", str(n), "--batch-size", "4",
            "--no-report", "--out", str(out), *extra]
    return attribution.main(args)


def test_sweep_sums_its_shards_into_the_whole_dataset_scores(tmp_path, tiny_llama):
    import pandas as pd

    out = tmp_path / "o"
    assert run_attribution(out, "--verify-top", "3") == 0
    nodes, edges = pd.read_parquet(out / "nodes"), pd.read_parquet(out / "edges")
    task = _task(tiny_llama.tokenizer, n=12)
    graph = A.build_graph(tiny_llama.weights.cfg)
    whole = A.attribute(tiny_llama.weights, graph, task)  # all 12 prompts in one pass
    normaliser = whole.clean_metric - whole.corrupt_metric
    expected = dict(zip(graph.upstream, whole.nodes.numpy() / normaliser))
    np.testing.assert_allclose(nodes.score, [expected[n] for n in nodes.node], rtol=1e-5, atol=1e-6)
    assert len(edges) == graph.n_edges and edges.abs_rank.tolist() == list(range(1, graph.n_edges + 1))
    assert {"upstream", "downstream", "input", "score", "abs_rank"} <= set(edges.columns)
    assert set(edges.input) == {"q", "k", "v", "mlp", "resid"} and "L1KV1" in set(edges.downstream)
    verify = pd.read_parquet(out / "verify")
    assert list(verify.kind) == ["node"] * 3 + ["edge"] * 3
    assert verify.target.iloc[0] == nodes.node.iloc[0]  # the top node by |score|
    top = verify.iloc[0]
    (patched,) = A.patch_metric(tiny_llama.weights, graph, task, [A.Target(top.upstream)]).tolist()
    assert abs(top.patch_effect - (whole.clean_metric - patched) / normaliser) < 1e-4


def test_ray_pool_equals_local_attribution_sweep(tmp_path, ray_session):
    import pandas as pd

    assert run_attribution(tmp_path / "local", "--verify-top", "2") == 0
    assert run_attribution(tmp_path / "ray", "--verify-top", "2", executor="ray") == 0
    for name in ("nodes", "edges", "verify"):
        local, ray_ = (pd.read_parquet(tmp_path / d / name).sort_values(list(
            {"nodes": ["node"], "edges": ["upstream", "downstream", "input"], "verify": ["target"]}[name]))
            .reset_index(drop=True) for d in ("local", "ray"))
        for column in ("score", "patch_effect"):
            if column in local:
                np.testing.assert_allclose(local[column], ray_[column], rtol=1e-5, atol=1e-6)


def test_resume_recomputes_only_missing_batches(tmp_path, capsys):
    import json

    import pandas as pd

    out = tmp_path / "o"
    assert run_attribution(out, "--verify-top", "0") == 0
    before = pd.read_parquet(out / "nodes")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"]["B00004-00007"]  # as if the driver died before committing it
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run_attribution(out, "--verify-top", "0") == 0
    assert "2 done, 1 to run" in capsys.readouterr().err
    pd.testing.assert_frame_equal(before, pd.read_parquet(out / "nodes"))


def test_top_nodes_become_the_scale_sweeps_circuit(tmp_path):
    import pandas as pd

    from sweeps.core.circuits import load_circuit

    out = tmp_path / "o"
    assert run_attribution(out, "--verify-top", "0", model="tiny-gpt2") == 0
    nodes = pd.read_parquet(out / "nodes")
    patchable = nodes[nodes.kind != "embed"].node.head(3).tolist()
    circuit = load_circuit(f"top:3@{out}", "tiny-gpt2", 3, 4)
    assert sorted(n.name for n in circuit.nodes) == sorted(patchable)
    assert circuit.label.endswith("(eap)")
    # Any method's result serves: exact scores rank the nodes by their real patching effect.
    exact = tmp_path / "exact"
    assert run_attribution(exact, "--verify-top", "0", "--method", "exact", model="tiny-gpt2") == 0
    nodes = pd.read_parquet(exact / "nodes")
    assert set(nodes.method) == {"exact"}
    circuit = load_circuit(f"top:3@{exact}", "tiny-gpt2", 3, 4)
    assert sorted(n.name for n in circuit.nodes) == sorted(nodes[nodes.kind != "embed"].node.head(3))
    assert circuit.label.endswith("(exact)")


def test_report_of_an_attribution_sweep(tmp_path):
    from analysis.__main__ import main as analysis_main
    from tests.wandb_records import history_and_summary

    out = tmp_path / "o"
    assert run_attribution(out, "--verify-top", "3") == 0
    assert analysis_main(["attribution", str(out), "--wandb", "offline"]) == 0
    for name in ("node_scores", "top_edges", "faithfulness"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    [run] = list((tmp_path / "wandb").rglob("run-*.wandb"))
    history, summary, artifacts = history_and_summary(run)
    for key in ("nodes", "edges_top", "verify", "faithfulness"):
        assert history.get(f"{key}/_type") == '"table-file"', sorted(history)
    assert float(summary["faithfulness/node_sign_agreement"]) >= 0
    assert any(name.startswith("attribution-results-") for name in artifacts)


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_integrated_gradients_with_one_step_equal_eap(tiny_llama, method):
    w, task = tiny_llama.weights, _task(tiny_llama.tokenizer)
    graph = A.build_graph(w.cfg)
    eap = A.attribute(w, graph, task)
    ig = A.attribute(w, graph, task, method=method, steps=1)
    torch.testing.assert_close(ig.edges, eap.edges, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ig.nodes, eap.nodes, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_integrated_gradients_equal_hooked_interpolated_gradients(loaded_model, name, method):
    """EAP-IG on sequential, grouped-query and parallel models against hooks on full forwards
    with the embeddings (inputs) or one group's outputs (activations) interpolated."""
    m = loaded_model(name)
    task = _task(m.tokenizer, n=3)
    graph = A.build_graph(m.weights.cfg)
    ours = A.attribute(m.weights, graph, task, method=method, steps=3)
    edges = reference.ig_attribution_by_hooks(m.bridge, task, graph, steps=3, activations=method.endswith("activations"))
    assert np.abs(edges).max() > 1e-3
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=2e-5)
    eap = A.attribute(m.weights, graph, task)
    assert not np.allclose(ours.edges.numpy(), eap.edges.numpy(), rtol=1e-3, atol=1e-4)  # the steps mattered


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_exact_node_scores_equal_the_scale_sweeps_metric_drop_at_scale_one(loaded_model, name):
    """``--method exact`` against an independent patcher: the scale sweep, each prompt's
    corrupt prompt as the source (``--pairs task``), at scale 1 replaces a node's output
    by its corrupt output; its summed metric drop is the node's exact score."""
    from sweeps.core.nodes import node_from_name
    from sweeps.jobs.scale import ScaleJob, make_pairs

    m = loaded_model(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    exact = A.exact_scores(m.weights, graph, task, with_edges=False)
    assert exact.edges.isnan().all()
    computer = ScaleJob(task, make_pairs(task, "task", None, 0, False), source="corrupt", batch_size=6).bind(m.weights)
    for row, name_ in enumerate(graph.upstream):
        if name_ == "embed":
            continue
        stats = computer.run_node(node_from_name(name_), [1.0])
        assert stats.metric_drop[0] == pytest.approx(float(exact.nodes[row]), rel=1e-4, abs=1e-4)
    assert exact.nodes.abs().max() > 1e-2


@pytest.mark.slow
def test_exact_edge_scores_are_real_path_patching(tiny_llama):
    """Every edge's exact score is the hooked path patch of that edge alone (a sample of edges
    of every input kind, grouped-query key/value heads included)."""
    w, task = tiny_llama.weights, _task(tiny_llama.tokenizer, n=3)
    graph = A.build_graph(w.cfg)
    exact = A.exact_scores(w, graph, task, with_edges=True)
    clean = reference.ld_or_logp_sum(tiny_llama.bridge, tiny_llama.bridge(task.clean), task)
    i = 0
    checked = set()
    for d, p in zip(graph.downstream, graph.prefix):
        for j, u in enumerate(graph.upstream[:p]):
            if d.input not in checked or (i + j) % 97 == 0:
                expected = float(clean) - reference.patched_metric_by_hooks(tiny_llama.bridge, task, u, d)
                assert float(exact.edges[i + j]) == pytest.approx(expected, rel=1e-4, abs=1e-4), (u, d)
                checked.add(d.input)
        i += p
    assert checked == {"q", "k", "v", "mlp", "resid"}


def _verified(scores: list[float], effects: list[float]):
    """Attribution results holding only a verification of nodes ``N0``, ``N1``, ..."""
    import pandas as pd

    from analysis.attribution import AttributionResults

    verify = pd.DataFrame({"kind": "node", "target": [f"N{i}" for i in range(len(scores))], "upstream": None,
                           "downstream": None, "input": None, "score": scores, "patch_effect": effects})
    return AttributionResults(out=None, spec={"verify_top": len(scores)}, manifest={}, nodes=pd.DataFrame(),
                              edges=pd.DataFrame(), verify=verify, n_prompts=1, n_points=1, clean_metric=1.0,
                              corrupt_metric=0.0, normaliser=1.0)


def test_the_console_says_in_words_when_verification_disagrees_and_why():
    from analysis.attribution import WHY, faithfulness_lines

    scores = [0.6, 0.3, 0.2, -0.2, -0.1, -0.26]
    agreeing = faithfulness_lines(_verified(scores, [0.62, 0.28, 0.21, -0.19, -0.12, -0.25]))
    assert agreeing == ["top 6 nodes: attribution predicts real patching (Pearson r 1.00, signs agree on 100%)."]
    # the last node is an embedding: score -0.26, patching it costs the whole task
    lines = faithfulness_lines(_verified(scores, [0.62, 0.28, 0.21, -0.19, -0.12, 1.0]))
    assert lines[0].startswith("top 6 nodes: attribution and real patching DISAGREE (Pearson r ")
    assert "furthest off: N5 (score -0.26, real +1.00); without it r = 1.00." in lines[0]
    assert lines[1] == WHY and "first-order" in WHY and "embeddings and early MLPs" in WHY


def test_exact_nodes_only_leaves_no_edge_scores_across_shards(tmp_path, capsys):
    """Above --max-exact-edges the edges are not patched: summed over several shards they stay
    unscored (not 0), so neither the edges/ dataset nor the verification ranks them."""
    import pandas as pd

    out = tmp_path / "o"
    assert run_attribution(out, "--method", "exact", "--max-exact-edges", "0", "--verify-top", "2") == 0
    printed = capsys.readouterr()
    assert "patching its 16 nodes only" in printed.out
    assert "No edge scores: --method exact scored the nodes only" in printed.out
    assert pd.read_parquet(out / "edges").empty
    verify = pd.read_parquet(out / "verify")
    assert list(verify.kind) == ["node", "node"]
    np.testing.assert_allclose(verify.score, verify.patch_effect, rtol=1e-4, atol=1e-5)  # exact is the patch


def _ungrouped(w):
    """The same model with each query head given its own copy of its key/value head's
    weights: the same forward, and an attribution graph with k and v edges per query head
    (EAP-IG's graph of a grouped-query model)."""
    G = w.cfg.group_size
    return dataclasses.replace(
        w,
        cfg=dataclasses.replace(w.cfg, n_kv_heads=w.cfg.n_heads),
        **{name: getattr(w, name).repeat_interleave(G, dim=1) for name in ("W_K", "b_K", "W_V", "b_V")},
    )


@pytest.mark.parametrize("name, method", [
    ("tiny-llama", "eap"), ("tiny-llama", "eap-ig-inputs"),
    ("tiny-gemma2", "eap"),  # soft-capped scores, post-norms, windows
    ("tiny-qwen3", "eap"),  # a QK-norm per head
])
def test_query_head_kv_scores_are_derivatives_of_one_query_heads_copy(loaded_model, name, method):
    """``split_kv``: each query head's own k/v edge equals ``d metric / d eps`` with ``eps ·
    (clean_u − corrupt_u)`` added to that query head's copy of the key/value input alone (an
    ``Edit`` of the ungrouped model, whose forward is the same), and a group's scores add up
    to the shared key/value edge's score. With IG, against attribution of the ungrouped model
    (its ordinary k/v rows, no split)."""
    m = loaded_model(name)
    w = m.weights
    assert w.cfg.n_kv_heads < w.cfg.n_heads
    task = _task(m.tokenizer, n=2)
    graph = A.build_graph(w.cfg)
    ours = A.attribute(w, graph, task, method=method, steps=3, split_kv=True)
    assert ours.kv_heads is not None
    names = A.query_head_kv_edges(graph)
    assert len(names) == ours.kv_heads.numel()
    split = dict(zip(names, ours.kv_heads.tolist()))

    wu = _ungrouped(w)
    gu = A.build_graph(wu.cfg)
    if method == "eap":
        _, expected = scores_by_derivatives(wu, gu, task)
    else:
        expected = A.attribute(wu, gu, task, method=method, steps=3).edges.tolist()
    by_name = {(u, d.name, d.input): s for (u, d), s in zip(
        [(u, d) for d, p in zip(gu.downstream, gu.prefix) for u in gu.upstream[:p]], expected)}
    got = [split[k] for k in names]
    want = [by_name[k] for k in names]
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    G = w.cfg.group_size
    shared = {(u, d.name, d.input): s for (u, d), s in zip(
        [(u, d) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]], ours.edges.tolist())}
    sums: dict = {}
    for (u, head, letter), s in split.items():
        layer, h = (int(x) for x in head[1:].split("H"))
        key = (u, f"L{layer}KV{h // G}", letter)
        sums[key] = sums.get(key, 0.0) + s
    assert set(sums) == {k for k in shared if k[2] in "kv"}
    np.testing.assert_allclose([sums[k] for k in sums], [shared[k] for k in sums], rtol=1e-5, atol=1e-6)
