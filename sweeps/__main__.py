"""``interp-sweeps`` (or ``python -m sweeps``): every command of the project behind one name.

    interp-sweeps SWEEP [ARGS]         every registered sweep (``sweeps.registry.SWEEPS``: backup,
                                       scale, attribution, circuit, report, ...)
    interp-sweeps analyze SWEEP DIR    tables, figures and a W&B run from saved results
    interp-sweeps plan SWEEP [ARGS]    memory, placement, FLOPs and time, from the model's config alone
    interp-sweeps export-graph DIR OUT.json   an attribution result as an EAP-IG graph file (MIB's format)
    interp-sweeps validate CLUSTER_YAML   check a Ray cluster config the way `ray up` will
    interp-sweeps models               the supported model families and which path runs each
    interp-sweeps tasks                the built-in tasks

``interp-sweeps COMMAND --help`` explains each. The entry scripts stay runnable on their own
(``python sweeps/backup.py ...``, ``ray submit cluster.yaml sweeps/backup.py -- ...``); a sweep
without one is submitted as this file: ``ray submit cluster.yaml sweeps/__main__.py -- SWEEP ...``.
"""

from __future__ import annotations

import argparse
import sys

from sweeps.registry.cli import ArgumentParser

ANALYZE_HELP = "tables, figures and a W&B run from a sweep's saved results"


def main(argv: list[str] | None = None) -> int:
    from sweeps.registry import SWEEPS

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SWEEPS:  # a sweep is a whole program: everything after its name is its own
        return SWEEPS[argv[0]].main(argv[1:])
    if argv and argv[0] == "analyze":
        from sweeps.registry.analyze import main as analyze

        return analyze(argv[1:], prog="interp-sweeps analyze")
    if argv and argv[0] == "plan":
        from sweeps.registry.plan import main as plan

        return plan(argv[1:])
    if argv and argv[0] == "export-graph":
        from sweeps.registry.export_graph import main as export_graph

        return export_graph(argv[1:])
    commands = [*SWEEPS, "analyze", "plan", "export-graph", "validate", "models", "tasks"]
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        from sweeps.registry.cli import did_you_mean

        print(
            f"error: unknown command {argv[0]!r}{did_you_mean(argv[0], commands)}; commands: {', '.join(commands)}",
            file=sys.stderr,
        )
        return 2
    parser = ArgumentParser(
        prog="interp-sweeps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distributed ablation sweeps for mechanistic interpretability.",
        epilog="`interp-sweeps COMMAND --help` explains each command. The entry scripts also run on their own:\n"
        "python sweeps/backup.py ..., ray submit cluster.yaml sweeps/backup.py -- ...",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls in SWEEPS.items():
        sub.add_parser(name, help=cls.summary_line, add_help=False)
    sub.add_parser("analyze", help=ANALYZE_HELP, add_help=False)
    sub.add_parser(
        "plan", help="memory, placement, FLOPs and time of a sweep, from the model's config alone", add_help=False
    )
    sub.add_parser(
        "export-graph",
        help="an attribution result as an EAP-IG graph file (Graph.to_json; MIB's format)",
        add_help=False,
    )
    p = sub.add_parser("validate", help="check a Ray cluster config (cluster.yaml) the way `ray up` will")
    p.add_argument("config", help="the cluster config, e.g. cluster.yaml")
    sub.add_parser("models", help="the supported model families and which path runs each")
    sub.add_parser("tasks", help="the built-in tasks (or give a .jsonl file to --task)")
    args = parser.parse_args(argv)
    if args.command == "models":
        return _models()
    if args.command == "tasks":
        from tasks import HUB_TASKS, TASKS

        for name, what in TASKS.items():
            print(f"{name:12s} {what}")
        print(f"{'FILE.jsonl':12s} your own logit-difference task: one {{clean, corrupt, correct, incorrect}} a line")
        print(f"{'':12s} (--data hf:NAME reads MIB's hub datasets for {', '.join(HUB_TASKS)}; docs/tasks.md)")
        return 0

    from sweeps.runtime.cluster_config import ClusterConfigError, check_cluster_config, describe, security_warnings

    try:
        config = check_cluster_config(args.config)
    except ClusterConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({describe(config)})")
    for warning in security_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _models() -> int:
    from sweeps.core.architectures import FAMILIES
    from sweeps.runtime.models import DEFAULT_MODEL

    print(f"{'family':18s} {'path':6s} {'tiny test model':15s} example hub names")
    for f in FAMILIES:
        print(f"{f.name:18s} {'fast':6s} {f.tiny_name:15s} {', '.join(f.examples)}")
    print(
        f"{'any other decoder':18s} {'bridge':6s} {'tiny-stablelm':15s} any causal LM TransformerLens boots "
        "(StableLM, Falcon, Cohere, Mixtral, ...): one full forward per ablation"
    )
    print(
        f"\ndefault: {DEFAULT_MODEL} (SmolLM2-135M-Instruct, embedded, offline). Refused by name: state-space, "
        "hybrid and non-causal models."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
