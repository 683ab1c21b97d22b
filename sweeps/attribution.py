#!/usr/bin/env python
"""Attribution sweep: attribution-patching scores of every node and every edge.

One clean forward + backward and one corrupt forward per batch of prompts
score, to first order, what patching each component's corrupt value into the
clean run would do to the metric: every node (the embeddings, each head's
output, each MLP's output) and every edge from a node to a later reader (the
q, k and v input of each head, each MLP's input, the final residual stream).
In grouped-query models a key/value head shared by several query heads is one
reader: its k and v edges are counted once (named L8KV1, not split or padded).
Metric: the normalised logit difference (ld - ld_corrupt)/(ld_clean -
ld_corrupt) for logit-difference tasks, the mean next-token log-probability
for text. A score > 0 means the node or edge carries the clean behaviour.
--method eap-ig-inputs / eap-ig-activations average the gradient over
--ig-steps interpolated runs (integrated gradients: better circuits where
first order fails); --method exact patches every node (and small models'
every edge) for real.

Shards are batches of prompts (--batch-size); each returns raw sums, and the
driver adds them up exactly. --verify-top K then patches the K top-ranked
nodes and the K top-ranked edges for real (node patching; path patching of
the one input an edge feeds) and reports how well attribution predicted it.

Writes the Parquet datasets nodes/ and edges/ (node, score, abs_rank; upstream,
downstream, input, score, abs_rank), verify/ and the per-shard sums under
--out; then plots and a W&B run. Re-running the same command resumes. The top
nodes serve the scale sweep as a circuit (--circuit top:K@OUT), and
sweeps/circuit.py measures how faithful the top edges or nodes are.

Examples:
  python sweeps/attribution.py --model tiny-gpt2 --executor local
  python sweeps/attribution.py --task sentiment --verify-top 20
  python sweeps/attribution.py --method eap-ig-inputs --ig-steps 5
  python sweeps/attribution.py --model gpt2-small --n-prompts 128 --batch-size 16
  python sweeps/scale.py --circuit top:20@results/attribution/smollm2-135m__ioi
  ray submit cluster.yaml sweeps/attribution.py -- --model gpt2-small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.engine.cli import (
    UserError,
    add_common_options,
    cli_main,
    non_negative_int,
    positive_int,
    script_parser,
)

DEFAULT_VERIFY_TOP = 10


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser("sweeps/attribution.py", __doc__)
    add_common_options(parser, "attribution")
    g = parser.add_argument_group("attribution sweep")
    g.add_argument("--verify-top", type=non_negative_int, default=DEFAULT_VERIFY_TOP, metavar="K",
                   help=f"patch the K top nodes and K top edges for real and report the correlation with "
                   f"their scores (default {DEFAULT_VERIFY_TOP}; 0 = off)")
    g.add_argument("--method", default="eap", metavar="METHOD",
                   help="how edges are scored: eap (attribution patching: one forward and backward), "
                   "eap-ig-inputs (gradients averaged over --ig-steps runs with the input embeddings "
                   "interpolated from corrupt to clean), eap-ig-activations (each node group's output "
                   "interpolated in turn), exact (real patching of every node, and of every edge up to "
                   f"--max-exact-edges) (default eap; results go to <out>__<method> unless --out is given)")
    g.add_argument("--ig-steps", type=positive_int, default=5, metavar="N",
                   help="interpolation steps of the eap-ig methods (default 5; 1 step is eap)")
    g.add_argument("--max-exact-edges", type=non_negative_int, default=5000, metavar="N",
                   help="--method exact patches every edge only if the model has at most N edges "
                   "(one forward each; default 5000), else nodes only")
    g.add_argument("--top", type=positive_int, default=10, metavar="N",
                   help="rows of the printed top-edges and top-nodes tables (default 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser, run, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    # Imports here keep --help instant.
    from analysis.attribution import DATASETS, DERIVED, load_attribution_results, top_targets
    from sweeps.engine.attribution_sweep import AttributionJob, VerifyShard, plan_attribution, plan_verify
    from sweeps.engine.driver import input_errors, prepare_inputs, print_failures, run_sweep

    from sweeps.engine.attribution import METHODS
    from sweeps.engine.cli import default_out, did_you_mean

    if args.method not in METHODS:
        raise UserError(f"unknown --method {args.method!r}{did_you_mean(args.method, METHODS)}; "
                        f"methods: {', '.join(METHODS)}")
    if args.out is None and args.method != "eap":
        args.out = f"{default_out('attribution', args.model, args.task)}__{args.method}"
    try:  # cheap checks first: nothing here loads model weights
        inputs = prepare_inputs(args, "attribution")
    except input_errors() as err:
        raise UserError(str(err)) from None
    info, task = inputs.info, inputs.task
    if args.method.startswith("eap-ig") and info.path != "fast":
        raise UserError(f"--method {args.method} runs on the fast path's families; {args.model} runs on the "
                        "bridge path: use --method eap or exact")
    steps = args.ig_steps if args.method.startswith("eap-ig") else 1
    exact_edges = args.method == "exact" and info.n_edges <= args.max_exact_edges
    if args.method == "exact" and not exact_edges:
        print(f"--method exact: {args.model} has {info.n_edges:,} edges, more than --max-exact-edges "
              f"{args.max_exact_edges:,} (one forward each): patching its {info.n_nodes} nodes only")
    spec = {
        "sweep": "attribution", "model": args.model, "task": task.name, "task_params": task.params,
        "task_hash": task.fingerprint(), "seed": args.seed, "metric": task.kind, "n_prompts": task.n_prompts,
        "batch_size": args.batch_size, "verify_top": args.verify_top,
        "method": args.method, "ig_steps": steps, "exact_edges": exact_edges,
        "n_layers": info.n_layers, "n_heads": info.n_heads,
    }

    def plan(done: set[str]):
        todo = plan_attribution(task.n_prompts, args.batch_size, done)
        n_batches = -(-task.n_prompts // args.batch_size)
        if todo or args.verify_top == 0:
            how = args.method + (f", {steps} steps" if steps > 1 else "")
            return todo, (f"attribution sweep ({how}): {args.model} on {task.name}, {task.n_prompts} prompts in "
                          f"{n_batches} batches, {n_batches - len(todo)} done, {len(todo)} to run")
        results = load_attribution_results(inputs.out)
        targets = top_targets(results.nodes, results.edges, args.verify_top)
        todo = plan_verify(task.n_prompts, args.batch_size, targets, done)
        return todo, (f"verifying the top {args.verify_top} nodes and edges by real patching: "
                      f"{n_batches - len(todo)} of {n_batches} batches done, {len(todo)} to run")

    def finish(store) -> None:
        """Add the shards up into nodes/, edges/ and verify/ (under the sweep's lock)."""
        results = load_attribution_results(inputs.out)
        store.write_derived("nodes", _table(results.nodes), n_prompts=results.n_prompts)
        store.write_derived("edges", _table(results.edges), n_prompts=results.n_prompts)
        store.write_derived("verify", _table(results.verify), n_prompts=results.n_prompts)

    failures = run_sweep(
        args, argv, "sweeps/attribution.py", inputs, spec, DATASETS, plan,
        AttributionJob(task, args.method, steps, exact_edges),
        units=lambda s: s.stop - s.start, unit_name="prompt",
        cost=lambda s: (s.stop - s.start) * (len(s.targets) / 2 if isinstance(s, VerifyShard) else 4),
        columns={"n_prompts": task.n_prompts}, derived=DERIVED, finish=finish,
    )
    if isinstance(failures, int):
        return failures
    print_failures(failures)
    if failures:
        return 1

    from analysis.attribution import summary_text

    results = load_attribution_results(inputs.out)
    metric = "logit difference" if task.kind == "logit_diff" else "log-probability"
    print(f"\nclean {metric} {results.clean_metric:.4f}, corrupt {results.corrupt_metric:.4f} "
          f"(mean over {results.n_points} points)")
    print(f"\n{summary_text(results, args.top)}")
    if not args.no_report:
        from analysis.report import write_attribution_report

        write_attribution_report(results, wandb_mode=args.wandb, project=args.wandb_project)
    return 0


def _table(frame):
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


if __name__ == "__main__":
    sys.exit(main())
