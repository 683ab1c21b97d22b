"""``interp-sweeps export-graph DIR OUT.json [--size FRACTION]``: an attribution result as the
EAP-IG library's graph file (``Graph.to_json``; the format in ``sweeps/core/graph_files.py``).

Reads only the result and the model's config (no weights). Without ``--size`` every edge
carries its score and ``in_graph`` false (EAP-IG's graph after ``attribute``, before a circuit
is chosen: the file is a ranking); with it, the top ``int(FRACTION x edges)`` edges by |score|,
pruned to the paths from the input to the logits (``apply_topn(n, absolute=True)``), are
``in_graph``. A grouped-query model's file needs the sweep's ``--split-kv`` scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sweeps.registry.cli import ArgumentParser, UserError, cli_main

if TYPE_CHECKING:
    from sweeps.core.graph_files import ModelShape

DESCRIPTION = "An attribution result as the EAP-IG library's graph file (Graph.to_json), MIB's format for circuits."
EPILOG = """\
Without --size: every edge has its score and in_graph false (a ranking: EAP-IG's graph after
attribute(), before apply_topn). With --size F: the top int(F x edges) edges by |score|, pruned
to the paths from the input to the logits, are in_graph (apply_topn(n, absolute=True)); a node
is in_graph when one of its edges out is; logits always. Scores are ours (units of the
normalised metric; > 0 carries the clean behaviour, the sign EAP-IG gives with a loss = -metric).

Names: input = embed, a{l}.h{h} = L{l}H{h}, m{l} = mlp{l}, logits = resid_final; edges
parent->a{l}.h{h}<q|k|v> and parent->child. EAP-IG has k and v edges per query head: for a
grouped-query model (SmolLM2, Llama 3) run the attribution sweep with --split-kv, which scores
each query head's own copy of its key/value input (a group's scores add up to our L9KV1 edge).

The file loads with EAP-IG's Graph.from_json, and back here with
interp-sweeps circuit --circuit OUT.json (the in_graph edges) or --from OUT.json (the scores).

Examples:
  interp-sweeps export-graph results/attribution/tiny-gpt2__ioi graph.json
  interp-sweeps attribution --method eap-ig-inputs --split-kv
  interp-sweeps export-graph results/attribution/smollm2-135m__ioi__eap-ig-inputs circuit.json --size 0.05
"""


def parser() -> ArgumentParser:
    import argparse

    p = ArgumentParser(
        prog="interp-sweeps export-graph",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", metavar="DIR", help="an attribution result (sweeps/attribution.py --out)")
    p.add_argument("out", metavar="OUT.json", help="the graph file to write")
    p.add_argument(
        "--size",
        type=float,
        metavar="FRACTION",
        help="mark the top FRACTION of the edges by |score| in_graph, pruned as EAP-IG prunes "
        "(default: none; the file is a ranking)",
    )
    return p


def shape_of(results) -> ModelShape:
    """The model shape of an attribution result: the model info its manifest recorded, or
    (older results) the model's config read again."""
    from sweeps.core.graph_files import ModelShape
    from sweeps.runtime.models import ModelNameError, describe_model

    info = dict(results.manifest.get("model") or {})
    if not info.get("d_model"):
        try:
            info = describe_model(results.spec["model"]).__dict__
        except ModelNameError as err:
            raise UserError(f"cannot read the shape of {results.spec.get('model')}: {err}") from None
    return ModelShape(
        int(info["n_layers"]),
        int(info["n_heads"]),
        int(info.get("n_kv_heads") or info["n_heads"]),
        bool(info.get("parallel", False)),
        not info.get("has_mlp", True),
        int(info.get("d_model") or 0),
    )


def run(args, argv) -> int:
    import torch

    from analysis.attribution import load_attribution_results
    from analysis.results import ResultsError
    from sweeps.core.graph_files import GraphFileError, circuit_of_size, eap_scores, graph_json

    if args.size is not None and not 0 < args.size <= 1:
        raise UserError(f"--size {args.size}: a fraction in (0, 1]")
    try:
        results = load_attribution_results(args.results)
    except ResultsError as err:
        raise UserError(f"{args.results}: {err}") from None
    shape = shape_of(results)
    graph = shape.graph()
    if results.edges.empty:
        raise UserError(f"{args.results} has no edge scores ({results.method} scored nodes only)")
    by = {(u, d, i): s for u, d, i, s in results.edges[["upstream", "downstream", "input", "score"]].itertuples(False)}
    from sweeps.core.circuits import graph_edges

    keys = [(u, d.name, d.input) for u, d in graph_edges(graph)]
    missing = [k for k in keys if k not in by]
    if missing:
        raise UserError(f"{args.results}: no score for {len(missing)} edges (e.g. {'->'.join(missing[0][:2])})")
    edges = torch.tensor([by[k] for k in keys], dtype=torch.float64)
    kv_heads = None
    if not results.kv_heads.empty:
        from sweeps.core.attribution import query_head_kv_edges

        kv = {(u, h, i): s for u, h, i, s in results.kv_heads[["upstream", "head", "input", "score"]].itertuples(False)}
        kv_heads = torch.tensor([kv[k] for k in query_head_kv_edges(graph)], dtype=torch.float64)
    try:
        scores = eap_scores(shape, edges, kv_heads)
        in_graph = None if args.size is None else circuit_of_size(shape, scores, args.size)
        data = graph_json(shape, scores, in_graph)
    except GraphFileError as err:
        raise UserError(f"{args.results}: {err}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(out)
    n_in = sum(e["in_graph"] for e in data["edges"].values())
    what = f"{n_in:,} in_graph after pruning (top {args.size:g} by |score|)" if args.size else "none in_graph"
    print(
        f"{out}: EAP-IG graph of {results.spec.get('model')} ({results.method}), {len(data['edges']):,} edges, {what}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(parser, run, list(sys.argv[1:] if argv is None else argv))
