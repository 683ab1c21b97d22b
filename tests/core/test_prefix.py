"""Prefix-shared restarts: a patch by a minimal pair's corrupt value changes nothing before the
pair's first differing token, so a restart computes only each prompt's positions from there
(``transformer.Window``). Checked on every family against the full restart and against a
hooked full forward through the TransformerLens bridge, on pairs that first differ at
position 1, in the middle and at the last token, with right padding, and (Mistral, Gemma 2
and 3) a sliding window shorter than the prompts."""

import numpy as np
import pytest
import torch

from sweeps.core import effects
from sweeps.core.engines.fast import FastEngine
from sweeps.runtime.tiny_models import FAMILY_TINY_MODELS
from tasks.base import TaskData

LENGTHS = [5, 9, 12, 7]
FIRST_DIFFERENCE = [1, 5, 11, 3]  # position 1, the middle, the last token of the longest prompt


def minimal_pairs(m, seed: int = 0) -> TaskData:
    """Random prompts (BOS first) and their corrupt partners, equal up to ``FIRST_DIFFERENCE``."""
    g = torch.Generator().manual_seed(seed)
    V, T, B = m.weights.cfg.d_vocab, max(LENGTHS), len(LENGTHS)
    bos = m.tokenizer.bos_token_id if m.tokenizer.bos_token_id is not None else 0
    clean = torch.randint(1, min(V, 4000), (B, T), generator=g)
    clean[:, 0] = bos
    corrupt = clean.clone()
    for b, (n, p0) in enumerate(zip(LENGTHS, FIRST_DIFFERENCE)):
        corrupt[b, p0:n] = torch.randint(1, min(V, 4000), (n - p0,), generator=g)
        clean[b, n:] = corrupt[b, n:] = 0  # right padding
    answers = torch.randint(1, min(V, 4000), (2, B), generator=g)
    return TaskData("pairs", "logit_diff", {}, clean, corrupt, torch.tensor(LENGTHS), answers[0], answers[1])


def test_the_window_starts_at_the_first_difference_and_ends_at_the_last_point(tiny_llama):
    task = minimal_pairs(tiny_llama)
    first = effects.first_difference(task.clean, task.corrupt)
    assert first.tolist() == FIRST_DIFFERENCE
    same = effects.first_difference(task.clean, task.clean)
    assert same.tolist() == [task.clean.shape[1]] * len(LENGTHS)  # nothing differs
    w = tiny_llama.weights
    points = effects.effect_points(w, task)
    clean = torch.zeros(w.cfg.n_layers, len(LENGTHS), max(LENGTHS), w.cfg.d_model)
    window = effects.restart_window(first, points, clean, copies=3)
    assert window is not None
    # answers at lengths - 1: the window is as wide as the widest prompt's need; each prompt's
    # starts at or before its first difference and reaches its answer
    assert window.width == max(n - p for n, p in zip(LENGTHS, FIRST_DIFFERENCE))
    starts = window.starts.tolist()
    assert all(s <= p and s + window.width >= n for s, p, n in zip(starts, FIRST_DIFFERENCE, LENGTHS))
    assert window.positions().shape == (3 * len(LENGTHS), window.width)
    assert effects.restart_window(torch.zeros(4, dtype=torch.long), points, clean, 1) is None  # all of it
    assert window.width / max(LENGTHS) <= effects.WINDOW_WORTH  # the tests below run windows


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_a_prefix_shared_restart_equals_the_full_restart(loaded_model, name):
    """Every quantity the backup sweep and its self-repair decomposition read, from every layer."""
    m = loaded_model(name)
    task = minimal_pairs(m)
    engine = FastEngine(m.weights)
    state, _ = engine.backup_state(task, 0, "resample", True)
    assert state.first_change is not None and state.first_change.tolist() == FIRST_DIFFERENCE
    H, L = m.weights.cfg.n_heads, m.weights.cfg.n_layers
    heads = list(range(H))
    for layer in range(L):
        replacement = torch.stack([state.replacement_z[layer, :, :, h] for h in heads])
        args = (m.weights, layer, heads, state.resid_pre[layer], replacement, state.points, state.scale)
        full = effects.ablate_heads_of_layer(*args)
        shared = effects.ablate_heads_of_layer(*args, first_change=state.first_change, clean=state.resid_pre)
        for field in ("heads", "mlps", "attn_bias", "final_dot", "final_scale", "final_normed", "last_hidden", "last_inv_rms"):
            a, b = getattr(full, field), getattr(shared, field)
            assert (a is None) == (b is None), field
            if a is not None:
                torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5, msg=f"{name} layer {layer}: {field}")
        assert not torch.allclose(full.heads[:, -1], state.de_heads[-1][None])  # the ablations changed something


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_a_prefix_shared_restart_gives_the_hooked_hugging_face_models_logit_difference(loaded_model, name):
    """The windowed restart's final stream at each answer (``x' · u / s'`` plus the bias) is
    the logit difference of a full forward of the Hugging Face model with the head's output
    projection input resampled by a hook (soft-cap off: the sweep reads the pre-cap logits)."""
    from tests.core.test_architectures import answer_logit_diff, hooked_logits, reference_model

    m = loaded_model(name)
    task = minimal_pairs(m, seed=1)
    state, _ = FastEngine(m.weights).backup_state(task, 0, "resample", True)
    hf = reference_model(name)
    if getattr(hf.config, "final_logit_softcapping", None):
        hf.config.final_logit_softcapping = None
    corrupt_z = state.replacement_z
    for layer, head in ((0, 0), (m.weights.cfg.n_layers - 1, 1)):
        shared = effects.ablate_heads_of_layer(
            m.weights, layer, [head], state.resid_pre[layer], corrupt_z[layer][None, :, :, head],
            state.points, state.scale, first_change=state.first_change, clean=state.resid_pre,
        )

        def edit(z, layer=layer, head=head):
            z = z.clone()
            z[:, :, head] = corrupt_z[layer][:, :, head]
            return z

        with torch.no_grad():
            expected = answer_logit_diff(hooked_logits(hf, task.clean, head_edit=(layer, edit)), task)
        ours = shared.final_dot[0] / shared.final_scale[0] + state.points.bias
        torch.testing.assert_close(ours, expected, atol=1e-4 * float(expected.abs().max()) + 1e-5, rtol=0)


