"""A replica over several stages: each layer's weights where its stage is, read back as the
stacked weights were; the runtime's placement is the planner's; a sweep with
``--devices-per-replica K`` gives the numbers of one stage (``tests/jobs/test_golden.py``
checks every job bit for bit against the golden record at K = 2 and 3)."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from sweeps import backup
from sweeps.core import stages
from sweeps.core.transformer import LAYER_FIELDS, LayerStack
from sweeps.registry import SWEEPS
from sweeps.registry.plan import parser, plan
from tests.registry.test_cli import fails


def test_a_staged_weight_reads_back_as_the_stacked_one(loaded_model):
    w = loaded_model("tiny-gemma2").weights
    staged = stages.stage(w, ["cpu", "cpu"])
    assert staged.staged and not w.staged
    for name in LAYER_FIELDS:
        value, stack = getattr(w, name), getattr(staged, name)
        if value is None:
            assert stack is None
            continue
        assert isinstance(stack, LayerStack) and stack.shape == value.shape
        for layer in range(w.cfg.n_layers):
            assert torch.equal(stack[layer], value[layer]), name
        assert torch.equal(stack[-1], value[-1])
    assert torch.equal(staged.W_O[1, 2], w.W_O[1, 2])
    with pytest.raises(TypeError, match="one layer at a time"):
        staged.W_O[0:2]


@pytest.mark.parametrize("k", [2, 3])
def test_the_runtime_places_the_layers_as_the_plan_does(loaded_model, k):
    w = loaded_model("tiny-llama3").weights
    placed = [[r.start, r.stop - 1] for r, _ in stages.placement(stages.stage(w, ["cpu"] * k))]
    args = parser(SWEEPS["backup"]).parse_args(["--model", "tiny-llama3", "--devices-per-replica", str(k)])
    assert placed == [s["layers"] for s in plan("backup", args)["stages"]]


def test_a_sweep_over_two_stages_equals_one_and_says_where_it_ran(tmp_path):
    common = ["--model", "tiny-llama3", "--executor", "local", "--n-prompts", "4", "--heads", "L1", "--no-report"]
    tables = {}
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        assert backup.main([*common, "--devices-per-replica", str(k), "--out", str(out)]) == 0
        tables[k] = pq.read_table(out / "slopes").to_pandas().drop(columns=["run_id"], errors="ignore")
        workers = json.loads((out / "manifest.json").read_text())["workers"]
        assert {w["device"] for w in workers} == {",".join(["cpu"] * k)}
    keep = [c for c in tables[1].columns if c not in ("created_at", "wall_seconds", "worker")]
    pd.testing.assert_frame_equal(tables[1][keep].reset_index(drop=True), tables[2][keep].reset_index(drop=True))


def test_devices_per_replica_that_cannot_be_is_one_line_before_loading(capsys, monkeypatch, tmp_path):
    from sweeps.runtime import loading

    monkeypatch.setattr(loading, "load_hf_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = str(tmp_path / "o")
    line = fails(capsys, "--model", "tiny-llama3", "--devices-per-replica", "4", "--out", out)
    assert "--devices-per-replica 4: tiny-llama3 has only 3 layers to split" in line
    line = fails(capsys, "--model", "tiny-stablelm", "--devices-per-replica", "2", "--out", out)
    assert "bridge path, one device per replica" in line
