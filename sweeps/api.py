"""Every sweep as a function call, for notebooks: ``from sweeps.api import backup, scale,
attribution, circuit, report, load, hf_model``.

    from sweeps.api import backup, hf_model
    model, tokenizer = hf_model("smollm2-135m")  # or any Hugging Face model, or a TransformerBridge
    r = backup(model, "ioi", tokenizer=tokenizer, heads="L22,L23", n_prompts=32)
    r.slopes            # a pandas DataFrame, read when first asked for
    print(r.summary())  # the lines the command prints
    r.plot("slopes")    # one of the report's figures (r.figures() names them)

Each function takes the command's options as keyword arguments, named as the option without
its dashes (``--n-prompts 32`` is ``n_prompts=32``; a flag is ``True``; a list is a Python
list or the command's comma-separated string), with the command's defaults, except that
``executor`` defaults to ``"local"`` (in-process, no Ray) and nothing is logged to W&B unless
asked (``r.to_wandb()``). The keywords are parsed by the command's own parser (the registry),
so a function has exactly the command's options and checks; ``model`` may also be a model in
memory (a Hugging Face model with ``tokenizer=``, or a TransformerBridge), ``task`` rows of
prompts (``_task``), and a result stands for its directory (``circuit(m, sources=[r])``).
Bad input raises ``ValueError`` with the command's one-line message, before any work. ``out=None`` writes to a fresh
temporary directory that the result keeps alive for as long as it exists, so the run can be
resumed (call again with ``out=r.out``) or logged later.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, cast

__all__ = ["backup", "scale", "attribution", "circuit", "report", "load", "hf_model", "Result", "Report", "options_of"]

# What a notebook call does unless asked otherwise (the command's defaults otherwise).
API_DEFAULTS = {"executor": "local", "wandb": "disabled", "no_report": True}


class _Refused(Exception):
    """The command's parser refused the arguments (its one-line message)."""


def _parser(sweep: str) -> argparse.ArgumentParser:
    from sweeps.registry import SWEEPS

    parser = SWEEPS[sweep].parser()

    def error(message: str):  # a Python exception, not a printed line and SystemExit
        raise _Refused(message)

    parser.error = error  # type: ignore[method-assign]
    return parser


def options_of(sweep: str) -> dict[str, argparse.Action]:
    """The keyword arguments of sweep ``sweep``'s function: its command's options by ``dest``."""
    return {a.dest: a for a in _parser(sweep)._actions if a.option_strings and a.dest not in ("help",)}


def _argv(sweep: str, kwargs: dict[str, Any]) -> list[str]:
    """The command line the keyword arguments stand for."""
    actions = options_of(sweep)
    argv: list[str] = []
    for key, value in kwargs.items():
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise TypeError(f"{sweep}() got an unexpected keyword argument {key!r}{hint}")
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if value is None:
            continue
        if isinstance(value, Result) or (
            isinstance(value, (list, tuple)) and any(isinstance(v, Result) for v in value)
        ):
            value = (
                [v.out if isinstance(v, Result) else v for v in value]
                if isinstance(value, (list, tuple))
                else value.out
            )
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if bool(value) != isinstance(action, argparse._StoreFalseAction):
                argv.append(flag)
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
            continue
        if isinstance(value, (list, tuple)):
            if action.nargs in ("+", "*"):  # an option of several words (circuit's --from DIR DIR)
                argv += [flag, *(str(v) for v in value)]
                continue
            value = ",".join(str(v) for v in value)
        argv += [flag, str(value)]
    return argv


