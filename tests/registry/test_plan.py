"""``interp-sweeps plan``: from a config file alone, memory and placement of research-size
models; what does not fit is one line with what would; bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeps.__main__ import main
from sweeps.runtime import loading

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
L70 = str(CONFIGS / "llama-3.1-70b.json")
L8 = str(CONFIGS / "llama-3.1-8b.json")


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(loading, "load_hf_model", lambda *a, **k: pytest.fail("weights loaded"))


def test_llama_70b_on_eight_h100s_in_bfloat16(capsys):
    assert main(["plan", "attribution", "--model", L70, "--dtype", "bfloat16", "--gpu", "H100", "--devices-per-replica", "8"]) == 0
    out = capsys.readouterr().out
    assert "70.55" in out and "8 devices per replica" in out
    assert out.count("stage ") == 8 and "layers 0-" in out and "-79 + unembedding" in out


def test_json_has_the_documented_fields(capsys):
    assert main(["plan", "backup", "--model", L8, "--dtype", "bfloat16", "--gpu", "H100", "--devices-per-replica", "2", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    for key in ("parameters", "weight_bytes", "per_replica_bytes", "devices_per_replica", "bytes_per_device", "flops"):
        assert key in p
    assert p["devices_per_replica"] == 2 and len(p["bytes_per_device"]) == 2
    assert p["weight_bytes"] == 2 * p["parameters"]  # bfloat16
    assert sum(p["bytes_per_device"]) == pytest.approx(p["per_replica_bytes"], rel=1e-6)
    assert p["fits"] and max(p["bytes_per_device"]) < 80e9


def test_a_replica_that_cannot_fit_says_what_would(capsys):
    assert main(["plan", "backup", "--model", L70, "--gpu", "H100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: even with one prompt a pass")
    assert "--dtype bfloat16" in err[0] and "--devices-per-replica" in err[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["plan", "backup", "--model", L8, "--devices-per-replica", "40"], "only 32 layers"),
        (["plan", "backup", "--model", L8, "--gpu", "H1OO"], "unknown --gpu"),
        (["plan", "backup", "--model", L8, "--device-memory", "0"], "positive"),
        (["plan", "bakup", "--model", L8], "did you mean 'backup'"),
        (["plan", "backup", "--model", "missing/config.json"], "no such file"),
    ],
)
def test_bad_input_is_one_line(capsys, args, words):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err


@pytest.mark.parametrize("config", [
    {"model_type": "t5", "d_model": 512, "num_layers": 6, "num_heads": 8, "vocab_size": 32128},
    {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "vocab_size": 30522},
])
def test_a_config_that_is_not_a_decoder_is_refused(capsys, tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["plan", "backup", "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a causal (decoder-only) language model" in err[0]


def test_a_sweep_that_cannot_fit_its_memory_budget_is_refused_before_loading(capsys, tmp_path):
    """``--memory-budget``: the sweep itself plans before loading weights (the fixture fails
    any load) and refuses, in one line saying what would fit, a budget one prompt cannot fit."""
    from sweeps import backup

    args = ["--model", "tiny-llama3", "--executor", "local", "--out", str(tmp_path / "o"), "--memory-budget", "0.01"]
    assert backup.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --memory-budget 0.01 GB: even with one prompt a pass")
    assert "--dtype bfloat16" in err[0]
    assert backup.main([*args[:-1], "-1"]) == 2
    assert "positive" in capsys.readouterr().err
