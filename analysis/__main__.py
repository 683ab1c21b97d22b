"""``python -m analysis backup|scale|attribution|circuit RESULTS_DIR``: plots, tables and a W&B run from saved results."""

from __future__ import annotations

import argparse
import sys

from sweeps.engine.cli import ArgumentParser, add_verbose_option
from sweeps.engine.console import set_verbose


def _subcommand(sub, sweep: str) -> argparse.ArgumentParser:
    """``python -m analysis SWEEP OUT [--wandb MODE] [--wandb-project P]``."""
    p = sub.add_parser(sweep, help=f"report on a {sweep} sweep's results directory")
    p.add_argument("out", help="the sweep's --out directory or URI")
    p.add_argument("--wandb", choices=("online", "offline", "disabled"), default="offline")
    p.add_argument("--wandb-project", default="interp-sweeps")
    p.add_argument("--allow-mixed-specs", action="store_true",
                   help="read shard files written under different sweep specs together (refused by default)")
    add_verbose_option(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m analysis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = _subcommand(sub, "backup")
    p.add_argument("--scatter", metavar="HEADS", help="heads to draw scatters for, e.g. L5H1,9.6 "
                   "(default: the top heads of the summary)")
    p.add_argument("--top", type=int, default=8, help="rows of the summary table per kind (default 8)")
    p.add_argument("--min-de-fraction", type=float, default=0.1, metavar="F",
                   help="rank (and colour in the heatmaps) only heads whose mean |direct effect| is at least "
                   "F times the largest head's (default 0.1)")
    p.add_argument("--min-r2", type=float, default=0.0, metavar="R",
                   help="also require the slope's fit to have r² >= R (default 0: no such condition)")
    p = _subcommand(sub, "scale")
    p.add_argument("--top", type=int, default=10, help="rows of each summary table (default 10)")
    p.add_argument("--min-break", type=float, default=0.5, metavar="E",
                   help="'breaks the model off-distribution': a causal effect of at least E at the smallest or "
                   "largest scale (default 0.5)")
    p = _subcommand(sub, "attribution")
    p.add_argument("--top", type=int, default=10, help="rows of the top-edges and top-nodes tables (default 10)")
    _subcommand(sub, "circuit")
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    if args.command == "circuit":
        return _circuit(args)
    if args.command == "scale":
        return _scale(args)
    if args.command == "attribution":
        return _attribution(args)

    from analysis.backup import ResultsError, load_results, summary_table, summary_text
    from analysis.report import write_backup_report
    from sweeps.engine.plan import PlanError, parse_heads

    try:
        results = load_results(args.out, args.allow_mixed_specs)
        scatter = parse_heads(args.scatter, results.n_layers, results.n_heads) if args.scatter else None
    except (ResultsError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_text(summary_table(results, args.top, args.min_de_fraction, args.min_r2)))
    from analysis.self_repair import summary_lines

    for line in summary_lines(results.self_repair, float(results.spec.get("top_fraction", 0.02)), results.n_layers,
                              results.neurons):
        print(line)
    write_backup_report(results, args.wandb, args.wandb_project, scatter, args.min_de_fraction, args.min_r2)
    return 0


def _load(loader, args):
    """``loader(out, allow_mixed)``'s results, or None after one ``error:`` line (exit code 2)."""
    from analysis.results import ResultsError

    try:
        return loader(args.out, args.allow_mixed_specs)
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def _scale(args) -> int:
    from analysis.report import write_scale_report
    from analysis.scale import load_scale_results, summary_tables, table_text

    results = _load(load_scale_results, args)
    if results is None:
        return 2
    if results.effects.empty:
        print(f"error: {args.out} holds no finished shards yet", file=sys.stderr)
        return 2
    for title, table in summary_tables(results, args.top, args.min_break).items():
        print(table_text(title, table))
    write_scale_report(results, args.wandb, args.wandb_project, args.min_break)
    return 0


def _attribution(args) -> int:
    from analysis.attribution import load_attribution_results, summary_text
    from analysis.report import write_attribution_report

    results = _load(load_attribution_results, args)
    if results is None:
        return 2
    if not results.complete:
        print(f"warning: only {results.n_prompts} of {results.spec.get('n_prompts')} prompts are in; "
              "scores cover those", file=sys.stderr)
    print(summary_text(results, args.top))
    write_attribution_report(results, args.wandb, args.wandb_project)
    return 0


def _circuit(args) -> int:
    from analysis.circuit import load_circuit_results, summary_lines
    from analysis.report import write_circuit_report

    results = _load(load_circuit_results, args)
    if results is None:
        return 2
    if not results.complete:
        print(f"warning: {len(results.faithfulness)} of {results.spec.get('n_circuits')} circuits are in",
              file=sys.stderr)
    print("\n".join(summary_lines(results)))
    write_circuit_report(results, args.wandb, args.wandb_project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