def test_the_manifest_says_how_the_restarts_ran(tmp_path, capsys):
    """IOI with only S2 corrupted shares each pair's prefix: its shards say prefix-shared and the
    fraction of positions recomputed; mean ablation changes every position: full restarts."""
    import json

    from sweeps.registry import SWEEPS

    common = ["--model", "tiny-llama3", "--n-prompts", "8", "--heads", "L1", "--executor", "local", "--no-report"]
    for task, ablation, restarts in (("ioi-s2", "resample", "prefix-shared"), ("ioi-s2", "mean", "full")):
        out = tmp_path / f"{task}-{ablation}"
        assert SWEEPS["backup"].main([*common, "--task", task, "--ablation", ablation, "--out", str(out)]) == 0
        shards = json.loads((out / "manifest.json").read_text())["shards"].values()
        assert {s["restarts"] for s in shards} == {restarts}
        fraction = {s["positions_recomputed"] for s in shards}.pop()
        assert (fraction < 0.5) if restarts == "prefix-shared" else fraction == 1.0
    # exact attribution and the circuits evaluated from it patch corrupt values too
    common = ["--model", "tiny-llama3", "--task", "ioi-s2", "--n-prompts", "8", "--executor", "local", "--no-report"]
    exact, circuits = tmp_path / "exact", tmp_path / "circuits"
    assert SWEEPS["attribution"].main([*common, "--method", "exact", "--verify-top", "0", "--out", str(exact)]) == 0
    assert SWEEPS["circuit"].main([*common, "--from", str(exact), "--sizes", "0.5", "--out", str(circuits)]) == 0
    for out in (exact, circuits):
        shards = json.loads((out / "manifest.json").read_text())["shards"].values()
        assert {s["restarts"] for s in shards} == {"prefix-shared"} and all(s["positions_recomputed"] < 0.5 for s in shards)


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_exact_patching_and_circuit_runs_in_windows_equal_full_runs(loaded_model, name, monkeypatch):
    """Exact attribution (every node and edge patched alone) and circuit evaluation compute only
    each pair's positions from its first difference on; with the window turned off they give
    the same metrics, and the empty and full circuits are the corrupt and clean runs."""
    from sweeps.core import attribution as A
    from sweeps.core import circuit_eval as CE
    from sweeps.core import transformer as tf

    m = loaded_model(name)
    w, task = m.weights, minimal_pairs(m, seed=2)
    clean = tf.forward(w, tf.embed(w, task.clean), record=("resid_pre",))
    assert effects.pair_window(w, task, clean.resid_pre) is not None  # the windows are what is tested
    graph = A.build_graph(w.cfg)
    targets = A.every_target(graph, with_edges=True)
    targets = targets[:: max(1, len(targets) // 60)]  # every node, and edges of every kind
    g = torch.Generator().manual_seed(0)
    masks = [torch.zeros(graph.n_edges, dtype=torch.bool), torch.ones(graph.n_edges, dtype=torch.bool),
             torch.rand(graph.n_edges, generator=g) < 0.3]
    windowed = A.patch_targets(w, graph, task, targets).metric
    runner = CE.CircuitRunner(w, graph, task)
    assert runner.window is not None
    circuits = [runner.metric(mask) for mask in masks]
    assert circuits[0] == pytest.approx(runner.corrupt_metric, abs=1e-4)
    assert circuits[1] == pytest.approx(runner.clean_metric, abs=1e-4)
    for module in (A, CE):
        monkeypatch.setattr(module, "pair_window", lambda *a, **k: None)
    full = A.patch_targets(w, graph, task, targets).metric
    torch.testing.assert_close(windowed, full, atol=1e-4, rtol=1e-5)
    full_runner = CE.CircuitRunner(w, graph, task)
    assert full_runner.window is None
    for mask, value in zip(masks, circuits):
        assert value == pytest.approx(full_runner.metric(mask), abs=1e-4)


@pytest.mark.parametrize("name", FAMILY_TINY_MODELS)
def test_the_scale_sweeps_source_patches_in_windows_equal_full_restarts_and_hooked_forwards(
    loaded_model, name, monkeypatch
):
    """The scale sweep patching each prompt's node with its corrupt partner's value: at scale 1
    the patch is zero before the pair's first difference, so those restarts compute a window
    from there (the shard notes say so); scales 0 and 2 change every position. Every (node,
    scale) outcome equals the sweep with windows turned off, and the hooked reference loop
    (one full forward of the bridge per pair, a hook replacing the node's output)."""
    from sweeps.core.nodes import Node
    from sweeps.jobs.scale import ScaleJob, make_pairs
    from tests import reference

    m = loaded_model(name)
    task = minimal_pairs(m, seed=3)
    pairs = make_pairs(task, "task", None, 0, False)
    scales = [0.0, 1.0, 2.0]
    L, H = m.weights.cfg.n_layers, m.weights.cfg.n_heads
    nodes = [Node(0, 0), Node(L - 1, H - 1)] + ([Node(0, None)] if not m.weights.cfg.attn_only else [])

    def sweep(worth: float):
        monkeypatch.setattr(effects, "WINDOW_WORTH", worth)
        job = ScaleJob(task, pairs, scales=tuple(scales), source="corrupt", batch_size=4).bind(m.weights)
        job._positions = [0, 0]
        return [job.run_node(node, scales) for node in nodes], job.notes()

    windowed, notes = sweep(1.0)
    full, full_notes = sweep(0.0)
    assert notes["restarts"] == "prefix-shared" and notes["positions_recomputed"] < 1
    assert full_notes == {"restarts": "full", "positions_recomputed": 1.0}
    for node, a, b in zip(nodes, windowed, full):
        np.testing.assert_array_equal(a.changed, b.changed)
        np.testing.assert_allclose(a.metric_drop, b.metric_drop, atol=1e-4 * a.n_points, rtol=1e-5, err_msg=str(node))
    for node, a in zip(nodes, windowed):
        if name == "tiny-gptj" and node.head is not None:  # its bridge has no hook_result to patch
            continue
        expected = reference.scale_patch_effects(
            m.bridge, task, pairs, node.layer, node.head, scales, source_tokens=task.corrupt
        )
        for i, (effect, drop, points) in enumerate(expected):
            if m.weights.cfg.post_norm and node.head is None and scales[i] not in (0, 1):
                # the sweep scales an MLP's output before its post-norm (scaling.node_activation),
                # the bridge's hook_mlp_out after it: the two agree at scales 0 and 1 only
                continue
            assert a.n_points == points
            assert a.changed[i] / points == pytest.approx(effect, abs=1e-9), (node, scales[i])
            assert a.metric_drop[i] == pytest.approx(drop, abs=1e-3 * max(1.0, abs(drop)) * points), (node, scales[i])
