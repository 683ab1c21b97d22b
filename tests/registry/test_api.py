"""``sweeps.api``: every sweep as a function with its command's options, giving the command's
numbers back as DataFrames; bad input is a Python exception with the command's message."""

from __future__ import annotations

import gc

import pandas as pd
import pytest

from sweeps import api, backup
from sweeps.registry import SWEEPS
from sweeps.runtime import tiny_models

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


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
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
def test_a_hugging_face_model_in_memory_gives_the_named_models_numbers_and_is_left_as_it_was(capsys, monkeypatch):
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
    processed = []
    real = loading.whole_weights
    monkeypatch.setattr(loading, "whole_weights", lambda info: processed.append(info) or real(info))
    again = api.backup(hf, tokenizer=tokenizer, n_prompts=4, heads="L2")  # the same model: not processed again
    assert processed == [] and again.results.spec["model"] == mine.results.spec["model"]


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
    falcon = tiny_models.build("tiny-falcon")  # no fast path: the bridge path runs in this process only
    with pytest.raises(ValueError, match="executor='local'"):
        api.backup(falcon, tokenizer=tokenizer, executor="ray")


def _bridge(name: str, processed: bool, **folds):
    """A TransformerBridge of tiny model ``name`` as a notebook boots one (and, with ``processed``,
    puts in compatibility mode), from the same weights as the named tiny model."""
    from transformer_lens.model_bridge import TransformerBridge

    from sweeps.runtime import loading, models

    tokenizer = loading.load_tokenizer(models.describe_model(name))
    bridge = TransformerBridge.boot_transformers(
        tiny_models.TINY_MODELS[name]["hub_name"], hf_model=tiny_models.build(name), tokenizer=tokenizer
    )
    if processed:
        bridge.enable_compatibility_mode(disable_warnings=True, **folds)
    return bridge


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gpt2"])
@pytest.mark.parametrize("processed", [False, True], ids=["booted", "processed"])
def test_a_transformer_bridge_gives_the_named_models_numbers(name, processed, tmp_path, capsys):
    """A bridge booted in a notebook, before or after enable_compatibility_mode, is the model it
    wraps: the command line's numbers on the named model with the same weights."""
    bridge = _bridge(name, processed)
    common = ["--model", name, "--n-prompts", "4", "--heads", "L1", "--executor", "local", "--no-report"]
    assert backup.main([*common, "--out", str(tmp_path / "cli")]) == 0
    mine = api.backup(bridge, n_prompts=4, heads="L1")
    pd.testing.assert_frame_equal(_numbers(mine.slopes), _numbers(api.load(tmp_path / "cli").slopes))
    assert mine.results.spec["model"].startswith("memory:")


def test_a_bridge_that_cannot_be_read_exactly_is_refused(capsys):
    """Processing without folding the norms leaves weights the fast path cannot use: refused,
    never run with the wrong numbers; a processed bridge of a family without a fast path too."""
    for name in ("tiny-llama3", "tiny-gpt2"):  # RMSNorm: the unfolded norm is seen; LayerNorm: the probe's logits
        with pytest.raises(ValueError, match="pass the bridge before enable_compatibility_mode"):
            api.backup(_bridge(name, True, fold_ln=False))
    with pytest.raises(ValueError, match="a family without a fast path"):
        api.backup(_bridge("tiny-falcon", True))


@pytest.mark.parametrize("sweep", ["scale", "attribution", "circuit"])
def test_every_sweep_runs_on_a_model_in_memory_with_the_commands_numbers(sweep, tmp_path, capsys):
    """Each sweep from a function on an in-memory Hugging Face model and on a processed bridge
    equals its command on the named model (the backup sweep: the tests above)."""
    from sweeps.runtime import loading, models

    options, argv = {
        "scale": ({"n_prompts": 4, "nodes": "L1H0,mlp1", "scales": "0,2", "pairs": "task"}, "--nodes L1H0,mlp1 --scales 0,2 --pairs task"),
        "attribution": ({"n_prompts": 4, "verify_top": 0}, "--verify-top 0"),
        "circuit": ({"n_prompts": 4, "sizes": "0.1,1"}, "--sizes 0.1,1"),
    }[sweep]
    argv = [*argv.split(), "--model", "tiny-llama3", "--n-prompts", "4", "--executor", "local", "--no-report"]
    if sweep == "circuit":  # of the attribution scores each model gave
        assert SWEEPS["attribution"].main([*argv[2:], "--verify-top", "0", "--out", str(tmp_path / "a")]) == 0
        argv += ["--from", str(tmp_path / "a")]
    assert SWEEPS[sweep].main([*argv, "--out", str(tmp_path / "cli")]) == 0
    cli_result = api.load(tmp_path / "cli")
    tokenizer = loading.load_tokenizer(models.describe_model("tiny-llama3"))
    for model, kw in ((tiny_models.build("tiny-llama3"), {"tokenizer": tokenizer}), (_bridge("tiny-llama3", True), {})):
        if sweep == "circuit":
            options["sources"] = [api.attribution(model, n_prompts=4, verify_top=0, **kw)]  # a result is its directory
        mine = api.run(sweep, model, "ioi", **kw, **options)
        assert mine.datasets == cli_result.datasets
        for name in mine.datasets:
            pd.testing.assert_frame_equal(
                _numbers(getattr(mine, name)).drop(columns=["source"], errors="ignore"),
                _numbers(getattr(cli_result, name)).drop(columns=["source"], errors="ignore"),
            )


