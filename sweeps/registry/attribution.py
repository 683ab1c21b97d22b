"""The attribution sweep as a command (the worker's side: ``sweeps/jobs/attribution.py``)."""

from __future__ import annotations

import argparse

from sweeps.jobs.datasets import DERIVED, SHARDS
from sweeps.registry.base import Sweep
from sweeps.registry.cli import UserError, default_out, did_you_mean, non_negative_int, positive_int

DEFAULT_VERIFY_TOP = 10


class AttributionSweep(Sweep):
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
      .venv/bin/interp-sweeps attribution --model tiny-gpt2 --executor local
      .venv/bin/interp-sweeps attribution --task sentiment --verify-top 20
      .venv/bin/interp-sweeps attribution --method eap-ig-inputs --ig-steps 5
      .venv/bin/interp-sweeps attribution --model gpt2-small --n-prompts 128 --batch-size 16
      .venv/bin/interp-sweeps scale --circuit top:20@results/attribution/smollm2-135m__ioi
      ray submit cluster.yaml sweeps/attribution.py -- --model gpt2-small
    """

    name = "attribution"
    script = "sweeps/attribution.py"
    order = 30
    summary_line = "the attribution sweep: every node and edge, checked by real patching"
    datasets = SHARDS["attribution"]
    derived = DERIVED["attribution"]
    unit_name = "prompt"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        g = parser.add_argument_group("attribution sweep")
        g.add_argument(
            "--verify-top",
            type=non_negative_int,
            default=DEFAULT_VERIFY_TOP,
            metavar="K",
            help=f"patch the K top nodes and K top edges for real and report the correlation with "
            f"their scores (default {DEFAULT_VERIFY_TOP}; 0 = off)",
        )
        g.add_argument(
            "--method",
            default="eap",
            metavar="METHOD",
            help="how edges are scored: eap (attribution patching: one forward and backward), "
            "eap-ig-inputs (gradients averaged over --ig-steps runs with the input embeddings "
            "interpolated from corrupt to clean), eap-ig-activations (each node group's output "
            "interpolated in turn), exact (real patching of every node, and of every edge up to "
            "--max-exact-edges) (default eap; results go to <out>__<method> unless --out is given)",
        )
        g.add_argument(
            "--ig-steps",
            type=positive_int,
            default=5,
            metavar="N",
            help="interpolation steps of the eap-ig methods (default 5; 1 step is eap)",
        )
        g.add_argument(
            "--max-exact-edges",
            type=non_negative_int,
            default=5000,
            metavar="N",
            help="--method exact patches every edge only if the model has at most N edges "
            "(one forward each; default 5000), else nodes only",
        )
        g.add_argument(
            "--split-kv",
            action="store_true",
            help="grouped-query models: also score each query head's own copy of its shared key/value "
            "input (EAP-IG's k and v edges per query head; a group's scores add up to our L9KV1 edge), "
            "stored in kv_head_sums/ so that export-graph writes an exact EAP-IG graph; eap and "
            "eap-ig-inputs, fast path; about 2H more downstream rows a layer",
        )
        g.add_argument(
            "--top",
            type=positive_int,
            default=10,
            metavar="N",
            help="rows of the printed top-edges and top-nodes tables (default 10)",
        )

    def prepare(self) -> None:
        from sweeps.core.attribution import METHODS

        args = self.args
        if args.method not in METHODS:
            raise UserError(
                f"unknown --method {args.method!r}{did_you_mean(args.method, METHODS)}; methods: {', '.join(METHODS)}"
            )
        if args.out is None and args.method != "eap":
            args.out = f"{default_out('attribution', args.model, args.task, args.dtype)}__{args.method}" + (
                f"__{args.metric}" if args.metric else ""
            )
        super().prepare()
        info = self.inputs.info
        from sweeps.core.metrics import check_metric

        check_metric(self.inputs.task.metric, self.inputs.task.kind, args.method)
        if args.method == "eap-ig-activations" and info.path != "fast":
            raise UserError(
                f"--method eap-ig-activations runs on the fast path's families; {args.model} runs on "
                "the bridge path: use --method eap-ig-inputs, eap or exact"
            )
        self.steps = args.ig_steps if args.method.startswith("eap-ig") else 1
        grouped = 0 < info.n_kv_heads < info.n_heads
        if args.split_kv and args.method not in ("eap", "eap-ig-inputs"):
            raise UserError(f"--split-kv scores with --method eap or eap-ig-inputs, not {args.method}")
        if args.split_kv and grouped and info.path != "fast":
            raise UserError(f"--split-kv runs on the fast path's families; {args.model} runs on the bridge path")
        if args.split_kv and grouped and info.family == "OLMo 2":  # QK-norm over all key heads at once
            raise UserError(
                "--split-kv: OLMo 2 normalises all key heads together, which couples them, so a query "
                "head's copy of one key/value input is not defined"
            )
        if args.split_kv and not grouped:
            print(f"--split-kv: {args.model} has one key/value head per query head; its k/v edges are per head already")
        self.split_kv = bool(args.split_kv and grouped)
        self.exact_edges = args.method == "exact" and info.n_edges <= args.max_exact_edges
        if args.method == "exact" and not self.exact_edges:
            print(
                f"--method exact: {args.model} has {info.n_edges:,} edges, more than --max-exact-edges "
                f"{args.max_exact_edges:,} (one forward each): patching its {info.n_nodes} nodes only"
            )

    def spec(self) -> dict:
        args, info, task = self.args, self.inputs.info, self.inputs.task
        return {
            **self.base_spec(),
            "metric": task.metric or task.kind,  # the chosen metric, or the task's kind (as before)
            "n_prompts": task.n_prompts,
            "batch_size": args.batch_size,
            "verify_top": args.verify_top,
            "method": args.method,
            "ig_steps": self.steps,
            "exact_edges": self.exact_edges,
            "n_layers": info.n_layers,
            "n_heads": info.n_heads,
            **({"split_kv": True} if self.split_kv else {}),  # kv_head_sums/ (absent: not split, as before)
        }

    def plan(self, done: set[str]) -> tuple[list, str]:
        """The batches still to score; once every batch is in, the verification shards of the top targets."""
        from analysis.attribution import load_attribution_results, top_targets
        from sweeps.jobs.attribution import plan_attribution, plan_verify

        args, task = self.args, self.inputs.task
        todo = plan_attribution(task.n_prompts, args.batch_size, done)
        n_batches = -(-task.n_prompts // args.batch_size)
        if todo or args.verify_top == 0:
            how = args.method + (f", {self.steps} steps" if self.steps > 1 else "")
            return todo, (
                f"attribution sweep ({how}): {args.model} on {task.name}, {task.n_prompts} prompts in "
                f"{n_batches} batches, {n_batches - len(todo)} done, {len(todo)} to run"
            )
        results = load_attribution_results(self.inputs.out)
        targets = top_targets(results.nodes, results.edges, args.verify_top)
        verify = plan_verify(task.n_prompts, args.batch_size, targets, done)
        return verify, (
            f"verifying the top {args.verify_top} nodes and edges by real patching: "
            f"{n_batches - len(verify)} of {n_batches} batches done, {len(verify)} to run"
        )

    def job(self):
        from sweeps.jobs.attribution import AttributionJob

        return AttributionJob(self.inputs.task, self.args.method, self.steps, self.exact_edges, self.split_kv)

    def units(self, shard) -> int:
        return shard.stop - shard.start

    def cost(self, shard) -> float:
        from sweeps.jobs.attribution import VerifyShard

        return (shard.stop - shard.start) * (len(shard.targets) / 2 if isinstance(shard, VerifyShard) else 4)

    def finish(self, store) -> None:
        """Add the shards up into nodes/, edges/ and verify/."""
        import pyarrow as pa

        from analysis.results import ResultsError

        try:
            results = self.load(self.inputs.out)
        except ResultsError as err:  # e.g. a metric on which clean and corrupt agree: scores undefined
            raise UserError(str(err)) from None
        for name, frame in (("nodes", results.nodes), ("edges", results.edges), ("verify", results.verify)):
            store.write_derived(name, pa.Table.from_pandas(frame, preserve_index=False), n_prompts=results.n_prompts)

    # -- results ---------------------------------------------------------------------

    @classmethod
    def add_analysis_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--top", type=int, default=10, help="rows of the top-edges and top-nodes tables (default 10)"
        )

    @staticmethod
    def load(out, allow_mixed: bool = False):
        from analysis.attribution import load_attribution_results

        return load_attribution_results(out, allow_mixed)

    @classmethod
    def summary(cls, results, options: argparse.Namespace) -> list[str]:
        import sys

        from analysis.attribution import summary_text

        if not results.complete:
            print(
                f"warning: only {results.n_prompts} of {results.spec.get('n_prompts')} prompts are in; "
                "scores cover those",
                file=sys.stderr,
            )
        from sweeps.core.metrics import label_of

        metric = label_of(results.spec.get("metric"))
        return [
            f"\nclean {metric} {results.clean_metric:.4f}, corrupt {results.corrupt_metric:.4f} "
            f"(mean over {results.n_points} points)",
            f"\n{summary_text(results, options.top)}",
        ]

    @classmethod
    def report(cls, results, options: argparse.Namespace) -> None:
        from analysis.report import write_attribution_report

        write_attribution_report(results, options.wandb, options.wandb_project)
