"""Bad input is rejected with one line, before any model weights load."""

import json
import sys
import os
import time

import pytest

from sweeps import attribution, backup, report, scale
from sweeps.registry import SWEEPS
from sweeps.runtime import loading, models


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr(loading, "load_hf_model", refuse)


def fails(capsys, *args, command=backup) -> str:
    """The one ``error:`` line of a command that must exit with code 2."""
    try:
        code = command.main(list(args))
    except SystemExit as exit_info:  # argparse's own checks (types, choices)
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def jsonl(tmp_path, *rows) -> str:
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    return str(path)


GOOD = {"clean": "The cat sat on the", "corrupt": "The dog sat on the", "correct": " mat", "incorrect": " floor"}


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        backup.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--task", "--n-prompts", "--seq-len", "--batch-size", "--seed", "--heads",
                   "--ablation", "--executor", "--num-workers", "--out", "--wandb", "--resume", "--data"):
        assert option in text


def test_unknown_model_suggests(capsys, no_model_loading, tmp_path):
    line = fails(capsys, "--model", "tiny-gtp2", "--out", str(tmp_path / "o"))
    assert "unknown model 'tiny-gtp2'" in line and "Did you mean tiny-gpt2" in line


def test_unknown_task(capsys, no_model_loading, tmp_path):
    assert "unknown task 'ioj'" in fails(capsys, "--model", "tiny-gpt2", "--task", "ioj", "--out", str(tmp_path / "o"))


def test_malformed_jsonl_line(capsys, no_model_loading, tmp_path):
    path = jsonl(tmp_path, GOOD, GOOD, '{"clean": "x"')
    assert "task.jsonl line 3: not valid JSON" in fails(capsys, "--model", "tiny-gpt2", "--task", path)


def test_length_mismatch(capsys, no_model_loading, tmp_path):
    path = jsonl(tmp_path, GOOD, {**GOOD, "corrupt": "A completely different and much longer prompt than that"})
    line = fails(capsys, "--model", "tiny-gpt2", "--task", path, "--out", str(tmp_path / "o"))
    assert "line 2: clean and corrupt prompts tokenize to different lengths" in line


def test_multi_token_answer(capsys, no_model_loading, tmp_path):
    path = jsonl(tmp_path, {**GOOD, "correct": " floorboardsmithery"})
    line = fails(capsys, "--model", "tiny-gpt2", "--task", path, "--out", str(tmp_path / "o"))
    assert "answer ' floorboardsmithery'" in line and "single tokens" in line


def test_missing_or_unreadable_task_file(capsys, no_model_loading, tmp_path):
    out = str(tmp_path / "o")
    line = fails(capsys, "--model", "tiny-gpt2", "--task", str(tmp_path / "missing.jsonl"), "--out", out)
    assert "cannot read task file" in line and "No such file" in line
    (tmp_path / "folder.jsonl").mkdir()  # the tests run as root, so a directory is the unreadable file
    line = fails(capsys, "--model", "tiny-gpt2", "--task", str(tmp_path / "folder.jsonl"), "--out", out)
    assert "cannot read task file" in line and "Is a directory" in line


