"""``python -m analysis backup RESULTS_DIR``: plots, tables and a W&B run from saved results."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backup", help="report on a backup sweep's results directory")
    p.add_argument("out", help="the sweep's --out directory")
    p.add_argument("--wandb", choices=("online", "offline", "disabled"), default="offline")
    p.add_argument("--wandb-project", default="interp-sweeps")
    p.add_argument("--scatter", metavar="HEADS", help="heads to draw scatters for, e.g. L5H1,9.6 "
                   "(default: the top heads of the summary)")
    p.add_argument("--top", type=int, default=8, help="rows of the summary table per kind (default 8)")
    p.add_argument("--min-de-fraction", type=float, default=0.1, metavar="F",
                   help="rank only heads whose mean |direct effect| is at least F times the largest "
                   "head's (default 0.1)")
    args = parser.parse_args(argv)

    from analysis.backup import ResultsError, load_results, summary_table
    from analysis.report import write_backup_report
    from sweeps.engine.plan import PlanError, parse_heads

    try:
        results = load_results(args.out)
        scatter = parse_heads(args.scatter, results.n_layers, results.n_heads) if args.scatter else None
    except (ResultsError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(results, args.top, args.min_de_fraction).to_string(index=False))
    write_backup_report(results, args.wandb, args.wandb_project, scatter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
