"""Circuit evaluation as a command (the worker's side: ``sweeps/jobs/circuit.py``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

from sweeps.jobs.datasets import DERIVED, SHARDS
from sweeps.registry.base import Sweep
from sweeps.registry.cli import UserError, number_list


def nulls(value):
    """``value`` (dicts, lists, numbers) with NaN and infinities as None: JSON's null, as
    ``DataFrame.to_json`` writes them beside it."""
    if isinstance(value, dict):
        return {k: nulls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nulls(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def is_mib(text: str | None) -> bool:
    """Whether ``--sizes`` asks for MIB's evaluation (``mib``)."""
    return text is not None and text.strip().lower() == "mib"


def parse_sizes(text: str | None) -> list[float]:
    """``"0.01,0.1,1"`` -> sorted fractions; ``"mib"`` -> MIB's ten; a one-line error for
    anything outside (0, 1], or ``mib`` among numbers (MIB's fractions are fixed)."""
    from sweeps.core.circuit_eval import MIB_FRACTIONS, default_sizes

    if text is None:
        return [s for s in default_sizes() if s > 0]
    if is_mib(text):
        return list(MIB_FRACTIONS)
    if "mib" in text.lower():
        raise UserError(f"--sizes {text}: mib stands alone (MIB's ten fractions are fixed); or give fractions only")
    return number_list(text, "--sizes", lambda x: 0 < x <= 1, "a fraction in (0, 1]", "0.001,0.01,0.1,1")


def circuit_out(circuit: str, model: str, task: str, dtype: str) -> Path:
    """The default --out of one --circuit FILE: ``results/circuit/<model>__<task>__<name>-<hash>``,
    after the file's name and a hash of its content, so that another circuit (or this file
    edited) on the same model and task gets a directory of its own."""
    from sweeps.registry.cli import _path_safe, default_out

    path = Path(circuit)
    try:
        content = path.read_bytes()
    except OSError:
        content = circuit.encode()  # read_graph_circuit says what is wrong with it
    digest = hashlib.blake2b(content, digest_size=4).hexdigest()
    return default_out("circuit", model, task, dtype).with_name(
        f"{default_out('circuit', model, task, dtype).name}__{_path_safe(path.stem)}-{digest}"
    )


def warn_without_embeddings(graph, level: str, member, name: str) -> None:
    """One warning line when no edge out of the embeddings is in a circuit: then every
    component reads the corrupt embeddings, the run is the corrupt run and the faithfulness
    is 0 by construction. As in MIB (EAP-IG's ``input`` node) the embeddings are a node like
    any other: in a circuit only when it lists them (``embed``, or an edge ``embed->...``)."""
    if level == "node":
        has_embed = bool(member[0])  # graph.upstream[0] is embed
    else:
        has_embed = any(m for m, (u, _) in zip(member, _edges(graph)) if u == "embed")
    if not has_embed:
        print(
            f"warning: {name} has no {'node embed' if level == 'node' else 'edge out of embed'}: every "
            "component then reads the corrupt embeddings, so the circuit is the corrupt run and its "
            "faithfulness is 0 by construction; add embed (as in MIB, the input is part of a circuit "
            "only when the circuit lists it)",
            file=sys.stderr,
        )


def _edges(graph):
    from sweeps.core.circuits import graph_edges

    return graph_edges(graph)


