"""``Sweep``: what one kind of sweep is, in one class.

A sweep class owns everything the commands need to know about its kind:

- its command line (``add_options``; the class docstring is its ``--help``),
- one run (an instance): cheap input checks (``prepare``), the spec that
  resume compares (``spec``), shard planning (``plan``), the worker job
  (``job``), progress units and cost, the datasets each shard writes and
  those written from all of them at the end (``finish``),
- its results: the loader (``load``), the console summary (``summary``) and the
  report (figures, tables, W&B: ``report``), shared by the sweep command and
  ``interp-sweeps analyze NAME DIR``.

``run`` strings them together for every sharded sweep; ``sweeps/registry/driver.py``
does the locking, resuming and shard loop, ``sweeps/runtime/executors.py`` the
workers. A class that sets ``name`` registers itself in ``SWEEPS`` when it is defined:
``interp-sweeps NAME``, ``python -m sweeps NAME`` (what ``ray submit`` runs for a sweep
without an entry script of its own), ``interp-sweeps analyze NAME DIR`` and the tests'
lists all come from there (docs/layout.md, "Adding a sweep").
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any, ClassVar, Iterable

from sweeps.registry.cli import (
    ArgumentParser,
    UserError,
    add_common_options,
    add_verbose_option,
    cli_main,
    script_parser,
)

# Every sweep, by name: a subclass of ``Sweep`` that sets ``name`` adds itself when it is defined.
# Commands list them by ``order`` (``ordered``).
SWEEPS: dict[str, type[Sweep]] = {}


def ordered(sweeps: Iterable[type[Sweep]]) -> list[type[Sweep]]:
    return sorted(sweeps, key=lambda cls: cls.order)


def check_devices(args: argparse.Namespace, info) -> None:
    """``--devices-per-replica K``, before any weights load: the model must have K layers to
    split and run on the fast path, and an in-process run on a GPU machine must see K GPUs
    (a Ray cluster's nodes are checked when its actors are placed)."""
    k = getattr(args, "devices_per_replica", 1)
    if k == 1:
        return
    from sweeps.registry.cli import UserError

    if info.path != "fast":
        raise UserError(f"--devices-per-replica {k}: {args.model} runs on the bridge path, one device per replica")
    if k > info.n_layers:
        raise UserError(f"--devices-per-replica {k}: {args.model} has only {info.n_layers} layers to split")
    import torch

    if args.executor == "local" and torch.cuda.is_available() and torch.cuda.device_count() < k:
        raise UserError(f"--devices-per-replica {k}: this machine has {torch.cuda.device_count()} GPU(s)")


class Sweep:
    """Subclasses set the class attributes below and override the methods that raise."""

    name: ClassVar[str]  # the subcommand, results/<name>/..., the spec's "sweep"; setting it registers the class
    script: ClassVar[str | None] = None  # an entry script under the repository, if the sweep has one
    order: ClassVar[int] = 100  # place in `interp-sweeps --help` (lower first)
    summary_line: ClassVar[str]  # one line for `interp-sweeps --help`
    help_sections: ClassVar[int] = 4  # paragraphs of the docstring above the options in --help
    datasets: ClassVar[tuple[str, ...]] = ()  # what every shard writes
    derived: ClassVar[tuple[str, ...]] = ()  # written from all shards by ``finish``, once none failed
    unit_name: ClassVar[str] = "shard"  # what the progress bar counts
    analyzable: ClassVar[bool] = True  # has results ``interp-sweeps analyze`` reads back

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # an abstract helper class, not a sweep
            return
        known = SWEEPS.get(cls.name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"two sweeps are named {cls.name!r}: {known.__module__}.{known.__qualname__} "
                f"and {cls.__module__}.{cls.__qualname__}"
            )
        SWEEPS[cls.name] = cls

    @classmethod
    def input_errors(cls) -> tuple[type[Exception], ...]:
        """Exceptions that mean bad input to this sweep (one ``error:`` line, exit code 2): those of
        every sweep (``driver.input_errors``) and the sweep's own, which a subclass adds."""
        from sweeps.registry.driver import input_errors

        return input_errors()

    @classmethod
    def prog(cls) -> str:
        """How the command is called: its entry script, else ``interp-sweeps NAME``."""
        return cls.script or f"interp-sweeps {cls.name}"

    @classmethod
    def resume_command(cls, argv: list[str]) -> str:
        """The command line that reruns this sweep with ``argv`` in this interpreter."""
        from sweeps.registry.driver import REPO
        from sweeps.runtime.console import command

        return command(REPO / cls.script, *argv) if cls.script else command("-m sweeps", cls.name, *argv)

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.inputs: Any = None  # driver.SweepInputs, set by ``prepare``

    # -- the command line -------------------------------------------------------

    @classmethod
    def parser(cls) -> ArgumentParser:
        parser = script_parser(cls.prog(), inspect.cleandoc(cls.__doc__ or ""), cls.help_sections)
        cls.add_options(parser)
        return parser

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        """The options every sweep shares; subclasses add their own group after these."""
        add_common_options(parser, cls.name)

    @classmethod
    def main(cls, argv: list[str] | None = None) -> int:
        """The entry script: parse, run; bad input is one ``error:`` line and exit code 2."""
        return cli_main(cls.parser, lambda args, full_argv: cls(args).run(full_argv), argv)

    # -- one run ------------------------------------------------------------------

    def prepare(self) -> None:
        """Check the input and parse what the run needs, before any model weights load.

        Raises one of ``driver.input_errors()`` or ``UserError``. The base checks the output
        directory, task and model name (``driver.prepare_inputs``)."""
        from sweeps.registry.driver import prepare_inputs

        self.inputs = prepare_inputs(self.args, self.name)
        check_devices(self.args, self.inputs.info)
        if getattr(self.args, "memory_budget", None) is not None:
            from sweeps.registry.plan import check_budget

            task = self.inputs.task
            check_budget(self.name, self.args, task.n_prompts, int(task.clean.shape[1]))

    def spec(self) -> dict:
        """What the results depend on: a resumed run must match it exactly. Subclasses add
        their own settings to ``base_spec``."""
        raise NotImplementedError

    def base_spec(self) -> dict:
        """What every sweep's results depend on: the sweep, the model and its dtype, the task
        and the seed."""
        task = self.inputs.task
        return {
            "sweep": self.name,
            "model": self.args.model,
            "dtype": self.args.dtype,
            "task": task.name,
            "task_params": task.params,
            "task_hash": task.fingerprint(),
            "seed": self.args.seed,
        }

    def plan(self, done: set[str]) -> tuple[list, str]:
        """The shards still to run given the finished shard ids, and a one-line header. Asked
        again after each wave: more shards may follow from finished ones (none ends the sweep)."""
        raise NotImplementedError

    def job(self):
        """The picklable job every worker binds to its model replica (``sweeps/jobs/``)."""
        raise NotImplementedError

    def units(self, shard) -> int:
        """How many ``unit_name`` a shard holds (the progress bar's count)."""
        return 1

    def cost(self, shard) -> float:
        """A shard's relative compute (the progress bar's time left)."""
        return float(self.units(shard))

    def columns(self) -> dict[str, Any]:
        """Sweep-specific provenance columns of every row."""
        return {"n_prompts": self.inputs.task.n_prompts}

    def finish(self, store) -> None:
        """Write ``derived`` from all shards (under the sweep's lock, once none failed)."""

    def run(self, argv: list[str]) -> int:
        """Check, run every shard (resuming), then print the summary and write the report."""
        from sweeps.registry.driver import print_failures, run_sweep

        try:  # cheap checks first: nothing here loads model weights
            self.prepare()
        except self.input_errors() as err:
            raise UserError(str(err)) from None
        failures = run_sweep(self, argv)
        if isinstance(failures, int):
            return failures
        print_failures(failures)
        if failures and self.derived:  # the derived datasets wait for every shard
            return 1
        try:
            return self._summary_and_report(failures)
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM while the report or W&B run is written
            from sweeps.runtime.console import command, interrupt_exit_code

            print(
                f"\nstopped while writing the report; the results in {self.inputs.out} are complete. Write the "
                f"report with:\n  {command('-m analysis', self.name, str(self.inputs.out))}",
                file=sys.stderr,
            )
            return interrupt_exit_code(err)

    def _summary_and_report(self, failures: list) -> int:
        results = self.load(self.inputs.out)
        if self.is_empty(results):
            print(f"no finished shards in {self.inputs.out}; re-run the same command to retry", file=sys.stderr)
            return 1
        options = self.analysis_options(self.args, self.inputs.out)
        self.check_options(results, options)
        for line in self.summary(results, options):
            print(line)
        if not self.args.no_report:
            self.report(results, options)
        return 1 if failures else 0

    # -- results: the sweep's last step, and `interp-sweeps analyze NAME DIR` -------

    @classmethod
    def analysis_parser(cls, prog: str) -> ArgumentParser:
        parser = ArgumentParser(
            prog=prog, description=f"Tables, figures and a W&B run from a {cls.name} sweep's results directory."
        )
        cls.add_analysis_arguments(parser)
        return parser

    @classmethod
    def add_analysis_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("out", help="the sweep's --out directory or URI")
        parser.add_argument(
            "--wandb",
            choices=("online", "offline", "disabled"),
            default="offline",
            help="W&B logging: offline (default), online or disabled",
        )
        parser.add_argument("--wandb-project", default="interp-sweeps", help="W&B project (default interp-sweeps)")
        parser.add_argument(
            "--allow-mixed-specs",
            action="store_true",
            help="read shard files written under different sweep specs together (refused by default)",
        )
        add_verbose_option(parser)
        cls.add_analysis_options(parser)

    @classmethod
    def add_analysis_options(cls, parser: argparse.ArgumentParser) -> None:
        """Options of the summary and report only (they never change the results)."""

    @classmethod
    def analysis_options(cls, args: argparse.Namespace, out) -> argparse.Namespace:
        """The analysis options after a sweep: their defaults, overridden by the sweep's own
        options of the same name (``--top``, ``--min-break``, ``--wandb``, ...)."""
        options = cls.analysis_parser(cls.name).parse_args([str(out)])
        for key in vars(options):
            if key != "out" and hasattr(args, key):
                setattr(options, key, getattr(args, key))
        return options

    @staticmethod
    def load(out, allow_mixed: bool = False):
        """The results under ``out`` (raises ``analysis.results.ResultsError``)."""
        raise NotImplementedError

    @classmethod
    def is_empty(cls, results) -> bool:
        """No finished shard is in yet."""
        return False

    @classmethod
    def check_options(cls, results, options: argparse.Namespace) -> None:
        """Check the analysis options against the results (raise ``UserError``)."""

    @classmethod
    def summary(cls, results, options: argparse.Namespace) -> list[str]:
        """The lines printed at the end of the sweep (and by analyze)."""
        raise NotImplementedError

    @classmethod
    def report(cls, results, options: argparse.Namespace) -> None:
        """Figures, tables and the W&B run."""
        raise NotImplementedError

    @classmethod
    def analyze(cls, argv: list[str], prog: str) -> int:
        """``interp-sweeps analyze NAME DIR [options]``: summary and report from saved results."""
        from analysis.results import ResultsError
        from sweeps.runtime.console import set_verbose

        options = cls.analysis_parser(prog).parse_args(argv)
        set_verbose(options.verbose)
        try:
            results = cls.load(options.out, options.allow_mixed_specs)
            if cls.is_empty(results):
                raise UserError(f"{options.out} holds no finished shards yet")
            cls.check_options(results, options)
        except (ResultsError, UserError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        from sweeps.runtime.console import interrupt_exit_code, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                for line in cls.summary(results, options):
                    print(line)
                cls.report(results, options)
        except KeyboardInterrupt as err:
            print(
                f"\nstopped; the results in {options.out} are untouched. Run the same command again to write "
                "the report",
                file=sys.stderr,
            )
            return interrupt_exit_code(err)
        return 0
