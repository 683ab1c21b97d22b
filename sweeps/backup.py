#!/usr/bin/env python
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
  python sweeps/backup.py                                   # SmolLM2-135M on IOI, local Ray
  python sweeps/backup.py --model tiny-gpt2 --executor local
  python sweeps/backup.py --task text --n-prompts 50 --seq-len 100 --heads L5,L9H6
  ray submit cluster.yaml sweeps/backup.py -- --model gpt2-small --task text
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.engine.cli import UserError, add_common_options, cli_main, non_negative_int, positive_int, script_parser
from sweeps.engine.effects import ABLATIONS

DATASETS = ("slopes", "responses", "points", "self_repair", "neurons")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser("sweeps/backup.py", __doc__)
    add_common_options(parser, "backup")
    g = parser.add_argument_group("backup sweep")
    g.add_argument("--heads", metavar="LIST",
                   help="upstream heads to ablate, e.g. L23H3,23.0,L5 (a whole layer) (default: all)")
    g.add_argument("--ablation", choices=ABLATIONS, default="resample",
                   help="resample (default): the head's output on the corrupt prompt; zero; mean: its "
                   "mean output over every token of the task")
    g.add_argument("--fit-threshold", type=float, default=0.0, metavar="X",
                   help="fit the slope only on points with |direct effect| > X (default 0: every point)")
    g.add_argument("--bootstrap", type=non_negative_int, default=200, metavar="N",
                   help="bootstrap resamples (of whole prompts) for the slope's 95%% interval "
                   "(default 200; 0 to skip)")
    g.add_argument("--top-fraction", type=float, default=0.02, metavar="F",
                   help="the self-repair decomposition's 'top' selection: the fraction of points with the "
                   "largest clean direct effect of the ablated head (default 0.02, as Rushing & Nanda 2024; "
                   "1 = every point)")
    g.add_argument("--top-neurons", type=int, default=20, metavar="K",
                   help="neurons/: the K neurons of the last layer's MLP whose direct effect changes most "
                   "when a head is ablated, per head and selection (default 20)")
    g.add_argument("--heads-per-shard", type=positive_int, metavar="N",
                   help="split each layer's heads into shards of N (default: one shard per layer)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser, run, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    # Imports here keep --help instant.
    from sweeps.engine.backup_sweep import BackupJob
    from sweeps.engine.driver import input_errors, prepare_inputs, print_failures, run_sweep
    from sweeps.engine.plan import PlanError, parse_heads, plan_backup, remaining

    try:  # cheap checks first: nothing here loads model weights
        if args.fit_threshold < 0 or args.fit_threshold != args.fit_threshold:
            raise PlanError(f"--fit-threshold must be a number >= 0, got {args.fit_threshold}")
        if not 0 < args.top_fraction <= 1:
            raise PlanError(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
        if args.top_neurons < 1:
            raise PlanError(f"--top-neurons must be >= 1, got {args.top_neurons}")
        inputs = prepare_inputs(args, "backup")
        heads = parse_heads(args.heads, inputs.info.n_layers, inputs.info.n_heads)
    except input_errors() as err:
        raise UserError(str(err)) from None
    task, out = inputs.task, inputs.out
    spec = {
        "sweep": "backup", "model": args.model, "task": task.name, "task_params": task.params,
        "task_hash": task.fingerprint(), "seed": args.seed, "ablation": args.ablation,
        "fit_threshold": args.fit_threshold, "bootstrap": args.bootstrap, "top_fraction": args.top_fraction,
        "top_neurons": args.top_neurons,
    }

    def plan(done: set[str]):
        todo = remaining(heads, done)
        shards = plan_backup(todo, args.heads_per_shard)
        return shards, (f"backup sweep: {args.model} on {task.name} ({task.n_prompts} prompts), "
                        f"{len(heads)} heads requested, {len(heads) - len(todo)} already done, "
                        f"{len(shards)} shards to run")

    job = BackupJob(task, args.ablation, args.batch_size, args.fit_threshold, args.bootstrap, args.seed,
                    args.top_fraction, args.top_neurons)
    failures = run_sweep(
        args, argv, "sweeps/backup.py", inputs, spec, DATASETS, plan, job,
        units=lambda s: len(s.heads), unit_name="head",
        # a shard replays layers layer..L-1 for each of its heads
        cost=lambda s: len(s.heads) * (inputs.info.n_layers - s.layer),
        columns={"ablation": args.ablation},
    )
    if isinstance(failures, int):
        return failures
    print_failures(failures)
    from analysis.backup import load_results, summary_table, summary_text

    results = load_results(out)
    if results.slopes.empty:
        print(f"no finished shards in {out}; re-run the same command to retry", file=sys.stderr)
        return 1
    print(summary_text(summary_table(results)))
    from analysis.self_repair import summary_lines

    for line in summary_lines(results.self_repair, args.top_fraction, inputs.info.n_layers, results.neurons):
        print(line)
    if not args.no_report:
        from analysis.report import write_backup_report

        write_backup_report(results, wandb_mode=args.wandb, project=args.wandb_project)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