class CircuitSweep(Sweep):
    """Circuit evaluation: how faithful is a circuit, and how fast does a ranking find one?

    A circuit keeps its edges (or nodes) clean and takes everything outside it from
    the corrupt run: at edge level each downstream input (q of each head, k and v of
    each key/value head, each MLP's input, the final stream) receives this run's
    value of the upstream nodes whose edge is in the circuit and the corrupt run's
    value of the rest; at node level every node outside the circuit (the embeddings,
    a head, an MLP) gives its corrupt output to every reader. Faithfulness =
    (m(C) - m(corrupt)) / (m(clean) - m(corrupt)): 1 is the full model, 0 the
    corrupt run (the empty circuit is exactly the corrupt run, the full one the
    clean run).

    --from DIR evaluates the top edges (or nodes) of an attribution result at each
    of --sizes (fractions of all edges or nodes, top by |score|): a faithfulness
    curve, summarised by CPR (area under it: higher is better) and CMD (area
    between it and 1: lower is better). Several --from results (eap, eap-ig-inputs,
    exact, ...) give one curve each, in one plot. --sizes mib evaluates as MIB does
    (docs/circuits.md): its ten fractions, int(fraction x edges) edges, circuits pruned
    to the paths from the embeddings to the logits, CPR from the ranking by score and
    CMD from the ranking by |score|, trapezoids from 0.001 to 1; printed as MIB's
    beside ours and kept in summary.json (mib). --circuit FILE evaluates one
    circuit: a JSON/YAML list of nodes (embed, L9H6, mlp9, L9H*) or of edges
    (upstream->reader.input, e.g. L0H1->L2H3.q, embed->L1KV0.k, mlp3->mlp4,
    L5H1->resid_final: the names the attribution sweep prints), or an EAP-IG graph
    file (Graph.to_json, MIB's format; interp-sweeps export-graph writes one): its
    in_graph edges form the circuit, and with --from its scores rank the edges. A
    circuit without the embeddings (embed) is the corrupt run by construction
    (faithfulness 0): a warning says so.

    One shard per circuit, sharded over the Ray pool; re-running resumes. Writes
    faithfulness/ (circuit, source, level, ranking, size, k, n_nodes, n_edges, metric,
    faithfulness) and summary.json (cpr, cmd per curve; mib) under --out, a plot
    (faithfulness.png/.html) and a W&B run. Model and task default to the first
    --from result's.

    Examples:
      .venv/bin/interp-sweeps attribution --model tiny-gpt2 --executor local
      .venv/bin/interp-sweeps circuit --from results/attribution/tiny-gpt2__ioi --executor local
      .venv/bin/interp-sweeps circuit --from results/attribution/smollm2-135m__ioi results/attribution/smollm2-135m__ioi__eap-ig-inputs
      .venv/bin/interp-sweeps circuit --from results/attribution/smollm2-135m__ioi --sizes mib
      .venv/bin/interp-sweeps circuit --circuit my_circuit.yaml --model gpt2-small
      ray submit cluster.yaml sweeps/circuit.py -- --from s3://bucket/attribution/gpt2-small__ioi
    """

    name = "circuit"
    script = "sweeps/circuit.py"
    order = 40
    summary_line = "circuit evaluation: faithfulness of circuits and of rankings (CPR, CMD)"
    datasets = SHARDS["circuit"]
    derived = DERIVED["circuit"]
    unit_name = "circuit"

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.set_defaults(model=None, task=None)  # default: the first --from result's
        g = parser.add_argument_group("circuit evaluation")
        what = g.add_mutually_exclusive_group(required=True)
        what.add_argument(
            "--from",
            dest="sources",
            nargs="+",
            metavar="DIR",
            help="attribution results (sweeps/attribution.py --out) or EAP-IG graph files (FILE.json, "
            "ranked by their scores; a shared k/v edge by its query heads' sum): one faithfulness curve each",
        )
        what.add_argument(
            "--circuit",
            metavar="FILE",
            help="one circuit: a JSON/YAML list of nodes or of edges, or an EAP-IG graph file (its in_graph "
            "edges, pruned; a shared k/v edge is in when any query head's is); default --out "
            "results/circuit/<model>__<task>__<file>-<hash>",
        )
        g.add_argument(
            "--level",
            choices=("node", "edge"),
            help="with --from: rank edges (default) or nodes; with --circuit: what the file lists",
        )
        g.add_argument(
            "--sizes",
            metavar="LIST",
            help="comma-separated fractions in (0, 1] of the edges (nodes) to keep, top by |score| "
            "(default: 16 log-spaced from 0.001 to 1); mib: MIB's evaluation (its ten fractions, "
            "counts and pruning; CPR from the ranking by score, CMD by |score|)",
        )

    def prepare(self) -> None:
        from sweeps.core.attribution import GraphConfig, build_graph
        from sweeps.core.circuits import CircuitError, read_graph_circuit
        from sweeps.jobs.circuit import Curve, plan_circuits
        from sweeps.runtime.models import DEFAULT_MODEL

        args = self.args
        self.sizes, self.mib = parse_sizes(args.sizes), is_mib(args.sizes)
        if self.mib and args.circuit:
            raise UserError("--sizes mib evaluates rankings (--from DIR); --circuit FILE is one circuit")
        if args.sources:  # model, task and prompts default to the first result's
            from sweeps.runtime.location import Location, LocationError

            try:
                first = Location.parse(args.sources[0]) / "sweep.json"
                spec0 = json.loads(first.read_text()) if first.is_file() else {}
            except (LocationError, OSError, json.JSONDecodeError):
                spec0 = {}
            args.model = args.model or spec0.get("model")
            from sweeps.core.metrics import METRICS

            if args.metric is None and spec0.get("metric") in METRICS and spec0.get("metric") != "logit_diff":
                args.metric = spec0["metric"]  # evaluate with the metric the ranking was scored by
            args.task = args.task or spec0.get("task")
            if args.n_prompts is None and spec0.get("n_prompts") and args.task == spec0.get("task"):
                args.n_prompts = int(spec0["n_prompts"])
            args.level = args.level or "edge"
        args.model, args.task = args.model or DEFAULT_MODEL, args.task or "ioi"
        if args.circuit and args.out is None:  # one directory a circuit: a second one never meets the first's
            args.out = circuit_out(args.circuit, args.model, args.task, args.dtype)
            if getattr(args, "metric", None):  # a chosen metric's results never meet another's
                args.out = args.out.with_name(f"{args.out.name}__{args.metric}")
        super().prepare()
        info = self.inputs.info
        graph = build_graph(
            GraphConfig(info.n_layers, info.n_heads, info.n_kv_heads or info.n_heads, not info.has_mlp, info.parallel)
        )
        if args.circuit:
            from sweeps.core.graph_files import is_graph_file

            path = Path(args.circuit)
            try:
                if is_graph_file(path):  # an EAP-IG graph file: its in_graph edges
                    level, member = "edge", self._graph_file(path).circuit.tolist()
                    if not any(member):
                        raise UserError(
                            f"{path}: no edge has in_graph true (after pruning to the paths from the input to "
                            "the logits); export it with --size, or use it as a ranking: --from FILE"
                        )
                else:
                    level, member = read_graph_circuit(path, graph)
            except CircuitError as err:
                raise UserError(str(err)) from None
            if args.level and args.level != level:
                raise UserError(f"--level {args.level}, but {args.circuit} lists {level}s")
            args.level = level
            warn_without_embeddings(graph, level, member, args.circuit)
            self.curves = [Curve(Path(args.circuit).name, args.circuit, level, fixed=tuple(member))]
        else:
            self.curves = self._curves_from_results(graph)
        self.n_circuits = len(plan_circuits(self.curves, self.sizes, set(), self.mib))

    def _graph_file(self, path: Path):
        """An EAP-IG graph file read for this model (``graph_files.read_graph_file``)."""
        from sweeps.core.graph_files import ModelShape, read_graph_file

        info = self.inputs.info
        shape = ModelShape(
            info.n_layers,
            info.n_heads,
            info.n_kv_heads or info.n_heads,
            info.parallel,
            not info.has_mlp,
            info.d_model,
        )
        return read_graph_file(path, shape)

    def _curve_from_graph_file(self, source: str, graph):
        """A ranking from an EAP-IG graph file: its edge scores (a shared key/value edge: its
        group's sum), or at node level its node scores, else each node's edges summed."""
        import torch

        from sweeps.core.circuits import CircuitError
        from sweeps.jobs.circuit import Curve

        try:
            gf = self._graph_file(Path(source))
        except CircuitError as err:
            raise UserError(str(err)) from None
        if self.args.level == "node":
            if gf.node_scores is not None:
                scores = gf.node_scores
            else:
                upstream = torch.cat([torch.arange(p) for p in graph.prefix])
                scores = torch.zeros(len(graph.upstream), dtype=torch.float64).index_add_(0, upstream, gf.scores)
        else:
            scores = gf.scores
        if not torch.isfinite(scores).all():
            raise UserError(f"--from {source}: some {self.args.level} scores are not numbers")
        return Curve(f"{Path(source).name} (EAP-IG graph)", source, self.args.level, scores=tuple(scores.tolist()))

    def _curves_from_results(self, graph) -> list:
        """One ranking a --from directory (or EAP-IG graph file): its edge (or node) scores in
        graph order."""
        from analysis.attribution import load_attribution_results
        from analysis.results import ResultsError
        from sweeps.core.circuits import graph_edges
        from sweeps.core.nodes import edge_name
        from sweeps.jobs.circuit import Curve

        args = self.args
        curves, labels = [], set()
        from sweeps.core.graph_files import is_graph_file

        for source in args.sources:
            if is_graph_file(Path(source)):
                curves.append(self._curve_from_graph_file(source, graph))
                labels.add(curves[-1].label)
                continue
            try:
                results = load_attribution_results(source)
            except ResultsError as err:
                raise UserError(f"--from {source}: {err}") from None
            if results.spec.get("model") != args.model:
                raise UserError(f"--from {source} holds results for {results.spec.get('model')}, not {args.model}")
            if args.level == "node":
                by = dict(zip(results.nodes.node, results.nodes.score))
                names = list(graph.upstream)
            else:
                if results.edges.empty:
                    raise UserError(
                        f"--from {source} has no edge scores ({results.method} scored nodes only); use --level node"
                    )
                by = {
                    (u, d, i): s
                    for u, d, i, s in zip(
                        results.edges.upstream, results.edges.downstream, results.edges.input, results.edges.score
                    )
                }
                names = [(u, d.name, d.input) for u, d in graph_edges(graph)]
            missing = [n for n in names if n not in by]
            if missing:
                example = missing[0] if isinstance(missing[0], str) else edge_name(*missing[0])
                raise UserError(
                    f"--from {source}: no score for {len(missing)} of the model's {args.level}s "
                    f"(e.g. {example}); is it an attribution result for this model?"
                )
            label = results.method + (
                f" ({results.spec.get('ig_steps')} steps)" if results.method.startswith("eap-ig") else ""
            )
            if label in labels:
                label = f"{label} [{Path(str(source)).name}]"
            labels.add(label)
            curves.append(Curve(label, str(source), args.level, scores=tuple(float(by[n]) for n in names)))
        return curves

    def spec(self) -> dict:
        args, task, curves = self.args, self.inputs.task, self.curves
        fingerprint = hashlib.blake2b(
            repr([(c.label, c.scores, c.fixed) for c in curves]).encode(), digest_size=8
        ).hexdigest()
        return {
            **self.base_spec(),
            "metric": task.metric or task.kind,  # the chosen metric, or the task's kind (as before)
            "n_prompts": task.n_prompts,
            "level": args.level,
            "sizes": self.sizes,
            **({"mib": True} if self.mib else {}),  # MIB's evaluation (absent: ours, as before)
            "curves": [[c.label, c.source] for c in curves],
            "curves_hash": fingerprint,
            "n_circuits": self.n_circuits,
        }

    def plan(self, done: set[str]) -> tuple[list, str]:
        from sweeps.jobs.circuit import plan_circuits

        todo = plan_circuits(self.curves, self.sizes, done, self.mib)
        return todo, (
            f"circuit evaluation ({self.args.level} level{', MIB' if self.mib else ''}): {self.args.model} on "
            f"{self.inputs.task.name}, {len(self.curves)} curve(s), {self.n_circuits} circuits, "
            f"{self.n_circuits - len(todo)} done, {len(todo)} to run"
        )

    def job(self):
        from sweeps.jobs.circuit import CircuitJob

        return CircuitJob(self.inputs.task, self.curves)

    def finish(self, store) -> None:
        """faithfulness/ and summary.json."""
        import pyarrow as pa

        results = self.load(self.inputs.out)
        store.write_derived("faithfulness", pa.Table.from_pandas(results.faithfulness, preserve_index=False))
        summary = results.summary()
        mib = results.mib_blocks()  # (circuit, source, level) -> MIB's evaluation, for --sizes mib
        curves = json.loads(summary.to_json(orient="records"))
        for curve in curves:
            key = (curve["circuit"], curve["source"], curve["level"])
            if key in mib:
                curve["mib"] = nulls(mib[key])
        (store.out / "summary.json").write_atomic(
            json.dumps(
                {
                    "clean_metric": results.clean_metric,
                    "corrupt_metric": results.corrupt_metric,
                    "n_points": results.n_points,
                    "curves": curves,
                },
                indent=2,
            ).encode()
        )

    # -- results ---------------------------------------------------------------------

    @staticmethod
    def load(out, allow_mixed: bool = False):
        from analysis.circuit import load_circuit_results

        return load_circuit_results(out, allow_mixed)

    @classmethod
    def summary(cls, results, options: argparse.Namespace) -> list[str]:
        from analysis.circuit import summary_lines

        if not results.complete:
            print(
                f"warning: {len(results.faithfulness)} of {results.spec.get('n_circuits')} circuits are in",
                file=sys.stderr,
            )
        return ["", *summary_lines(results)]

    @classmethod
    def report(cls, results, options: argparse.Namespace) -> None:
        from analysis.report import write_circuit_report

        write_circuit_report(results, options.wandb, options.wandb_project)
