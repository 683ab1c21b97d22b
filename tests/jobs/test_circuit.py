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
