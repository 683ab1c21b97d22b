"""The backup-slope sweep as a command (the worker's side: ``sweeps/jobs/backup.py``)."""

from __future__ import annotations

import argparse

from sweeps.jobs.datasets import SHARDS
from sweeps.registry.base import Sweep
from sweeps.registry.cli import UserError, non_negative_int, positive_int


class BackupSweep(Sweep):
    """Backup-slope sweep: ablate every upstream head, measure how later heads compensate.

    For each upstream head (l*, h*): replace its output at every position (resample
    from the corrupt prompts by default), rerun the model from layer l*, and
    recompute every head's direct effect on the answer, still dividing by the
    clean run's final-norm scale. The accumulated backup is the summed change of
    every head in layers > l*; its least-squares slope against the head's own
    clean direct effect says how much of the head's effect is compensated
    (slope > 0: backed up; slope < 0: later heads make it worse).

    It also splits each head's total effect exactly into its own change and the repair by the
    other heads, the MLPs and the final norm (Rushing & Nanda 2024): self_repair/; and the last
    layer's MLP term per neuron (anti-erasure): the top --top-neurons neurons of each head, neurons/.

    Writes Parquet datasets slopes/, responses/, points/, self_repair/, neurons/ and a manifest under
    --out, then plots and a W&B run (offline by default). Re-running the same
    command resumes: finished shards are skipped.

    Examples:
      .venv/bin/interp-sweeps backup                                   # SmolLM2-135M on IOI, local Ray
      .venv/bin/interp-sweeps backup --model tiny-gpt2 --executor local
      .venv/bin/interp-sweeps backup --task text --n-prompts 50 --seq-len 100 --heads L5,L9H6
      ray submit cluster.yaml sweeps/backup.py -- --model gpt2-small --task text
    """

    name = "backup"
    script = "sweeps/backup.py"
    order = 10
    summary_line = "the backup-slope sweep: ablate each head, fit how later heads compensate"
    datasets = SHARDS["backup"]
    unit_name = "head"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        from sweeps.core.effects import ABLATIONS

        super().add_options(parser)
        g = parser.add_argument_group("backup sweep")
        g.add_argument(
            "--heads",
            metavar="LIST",
            help="upstream heads to ablate, e.g. L23H3,23.0,L5 (a whole layer) (default: all)",
        )
        g.add_argument(
            "--ablation",
            choices=ABLATIONS,
            default="resample",
            help="resample (default): the head's output on the corrupt prompt; zero; mean: its "
            "mean output over every token of the task",
        )
        g.add_argument(
            "--fit-threshold",
            type=float,
            default=0.0,
            metavar="X",
            help="fit the slope only on points with |direct effect| > X (default 0: every point)",
        )
        g.add_argument(
            "--bootstrap",
            type=non_negative_int,
            default=200,
            metavar="N",
            help="bootstrap resamples (of whole prompts) for the slope's 95%% interval (default 200; 0 to skip)",
        )
        g.add_argument(
            "--top-fraction",
            type=float,
            default=0.02,
            metavar="F",
            help="the self-repair decomposition's 'top' selection: the fraction of points with the "
            "largest clean direct effect of the ablated head (default 0.02, as Rushing & Nanda 2024; "
            "1 = every point)",
        )
        g.add_argument(
            "--top-neurons",
            type=int,
            default=20,
            metavar="K",
            help="neurons/: the K neurons of the last layer's MLP whose direct effect changes most "
            "when a head is ablated, per head and selection (default 20)",
        )
        g.add_argument(
            "--heads-per-shard",
            type=positive_int,
            metavar="N",
            help="split each layer's heads into shards of N (default: one shard per layer)",
        )

    def prepare(self) -> None:
        from sweeps.jobs.plan import PlanError, parse_heads

        args = self.args
        if args.fit_threshold < 0 or args.fit_threshold != args.fit_threshold:
            raise PlanError(f"--fit-threshold must be a number >= 0, got {args.fit_threshold}")
        if not 0 < args.top_fraction <= 1:
            raise PlanError(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
        if args.top_neurons < 1:
            raise PlanError(f"--top-neurons must be >= 1, got {args.top_neurons}")
        super().prepare()
        info = self.inputs.info
        self.heads = parse_heads(args.heads, info.n_layers, info.n_heads)

    def spec(self) -> dict:
        args = self.args
        return {
            **self.base_spec(),
            "ablation": args.ablation,
            "fit_threshold": args.fit_threshold,
            "bootstrap": args.bootstrap,
            "top_fraction": args.top_fraction,
            "top_neurons": args.top_neurons,
        }

    def plan(self, done: set[str]) -> tuple[list, str]:
        from sweeps.jobs.plan import plan_backup, remaining

        todo = remaining(self.heads, done)
        shards = plan_backup(todo, self.args.heads_per_shard)
        task = self.inputs.task
        return shards, (
            f"backup sweep: {self.args.model} on {task.name} ({task.n_prompts} prompts), "
            f"{len(self.heads)} heads requested, {len(self.heads) - len(todo)} already done, "
            f"{len(shards)} shards to run"
        )

    def job(self):
        from sweeps.jobs.backup import BackupJob

        a = self.args
        return BackupJob(
            self.inputs.task,
            a.ablation,
            a.batch_size,
            a.fit_threshold,
            a.bootstrap,
            a.seed,
            a.top_fraction,
            a.top_neurons,
        )

    def units(self, shard) -> int:
        return len(shard.heads)

    def cost(self, shard) -> float:
        return len(shard.heads) * (self.inputs.info.n_layers - shard.layer)  # replays layers layer..L-1 per head

    def columns(self) -> dict:
        return {"ablation": self.args.ablation}

    # -- results ---------------------------------------------------------------------

    @classmethod
    def add_analysis_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--scatter",
            metavar="HEADS",
            help="heads to draw scatters for, e.g. L5H1,9.6 (default: the top heads of the summary)",
        )
        parser.add_argument("--top", type=int, default=8, help="rows of the summary table per kind (default 8)")
        parser.add_argument(
            "--heads",
            metavar="LIST",
            help="heads the summary answers for, each with its fit and whether it is ranked or why not "
            "(after a sweep: the heads it swept)",
        )
        parser.add_argument(
            "--min-de-fraction",
            type=float,
            default=0.1,
            metavar="F",
            help="rank (and colour in the heatmaps) only heads whose mean |direct effect| is at "
            "least F times the largest head's (default 0.1)",
        )
        parser.add_argument(
            "--min-r2",
            type=float,
            default=0.0,
            metavar="R",
            help="also require the slope's fit to have r² >= R (default 0: no such condition)",
        )

    @staticmethod
    def load(out, allow_mixed: bool = False):
        from analysis.backup import load_results

        return load_results(out, allow_mixed)

    @classmethod
    def is_empty(cls, results) -> bool:
        return results.slopes.empty

    @classmethod
    def check_options(cls, results, options: argparse.Namespace) -> None:
        from sweeps.jobs.plan import PlanError, parse_heads

        try:
            options.scatter_heads = (
                parse_heads(options.scatter, results.n_layers, results.n_heads) if options.scatter else None
            )
            heads = getattr(options, "heads", None)
            options.asked_heads = parse_heads(heads, results.n_layers, results.n_heads) if heads else None
        except PlanError as err:
            raise UserError(str(err)) from None

    @classmethod
    def summary(cls, results, options: argparse.Namespace) -> list[str]:
        from analysis.backup import asked_heads_lines, summary_table, summary_text
        from analysis.self_repair import summary_lines

        table = summary_table(results, options.top, options.min_de_fraction, options.min_r2)
        asked = getattr(options, "asked_heads", None)
        return [
            summary_text(table, options.min_de_fraction),
            *(
                asked_heads_lines(results, asked, table, options.top, options.min_de_fraction, options.min_r2)
                if asked
                else []
            ),
            *summary_lines(
                results.self_repair, float(results.spec.get("top_fraction", 0.02)), results.n_layers, results.neurons
            ),
        ]

    @classmethod
    def report(cls, results, options: argparse.Namespace) -> None:
        from analysis.report import write_backup_report

        write_backup_report(
            results,
            options.wandb,
            options.wandb_project,
            options.scatter_heads,
            options.min_de_fraction,
            options.min_r2,
        )