def test_out_of_memory_outside_a_shard_is_one_line(capsys, no_model_loading, tmp_path, monkeypatch):
    import tasks

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(tasks, "build_task", no_memory)
    assert backup.main(["--model", "tiny-gpt2", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: out of memory outside a shard"), err
    assert "Lower --n-prompts or --seq-len" in err


@pytest.mark.parametrize("n,message", [
    ("0", "argument --n-prompts: must be positive, got 0 (see sweeps/backup.py --help)"),
    ("-3", "argument --n-prompts: must be positive, got -3"),
    ("ten", "argument --n-prompts: expected a whole number, got 'ten'"),
    ("3", "--n-prompts 3 is more than the 2 prompts in"),
])
def test_n_prompts_must_be_positive_and_available(capsys, no_model_loading, tmp_path, n, message):
    line = fails(capsys, "--model", "tiny-gpt2", "--task", jsonl(tmp_path, GOOD, GOOD), "--n-prompts", n,
                 "--out", str(tmp_path / "o"))
    assert message in line


@pytest.mark.parametrize("heads,message", [
    ("L7H0", "layer 7 is out of range (the model has layers 0-2)"),
    ("1.9", "head 9 is out of range (the model has heads 0-3)"),
    (",", "--heads is empty"),
    ("L1X2", "is not a head"),
])
def test_bad_heads(capsys, no_model_loading, tmp_path, heads, message):
    assert message in fails(capsys, "--model", "tiny-gpt2", "--heads", heads, "--out", str(tmp_path / "o"))


def test_output_path_is_a_file(capsys, no_model_loading, tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    assert "is a file" in fails(capsys, "--model", "tiny-gpt2", "--out", str(path))


def _bad_out(tmp_path, case: str) -> str:
    """An ``--out`` that cannot be used: under a file, a file, or where nothing can be written."""
    (tmp_path / "file.txt").write_text("x")
    if case == "under a file":
        return str(tmp_path / "file.txt" / "results")
    if case == "a file":
        return str(tmp_path / "file.txt")
    if os.geteuid() == 0:  # root writes through any mode bits: /proc has no room for directories
        return "/proc/interp-sweeps-test/results"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return str(locked / "results")


@pytest.mark.parametrize("case", ["under a file", "a file", "not writable"])
@pytest.mark.parametrize("command", [cls for cls in SWEEPS.values() if cls.name != "circuit"], ids=lambda c: c.name)
def test_every_bad_out_is_one_error_line_and_exit_2(capsys, no_model_loading, tmp_path, case, command):
    line = fails(capsys, "--model", "tiny-gpt2", "--out", _bad_out(tmp_path, case),
                 command=command)
    assert line.startswith("error: --out ") and len(line) < 300
    assert {"under a file": "is a file, not a directory", "a file": "is a file; give a directory",
            "not writable": "cannot create it"}[case] in line


def test_a_hub_name_without_internet_fails_at_once_in_one_line(capsys, no_model_loading, tmp_path, monkeypatch):
    """No retries with backoff: one look at the hub, then its cache only."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test: the probe sets it
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    line = fails(capsys, "--model", "EleutherAI/pythia-14m", "--out", str(tmp_path / "o"))
    assert time.monotonic() - start < 20, "the hub was retried"
    assert "is not in the local Hugging Face cache, and 127.0.0.1 cannot be reached" in line
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"  # what the workers inherit


@pytest.mark.slow
def test_a_ray_run_prints_only_its_own_lines_unless_verbose(tmp_path):
    """Ray's token-authentication warning and its actor-constructor error line are not ours to
    print; ``--verbose`` shows Ray's warnings again."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"RAY_ADDRESS": "local"}
    cmd = [sys.executable, "sweeps/backup.py", "--model", "tiny-gpt2", "--executor", "ray", "--num-workers", "1",
           "--n-prompts", "6", "--heads", "L1", "--wandb", "disabled", "--no-report", "--out", str(tmp_path / "o")]
    repo = Path(__file__).resolve().parents[2]
    quiet = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    lines = [line.strip() for line in re.split(r"[\r\n]", quiet.stderr) if line.strip()]
    foreign = [line for line in lines if not line.startswith(("model:", "backup sweep:", "Ray:"))
               and "ray×1:" not in line]  # the rest is the progress bar
    assert not foreign, foreign
    assert any(line.startswith("Ray: RAY_ADDRESS=local; started") for line in lines)
    loud = subprocess.run([*cmd, "--verbose", "--no-resume"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert "Token authentication is enabled for this Ray cluster" in loud.stderr


def test_output_dir_of_another_sweep_is_refused(capsys, tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    common = ["--model", "tiny-gpt2", "--executor", "local", "--n-prompts", "4", "--heads", "L2", "--no-report",
              "--out", out]
    assert backup.main(common) == 0
    monkeypatch.setattr(loading, "load_hf_model", lambda *a, **k: pytest.fail("weights loaded"))
    line = fails(capsys, *common, "--seed", "1")
    assert "holds results of a different sweep" in line and "seed: 0 here vs 1 now" in line
    assert "--no-resume" in line


def test_the_dtype_is_recorded_and_a_resume_in_another_is_refused(capsys, tmp_path, monkeypatch):
    """``--dtype bfloat16``: in the spec (sweep.json, the manifest), in every row and in the
    default directory's name; resuming in float32 is refused in one line naming it, before any
    weights load; an unknown dtype is one line too."""
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    common = ["--model", "tiny-gpt2", "--executor", "local", "--n-prompts", "4", "--heads", "L2", "--no-report"]
    assert backup.main([*common, "--dtype", "bfloat16"]) == 0
    out = tmp_path / "results" / "backup" / "tiny-gpt2__ioi__bfloat16"
    assert json.loads((out / "sweep.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "manifest.json").read_text())["spec"]["dtype"] == "bfloat16"
    for path in (out / "slopes").glob("*.parquet"):
        assert set(pq.read_table(path).column("dtype").to_pylist()) == {"bfloat16"}
    monkeypatch.setattr(loading, "load_hf_model", lambda *a, **k: pytest.fail("weights loaded"))
    line = fails(capsys, *common, "--out", str(out))
    assert "dtype: 'bfloat16' here vs 'float32' now" in line
    assert "invalid choice: 'bf16'" in fails(capsys, *common, "--dtype", "bf16")


def test_options_that_do_not_apply_and_prompts_longer_than_the_context(capsys, no_model_loading, tmp_path):
    out = str(tmp_path / "o")
    assert "only to --task text" in fails(capsys, "--model", "tiny-gpt2", "--seq-len", "8", "--out", out)
    long = {**GOOD, "clean": "word " * 600, "corrupt": "word " * 600}
    line = fails(capsys, "--model", "tiny-gpt2", "--task", jsonl(tmp_path, long), "--out", out)
    assert "prompts of 602 tokens are longer than tiny-gpt2's context of 512" in line


def test_unsupported_architecture_is_refused_before_loading(capsys, no_model_loading, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": 6}))
    assert "'t5' is not a causal (decoder-only) language model" in fails(capsys, "--model", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma9", "num_hidden_layers": 6}))
    line = fails(capsys, "--model", str(tmp_path))
    assert "architecture 'gemma9' is unknown" in line and "did you mean gemma" in line


@pytest.mark.slow
def test_the_script_runs_as_users_run_it(tmp_path):
    """``python sweeps/backup.py ...`` as a subprocess (the path `ray submit` takes too)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "o"
    cmd = [sys.executable, str(root / "sweeps" / "backup.py"), "--model", "tiny-gpt2", "--executor", "local",
           "--n-prompts", "6", "--heads", "L1", "--wandb", "disabled", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    from analysis.backup import load_results, summary_table, summary_text

    assert summary_text(summary_table(load_results(out))) in done.stdout  # the summary of what it wrote
    assert (out / "plots" / "slopes.png").is_file()
    assert len(list((out / "slopes").glob("*.parquet"))) == 1


# --------------------------------------------------------------------------- #
# sweeps/scale.py
# --------------------------------------------------------------------------- #


def scale_fails(capsys, tmp_path, *args) -> str:
    return fails(capsys, "--model", "tiny-gpt2", "--out", str(tmp_path / "o"), *args, command=scale)


def test_scale_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        scale.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--scales", "--nodes", "--circuit", "--subspace", "--pca-k", "--self-patch", "--pairs",
                   "--max-pairs", "--executor", "--out", "--wandb", "--resume", "--n-prompts", "--batch-size"):
        assert option in text
    assert "0,0.1,0.2,0.5,0.7,0.8,1,1.2,1.4,2,5,10" in text


@pytest.mark.parametrize("scales,message", [
    ("0,-1", "'-1' must be a finite number >= 0"),
    ("0,nan", "'nan' must be a finite number >= 0"),
    ("0,big", "'big' is not a number"),
    (" , ", "--scales is empty"),
])
def test_bad_scales(capsys, no_model_loading, tmp_path, scales, message):
    assert message in scale_fails(capsys, tmp_path, "--scales", scales)


@pytest.mark.parametrize("args,message", [
    (["--nodes", "mlp3"], "layer 3 is out of range (the model has layers 0-2)"),
    (["--nodes", "L1H4"], "head 4 is out of range"),
    (["--nodes", "attn1"], "is not a node"),
    (["--circuit", "ioi-gpt2-smal"], "Did you mean ioi-gpt2-small"),
    (["--circuit", "ioi-gpt2-small"], "preset ioi-gpt2-small (gpt2-small): entry '9.6': layer 9 is out of range"),
    (["--circuit", "top:5"], "write top:K@DIR"),
    (["--subspace", "high_variance", "--pca-k", "8", "--n-prompts", "8"], "--pca-k 8 needs more prompts"),
])
def test_bad_scale_sweep_input(capsys, no_model_loading, tmp_path, args, message):
    assert message in scale_fails(capsys, tmp_path, *args)


def test_bad_circuit_files(capsys, no_model_loading, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - L1H2\n  - head seven\n")
    assert "entry 'head seven' is not a node" in scale_fails(capsys, tmp_path, "--circuit", str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text('["L1H2", ')
    assert "cannot parse circuit file" in scale_fails(capsys, tmp_path, "--circuit", str(broken))
    (tmp_path / "empty").mkdir()
    assert "holds no attribution results" in scale_fails(capsys, tmp_path, "--circuit", f"top:3@{tmp_path / 'empty'}")


def test_prompts_of_different_lengths_give_no_pairs(capsys, no_model_loading, tmp_path):
    short = {**GOOD, "clean": "The cat sat", "corrupt": "The dog sat"}
    path = jsonl(tmp_path, GOOD, short)
    line = scale_fails(capsys, tmp_path, "--task", path)
    assert "no two distinct prompts have the same token length" in line and "--pairs task" in line


# --------------------------------------------------------------------------- #
# The attribution methods and circuit evaluation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("args,message", [
    (["--method", "eap-ig"], "unknown --method 'eap-ig' (did you mean 'eap'?)"),
    (["--method", "eap-ig-inputs", "--ig-steps", "0"], "--ig-steps"),
])
def test_bad_attribution_methods(capsys, no_model_loading, tmp_path, args, message):
    from sweeps import attribution

    line = fails(capsys, "--model", "tiny-gpt2", "--out", str(tmp_path / "out"), *args, command=attribution)
    assert message in line


def test_exact_attribution_says_when_it_patches_nodes_only(capsys, no_model_loading, tmp_path, monkeypatch):
    """The embedded model has too many edges for exact edge patching: one line says so
    before anything runs."""
    from sweeps import attribution
    from sweeps.registry import driver

    monkeypatch.setattr(driver, "run_sweep", lambda *a, **k: 0)
    assert attribution.main(["--method", "exact", "--out", str(tmp_path / "out"), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "has 70,651 edges, more than --max-exact-edges 5,000" in out and "its 301 nodes only" in out


def test_model_shape_counts_the_attribution_graph(loaded_model):
    """``ModelInfo.n_edges`` (from the config alone, before loading) is the built graph's."""
    from sweeps.core.attribution import build_graph

    from sweeps.core import bridge_path

    for name in ("tiny-gpt2", "tiny-llama", "tiny-pythia"):
        info = models.describe_model(name)
        graph = build_graph(loaded_model(name).weights.cfg)
        assert (info.n_edges, info.n_nodes) == (graph.n_edges, len(graph.upstream)), name
    # The bridge path: Falcon is multi-query and parallel, Cohere parallel, StableLM neither
    for name in ("tiny-falcon", "tiny-cohere", "tiny-stablelm"):
        info = models.describe_model(name)
        graph = build_graph(bridge_path.graph_config(loading.load_model(info).bridge))
        assert (info.n_edges, info.n_nodes) == (graph.n_edges, len(graph.upstream)), name


def circuit_fails(capsys, tmp_path, *args) -> str:
    from sweeps import circuit

    return fails(capsys, "--model", "tiny-llama", "--out", str(tmp_path / "out"), *args, command=circuit)


@pytest.mark.parametrize("sizes,message", [
    ("0.5,0", "'0' must be a fraction in (0, 1]"),
    ("1.5", "'1.5' must be a fraction in (0, 1]"),
    ("a", "'a' is not a number"),
])
def test_bad_circuit_sizes(capsys, no_model_loading, tmp_path, sizes, message):
    (tmp_path / "c.json").write_text('["L0H1"]')
    assert message in circuit_fails(capsys, tmp_path, "--circuit", str(tmp_path / "c.json"), "--sizes", sizes)


@pytest.mark.parametrize("content,message", [
    ('["L0H1", "L7H0"]', "layer 7 is out of range"),
    ('["L0H1->L2H3.q", "mlp9->mlp10"]', "the model has no edge 'mlp9->mlp10'"),
    ('["L0H1->L2H3.z"]', "'L0H1->L2H3.z'"),
    ('["L2H3->L0H1.q"]', "the model has no edge 'L2H3->L0H1.q'"),
    ('["L0H1", "L0H1->L2H3.q"]', "mixes nodes and edges"),
    ('[]', "non-empty list"),
])
def test_circuits_naming_what_the_model_lacks(capsys, no_model_loading, tmp_path, content, message):
    (tmp_path / "c.json").write_text(content)
    assert message in circuit_fails(capsys, tmp_path, "--circuit", str(tmp_path / "c.json"))


def test_circuit_from_a_directory_without_results(capsys, no_model_loading, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "holds no sweep results" in circuit_fails(capsys, tmp_path, "--from", str(tmp_path / "empty"))


# --------------------------------------------------------------------------- #
# interp-sweeps: one command for all of them
# --------------------------------------------------------------------------- #


def test_interp_sweeps_lists_every_command_and_delegates(capsys):
    from sweeps.__main__ import main as interp_sweeps

    with pytest.raises(SystemExit) as exit_:
        interp_sweeps(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out
    for command in (*SWEEPS, "analyze", "validate", "models", "tasks"):
        assert f"    {command}" in listed, command
    assert interp_sweeps(["models"]) == 0
    out = capsys.readouterr().out
    assert "Gemma 2" in out and "tiny-olmo2" in out and "bridge" in out
    assert interp_sweeps(["tasks"]) == 0
    assert "ioi" in capsys.readouterr().out
    # A delegated command is the script itself: its own checks, its own one-line errors.
    assert interp_sweeps(["backup", "--model", "tiny-gtp2"]) == 2
    assert "did you mean tiny-gpt2" in capsys.readouterr().err.lower()


@pytest.mark.slow
def test_interp_sweeps_is_installed_as_a_command():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "interp-sweeps"
    assert script.is_file(), "pip install -e . installs the interp-sweeps command ([project.scripts])"
    done = subprocess.run([str(script), "models"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OLMo 2" in done.stdout


# --------------------------------------------------------------------------- #
# The sweep registry: every command is built from it
# --------------------------------------------------------------------------- #


def test_every_registered_sweep_has_its_entry_script_subcommand_and_analysis(capsys):
    import importlib
    from pathlib import Path

    from analysis.__main__ import main as analyze
    from sweeps.__main__ import main as interp_sweeps
    from sweeps.registry import SWEEPS

    repo = Path(__file__).resolve().parents[2]
    assert list(SWEEPS)[:5] == ["backup", "scale", "attribution", "circuit", "report"]  # --help order
    for name, cls in SWEEPS.items():
        assert cls.name == name, name
        if cls.script:  # an entry script, where a sweep has one, runs the class
            assert (repo / cls.script).is_file(), name
            assert importlib.import_module(f"sweeps.{name}").main == cls.main
        with pytest.raises(SystemExit):
            interp_sweeps([name, "--help"])
        shown = capsys.readouterr().out
        assert shown.startswith(f"usage: {cls.prog()}") and cls.__doc__.splitlines()[0] in shown, name
        if cls.analyzable:
            with pytest.raises(SystemExit):
                analyze([name, "--help"])
            assert "the sweep's --out directory" in capsys.readouterr().out, name
    assert analyze(["report", "x"]) == 2  # the report has no results to analyze: its outputs are the report
    assert "the report command writes its outputs itself" in capsys.readouterr().err
    assert analyze(["scael", "x"]) == 2
    assert "unknown sweep 'scael' (did you mean 'scale'?)" in capsys.readouterr().err
    assert interp_sweeps(["bakup"]) == 2
    assert "unknown command 'bakup' (did you mean 'backup'?)" in capsys.readouterr().err


def test_an_unknown_sweep_is_named_with_the_closest_one():
    from sweeps.registry import UserError, sweep_named

    with pytest.raises(UserError, match=r"unknown sweep 'bakup' \(did you mean 'backup'\?\); sweeps: backup, scale"):
        sweep_named("bakup")


def test_a_sweeps_own_options_carry_into_its_summary_and_report():
    """--top and --min-break given to the scale sweep are the ones its summary uses, not the
    analysis defaults; options the sweep does not have keep those defaults."""
    from sweeps.registry import ScaleSweep

    args = ScaleSweep.parser().parse_args(["--min-break", "0.9", "--wandb", "disabled"])
    options = ScaleSweep.analysis_options(args, "results/x")
    assert options.min_break == 0.9 and options.wandb == "disabled" and options.out == "results/x"
    assert options.top == 10  # the analysis default: the scale sweep has no --top


# Every folder of code, lowest layer first: each may import itself and the layers before it.
LAYERS = {"tasks": "tasks", "core": "sweeps/core", "runtime": "sweeps/runtime", "jobs": "sweeps/jobs",
          "analysis": "analysis", "registry": "sweeps/registry"}
# Commands, above every layer: the entry scripts and the two `python -m` shims.
COMMANDS = {"analysis/__main__.py"}


def imported_layer(name: str) -> str | None:
    """The layer a dotted import name belongs to (None: not this project's code)."""
    parts = name.split(".")
    if parts[0] in ("tasks", "analysis"):
        return parts[0]
    if parts[0] == "sweeps":
        assert len(parts) > 1 and parts[1] in LAYERS, f"`{name}` imports the sweeps package's commands"
        return parts[1]
    return None


def test_each_layer_imports_only_the_layers_below_it():
    """tasks <- core (the math) <- runtime <- jobs <- analysis <- registry: checked on every import
    statement of every module of every folder, also the ones inside functions. The folders are
    named here; a missing one (say, moved) fails the test instead of passing it vacuously."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    top_level = {p.name for p in (root / "sweeps").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert top_level == {"core", "runtime", "jobs", "registry"}, f"sweeps/ has folders {sorted(top_level)}"
    order = list(LAYERS)
    for layer, folder in LAYERS.items():
        may = set(order[: order.index(layer) + 1])
        paths = sorted((root / folder).rglob("*.py"))
        assert (root / folder / "__init__.py") in paths, f"{folder} is missing"
        for path in paths:
            if str(path.relative_to(root)) in COMMANDS:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    used = imported_layer(name)
                    assert used is None or used in may, f"{path.relative_to(root)} ({layer}) imports {name}"


def test_the_tests_mirror_the_source_folders():
    """A module's tests are found by its path: ``tests/core/`` tests ``sweeps/core/``, and so on;
    every test module is in the folder of a source folder, none at the top."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tests = root / "tests"
    assert not list(tests.glob("test_*.py")), "test modules at the top of tests/"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("__pycache__", "data")}
    sources = {layer: root / folder for layer, folder in LAYERS.items()} | {"benchmarks": root / "benchmarks"}
    assert folders == set(sources), f"tests/ has {sorted(folders)}, the source folders are {sorted(sources)}"
    for folder in folders:
        assert list((tests / folder).glob("test_*.py")), f"tests/{folder} has no tests"
        assert sources[folder].is_dir(), f"tests/{folder} mirrors no source folder"


def test_a_new_sweep_is_its_own_files_and_nothing_else(tmp_path, capsys, monkeypatch):
    """A sweep defined in a module of its own (``tests/toy_sweep.py``) registers itself when it is
    imported: ``interp-sweeps toy`` runs it end to end (plan, shards, Parquet, summary), resumes
    it, ``interp-sweeps analyze toy`` reads it back, and its resume command needs no entry script."""
    import importlib.util

    from sweeps.__main__ import main as interp_sweeps
    from tests.toy_sweep import TOY_SOURCE

    module_path = tmp_path / "toy_sweep_module.py"
    module_path.write_text(TOY_SOURCE)
    spec = importlib.util.spec_from_file_location("toy_sweep_module", module_path)
    toy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_sweep_module", toy)
    assert "toy" not in SWEEPS
    try:
        spec.loader.exec_module(toy)  # defining ToySweep registers it
        assert SWEEPS["toy"] is toy.ToySweep
        out = tmp_path / "out"
        args = ["toy", "--model", "tiny-gpt2", "--n-prompts", "5", "--executor", "local", "--out", str(out)]
        assert interp_sweeps(args) == 0
        captured = capsys.readouterr()
        assert "toy: 5 prompts, longest" in captured.out
        lengths = toy.load_toy(out).sort_values("prompt")
        assert lengths.prompt.tolist() == [0, 1, 2, 3, 4]
        assert (lengths.answer_offset == lengths.length - 1).all()
        assert interp_sweeps(args) == 0 and "toy sweep: 3 done, 0 to run" in capsys.readouterr().err
        assert interp_sweeps(["analyze", "toy", str(out)]) == 0
        assert "toy: 5 prompts" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            interp_sweeps(["--help"])
        assert "a toy sweep (tests only)" in capsys.readouterr().out
        assert toy.ToySweep.resume_command(args[1:]).split()[1:4] == ["-m", "sweeps", "toy"]
    finally:
        SWEEPS.pop("toy", None)


@pytest.mark.slow
def test_the_summary_answers_for_the_heads_asked_for(capsys, tmp_path, monkeypatch):
    """``--heads``: beside the ranking, a line for each head asked for with its fit, and whether
    it is ranked or why not; the analysis command takes the same option."""
    from sweeps.registry.analyze import main as analyze

    out = str(tmp_path / "o")
    common = ["--model", "tiny-llama3", "--executor", "local", "--n-prompts", "8", "--no-report", "--out", out]
    assert backup.main([*common, "--heads", "L1H2,L2"]) == 0
    printed = capsys.readouterr().out
    assert "heads asked for:" in printed
    lines = {line.split(":")[0].strip(): line for line in printed.splitlines() if line.startswith("  L")}
    for name in ("L1H2", "L2H0", "L2H3"):
        assert name in lines and ("ranked" in lines[name] or "no fit" in lines[name]), printed
    assert "no head is downstream of the last layer" in lines["L2H0"]
    assert "(1 point a head)" in printed and "too few for these shares to mean much" in printed  # 2 % of 8
    assert analyze(["backup", out, "--wandb", "disabled", "--heads", "L1H2"]) == 0
    assert "  L1H2: slope" in capsys.readouterr().out
    import analysis.backup as summaries

    monkeypatch.setattr(summaries, "MAX_ASKED_LINES", 2)  # more heads than lines: counted by reason
    assert analyze(["backup", out, "--wandb", "disabled", "--heads", "L2,L1H2"]) == 0
    assert "the 5 heads asked for: 4 in the last layer, 1 " in capsys.readouterr().out


@pytest.mark.parametrize("sizes,message", [
    ("mib,0.1", "--sizes mib,0.1: mib stands alone"),
    ("0.01, MIB", "mib stands alone"),
])
def test_mib_sizes_stand_alone(capsys, no_model_loading, tmp_path, sizes, message):
    (tmp_path / "empty").mkdir()
    assert message in circuit_fails(capsys, tmp_path, "--from", str(tmp_path / "empty"), "--sizes", sizes)


def test_mib_sizes_evaluate_rankings_not_a_circuit_file(capsys, no_model_loading, tmp_path):
    (tmp_path / "c.json").write_text('["L0H1"]')
    assert "--sizes mib evaluates rankings" in circuit_fails(
        capsys, tmp_path, "--circuit", str(tmp_path / "c.json"), "--sizes", "mib")


def test_split_kv_and_export_graph_refuse_bad_input_in_one_line(capsys, no_model_loading, tmp_path):
    from sweeps.registry import export_graph

    out = str(tmp_path / "o")
    line = fails(capsys, "--model", "tiny-llama", "--split-kv", "--method", "exact", "--out", out, command=attribution)
    assert "--split-kv scores with --method eap or eap-ig-inputs" in line
    assert "OLMo 2 normalises all key heads together" in fails(
        capsys, "--model", "tiny-olmo2", "--split-kv", "--out", out, command=attribution)
    assert "holds no sweep results" in fails(capsys, str(tmp_path), "g.json", command=export_graph)
    assert "a fraction in (0, 1]" in fails(capsys, str(tmp_path), "g.json", "--size", "2", command=export_graph)


@pytest.mark.parametrize("sweep", ["backup", "scale", "attribution", "circuit"])
def test_unknown_metric_is_one_line_before_any_weights_load(capsys, no_model_loading, tmp_path, sweep):
    command = SWEEPS[sweep]
    extra = ["--circuit", str(tmp_path / "c.json")] if sweep == "circuit" else []
    line = fails(capsys, "--model", "tiny-gpt2", "--metric", "prob-diff", "--out", str(tmp_path / "o"), *extra,
                 command=command)
    assert "unknown metric 'prob-diff'. Did you mean prob_diff" in line


@pytest.mark.parametrize("args,message", [
    (["--task", "text", "--metric", "greater_than"], "--metric greater_than needs answers"),
    (["--task", "greater-than", "--metric", "accuracy"], "--metric accuracy is not differentiable: --method eap"),
    (["--task", "mcqa", "--metric", "kl"], "zero gradient at the clean run"),
])
def test_metrics_the_task_or_method_cannot_take(capsys, no_model_loading, tmp_path, args, message):
    from sweeps import attribution

    line = fails(capsys, "--model", "tiny-gpt2", "--out", str(tmp_path / "o"), *args, command=attribution)
    assert message in line


def test_a_multi_token_answer_in_an_answer_set_is_one_line(capsys, no_model_loading, tmp_path):
    path = jsonl(tmp_path, {**GOOD, "incorrect": [" floor", " Constantinopolitanism"]})
    line = fails(capsys, "--model", "tiny-gpt2", "--task", path, "--metric", "greater_than", "--out", str(tmp_path / "o"))
    assert "answer ' Constantinopolitanism' (task.jsonl line 1) is" in line and "single tokens" in line


def test_attribution_whose_clean_and_corrupt_metric_agree_is_one_line(capsys, tmp_path):
    """Accuracy on a random tiny model: the clean and corrupt runs score alike, so every score
    (normalised by their difference) would be inf or NaN; one line says so, exit 2."""
    from sweeps import attribution

    line = fails(capsys, "--model", "tiny-llama", "--task", "mcqa", "--metric", "accuracy", "--method", "exact",
                 "--n-prompts", "4", "--executor", "local", "--verify-top", "0", "--out", str(tmp_path / "a"),
                 command=attribution)
    assert "the clean and corrupt runs give the same accuracy" in line
