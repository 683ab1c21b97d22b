"""The scale sweep (README: the all-nodes × all-scales sweep) against independent computations."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sweeps import scale
from sweeps.core import scaling
from sweeps.core import transformer as tf
from sweeps.core.nodes import Node
from sweeps.jobs.scale import ScaleJob, make_pairs
from tasks import TaskSpec, build_task
from tests import known_circuit, reference


def ioi(m, n=10, seed=0):
    return build_task(TaskSpec("ioi"), m.tokenizer, n_prompts=n, seed=seed)


# --------------------------------------------------------------------------- #
# Subspaces: the projection is Σ_k ((a − μ)·v_k) v_k, on a per-position PCA
# --------------------------------------------------------------------------- #


def random_activations(N=12, T=5, D=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(N, T, D, generator=g) * torch.linspace(3, 0.2, D) + torch.randn(D, generator=g)
    lengths = torch.tensor([T, T, T - 2, T - 1, T, 3, T, T - 1, T, 4, T, T])[:N]
    real = torch.arange(T)[None, :] < lengths[:, None]
    return acts, real


def test_pca_and_projection_equal_an_explicit_V_Vt_computation():
    acts, real = random_activations()
    k = 2
    sub = scaling.fit_subspace(acts, real, k)
    for t in range(acts.shape[1]):
        rows = acts[real[:, t], t].double().numpy()  # the prompts that reach position t
        mu = rows.mean(0)
        _, _, vt = np.linalg.svd(rows - mu, full_matrices=False)  # PCA: right singular vectors
        V = vt[:k].T  # [D, k]
        np.testing.assert_allclose(sub.mean[t].numpy(), mu, atol=1e-5)
        explicit = (acts[:, t].double().numpy() - mu) @ V @ V.T  # V Vᵀ (a − μ), every prompt
        np.testing.assert_allclose(sub.project(acts)[:, t].numpy(), explicit, atol=1e-4)


def test_mean_plus_high_plus_low_variance_parts_reconstruct_the_activation():
    acts, real = random_activations()
    sub = scaling.fit_subspace(acts, real, 3)
    mean, high, low = sub.split(acts)
    torch.testing.assert_close(mean + high + low, acts, atol=1e-5, rtol=0)
    # the two parts are orthogonal at every position, and low has no top-k component
    assert (high * low).sum(-1).abs().max() < 1e-4
    torch.testing.assert_close(sub.project(mean + low), torch.zeros_like(low), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaling.patched_part(acts, "full", None), acts)


# --------------------------------------------------------------------------- #
# Identities and the engine against hooks on full forwards
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("subspace", ["full", "high_variance", "low_variance"])
def test_scale_one_self_patch_and_resample_from_itself_change_nothing(tiny_llama, subspace):
    task = ioi(tiny_llama)
    self_pairs = make_pairs(task, "all", None, 0, self_patch=True)
    assert (self_pairs[:, 0] == self_pairs[:, 1]).all() and len(self_pairs) == task.n_prompts
    computer = ScaleJob(task, self_pairs, subspace=subspace, batch_size=4).bind(tiny_llama.weights)
    for node in (Node(0, 1), Node(1, None), Node(2, 3)):
        stats = computer.run_node(node, [1.0])
        assert stats.changed[0] == 0  # exactly: no answer flips
        assert abs(stats.metric_drop[0]) / stats.n_points < 1e-4
        stats = computer.run_node(node, [0.0])  # while a real ablation does change things
        assert abs(stats.metric_drop[0]) > 1e-3


@pytest.mark.parametrize(
    "name,subspace,source",
    [("tiny-gpt2", "full", "clean"), ("tiny-llama", "high_variance", "clean"),
     ("tiny-pythia", "low_variance", "corrupt"), ("smollm2-135m", "full", "clean")],
)
def test_engine_equals_hooked_full_forwards_pair_by_pair(loaded_model, name, subspace, source):
    """One (node, scale) at a time with hooks on hook_result / hook_mlp_out, as the usual scale-ablation loop does."""
    m = loaded_model(name)
    task = ioi(m, n=12)
    pairs = make_pairs(task, "task" if source == "corrupt" else "all", 8, 0, False)
    computer = ScaleJob(task, pairs, source=source, subspace=subspace, pca_k=2, batch_size=5).bind(m.weights)
    L, H = m.weights.cfg.n_layers, m.weights.cfg.n_heads
    nodes = [Node(1, H - 1), Node(0, None)] if name != "smollm2-135m" else [Node(L - 6, 2)]
    scales = [0.0, 1.0, 2.5]
    for node in nodes:
        stats = computer.run_node(node, scales)
        sub = computer.subspace_of(node) if subspace != "full" else None

        def replace(a, s, k, sub=sub):
            """Explicit V Vᵀ (a − μ) arithmetic, written out."""
            if sub is None:
                return k * s
            T = a.shape[0]
            mu, V = sub.mean[:T], sub.basis[:T]  # [T, D], [T, K, D]
            P = torch.einsum("tkd,tke->tde", V, V)  # V Vᵀ at each position
            high_a = torch.einsum("tde,te->td", P, a - mu)
            high_s = torch.einsum("tde,te->td", P, s - mu)
            if subspace == "high_variance":
                return a - high_a + k * high_s
            return mu + high_a + k * (s - mu - high_s)

        expected = reference.scale_patch_effects(
            m.bridge, task, pairs, node.layer, node.head, scales, replace,
            source_tokens=task.corrupt if source == "corrupt" else None,
        )
        for i, (k, (effect, drop, points)) in enumerate(zip(scales, expected)):
            assert stats.n_points == points
            assert stats.changed[i] / stats.n_points == pytest.approx(effect, abs=1e-9), (node, k)
            assert stats.metric_drop[i] == pytest.approx(drop, abs=1e-3 * max(1.0, abs(drop)) * points)


@pytest.mark.parametrize("source_is_base_run", [True, False])
def test_distinct_restarts_are_the_distinct_patches_written_out(source_is_base_run):
    """Against the patches listed one row at a time: (scale, base) at scale 0, nothing for a
    self-patch at scale 1 (when the source run is the base's), else (scale, base, source)."""
    pairs = torch.tensor([[0, 1], [0, 2], [1, 0], [1, 1], [2, 2], [2, 0], [0, 0]])
    scales = torch.tensor([2.0, 0.0, 1.0, 0.5])
    todo = scaling.distinct_restarts(pairs, scales, source_is_base_run)
    expected: dict[tuple, int] = {}
    for i, k in enumerate(scales.tolist()):
        for base, source in pairs.tolist():
            if source_is_base_run and k == 1 and base == source:
                continue
            key = (i, base) if k == 0 else (i, base, source)
            expected[key] = expected.get(key, 0) + 1
    got = {}
    for i, p, n in zip(todo.scale.tolist(), todo.pair.tolist(), todo.count.tolist()):
        base, source = pairs[p].tolist()
        key = (i, base) if scales[i] == 0 else (i, base, source)
        assert key not in got
        got[key] = n
    assert got == expected
    assert len(got) == 3 + 3 * 7 - (3 if source_is_base_run else 0)  # scale 0: bases 0, 1, 2; 3 self-pairs


def test_rows_sharing_a_patch_share_a_restart_and_give_the_pair_by_pair_numbers(tiny_llama):
    """Every ordered pair, so each base has several sources: scale 0 restarts once per base,
    and the sums still count every pair, as the usual scale-ablation loop's loop over pairs does."""
    task = ioi(tiny_llama, n=10)
    pairs = make_pairs(task, "all", None, 0, False)
    bases = len(set(pairs[:, 0].tolist()))
    assert bases < len(pairs)
    stats = ScaleJob(task, pairs, batch_size=4).bind(tiny_llama.weights).run_node(Node(1, 2), [0.0, 2.0])
    assert stats.n_restarts == bases + len(pairs)
    for i, (effect, drop, points) in enumerate(reference.scale_patch_effects(tiny_llama.bridge, task, pairs, 1, 2,
                                                                              [0.0, 2.0])):
        assert stats.n_points == points
        assert stats.changed[i] / points == pytest.approx(effect, abs=1e-9)
        assert stats.metric_drop[i] == pytest.approx(drop, abs=1e-3 * max(1.0, abs(drop)))
    self_pairs = make_pairs(task, "all", None, 0, self_patch=True)
    stats = ScaleJob(task, self_pairs, batch_size=4).bind(tiny_llama.weights).run_node(Node(1, 2), [1.0, 0.0])
    assert stats.n_restarts == len(self_pairs)  # scale 1 of a self-patch needs none
    assert stats.changed[0] == 0 and stats.metric_drop[0] == 0 and stats.n_pairs == len(self_pairs)


def test_next_token_task_reads_every_position(tiny_gpt2):
    task = build_task(TaskSpec("text"), tiny_gpt2.tokenizer, n_prompts=4, seq_len=12, seed=0)
    pairs = make_pairs(task, "all", 5, 0, False)
    stats = ScaleJob(task, pairs, batch_size=2).bind(tiny_gpt2.weights).run_node(Node(1, 0), [0.5])
    effect, drop, points = reference.scale_patch_effect(tiny_gpt2.bridge, task, pairs, 1, 0, 0.5)
    assert stats.n_points == points == 5 * 11
    assert stats.changed[0] / points == pytest.approx(effect)
    assert stats.metric_drop[0] == pytest.approx(drop, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("kind", ["next-token", "logit difference"])
def test_fast_readout_equals_full_logits_and_log_softmax(tiny_gpt2, kind):
    """The read-out (blocks of rows × vocabulary, a running max and sum of exponentials) against
    logits and log_softmax written out."""
    generator = torch.Generator().manual_seed(0)
    W_U = tiny_gpt2.weights.W_U.clone()
    W_U[:, 2500] = W_U[:, 7] = 50 * W_U[:, 7]  # a tie for the top in two vocabulary blocks: argmax takes the first
    b_U = torch.randn(tiny_gpt2.weights.cfg.d_vocab, generator=generator)
    b_U[2500] = b_U[7]
    w = dataclasses.replace(tiny_gpt2.weights, W_U=W_U, b_U=b_U)
    resid = torch.randn(5, 9, w.cfg.d_model, generator=generator) * 3
    positions = torch.tensor([0, 3, 8])
    correct = torch.randint(0, w.cfg.d_vocab, (5, 3), generator=generator)
    incorrect = torch.randint(0, w.cfg.d_vocab, (5, 3), generator=generator) if kind == "logit difference" else None
    # Blocks of 4 rows (of 15) and 1000 tokens: both loops run, and both end on a partial block.
    out = scaling.readout(w, resid, positions, correct, incorrect, rows_per_block=4, vocab_per_block=1000)
    logits = tf.normalize(w.cfg, resid[:, positions]) @ w.W_U + w.b_U
    if incorrect is None:
        expected = logits.log_softmax(-1).gather(-1, correct[..., None])[..., 0]
    else:
        expected = (logits.gather(-1, correct[..., None]) - logits.gather(-1, incorrect[..., None]))[..., 0]
    torch.testing.assert_close(out.metric, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.top1, logits.argmax(-1))
    assert (out.top1 == 7).any() and not (out.top1 == 2500).any()


def test_pairs_are_distinct_equal_length_and_sampled_deterministically(tiny_gpt2):
    task = ioi(tiny_gpt2, n=24)
    every = make_pairs(task, "all", None, 0, False)
    lengths = task.lengths.numpy()
    assert (every[:, 0] != every[:, 1]).all()
    assert (lengths[every[:, 0]] == lengths[every[:, 1]]).all()
    by_length = np.bincount(lengths)
    assert len(every) == sum(n * (n - 1) for n in by_length)  # every ordered pair, nothing else
    sample = make_pairs(task, "all", 10, 3, False)
    assert len(sample) == 10 and (make_pairs(task, "all", 10, 3, False) == sample).all()
    assert {tuple(p) for p in sample} <= {tuple(p) for p in every}
    assert (make_pairs(task, "task", None, 0, False) == np.stack([np.arange(24)] * 2, 1)).all()


# --------------------------------------------------------------------------- #
# The known circuit: the scale-ablation picture, through the CLI and a TL checkpoint
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def known(tmp_path_factory, loaded_model):
    tokenizer = loaded_model("tiny-gpt2").tokenizer
    root = tmp_path_factory.mktemp("known")
    model = known_circuit.write_checkpoint(root / "model", tokenizer)
    return model, known_circuit.write_task(root / "task.jsonl"), known_circuit.write_circuit(root / "circuit.json")


def run_scale(out, *extra, model="tiny-llama", executor="local"):
    args = ["--model", str(model), "--executor", executor, "--n-prompts", "8", "--batch-size", "4",
            "--max-pairs", "12", "--no-report", "--out", str(out), *extra]
    return scale.main(args)


def effects(out) -> pd.DataFrame:
    frame = pd.read_parquet(out / "effects").drop(columns=["shard"])
    return frame.sort_values(["node", "scale"]).reset_index(drop=True)


def test_known_circuit_shows_the_scale_ablation_picture(known, tmp_path, capsys):
    model, task, circuit = known
    out = tmp_path / "o"
    assert scale.main(["--model", str(model), "--task", str(task), "--circuit", str(circuit), "--executor",
                       "local", "--no-report", "--out", str(out)]) == 0
    printed = capsys.readouterr()  # the circuit's nodes, at the start and in the summary
    assert f"circuit {circuit}: {len(known_circuit.CIRCUIT)} nodes, L0H0, mlp1" in printed.err
    assert f"The circuit {circuit}: {len(known_circuit.CIRCUIT)} nodes, {len(known_circuit.CIRCUIT)} swept" in printed.out
    table = effects(out).pivot(index="node", columns="scale", values="causal_effect")
    status = effects(out).drop_duplicates("node").set_index("node")["status"]
    assert set(status[status == "in_circuit"].index) == set(known_circuit.CIRCUIT)
    outside = table[status == "not_in_circuit"]
    assert len(outside) == 4
    assert (outside[1.0] == 0).all()  # no effect at scale 1 ...
    assert (outside[[0.0, 5.0, 10.0]] >= 0.95).all().all()  # ... but the model breaks off-distribution
    inside = table[status == "in_circuit"]
    assert (inside >= 0.85).all().all()  # high at every scale under resample ablation
    change = effects(out).pivot(index="node", columns="scale", values="metric_change")
    assert change.loc[outside.index, 1.0].abs().max() < 1e-5
    assert (change.loc[inside.index, 1.0] > 0.5).all()


def test_tl_checkpoint_directory_loads_through_boot_native(known, loaded_model):
    from sweeps.core import transformer as tf
    from sweeps.runtime import loading, models

    model, _, _ = known
    info = models.describe_model(str(model))
    assert info.kind == "checkpoint" and (info.n_layers, info.n_heads) == (2, 2)
    bridge = loading.load_bridge(info)
    loaded = loading.load_model(info)
    tokens = bridge.to_tokens([" red cat", " pink dog"])
    ours = tf.unembed(loaded.weights, tf.run(loaded.weights, tokens).resid_final)
    torch.testing.assert_close(ours.log_softmax(-1), bridge(tokens).log_softmax(-1), atol=1e-4, rtol=0)
    numbers = [tokenizer_id(bridge, w) for w in known_circuit.NUMBERS]
    assert ours[:, -1].argmax(-1).tolist() == [numbers[0], numbers[5]]  # red -> one, pink -> six


def tokenizer_id(bridge, word):
    [token] = bridge.tokenizer(word, add_special_tokens=False)["input_ids"]
    return token


# --------------------------------------------------------------------------- #
# The sweep: executors agree, resume, results
# --------------------------------------------------------------------------- #


def test_ray_pool_equals_local_scale_sweep(tmp_path, ray_session):
    extra = ["--nodes", "L0H1,L1,mlp2", "--scales", "0,1,5", "--subspace", "high_variance"]
    assert run_scale(tmp_path / "local", *extra) == 0
    assert run_scale(tmp_path / "ray", *extra, executor="ray") == 0
    local, ray_ = effects(tmp_path / "local"), effects(tmp_path / "ray")
    assert len(local) == (1 + 5 + 1) * 3
    pd.testing.assert_frame_equal(local, ray_, check_exact=False, atol=1e-5, rtol=1e-5)  # thread counts differ


@pytest.mark.slow
def test_interrupted_scale_sweep_resumes_only_missing_shards(tmp_path, monkeypatch, capsys):
    extra = ["--nodes", "L1,L2H0", "--scales", "0,0.5,1,2", "--scales-per-shard", "2"]
    assert run_scale(tmp_path / "reference", *extra) == 0
    calls, original = [], ScaleJob.run_shard

    def counting(self, shard, fail_after=None):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.append(shard.id)
        return original(self, shard)

    monkeypatch.setattr(ScaleJob, "run_shard", lambda self, shard: counting(self, shard, fail_after=1))
    out = tmp_path / "o"
    assert run_scale(out, *extra) == 130
    assert "Resume with" in capsys.readouterr().err and calls == ["L01H0-3M_S0-1"]
    monkeypatch.setattr(ScaleJob, "run_shard", lambda self, shard: counting(self, shard))
    assert run_scale(out, *extra) == 0
    assert calls[1:] == ["L01H0-3M_S2-3", "L02H0_S0-1", "L02H0_S2-3"]
    got = effects(out)
    assert not got.duplicated(["node", "scale"]).any()
    pd.testing.assert_frame_equal(effects(tmp_path / "reference"), got)


def test_results_rows_and_provenance(tmp_path):
    out = tmp_path / "o"
    assert run_scale(out, "--nodes", "L2", "--scales", "0,1", "--circuit", str(_circuit(tmp_path, ["2.1", "mlp2"]))) == 0
    got = effects(out)
    assert list(got.columns[:13]) == ["node", "layer", "head", "kind", "scale", "subspace", "self_patch", "status",
                                      "causal_effect", "metric_change", "metric_drop", "n_pairs", "n_points"]
    assert {"model", "weight_hash", "task", "task_hash", "seed", "code_version", "spec_id"} <= set(got.columns)
    mlp = got[got.node == "mlp2"]
    assert mlp["head"].isna().all() and (mlp.kind == "mlp").all() and (mlp.status == "in_circuit").all()
    assert set(got[got.status == "in_circuit"].node) == {"L2H1", "mlp2"}
    assert got.n_pairs.nunique() == 1 and 0 < got.n_pairs.iloc[0] <= 12 and got.causal_effect.between(0, 1).all()
    spec = json.loads((out / "sweep.json").read_text())
    assert spec["circuit"]["nodes"] == ["L2H1", "mlp2"] and spec["scales"] == [0.0, 1.0]


def _circuit(tmp_path: Path, nodes, suffix=".json") -> Path:
    path = tmp_path / f"circuit{suffix}"
    path.write_text(json.dumps(nodes) if suffix == ".json" else "nodes:\n" + "".join(f"  - '{n}'\n" for n in nodes))
    return path


def test_report_from_results_writes_figures_and_wandb(tmp_path):
    from analysis.__main__ import main as analysis_main
    from tests.wandb_records import history_and_summary

    out = tmp_path / "o"
    assert run_scale(out, "--scales", "0,1,5", "--model", "tiny-gpt2") == 0
    assert analysis_main(["scale", str(out), "--wandb", "offline"]) == 0
    for name in ("causal_effect", "metric_change", "causal_effect_heatmap"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
        assert "plotly" in (out / "plots" / f"{name}.html").read_text()
    [run] = list(Path(tmp_path / "wandb").rglob("run-*.wandb"))
    history, summary, artifacts = history_and_summary(run)
    for key, kind in {"effects": "table-file", "effects_wide": "table-file",
                      "plots/causal_effect": "image-file", "html/causal_effect_heatmap": "html-file"}.items():
        assert history.get(f"{key}/_type") == f'"{kind}"', sorted(history)
    assert summary["n_nodes"] == "15" and summary["n_scales"] == "3"
    assert any(name.startswith("scale-results-") for name in artifacts)
