"""``python -m analysis SWEEP DIR`` (also ``interp-sweeps analyze SWEEP DIR``): the summary, plots,
tables and a W&B run from a sweep's saved results. SWEEP is any registered sweep with results
(backup, scale, attribution, circuit); each takes its own options (``SWEEP --help``)."""

from __future__ import annotations

import sys

from sweeps.registry.cli import ArgumentParser


def main(argv: list[str] | None = None, prog: str = "python -m analysis") -> int:
    from sweeps.registry import SWEEPS

    argv = list(sys.argv[1:] if argv is None else argv)
    analyzable = {name: cls for name, cls in SWEEPS.items() if cls.analyzable}
    if argv and argv[0] in analyzable:
        return analyzable[argv[0]].analyze(argv[1:], prog=f"{prog} {argv[0]}")
    if argv and not argv[0].startswith("-"):
        from sweeps.registry import UserError, sweep_named

        try:
            sweep_named(argv[0])
            message = (
                f"the {argv[0]} command writes its outputs itself; nothing to analyze "
                f"(sweeps with results: {', '.join(analyzable)})"
            )
        except UserError as err:
            message = str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    parser = ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="sweep", required=True, metavar="SWEEP")
    for name in analyzable:
        sub.add_parser(name, help=f"summary, figures and a W&B run from {name} results", add_help=False)
    parser.parse_args(argv)  # only reached without a known SWEEP: prints the usage or one error line
    return 2


if __name__ == "__main__":
    sys.exit(main())