def test_a_task_given_as_rows_is_the_task_of_the_same_file(tmp_path, capsys):
    """task= as a DataFrame or a list of dicts runs the same prompts as the .jsonl file of those
    rows; rows of ``text`` are next-token documents; rows of neither are refused."""
    import json

    rows = [
        {"clean": f"When Mary and John went to the store, {a} gave a drink to", "corrupt":
         f"When Alice and Bob went to the store, {a} gave a drink to", "correct": " Mary", "incorrect": " John"}
        for a in ("John", "he", "she", "Paul")
    ]
    file = tmp_path / "pairs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_file = api.backup("tiny-llama3", str(file), heads="L1")
    by_rows = api.backup("tiny-llama3", pd.DataFrame(rows), heads="L1")
    by_dicts = api.backup("tiny-llama3", rows, heads="L1")
    for r in (by_rows, by_dicts):
        pd.testing.assert_frame_equal(_numbers(r.slopes).drop(columns="task"), _numbers(by_file.slopes).drop(columns="task"))
    assert by_rows.results.spec["task_hash"] == by_dicts.results.spec["task_hash"] == by_file.results.spec["task_hash"]
    docs = [{"text": "The quick brown fox jumps over the lazy dog. " * 8} for _ in range(3)]
    text = api.scale("tiny-llama3", docs, nodes="L1H0,mlp1", scales="0", n_prompts=2, seq_len=16)
    assert text.results.spec["task"] == "text" and len(text.effects) == 2  # L1H0 and mlp1 at scale 0
    with pytest.raises(ValueError, match="row 0 has no clean, corrupt, correct, incorrect"):
        api.backup("tiny-llama3", [{"prompt": "x"}])
    with pytest.raises(ValueError, match="task= takes a task name"):
        api.backup("tiny-llama3", 42)


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


def test_a_model_in_memory_goes_to_ray_workers_once_through_the_object_store(ray_session, monkeypatch, capsys):
    """With executor="ray" the driver processes a model in memory once and its actors read the
    weights from Ray's object store (they could not load it by name: it is not in their
    memory); the numbers are the in-process run's."""
    from sweeps.runtime import loading, models

    hf = tiny_models.build("tiny-llama3")
    tokenizer = loading.load_tokenizer(models.describe_model("tiny-llama3"))
    local = api.backup(hf, tokenizer=tokenizer, n_prompts=4, heads="L1")
    loads, stored = [], []
    real_load, real_put = loading.load_model, ray_session.put
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(ray_session, "put", lambda value, **k: stored.append(type(value).__name__) or real_put(value, **k))
    remote = api.backup(hf, tokenizer=tokenizer, n_prompts=4, heads="L1", executor="ray", num_workers=2)
    assert len(loads) == 1 and stored.count("LoadedModel") == 1  # processed once, here; in the store once
    pd.testing.assert_frame_equal(_numbers(remote.slopes), _numbers(local.slopes))
    assert len({w["pid"] for w in remote.results.manifest["workers"]}) == 2


def test_the_task_report_from_a_function_gives_the_commands_tables(tmp_path, capsys):
    """``report(model, task)``: the command's tables as DataFrames, its printed summary, its
    figures and attention page; a bridge in memory gives the named model's tables."""
    from sweeps.registry import SWEEPS

    assert SWEEPS["report"].main(["--model", "tiny-llama3", "--wandb", "disabled", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    cli = api.load(tmp_path / "cli")
    assert isinstance(cli, api.Report) and "heads" in cli.tables
    mine = api.report(_bridge("tiny-llama3", True))
    pd.testing.assert_frame_equal(mine.heads, cli.heads)
    assert mine.summary() == cli.summary() and mine.summary().splitlines()[0] in printed
    assert mine.attention.is_file() and "dla_heads" in mine.figures()
    with pytest.raises(TypeError, match="unexpected keyword argument 'executor'"):
        api.report("tiny-llama3", executor="ray")  # the report runs in this process: no such option