class Result:
    """A sweep's results directory: its datasets as DataFrames (``r.slopes``, ``r.edges``, ...,
    read when first asked for), ``summary()``, ``to_wandb()``, ``out``."""

    def __init__(self, sweep: str, out: Path, keep: Any = None):
        self.sweep, self.out, self._keep = sweep, Path(out), keep
        self._results: Any = None

    @property
    def results(self):
        """The analysis module's results object of the sweep (``analysis/<sweep>.py``)."""
        from sweeps.registry import SWEEPS

        if self._results is None:
            self._results = SWEEPS[self.sweep].load(self.out)
        return self._results

    @property
    def datasets(self) -> tuple[str, ...]:
        """The results' tables (``r.<name>``): the analysis results object's DataFrames."""
        import dataclasses

        import pandas as pd

        results = self.results
        return tuple(f.name for f in dataclasses.fields(results) if isinstance(getattr(results, f.name), pd.DataFrame))

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self.datasets:
            raise AttributeError(f"{self.sweep} results have no {name!r}; datasets: {', '.join(self.datasets)}")
        return getattr(self.results, name)

    def _options(self, **overrides) -> argparse.Namespace:
        from sweeps.registry import SWEEPS

        cls = SWEEPS[self.sweep]
        options = cls.analysis_options(argparse.Namespace(**overrides), self.out)
        cls.check_options(self.results, options)
        return options

    def summary(self, **options) -> str:
        """The summary the command prints at its end (``options``: the analysis options, e.g. ``top=10``)."""
        from sweeps.registry import SWEEPS

        return "\n".join(SWEEPS[self.sweep].summary(self.results, self._options(**options)))

    def to_wandb(self, mode: str = "offline", project: str = "interp-sweeps", **options) -> None:
        """Write the report (figures, tables) and log it to W&B (``mode``: offline or online)."""
        from sweeps.registry import SWEEPS

        SWEEPS[self.sweep].report(self.results, self._options(wandb=mode, wandb_project=project, **options))

    def figures(self) -> dict[str, Path]:
        """The report's figures by name (PNG files under ``out/plots``), written first (without
        W&B) if they are not there yet."""
        folder = self.out / "plots"
        if not any(folder.glob("*.png")):
            self.to_wandb(mode="disabled")
        return {p.stem: p for p in sorted(folder.glob("*.png"))}

    def plot(self, name: str):
        """One of the report's figures (``figures()`` names them) as a matplotlib figure, which a
        notebook shows inline."""
        return _figure(self.figures(), name)

    def __repr__(self) -> str:  # the tables once read (reading them is the results' loading)
        tables = f": {', '.join(self.datasets)}" if self._results is not None else ""
        return f"<{self.sweep} results in {self.out}{tables}>"


class Report:
    """The task report's directory (``interp-sweeps report``): its tables as DataFrames
    (``r.heads``, ``r.layers``, ..., ``r.tables`` names them), ``summary()``, its figures
    (``figures()``, ``plot(name)``), the attention page (``attention``), ``out``."""

    sweep = "report"

    def __init__(self, sweep: str, out: Path, keep: Any = None):
        self.out, self._keep = Path(out), keep

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(sorted(p.stem for p in (self.out / "tables").glob("*.csv")))

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self.tables:
            raise AttributeError(f"the task report has no table {name!r}; tables: {', '.join(self.tables)}")
        import pandas as pd

        return pd.read_csv(self.out / "tables" / f"{name}.csv")

    @property
    def manifest(self) -> dict:
        import json

        return json.loads((self.out / "manifest.json").read_text())

    def summary(self) -> str:
        """The lines the command printed."""
        return "\n".join(self.manifest["lines"])

    @property
    def attention(self) -> Path:
        """The attention page (open it in a browser, or ``IPython.display.IFrame`` it)."""
        return self.out / "attention.html"

    def figures(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted((self.out / "plots").glob("*.png"))}

    def plot(self, name: str):
        """One of the report's figures as a matplotlib figure (``Result.plot``)."""
        return _figure(self.figures(), name)

    def __repr__(self) -> str:
        return f"<task report in {self.out}: {', '.join(self.tables)}>"


