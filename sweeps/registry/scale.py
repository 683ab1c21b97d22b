"""The all-nodes x all-scales sweep as a command (the worker's side: ``sweeps/jobs/scale.py``)."""

from __future__ import annotations

import argparse
import sys

from sweeps.jobs.datasets import SHARDS
from sweeps.registry.base import Sweep
from sweeps.registry.cli import number_list, positive_int

DEFAULT_SCALES = "0,0.1,0.2,0.5,0.7,0.8,1,1.2,1.4,2,5,10"
SUBSPACE_CHOICES = ("full", "high_variance", "low_variance")
DEFAULT_MAX_PAIRS = 64


def parse_scales(text: str) -> list[float]:
    """``"0,0.5,1"`` -> sorted unique scales; a one-line PlanError for anything else."""
    from sweeps.jobs.plan import PlanError

    return number_list(text, "--scales", lambda x: x >= 0, "a finite number >= 0", "0,0.5,1,2,5", PlanError)


class ScaleSweep(Sweep):
    """All-nodes × all-scales ablation sweep: patch every head and MLP at many scales.

    For every node (each attention head's output, each MLP's output), every scale
    and every (base, source) pair of prompts, the node's activation on the base
    prompt is replaced by scale × its activation on the source prompt, and the
    model reruns from that node on. The causal effect of (node, scale) is the
    fraction of pairs whose top-1 prediction at the answer position(s) changes
    from the clean one; metric_change is the mean drop of the task metric,
    normalised so 0 = clean and 1 = the task's corrupt prompts. The expected
    picture: nodes outside the circuit have effect ~0 at scale 1 but ~1 at scale
    0 or >= 5; nodes in the circuit stay high at every scale.

    Subspace modes fit a PCA (--pca-k components) per node and position over the
    task's prompts: high_variance patches only the activation's component in the
    top directions (around the mean), low_variance only the rest.
    --self-patch scales the base's own activation instead of patching the
    source's. Pairs are distinct prompts of equal token length (patches are
    position by position), capped at --max-pairs by a seeded sample.

    Writes the Parquet dataset effects/ and a manifest under --out, then plots
    (effect against scale per node, coloured by circuit status; a nodes x scales
    heatmap) and a W&B run (offline by default). Re-running the same command
    resumes.

    Examples:
      .venv/bin/interp-sweeps scale --model tiny-gpt2 --executor local
      .venv/bin/interp-sweeps scale --circuit ioi-gpt2-small --model gpt2-small --subspace high_variance
      .venv/bin/interp-sweeps scale --circuit circuit.yaml --pairs task --nodes L9,L10,mlp11
      .venv/bin/interp-sweeps scale --circuit top:20@results/attribution/smollm2-135m__ioi
      ray submit cluster.yaml sweeps/scale.py -- --model gpt2-small --circuit ioi
    """

    name = "scale"
    script = "sweeps/scale.py"
    order = 20
    summary_line = "the all-nodes x all-scales sweep: patch each node at many scales"
    datasets = SHARDS["scale"]
    unit_name = "node-scale"

    @classmethod
    def input_errors(cls) -> tuple[type[Exception], ...]:
        from sweeps.jobs.scale import PairsError

        return (*super().input_errors(), PairsError)

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        g = parser.add_argument_group("scale sweep")
        g.add_argument(
            "--scales",
            default=DEFAULT_SCALES,
            metavar="LIST",
            help=f"comma-separated scales >= 0 (default {DEFAULT_SCALES})",
        )
        g.add_argument(
            "--nodes",
            metavar="LIST",
            help="nodes to patch: L9H6, 9.6, mlp9, L9H* (a layer's heads), L9 (its heads and "
            "MLP) (default: every head and MLP)",
        )
        g.add_argument(
            "--circuit",
            metavar="FILE_OR_PRESET",
            help="label nodes in_circuit / not_in_circuit: a JSON/YAML list of nodes, a preset "
            "(ioi-gpt2-small), or top:K@DIR (the K top nodes of an attribution sweep's results) "
            "(default: every node 'unlabelled')",
        )
        g.add_argument(
            "--subspace",
            choices=SUBSPACE_CHOICES,
            default="full",
            help="full (default): the whole activation; high_variance: only its top --pca-k PCA "
            "directions; low_variance: only the rest",
        )
        g.add_argument(
            "--pca-k",
            type=positive_int,
            default=2,
            metavar="K",
            help="principal directions per node and position for the subspace modes (default 2)",
        )
        g.add_argument(
            "--self-patch",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="scale the base prompt's own activation (pure scaling) instead of patching the "
            "source's (default: --no-self-patch)",
        )
        g.add_argument(
            "--pairs",
            choices=("all", "task"),
            default="all",
            help="all (default): ordered pairs of distinct prompts of equal length, as the "
            "usual scale-ablation loop; task: each prompt with its own corrupt prompt",
        )
        g.add_argument(
            "--max-pairs",
            type=positive_int,
            default=DEFAULT_MAX_PAIRS,
            metavar="N",
            help=f"at most N pairs, a deterministic sample (default {DEFAULT_MAX_PAIRS})",
        )
        g.add_argument(
            "--min-break",
            type=float,
            default=0.5,
            metavar="E",
            help="the summary's 'breaks the model off-distribution': a causal effect of at least E "
            "at the smallest or largest scale (default 0.5: half the answers change); results do "
            "not depend on it",
        )
        g.add_argument(
            "--scales-per-shard",
            type=positive_int,
            metavar="N",
            help="split the scales into shards of N (default: one shard per layer, all scales)",
        )

    def prepare(self) -> None:
        from sweeps.core.circuits import load_circuit
        from sweeps.core.nodes import parse_nodes
        from sweeps.jobs.plan import PlanError
        from sweeps.jobs.scale import make_pairs

        args = self.args
        if not 0 <= args.min_break <= 1:
            raise PlanError(f"--min-break is a causal effect, between 0 and 1; got {args.min_break}")
        self.scales = parse_scales(args.scales)
        super().prepare()
        info, task = self.inputs.info, self.inputs.task
        self.nodes = parse_nodes(args.nodes, info.n_layers, info.n_heads, info.has_mlp)
        self.circuit = load_circuit(args.circuit, args.model, info.n_layers, info.n_heads, info.has_mlp)
        if args.subspace != "full" and args.pca_k >= task.n_prompts:
            raise PlanError(
                f"--pca-k {args.pca_k} needs more prompts than that (have {task.n_prompts}); "
                "lower --pca-k or raise --n-prompts"
            )
        self.pairs = make_pairs(task, args.pairs, args.max_pairs, args.seed, args.self_patch)
        circuit = self.circuit
        if circuit is not None:
            print(f"circuit {circuit.label}: {len(circuit.nodes)} nodes, {', '.join(circuit.names())}", file=sys.stderr)
        if circuit is not None and circuit.model and circuit.model != args.model:
            print(
                f"note: circuit {circuit.label} describes {circuit.model}; on {args.model} its nodes are "
                "labels at the same positions only",
                file=sys.stderr,
            )

    def spec(self) -> dict:
        from sweeps.runtime.provenance import spec_id

        args, circuit = self.args, self.circuit
        return {
            **self.base_spec(),
            "scales": self.scales,
            "subspace": args.subspace,
            "pca_k": args.pca_k if args.subspace != "full" else None,
            "self_patch": args.self_patch,
            "pairs": self.pair_mode,
            "max_pairs": args.max_pairs,
            "pairs_hash": spec_id({"pairs": self.pairs.tolist()}),
            "circuit": None if circuit is None else {"label": circuit.label, "nodes": circuit.names()},
        }

    @property
    def pair_mode(self) -> str:
        return "self" if self.args.self_patch else self.args.pairs

    def plan(self, done: set[str]) -> tuple[list, str]:
        from sweeps.jobs.plan import plan_scale

        args, task, nodes, scales = self.args, self.inputs.task, self.nodes, self.scales
        shards = plan_scale(nodes, len(scales), done, args.scales_per_shard)
        todo = sum(len(s.nodes) * len(s.scales) for s in shards)
        total = len(nodes) * len(scales)
        return shards, (
            f"scale sweep: {args.model} on {task.name} ({task.n_prompts} prompts, {len(self.pairs)} "
            f"{self.pair_mode} pairs), {len(nodes)} nodes x {len(scales)} scales, "
            f"{args.subspace}, {total - todo} of {total} done, {len(shards)} shards to run"
        )

    def job(self):
        from sweeps.jobs.scale import ScaleJob

        a = self.args
        return ScaleJob(
            self.inputs.task,
            self.pairs,
            tuple(self.scales),
            source="corrupt" if self.pair_mode == "task" else "clean",
            subspace=a.subspace,
            self_patch=a.self_patch,
            pca_k=a.pca_k,
            batch_size=a.batch_size,
            circuit=self.circuit,
        )

    def units(self, shard) -> int:
        return len(shard.nodes) * len(shard.scales)

    def cost(self, shard) -> float:
        # each (node, scale) replays the layers from the node on, for every pair
        return len(shard.nodes) * len(shard.scales) * (self.inputs.info.n_layers - shard.layer)

    # -- results ---------------------------------------------------------------------

    @classmethod
    def add_analysis_options(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--top", type=int, default=10, help="rows of each summary table (default 10)")
        parser.add_argument(
            "--min-break",
            type=float,
            default=0.5,
            metavar="E",
            help="'breaks the model off-distribution': a causal effect of at least E at the "
            "smallest or largest scale (default 0.5)",
        )

    @staticmethod
    def load(out, allow_mixed: bool = False):
        from analysis.scale import load_scale_results

        return load_scale_results(out, allow_mixed)

    @classmethod
    def is_empty(cls, results) -> bool:
        return results.effects.empty

    @classmethod
    def summary(cls, results, options: argparse.Namespace) -> list[str]:
        from analysis.scale import summary_tables, table_text

        return [
            table_text(title, table) for title, table in summary_tables(results, options.top, options.min_break).items()
        ]

    @classmethod
    def report(cls, results, options: argparse.Namespace) -> None:
        from analysis.report import write_scale_report

        write_scale_report(results, options.wandb, options.wandb_project, options.min_break)
