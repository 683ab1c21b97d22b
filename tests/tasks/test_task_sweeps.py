"""Every template task (and a chosen metric) runs through every sweep on a tiny model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sweeps import attribution, backup, circuit, scale


def _sweeps(tmp_path, task: str, *metric: str, method: str = "eap") -> dict:
    common = ["--model", "tiny-llama", "--task", task, "--n-prompts", "4", "--batch-size", "4", "--executor", "local",
              "--no-report", *metric]
    assert backup.main([*common, "--out", str(tmp_path / "backup")]) == 0
    assert scale.main([*common, "--max-pairs", "4", "--out", str(tmp_path / "scale")]) == 0
    assert attribution.main([*common, "--method", method, "--verify-top", "2", "--out", str(tmp_path / "attr")]) == 0
    assert circuit.main(["--from", str(tmp_path / "attr"), "--sizes", "0.1,1", "--executor", "local", "--no-report",
                         "--out", str(tmp_path / "circuit")]) == 0
    return json.loads((tmp_path / "circuit" / "sweep.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("task", ["greater-than", "addition", "subtraction", "mcqa"])
def test_template_tasks_run_through_every_sweep(tmp_path, task):
    spec = _sweeps(tmp_path, task)
    assert spec["task"] == task and spec["metric"] == "logit_diff"
    faith = pd.read_parquet(tmp_path / "circuit" / "faithfulness")
    assert faith[faith["size"] == 1.0].faithfulness.to_numpy() == pytest.approx(1.0, abs=1e-4)  # the full circuit


@pytest.mark.slow
@pytest.mark.parametrize("task,metric,method", [("greater-than", "greater_than", "eap"),
                                                ("mcqa", "kl", "eap-ig-inputs")])
def test_a_chosen_metric_runs_through_every_sweep(tmp_path, task, metric, method):
    spec = _sweeps(tmp_path, task, "--metric", metric, method=method)
    assert spec["metric"] == metric  # the circuit evaluation took the ranking's metric
    repair = pd.read_parquet(tmp_path / "backup" / "self_repair")
    assert repair.total_effect_metric.notna().all()
    attr = json.loads((tmp_path / "attr" / "sweep.json").read_text())
    assert attr["metric"] == metric


@pytest.mark.slow
def test_a_chosen_metric_runs_on_a_family_without_a_fast_path(tmp_path):
    """StableLM (the bridge path): every sweep reads the chosen metric."""
    common = ["--model", "tiny-stablelm", "--task", "greater-than", "--n-prompts", "4", "--executor", "local",
              "--no-report", "--metric", "prob_diff"]
    assert scale.main([*common, "--nodes", "L1H0", "--scales", "0,1", "--out", str(tmp_path / "scale")]) == 0
    assert attribution.main([*common, "--verify-top", "2", "--out", str(tmp_path / "attr")]) == 0
    assert circuit.main(["--from", str(tmp_path / "attr"), "--sizes", "0.1,1", "--executor", "local", "--no-report",
                         "--out", str(tmp_path / "circuit")]) == 0
    assert json.loads((tmp_path / "circuit" / "sweep.json").read_text())["metric"] == "prob_diff"
    faith = pd.read_parquet(tmp_path / "circuit" / "faithfulness")
    assert faith[faith["size"] == 1.0].faithfulness.to_numpy() == pytest.approx(1.0, abs=1e-3)
    assert backup.main([*common, "--heads", "L1", "--out", str(tmp_path / "backup")]) == 0
    repair = pd.read_parquet(tmp_path / "backup" / "self_repair")
    assert repair.total_effect_metric.notna().all() and (repair.total_effect_metric != 0).any()