def _figure(figures: dict[str, Path], name: str):
    """Figure ``name`` of ``figures`` (PNG files by name) as a matplotlib figure that a notebook
    shows inline, as the file itself."""
    import matplotlib.pyplot as plt

    if name not in figures:
        close = difflib.get_close_matches(name, list(figures), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"no figure {name!r}.{hint} Figures: {', '.join(figures)}")
    image = plt.imread(figures[name])
    height, width = image.shape[:2]
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(image)
    ax.set_axis_off()
    plt.close(fig)  # shown where it is returned (a notebook cell), not by pyplot's state
    # A notebook shows the report's own PNG, whatever matplotlib backend is active (the
    # analysis modules draw with Agg, which registers no inline display).
    png = figures[name].read_bytes()
    fig._repr_png_ = lambda: png  # type: ignore[attr-defined]
    return fig


def _records_file(records: list[dict]) -> Path:
    """``records`` as a JSON Lines file named by its content, in the sweeps' cache directory
    (the system's temporary one when the cache is off): the same rows are the same file, so a
    call made again resumes the same results."""
    import hashlib
    import json

    from sweeps.runtime.model_cache import cache_dir

    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in records)
    folder = (cache_dir() or Path(tempfile.gettempdir()) / "sweeps") / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"records-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}.jsonl"
    if not path.is_file():
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    return path


def _task(task: Any, options: dict[str, Any]) -> str:
    """What ``--task`` (and, for documents, ``--data``) a ``task=`` stands for: a name or a file as
    the command takes them, the tasks module's ``TaskSpec``, or rows (a pandas DataFrame or a list
    of dicts) with ``clean, corrupt, correct, incorrect``, or with ``text`` for next-token
    prediction, written to a file (``_records_file``)."""
    from tasks import TaskSpec
    from tasks.jsonl import FIELDS

    if isinstance(task, (str, Path)):
        return str(task)
    if isinstance(task, TaskSpec):
        return task.path or task.name
    if hasattr(task, "to_dict") and hasattr(task, "columns"):  # a pandas DataFrame
        task = task.to_dict("records")
    if not isinstance(task, (list, tuple)) or not task or not all(isinstance(r, dict) for r in task):
        raise ValueError(
            "task= takes a task name, a .jsonl file, or rows (a DataFrame or a list of dicts) with "
            f"{', '.join(FIELDS)} (or text)"
        )
    keys = set().union(*(r.keys() for r in task))
    if "text" in keys and not keys & set(FIELDS):
        if options.get("data") is not None:
            raise ValueError("rows of text are the documents: leave data= out")
        options["data"] = str(_records_file([{"text": r.get("text")} for r in task]))
        return "text"
    for number, row in enumerate(task):
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise ValueError(
                f"task= row {number} has no {', '.join(missing)}: each row needs {', '.join(FIELDS)} (or text)"
            )
    return str(_records_file([{k: row[k] for k in FIELDS} for row in task]))


def run(
    sweep: str, model: Any, task: Any, out: str | Path | None = None, tokenizer: Any = None, **options
) -> Result | Report:
    """Run sweep ``sweep`` (a name of the registry) as its command would, in this process by default.

    ``model``: what ``--model`` takes (a name, a hub name, a directory), or a model in memory:
    a Hugging Face model with its ``tokenizer`` (processed from a copy: the model is left as
    it was), or a TransformerBridge, before or after ``enable_compatibility_mode``. With
    ``executor="ray"`` a model in memory is processed here once and read by every worker
    from Ray's object store. ``task``: see ``_task``."""
    from sweeps.registry import SWEEPS
    from sweeps.registry.cli import UserError
    from sweeps.runtime import loading, models

    if not isinstance(model, (str, Path)):
        try:
            model = loading.register_model(model, tokenizer)
            path = models.describe_model(model).path
        except models.ModelNameError as err:
            raise ValueError(str(err)) from None
        if options.get("executor", API_DEFAULTS["executor"]) != "local" and path != "fast":
            raise ValueError("a model in memory of a family without a fast path runs in this process: executor='local'")
    elif tokenizer is not None:
        raise ValueError("tokenizer= goes with a model in memory; a named model brings its own")
    task = _task(task, options)
    keep = None
    if out is None:
        keep = tempfile.TemporaryDirectory(prefix=f"sweeps-{sweep}-")
        out = Path(keep.name) / "results"
    defaults = {k: v for k, v in API_DEFAULTS.items() if k in options_of(sweep)}  # the report has no executor
    argv = _argv(sweep, {**defaults, "model": model, "task": task, **options, "out": str(out)})
    try:
        args = _parser(sweep).parse_args(argv)
        with _quiet():
            code = SWEEPS[sweep](args).run(argv)
    except (_Refused, UserError) as err:
        raise ValueError(str(err)) from None
    except KeyboardInterrupt:  # before the sweep's own handling (checking input, loading the model)
        code = 130
    if code in (130, 143):  # interrupted (a kernel interrupt, SIGTERM): the finished shards stay
        if keep is not None:
            keep._finalizer.detach()  # type: ignore[attr-defined]  # the temporary directory outlives this call
        raise KeyboardInterrupt(
            f"stopped; the finished shards are kept in {out}: call again with out={str(out)!r} to go on"
        )
    if code != 0:
        raise RuntimeError(f"the {sweep} sweep did not finish (exit code {code}); its messages are above")
    return (Report if sweep == "report" else Result)(sweep, Path(out), keep)


