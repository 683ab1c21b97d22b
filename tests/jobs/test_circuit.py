"""Circuit evaluation (sweeps/core/circuit_eval.py, sweeps/circuit.py) against hooks on full forwards."""

import json
import random

import numpy as np
import pytest
import torch

from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from sweeps.runtime import models
from tasks import build_task, check_task
from tests import reference


def _task(tokenizer, n=4):
    return build_task(check_task("ioi"), tokenizer, n, 0)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia", "tiny-gemma2", "tiny-olmo2", "tiny-qwen3"])
def test_empty_circuit_is_the_corrupt_run_and_full_circuit_the_clean_run(loaded_model, name):
    """At both levels, on sequential, parallel, grouped-query and post-norm (Gemma 2, OLMo 2) models."""
    m = loaded_model(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    runner = CE.CircuitRunner(m.weights, graph, task)
    assert abs(runner.clean_metric - runner.corrupt_metric) > 1e-3
    none, every = set(), set(graph.upstream)
    for mask in (torch.zeros(graph.n_edges, dtype=torch.bool), CE.node_edge_mask(graph, none)):
        assert runner.metric(mask) == pytest.approx(runner.corrupt_metric, abs=1e-4)
    for mask in (torch.ones(graph.n_edges, dtype=torch.bool), CE.node_edge_mask(graph, every)):
        assert runner.metric(mask) == pytest.approx(runner.clean_metric, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_node_circuits_equal_hooks_that_patch_the_nodes_outside(loaded_model, name):
    m = loaded_model(name)
    task = _task(m.tokenizer)
    graph = A.build_graph(m.weights.cfg)
    runner = CE.CircuitRunner(m.weights, graph, task)
    rng = random.Random(0)
    for trial in range(3):
        nodes = {u for u in graph.upstream if rng.random() < 0.5}
        ours = runner.metric(CE.node_edge_mask(graph, nodes))
        expected = reference.node_circuit_metric_by_hooks(m.bridge, task, nodes, list(graph.upstream))
        assert ours == pytest.approx(expected, rel=1e-4, abs=1e-4), nodes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia"])
def test_edge_circuits_equal_a_per_input_reference(loaded_model, name):
    """Random edge circuits (sequential, grouped-query, parallel) against hooks that edit each
    split input by the out-of-circuit upstream nodes' (this run − corrupt run) outputs."""
    m = loaded_model(name)
    task = _task(m.tokenizer, n=3)
    graph = A.build_graph(m.weights.cfg)
    runner = CE.CircuitRunner(m.weights, graph, task)
    triples = [(u, d.name, d.input) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
    gen = torch.Generator().manual_seed(0)
    for keep in (0.3, 0.7):
        mask = torch.rand(graph.n_edges, generator=gen) < keep
        ours = runner.metric(mask)
        expected = reference.circuit_metric_by_hooks(m.bridge, task, graph, {t for t, k in zip(triples, mask) if k})
        assert ours == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert abs(ours - runner.clean_metric) > 1e-4 and abs(ours - runner.corrupt_metric) > 1e-4


def test_areas_of_known_curves():
    assert CE.area_scores([0, 0.5, 1], [1, 1, 1]) == pytest.approx((1.0, 0.0))
    assert CE.area_scores([0, 1], [0, 1]) == pytest.approx((0.5, 0.5))
    cpr, cmd = CE.area_scores([1, 0, 0.5], [2, 0, 1])  # unsorted input; overshoot counts in CMD
    assert cpr == pytest.approx(1.0) and cmd == pytest.approx(0.5)
    assert np.isnan(CE.faithfulness(1.0, 2.0, 2.0))


def test_top_mask_picks_the_largest_magnitudes():
    mask = CE.top_mask(torch.tensor([0.1, -3.0, 2.0, float("nan"), 0.5]), 2)
    assert mask.tolist() == [False, True, True, False, False]


# --------------------------------------------------------------------------- #
# The sweep: curves from attribution results, resume, the report
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_circuit_sweep_curves_resume_and_report(tmp_path, tiny_llama, capsys):
    import pandas as pd

    from sweeps import circuit
    from tests.core.test_attribution import run_attribution

    eap, ig = tmp_path / "eap", tmp_path / "ig"
    assert run_attribution(eap, "--verify-top", "0") == 0
    assert run_attribution(ig, "--verify-top", "0", "--method", "eap-ig-inputs", "--ig-steps", "2") == 0
    out = tmp_path / "circuit"
    args = ["--from", str(eap), str(ig), "--executor", "local", "--out", str(out), "--sizes", "0.01,0.1,0.5,1",
            "--wandb", "offline"]
    assert circuit.main(args) == 0
    printed = capsys.readouterr()
    assert "eap (edges): CPR" in printed.out and "eap-ig-inputs (2 steps) (edges): CPR" in printed.out
    assert (out / "plots" / "faithfulness.png").is_file() and (out / "plots" / "faithfulness.html").is_file()
    faith = pd.read_parquet(out / "faithfulness")
    assert len(faith) == 8 and set(faith.circuit) == {"eap", "eap-ig-inputs (2 steps)"}
    # Model and task came from the results; 12 prompts as they had.
    graph = A.build_graph(tiny_llama.weights.cfg)
    runner = CE.CircuitRunner(tiny_llama.weights, graph, _task(tiny_llama.tokenizer, n=12))
    full = faith[faith["size"] == 1.0]
    np.testing.assert_allclose(full.faithfulness, 1.0, atol=1e-4)
    # One point of the curve, recomputed directly: the top 10 % of edges by |EAP score|.
    edges = pd.read_parquet(eap / "edges")
    score = {(u, d, i): s for u, d, i, s in zip(edges.upstream, edges.downstream, edges.input, edges.score)}
    names = [(u, d.name, d.input) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
    k = round(0.1 * graph.n_edges)
    mask = CE.top_mask(torch.tensor([score[n] for n in names]), k)
    expected = CE.faithfulness(runner.metric(mask), runner.clean_metric, runner.corrupt_metric)
    row = faith[(faith.circuit == "eap") & (faith["size"] == 0.1)].iloc[0]
    assert row.k == k and row.n_edges == k
    assert row.faithfulness == pytest.approx(expected, rel=1e-4, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert [c["circuit"] for c in summary["curves"]] == ["eap", "eap-ig-inputs (2 steps)"]
    curve = faith[faith.circuit == "eap"].sort_values("size")
    expected_cpr, expected_cmd = CE.area_scores([0, *curve["size"]], [0, *curve.faithfulness])
    assert summary["curves"][0]["cpr"] == pytest.approx(expected_cpr)
    assert summary["curves"][0]["cmd"] == pytest.approx(expected_cmd)
    # Re-running resumes: nothing left to run, the same results.
    assert circuit.main(args + ["--no-report"]) == 0
    assert "0 to run" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_parquet(out / "faithfulness"), faith)
    # The report again from the results alone, as users run it (python -m, a process of its own).
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "analysis", "circuit", str(out), "--wandb", "disabled"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eap (edges): CPR" in done.stdout


def test_a_circuit_file_of_nodes_or_edges(tmp_path, tiny_llama, capsys):
    """--circuit FILE: one circuit, evaluated as the runner evaluates it."""
    import pandas as pd

    from sweeps import circuit

    graph = A.build_graph(tiny_llama.weights.cfg)
    runner = CE.CircuitRunner(tiny_llama.weights, graph, _task(tiny_llama.tokenizer, n=8))
    for content, mask in (
        ('["embed", "L0H1", "mlp1", "L2H*"]',
         CE.node_edge_mask(graph, {"embed", "L0H1", "mlp1", *(f"L2H{h}" for h in range(4))})),
        ("edges:\n  - embed->L1H0.q\n  - L0H2->L1KV1.k\n  - mlp1->resid_final\n",
         None),
    ):
        path = tmp_path / ("c.json" if content.startswith("[") else "c.yaml")
        path.write_text(content)
        out = tmp_path / path.stem / path.suffix[1:]
        assert circuit.main(["--circuit", str(path), "--model", "tiny-llama", "--n-prompts", "8",
                             "--executor", "local", "--out", str(out), "--no-report"]) == 0
        row = pd.read_parquet(out / "faithfulness").iloc[0]
        if mask is None:
            triples = [(u, d.name, d.input) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
            wanted = {("embed", "L1H0", "q"), ("L0H2", "L1KV1", "k"), ("mlp1", "resid_final", "resid")}
            mask = torch.tensor([t in wanted for t in triples])
            assert row.level == "edge" and row.n_edges == 3 and row.n_nodes == 3
        else:
            assert row.level == "node" and row.n_nodes == 7
        expected = CE.faithfulness(runner.metric(mask), runner.clean_metric, runner.corrupt_metric)
        assert row.faithfulness == pytest.approx(expected, rel=1e-4, abs=1e-4)
    capsys.readouterr()


# --------------------------------------------------------------------------- #
# MIB's evaluation (--sizes mib): counts, pruning, areas
# --------------------------------------------------------------------------- #

# MIB's ``percentages`` (hannamw/MIB-circuit-track, MIB_circuit_track/evaluation.py), written out
MIB = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


def _mib_formula(signed, absolute):
    """MIB's areas as its evaluation.py writes them: a loop of trapezoids over the raw fractions."""
    cpr = cmd = 0.0
    for i in range(len(MIB) - 1):
        p1, p2 = MIB[i], MIB[i + 1]
        cpr += (p2 - p1) * (signed[i] + signed[i + 1]) / 2
        cmd += (p2 - p1) * (abs(1 - absolute[i]) + abs(1 - absolute[i + 1])) / 2
    return cpr, cmd


def test_mib_areas_equal_mibs_formula():
    assert CE.MIB_FRACTIONS == MIB
    rng = np.random.default_rng(0)
    for _ in range(20):
        signed, absolute = rng.uniform(-0.5, 1.5, 10), rng.uniform(-0.5, 1.5, 10)  # overshoot and undershoot
        assert CE.mib_areas(MIB, signed, absolute) == pytest.approx(_mib_formula(signed, absolute), abs=1e-12)
    # Not ours: no (0, 0) start, and each area from its own ranking.
    flat = np.full(10, 0.5)
    assert CE.mib_areas(MIB, flat, flat) == pytest.approx((0.5 * 0.999, 0.5 * 0.999))
    assert CE.area_scores([0, *MIB], [0, *flat])[0] != pytest.approx(0.5 * 0.999)
    assert CE.mib_areas(MIB, np.ones(10), np.zeros(10)) == pytest.approx((0.999, 0.999))


@pytest.mark.parametrize("n", [7, 99, 1000, 32491, 70651])
def test_mib_counts_are_int_of_fraction_times_scored_edges(n):
    from sweeps.jobs.circuit import Curve, plan_circuits

    curve = Curve("eap", "dir", "edge", scores=tuple(float(i) for i in range(n)))
    shards = plan_circuits([curve], list(MIB), set(), mib=True)
    assert len(shards) == 20 and len({s.id for s in shards}) == 20
    for ranking in ("signed", "absolute"):
        mine = [s for s in shards if s.ranking == ranking]
        assert [s.size for s in mine] == list(MIB) and all(s.mib for s in mine)
        assert [s.k for s in mine] == [int(p * n) for p in MIB]  # truncated: 0 edges at 0.1 % of 7


def test_mib_rankings_before_pruning():
    """The circuit at k holds the k top edges by score (signed) or by |score| (absolute)."""
    from sweeps.jobs.circuit import Curve, circuit_mask

    graph = A.build_graph(A.GraphConfig(2, 2, 2))
    scores = torch.linspace(-1, 1, graph.n_edges)
    scores[3] = -5.0  # first by |score|, last by score
    curve = Curve("eap", "dir", "edge", scores=tuple(scores.tolist()))
    for k in (1, 5, 40):
        signed, _, n_signed = circuit_mask(graph, curve, k, "signed")
        absolute, _, n_absolute = circuit_mask(graph, curve, k, "absolute")
        assert n_signed == n_absolute == k
        assert set(signed.nonzero()[:, 0].tolist()) == set(torch.argsort(-scores)[:k].tolist())
        assert set(absolute.nonzero()[:, 0].tolist()) == set(torch.argsort(-scores.abs())[:k].tolist())
        assert not signed[3] and absolute[3]


def _reachable_edges(graph, n_heads, n_kv_heads, kept):
    """The edges of ``kept`` (graph-order triples) on a path from the embeddings to the final
    stream, by a plain graph search: a q input feeds its head, a k or v input of a key/value
    head every query head of its group, an MLP's input the MLP, the final stream the logits."""
    group = n_heads // n_kv_heads

    def children(d):
        if d.input == "resid":
            return ["logits"]
        if d.input in ("k", "v"):
            return [f"L{d.layer}H{h}" for h in range(n_heads) if h // group == d.head]
        return [d.name]  # q: L1H0; mlp: mlp1

    edges = [(u, d) for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
    chosen = [(u, d) for (u, d), k in zip(edges, kept) if k]
    forward = {"embed"}
    todo = ["embed"]
    while todo:
        node = todo.pop()
        for u, d in chosen:
            for c in children(d):
                if u == node and c not in forward:
                    forward.add(c)
                    todo.append(c)
    backward = {"logits"}
    todo = ["logits"]
    while todo:
        node = todo.pop()
        for u, d in chosen:
            if node in children(d) and u not in backward:
                backward.add(u)
                todo.append(u)
    return [bool(k) and u in forward and any(c in backward for c in children(d)) for (u, d), k in zip(edges, kept)]


def test_pruning_keeps_exactly_the_edges_from_the_input_to_the_logits():
    # By hand, on 2 layers of 2 query heads sharing 1 key/value head, with MLPs.
    graph = A.build_graph(A.GraphConfig(2, 2, 1))
    names = [f"{u}->{d.name}.{d.input}" for d, p in zip(graph.downstream, graph.prefix) for u in graph.upstream[:p]]
    kept = {
        "embed->L0H0.q", "L0H0->mlp0.mlp", "mlp0->resid_final.resid",  # a path
        "embed->L1KV0.k", "L1H1->resid_final.resid",  # k of the shared key/value head reaches L1H1
    }
    dropped = {
        "L0H1->resid_final.resid",  # L0H1: nothing of the circuit enters it
        "L0H1->L1H1.q",  # from it
        "embed->L1H0.q", "mlp0->L1H0.q",  # into L1H0, which leads nowhere
        "embed->mlp1.mlp",  # mlp1 leads nowhere
    }
    assert kept | dropped <= set(names)
    mask = torch.tensor([n in kept | dropped for n in names])
    pruned = CE.prune_mask(graph, mask)
    assert {n for n, k in zip(names, pruned.tolist()) if k} == kept
    # Against the plain search, on random circuits of every shape: sequential, parallel,
    # grouped-query, attention-only.
    gen = torch.Generator().manual_seed(0)
    for shape in ((2, 2, 1), (3, 4, 2), (3, 2, 2, False, True), (2, 3, 3, True)):
        graph = A.build_graph(A.GraphConfig(*shape))
        for density in (0.02, 0.05, 0.1, 0.3):
            for _ in range(5):
                mask = torch.rand(graph.n_edges, generator=gen) < density
                expected = _reachable_edges(graph, shape[1], shape[2], mask.tolist())
                assert CE.prune_mask(graph, mask).tolist() == expected, (shape, density)
    full = torch.ones(graph.n_edges, dtype=torch.bool)
    assert CE.prune_mask(graph, full).all() and not CE.prune_mask(graph, ~full).any()


def test_pruning_changes_the_count_not_the_metric(tiny_llama):
    """Without post-norms an edge off every input-to-logits path carries nothing the metric reads."""
    graph = A.build_graph(tiny_llama.weights.cfg)
    runner = CE.CircuitRunner(tiny_llama.weights, graph, _task(tiny_llama.tokenizer))
    gen = torch.Generator().manual_seed(1)
    for density in (0.2, 0.5):  # sparser circuits of its 190 edges prune to nothing
        mask = torch.rand(graph.n_edges, generator=gen) < density
        pruned = CE.prune_mask(graph, mask)
        assert 0 < pruned.sum() < mask.sum()
        assert runner.metric(pruned) == pytest.approx(runner.metric(mask), rel=1e-5, abs=1e-5)


def test_mib_sweep_on_tiny_llama3(tmp_path, loaded_model, capsys):
    """--sizes mib: MIB's counts, pruned circuits, both rankings, MIB's areas in summary.json
    and printed beside ours."""
    import pandas as pd

    from sweeps import circuit
    from tests.core.test_attribution import run_attribution

    eap, out = tmp_path / "eap", tmp_path / "circuit"
    assert run_attribution(eap, "--verify-top", "0", model="tiny-llama3", n=4) == 0
    args = ["--from", str(eap), "--sizes", "mib", "--executor", "local", "--out", str(out), "--wandb", "disabled"]
    assert circuit.main(args) == 0
    printed = capsys.readouterr().out
    assert "eap (edges): CPR" in printed and "eap (edges), MIB's evaluation: CPR" in printed
    assert (out / "plots" / "faithfulness.png").is_file()

    m = loaded_model("tiny-llama3")
    graph = A.build_graph(m.weights.cfg)
    n = graph.n_edges
    faith = pd.read_parquet(out / "faithfulness")
    assert len(faith) == 20 and set(faith.ranking) == {"signed", "absolute"}
    edges = pd.read_parquet(eap / "edges")
    score = {(u, d, i): s for u, d, i, s in zip(edges.upstream, edges.downstream, edges.input, edges.score)}
    scores = torch.tensor([score[(u, d.name, d.input)] for d, p in zip(graph.downstream, graph.prefix)
                           for u in graph.upstream[:p]], dtype=torch.float64)
    runner = CE.CircuitRunner(m.weights, graph, _task(m.tokenizer, n=4))
    for ranking in ("signed", "absolute"):
        rows = faith[faith.ranking == ranking].sort_values("size")
        assert rows["size"].tolist() == list(MIB)
        assert rows.k.tolist() == [int(p * n) for p in MIB]  # before pruning
        masks = [CE.prune_mask(graph, CE.top_mask(scores, int(p * n), ranking == "absolute")) for p in MIB]
        assert rows.n_edges.tolist() == [int(mask.sum()) for mask in masks]  # after pruning
        assert rows.n_edges.iloc[-1] == n and rows.faithfulness.iloc[-1] == pytest.approx(1.0, abs=1e-4)
        mask = masks[MIB.index(0.1)]  # one point, recomputed directly
        expected = CE.faithfulness(runner.metric(mask), runner.clean_metric, runner.corrupt_metric)
        assert rows.faithfulness.iloc[MIB.index(0.1)] == pytest.approx(expected, rel=1e-4, abs=1e-4)

    summary = json.loads((out / "summary.json").read_text())
    block = summary["curves"][0]["mib"]
    assert block["fractions"] == list(MIB)
    for ranking in ("signed", "absolute"):
        rows = faith[faith.ranking == ranking].sort_values("size")
        np.testing.assert_allclose(block[ranking], rows.faithfulness)
        assert block["n_edges"][ranking] == rows.n_edges.tolist()
    cpr, cmd = _mib_formula(block["signed"], block["absolute"])
    assert block["cpr"] == pytest.approx(cpr) and block["cmd"] == pytest.approx(cmd)
    assert f"MIB's evaluation: CPR {cpr:.3f} (top by score), CMD {cmd:.3f}" in printed
    # Ours beside it: the curve by |score| from (0, 0).
    ours = faith[faith.ranking == "absolute"].sort_values("size")
    assert summary["curves"][0]["cpr"] == pytest.approx(CE.area_scores([0, *MIB], [0, *ours.faithfulness])[0])


# --------------------------------------------------------------------------- #
# EAP-IG graph files through the commands (export-graph, --circuit FILE.json, --from FILE.json)
# --------------------------------------------------------------------------- #


def test_graph_files_export_and_import_through_the_commands(tmp_path, tiny_llama, capsys, monkeypatch):
    """A grouped-query model (tiny-llama: 4 query heads, 2 key/value heads): attribution with
    --split-kv stores each query head's k/v scores, which add up to our key/value edges;
    export-graph writes EAP-IG's graph; --from the file ranks exactly as --from the result;
    --circuit the file evaluates the file's circuit mapped onto ours; a result without
    --split-kv and a file of another shape are one-line errors (exit 2)."""
    import pandas as pd

    from analysis.attribution import load_attribution_results
    from sweeps import circuit
    from sweeps.__main__ import main as interp_sweeps
    from tests.core.test_attribution import run_attribution
    from tests.core.test_graph_files import eap_ig_file, our_edge

    res = tmp_path / "eap"
    assert run_attribution(res, "--verify-top", "0", "--split-kv", n=8) == 0
    results = load_attribution_results(res)
    G = tiny_llama.weights.cfg.group_size
    assert G == 2 and len(results.kv_heads) == len(A.query_head_kv_edges(A.build_graph(tiny_llama.weights.cfg)))
    kv = results.kv_heads.assign(
        downstream=[f"L{h[1:].split('H')[0]}KV{int(h.split('H')[1]) // G}" for h in results.kv_heads["head"]]
    ).groupby(["upstream", "downstream", "input"])["score"].sum()
    shared = results.edges.set_index(["upstream", "downstream", "input"])["score"].loc[kv.index]
    np.testing.assert_allclose(kv.to_numpy(), shared.to_numpy(), rtol=1e-4, atol=1e-5)  # float32 products

    ranking, chosen = tmp_path / "ranking.json", tmp_path / "circuit.json"
    assert interp_sweeps(["export-graph", str(res), str(ranking)]) == 0
    assert interp_sweeps(["export-graph", str(res), str(chosen), "--size", "0.2"]) == 0
    capsys.readouterr()
    data = json.loads(ranking.read_text())
    assert data["cfg"] == {"n_layers": 3, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 64}
    assert not any(e["in_graph"] for e in data["edges"].values()) and data["nodes"]["logits"]["in_graph"]
    per_head = {(u, h, i): s for u, h, i, s in results.kv_heads[["upstream", "head", "input", "score"]].itertuples(False)}
    assert data["edges"]["a0.h3->a2.h1<v>"]["score"] == pytest.approx(per_head[("L0H3", "L2H1", "v")], rel=1e-12)

    out = tmp_path / "curves"
    assert circuit.main(["--from", str(res), str(ranking), "--sizes", "0.1,0.5", "--executor", "local",
                         "--out", str(out), "--no-report"]) == 0
    faith = pd.read_parquet(out / "faithfulness").sort_values(["size", "circuit"])
    assert set(faith.circuit) == {"eap", "ranking.json (EAP-IG graph)"}
    by_curve = {c: f.sort_values("size") for c, f in faith.groupby("circuit")}
    np.testing.assert_allclose(by_curve["eap"].faithfulness, by_curve["ranking.json (EAP-IG graph)"].faithfulness,
                               rtol=1e-9, atol=1e-9)

    out = tmp_path / "one"
    assert circuit.main(["--circuit", str(chosen), "--model", "tiny-llama", "--n-prompts", "8",
                         "--executor", "local", "--out", str(out), "--no-report"]) == 0
    graph = A.build_graph(tiny_llama.weights.cfg)
    wanted = {our_edge(n, G) for n, e in json.loads(chosen.read_text())["edges"].items() if e["in_graph"]}
    mask = torch.tensor([(u, d.name, d.input) in wanted for d, p in zip(graph.downstream, graph.prefix)
                         for u in graph.upstream[:p]])
    runner = CE.CircuitRunner(tiny_llama.weights, graph, _task(tiny_llama.tokenizer, n=8))
    row = pd.read_parquet(out / "faithfulness").iloc[0]
    assert row.n_edges == int(mask.sum()) > 0
    assert row.faithfulness == pytest.approx(
        CE.faithfulness(runner.metric(mask), runner.clean_metric, runner.corrupt_metric), rel=1e-4, abs=1e-4)
    capsys.readouterr()

    plain = tmp_path / "plain"
    assert run_attribution(plain, "--verify-top", "0", n=4) == 0
    capsys.readouterr()
    from sweeps.runtime import loading

    monkeypatch.setattr(loading, "load_hf_model", lambda *a, **k: pytest.fail("weights loaded"))
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps(eap_ig_file({"n_layers": 3, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32},
                                           lambda n: 1.0, lambda n: True)))
    for args in (["--circuit", str(gpt2)], ["--from", str(gpt2)]):
        assert circuit.main([*args, "--model", "tiny-llama", "--n-prompts", "8", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is for another model shape" in err[0] and "d_model=32" in err[0]
    assert interp_sweeps(["export-graph", str(plain), str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--split-kv" in err[0]


def test_a_circuit_without_the_embeddings_warns_and_each_circuit_has_its_own_directory(tmp_path, tiny_llama,
                                                                                       capsys, monkeypatch):
    """A node circuit without embed is the corrupt run (faithfulness exactly 0): one warning
    line says so. Two circuits on the same model and task go to two default directories,
    named after each file, so the second never resumes (or deletes) the first."""
    import pandas as pd

    from sweeps import circuit

    monkeypatch.chdir(tmp_path)
    (tmp_path / "heads.json").write_text('["L0H1", "mlp1", "L2H*"]')
    (tmp_path / "with_embed.json").write_text('["embed", "L0H1", "mlp1", "L2H*"]')
    common = ["--model", "tiny-llama", "--n-prompts", "4", "--executor", "local", "--no-report"]
    assert circuit.main(["--circuit", "heads.json", *common]) == 0
    err = capsys.readouterr().err
    assert "warning: heads.json has no node embed" in err and "faithfulness is 0 by construction" in err
    assert circuit.main(["--circuit", "with_embed.json", *common]) == 0
    assert "has no node embed" not in capsys.readouterr().err
    dirs = sorted(p.name for p in (tmp_path / "results" / "circuit").iterdir())
    assert len(dirs) == 2 and dirs[0].startswith("tiny-llama__ioi__heads-") and dirs[1].startswith(
        "tiny-llama__ioi__with_embed-")
    zero = pd.read_parquet(tmp_path / "results" / "circuit" / dirs[0] / "faithfulness").faithfulness.iloc[0]
    assert zero == pytest.approx(0.0, abs=1e-5)  # 0 up to float32 rounding of the corrections
    # the same circuit under a chosen metric: a directory of its own again
    assert circuit.main(["--circuit", "with_embed.json", *common, "--metric", "prob_diff"]) == 0
    dirs = sorted(p.name for p in (tmp_path / "results" / "circuit").iterdir())
    assert len(dirs) == 3 and dirs[2].startswith("tiny-llama__ioi__with_embed-") and dirs[2].endswith("__prob_diff")
