"""Direct effects and ablations (README: the backup-slope sweep) against independent computations."""

import numpy as np
import pytest
import torch

from sweeps.core import effects
from sweeps.core import transformer as tf
from sweeps.jobs.backup import BackupJob
from tasks import TaskSpec, build_task
from tests import reference


def ioi(m, n=8, seed=0):
    return build_task(TaskSpec("ioi"), m.tokenizer, n_prompts=n, seed=seed)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia", "smollm2-135m"])
def test_direct_effects_sum_to_logit_difference(loaded_model, name):
    m = loaded_model(name)
    task = ioi(m)
    run = tf.run(m.weights, task.clean)
    points = effects.effect_points(m.weights, task)
    parts = effects.decompose(m.weights, task.clean, run, points)
    expected = reference.logit_diffs(m.bridge, task)  # the bridge's own logits
    torch.testing.assert_close(parts.total(), expected, atol=1e-3 * expected.abs().max() + 1e-5, rtol=0)


def test_embedded_model_prefers_mary_by_about_4_6(smollm):
    """The documented figure for SmolLM2 on the classic IOI prompt, from the sum of direct effects."""
    from tasks.base import logit_diff_task

    prompt = "When John and Mary went to the shops, John gave the bag to"
    task = logit_diff_task("one", {}, smollm.tokenizer, [(prompt, prompt, " Mary", " John")])
    run = tf.run(smollm.weights, task.clean)
    parts = effects.decompose(smollm.weights, task.clean, run, effects.effect_points(smollm.weights, task))
    assert float(parts.total()[0]) == pytest.approx(4.6, abs=0.1)


@pytest.mark.parametrize("name", ["tiny-gpt2", "smollm2-135m"])
def test_direct_effects_sum_to_next_token_logit(loaded_model, name):
    m = loaded_model(name)
    task = build_task(TaskSpec("text"), m.tokenizer, n_prompts=3, seq_len=24)
    run = tf.run(m.weights, task.clean)
    points = effects.effect_points(m.weights, task)
    assert points.n == 3 * 23  # the last position has no target
    parts = effects.decompose(m.weights, task.clean, run, points)
    logits = m.bridge(task.clean)
    target = task.clean[points.batch, points.pos + 1]
    expected = logits[points.batch, points.pos, target]
    # the unembedding is centred, so the logit of a token = its direct effects summed
    torch.testing.assert_close(parts.total(), expected, atol=2e-3 * expected.abs().max() + 1e-5, rtol=0)