def backup(
    model: Any = "smollm2-135m", task: Any = "ioi", out: str | Path | None = None, tokenizer: Any = None, **options
) -> Result:
    """The backup sweep (``interp-sweeps backup --help`` lists the options)."""
    return cast(Result, run("backup", model, task, out, tokenizer, **options))


def scale(
    model: Any = "smollm2-135m", task: Any = "ioi", out: str | Path | None = None, tokenizer: Any = None, **options
) -> Result:
    """The scale sweep (``interp-sweeps scale --help`` lists the options)."""
    return cast(Result, run("scale", model, task, out, tokenizer, **options))


def attribution(
    model: Any = "smollm2-135m", task: Any = "ioi", out: str | Path | None = None, tokenizer: Any = None, **options
) -> Result:
    """The attribution sweep (``interp-sweeps attribution --help`` lists the options)."""
    return cast(Result, run("attribution", model, task, out, tokenizer, **options))


def circuit(
    model: Any = "smollm2-135m", task: Any = "ioi", out: str | Path | None = None, tokenizer: Any = None, **options
) -> Result:
    """Circuit evaluation (``interp-sweeps circuit --help`` lists the options)."""
    return cast(Result, run("circuit", model, task, out, tokenizer, **options))


def report(
    model: Any = "smollm2-135m", task: Any = "ioi", out: str | Path | None = None, tokenizer: Any = None, **options
) -> Report:
    """The task report (``interp-sweeps report --help`` lists the options): direct logit
    attribution, logit lens and attention patterns of one clean run."""
    return cast(Report, run("report", model, task, out, tokenizer, **options))


def hf_model(name: str = "smollm2-135m") -> tuple[Any, Any]:
    """(a Hugging Face model, its tokenizer) in memory, of any name ``--model`` takes: the
    embedded SmolLM2, a tiny test model, a directory, a hub name. Every sweep function takes it
    back (``backup(model, tokenizer=tokenizer)``), processing it once however many sweeps run."""
    from sweeps.runtime import loading, models

    try:
        with _quiet():
            model, tokenizer, hub_name = loading.load_hf_model(models.describe_model(name))
    except models.ModelNameError as err:
        raise ValueError(str(err)) from None
    model.config._name_or_path = hub_name  # what its sweeps are labelled with (not a file path)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _quiet():
    """In a notebook without ipywidgets: text progress bars, without tqdm's warning about them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        yield


def load(out: str | Path) -> Result | Report:
    """Reopen any sweep's results directory (the sweep is read from its ``sweep.json``) or a
    task report's (its ``manifest.json``)."""
    import json

    spec = Path(out) / "sweep.json"
    if spec.is_file():
        return Result(json.loads(spec.read_text())["sweep"], Path(out))
    manifest = Path(out) / "manifest.json"
    if manifest.is_file() and "lines" in json.loads(manifest.read_text()):
        return Report("report", Path(out))
    raise ValueError(f"{out} is not a sweep's results directory (no sweep.json) or a task report's")
