"""``python -m sweeps validate CLUSTER_YAML``: check a Ray cluster config before ``ray up``.

Runs Ray's own validation and this project's needs (the checkout mounted and
installed on every node); prints one line either way; exit code 0 or 2.
"""

from __future__ import annotations

import sys

from sweeps.engine.cli import ArgumentParser


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m sweeps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a Ray cluster config (cluster.yaml) the way `ray up` will")
    p.add_argument("config", help="the cluster config, e.g. cluster.yaml")
    args = parser.parse_args(argv)

    from sweeps.engine.cluster_config import ClusterConfigError, check_cluster_config, describe

    try:
        config = check_cluster_config(args.config)
    except ClusterConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({describe(config)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