def test_mixed_length_batch_equals_each_prompt_alone(tiny_llama):
    m = tiny_llama
    task = ioi(m, n=6)
    assert len(set(task.lengths.tolist())) > 1, "the test needs prompts of different lengths"
    w = m.weights
    batch_run = tf.run(w, task.clean)
    batch_points = effects.effect_points(w, task)
    batch = effects.decompose(w, task.clean, batch_run, batch_points)
    for i in range(task.n_prompts):
        alone = task.select([i])
        run = tf.run(w, alone.clean)
        parts = effects.decompose(w, alone.clean, run, effects.effect_points(w, alone))
        torch.testing.assert_close(parts.total()[0], batch.total()[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(parts.heads[:, 0], batch.heads[:, i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,heads", [("tiny-gpt2", [(1, 2), (0, 0)]), ("smollm2-135m", [(20, 4)])])
def test_engine_backup_equals_independent_full_forward(loaded_model, name, heads):
    """The hooked reference recipe (full hooked forward, full cache, lstsq) gives the engine's numbers."""
    m = loaded_model(name)
    task = ioi(m, n=12)
    computer = BackupJob(task, "resample", batch_size=5).bind(m.weights)  # 3 uneven batches
    for layer, head in heads:
        [result] = computer.run_heads(layer, [head])
        clean, ablated, slope, intercept, mlp_delta = reference.resample_backup(m.bridge, task, layer, head)
        delta = (ablated - clean).numpy()
        # earlier layers are untouched by the ablation, in the reference too
        assert np.abs(delta[:layer]).max(initial=0.0) < 1e-5
        np.testing.assert_allclose(result.de_clean, clean[layer, :, head].numpy(), atol=1e-4)
        np.testing.assert_allclose(result.backup, delta[layer + 1 :].sum((0, 2)), atol=1e-4)
        np.testing.assert_allclose(result.mean_delta_heads, delta.mean(1), atol=1e-4)
        np.testing.assert_allclose(result.mean_delta_mlps, mlp_delta.mean(1).numpy(), atol=1e-4)
        fit = effects.fit_line(result.de_clean, result.backup)
        assert fit.slope == pytest.approx(slope, abs=1e-4)
        assert fit.intercept == pytest.approx(intercept, abs=1e-4)


def test_restart_equals_full_ablated_forward_and_earlier_layers_do_not_change(tiny_llama):
    """The restart from layer l* equals a full forward with the same ablation from layer 0,
    whose heads before l* have exactly their clean direct effects."""
    w, task = tiny_llama.weights, ioi(tiny_llama, n=6)
    layer, head = 1, 2
    clean = tf.run(w, task.clean)
    corrupt = tf.run(w, task.corrupt)
    points = effects.effect_points(w, task)
    scale = effects.final_scale(w, clean, points)
    clean_de = effects.decompose(w, task.clean, clean, points).heads

    def ablate(z):
        z = z.clone()
        z[:, :, head] = corrupt.z[layer][:, :, head]
        return z

    rope = tf.rotary_tables(w, task.clean.shape[1])
    full_de = []
    for out in tf.blocks(w, tf.embed(w, task.clean), 0, [tf.Edit("z", layer, replace=ablate)], rope=rope):
        full_de.append(effects.head_direct_effects(w, out.layer, out.z, points, scale))
    full_de = torch.stack(full_de)
    assert torch.equal(full_de[:layer], clean_de[:layer])  # bit for bit
    restart = effects.ablate_heads_of_layer(
        w, layer, [head], clean.resid_pre[layer], corrupt.z[layer][None, :, :, head], points, scale
    )
    torch.testing.assert_close(restart.heads[0], full_de[layer:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full_de[layer:], clean_de[layer:])  # the ablation did something


def test_resample_from_identical_prompts_changes_nothing(tiny_llama):
    m = tiny_llama
    task = ioi(m, n=6)
    same = task.select(slice(None))
    same.corrupt = same.clean.clone()  # "resample" from the clean prompts themselves
    computer = BackupJob(same, "resample", batch_size=6).bind(m.weights)
    for layer in range(m.weights.cfg.n_layers):
        for r in computer.run_heads(layer, list(range(m.weights.cfg.n_heads))):
            np.testing.assert_allclose(r.mean_delta_heads, 0.0, atol=1e-6)
            np.testing.assert_allclose(r.mean_delta_mlps, 0.0, atol=1e-6)
            np.testing.assert_allclose(r.backup, 0.0, atol=1e-6)


def test_zero_and_mean_ablation_set_the_heads_output(tiny_gpt2):
    w, task = tiny_gpt2.weights, ioi(tiny_gpt2, n=6)
    layer, head = 0, 1
    run = tf.run(w, task.clean)
    points = effects.effect_points(w, task)
    scale = effects.final_scale(w, run, points)
    # the mean of the head's z over every real token of the task, computed directly
    real = [run.z[layer, b, : int(n), head] for b, n in enumerate(task.lengths)]
    mean = torch.cat(real).mean(0)
    direction = torch.einsum("ed,pd->pe", w.W_O[layer, head], points.u) / scale[:, None]
    for ablation, value in (("zero", torch.zeros_like(mean)), ("mean", mean)):
        [r] = BackupJob(task, ablation).bind(w).run_heads(layer, [head])
        expected = (direction @ value).numpy() - r.de_clean  # the ablated head's own new effect
        assert r.mean_delta_heads[layer, head] == pytest.approx(expected.mean(), abs=1e-5)
        assert np.abs(r.mean_delta_heads[layer + 1 :]).sum() > 0


def test_fit_line_matches_numpy_and_threshold():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = -0.3 * x + 0.1 + 0.01 * rng.normal(size=200)
    fit = effects.fit_line(x, y)
    assert fit.slope == pytest.approx(np.polyfit(x, y, 1)[0], abs=1e-10)
    assert fit.n_points == 200 and fit.r2 > 0.99
    assert effects.fit_line(x, y, threshold=0.5).n_points == int((np.abs(x) > 0.5).sum())
    lo, hi = effects.bootstrap_slope_ci(x, y)
    assert lo < fit.slope < hi and hi - lo < 0.05
    # 20 prompts of 10 perfectly correlated points: resampling prompts sees only 20 draws
    xg, yg = np.repeat(x[:20], 10), np.repeat(y[:20] + rng.normal(size=20), 10)
    groups = np.repeat(np.arange(20), 10)
    by_point = effects.bootstrap_slope_ci(xg, yg)
    by_prompt = effects.bootstrap_slope_ci(xg, yg, groups)
    assert by_prompt[1] - by_prompt[0] > 2 * (by_point[1] - by_point[0])
    assert np.isnan(effects.fit_line(np.ones(5), y[:5]).slope)


def test_mean_ablation_uses_the_whole_task_whatever_the_batch_size(tiny_gpt2):
    task = ioi(tiny_gpt2, n=7)
    [a] = BackupJob(task, "mean", batch_size=3).bind(tiny_gpt2.weights).run_heads(1, [2])
    [b] = BackupJob(task, "mean", batch_size=7).bind(tiny_gpt2.weights).run_heads(1, [2])
    np.testing.assert_allclose(a.backup, b.backup, atol=1e-5)
    np.testing.assert_allclose(a.mean_delta_heads, b.mean_delta_heads, atol=1e-5)


def test_next_token_backup_equals_independent_full_forward(tiny_gpt2):
    """The classic backup setting: every position, direction W_U[:, next token], LayerNorm model."""
    m = tiny_gpt2
    task = build_task(TaskSpec("text"), m.tokenizer, n_prompts=4, seq_len=12)
    layer, head = 1, 3
    [result] = BackupJob(task, "resample", batch_size=3).bind(m.weights).run_heads(layer, [head])
    x, backup = reference.next_token_backup(m.bridge, task, layer, head)
    np.testing.assert_allclose(result.de_clean, x, atol=1e-4)
    np.testing.assert_allclose(result.backup, backup, atol=1e-4)


def test_a_pass_that_runs_out_of_memory_is_split_not_lost(tiny_gpt2, monkeypatch):
    from sweeps.jobs import backup as backup_sweep

    task = ioi(tiny_gpt2, n=6)
    expected = BackupJob(task).bind(tiny_gpt2.weights).run_heads(1, [0, 1, 2, 3])
    real = effects.ablate_heads_of_layer
    sizes = []

    def small_memory(w, layer, heads, *args, **kwargs):
        sizes.append(len(heads))
        if len(heads) > 1:  # pretend only single-head passes fit
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(w, layer, heads, *args, **kwargs)

    monkeypatch.setattr(backup_sweep.effects, "ablate_heads_of_layer", small_memory)
    got = BackupJob(task).bind(tiny_gpt2.weights).run_heads(1, [0, 1, 2, 3])
    assert sizes[0] == 4 and sizes[-4:] == [1, 1, 1, 1]  # halved until it fits
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.backup, b.backup, atol=1e-6)
        np.testing.assert_allclose(a.mean_delta_heads, b.mean_delta_heads, atol=1e-6)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(backup_sweep.effects, "ablate_heads_of_layer", no_memory)
    with pytest.raises(RuntimeError, match="use a smaller --batch-size"):
        BackupJob(task, batch_size=6).bind(tiny_gpt2.weights).run_heads(1, [0, 1])
