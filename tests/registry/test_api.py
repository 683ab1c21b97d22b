"""``sweeps.api``: every sweep as a function with its command's options, giving the command's
numbers back as DataFrames; bad input is a Python exception with the command's message."""

from __future__ import annotations

import gc

import pandas as pd
import pytest

from sweeps import api, backup
from sweeps.registry import SWEEPS

PROVENANCE = ("created_at", "wall_seconds", "worker", "run_id", "model", "weight_hash", "spec_id")


def _numbers(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in PROVENANCE if c in frame.columns]).reset_index(drop=True)


def test_the_function_gives_the_commands_numbers(tmp_path, capsys):
    common = ["--model", "tiny-llama3", "--n-prompts", "4", "--heads", "L1", "--ablation", "mean"]
    assert backup.main([*common, "--executor", "local", "--no-report", "--out", str(tmp_path / "cli")]) == 0
    cli = api.load(tmp_path / "cli")
    r = api.backup("tiny-llama3", n_prompts=4, heads=["L1"], ablation="mean")
    pd.testing.assert_frame_equal(_numbers(r.slopes), _numbers(cli.slopes))
    pd.testing.assert_frame_equal(_numbers(r.self_repair), _numbers(cli.self_repair))
    assert "L1H" in r.summary()
    assert repr(r).startswith("<backup results in ")


@pytest.mark.slow
def test_out_none_is_a_temporary_directory_the_result_keeps(capsys):
    r = api.backup("tiny-llama3", n_prompts=4, heads="L2")
    out = r.out
    assert (out / "sweep.json").is_file()
    again = api.load(out)  # reopened while the first result holds the directory
    assert len(again.slopes) == 4
    del r, again
    gc.collect()
    assert not out.exists()


@pytest.mark.parametrize("sweep", sorted(n for n in SWEEPS if n in ("backup", "scale", "attribution", "circuit")))
def test_every_option_of_the_command_is_a_keyword(sweep):
    parser = SWEEPS[sweep].parser()
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(api.options_of(sweep)) == flags
    assert callable(getattr(api, sweep))


def test_bad_input_is_an_exception_with_the_commands_message(capsys):
    with pytest.raises(TypeError, match="did you mean n_prompts"):
        api.backup("tiny-llama3", n_promts=4)
    with pytest.raises(ValueError, match="invalid choice: 'nope'"):
        api.backup("tiny-llama3", ablation="nope")
    with pytest.raises(ValueError, match="unknown model 'tiny-llamaX'"):
        api.backup("tiny-llamaX")
    with pytest.raises(ValueError, match="not a sweep's results directory"):
        api.load("/nonexistent")


@pytest.mark.slow
def test_a_hugging_face_model_in_memory_gives_the_named_models_numbers_and_is_left_as_it_was(capsys):
    import torch

    from sweeps.runtime import loading, models, tiny_models

    hf = tiny_models.build("tiny-llama3")  # the same weights as the named tiny model
    tokenizer = loading.load_tokenizer(models.describe_model("tiny-llama3"))
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    mine = api.backup(hf, tokenizer=tokenizer, n_prompts=4, heads="L1")
    named = api.backup("tiny-llama3", n_prompts=4, heads="L1")
    pd.testing.assert_frame_equal(_numbers(mine.slopes), _numbers(named.slopes))
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())  # processed from a copy
    assert mine.results.spec["model"].startswith("memory:")


def test_a_model_in_memory_refuses_ray_and_a_tokenizer_it_cannot_read(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sweeps.runtime import loading, models

    tokenizer = loading.load_tokenizer(models.describe_model("tiny-llama3"))
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="more than the model's vocabulary of 100"):
        api.backup(small, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        api.backup(small)
    with pytest.raises(ValueError, match="executor='local'"):
        api.backup(small, tokenizer=tokenizer, executor="ray")


@pytest.mark.slow
def test_the_reports_figures_come_back_as_matplotlib_figures(capsys):
    from matplotlib.figure import Figure

    r = api.backup("tiny-llama3", n_prompts=4, heads="L1")
    names = r.figures()
    assert {"slopes", "self_repair", "compensation"} <= set(names)
    figure = r.plot("slopes")
    assert isinstance(figure, Figure) and figure.get_size_inches()[0] > 1
    with pytest.raises(KeyError, match="Did you mean 'slopes'"):
        r.plot("slope")


@pytest.mark.slow
def test_an_interrupted_call_keeps_its_shards_and_the_next_call_goes_on(monkeypatch, capsys):
    import re
    import shutil
    from pathlib import Path

    from sweeps.jobs.backup import BackupJob

    real, calls = BackupJob.run_shard, []

    def interrupted(self, shard):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, shard)

    monkeypatch.setattr(BackupJob, "run_shard", interrupted)
    with pytest.raises(KeyboardInterrupt, match="call again with out=") as stopped:
        api.backup("tiny-llama3", n_prompts=4, heads="L0,L1")
    out = Path(re.search(r"out='([^']+)'", str(stopped.value)).group(1))
    assert (out / "manifest.json").is_file()  # the temporary directory outlived the call
    monkeypatch.setattr(BackupJob, "run_shard", real)
    r = api.backup("tiny-llama3", n_prompts=4, heads="L0,L1", out=out)
    assert sorted(set(r.slopes.layer)) == [0, 1]
    shutil.rmtree(out.parent, ignore_errors=True)


@pytest.mark.slow
def test_the_quickstart_notebook_runs():
    """``docs/quickstart.ipynb`` executes from top to bottom in a Jupyter kernel (nbclient), its
    figures shown as images; the outputs saved in the file are what ``make notebook`` wrote."""
    from pathlib import Path

    import nbclient
    import nbformat

    root = Path(__file__).resolve().parents[2]
    nb = nbformat.read(root / "docs" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # slopes, self-repair, faithfulness
    assert any("backed up" in o.get("text", "") for o in outputs)  # the backup summary
