"""Plots of a sweep and its W&B run, from the results directory alone.

``write_backup_report(load_results(out))`` and ``write_scale_report(load_scale_results(out))``
can be re-run at any time (``python -m analysis backup|scale OUT``), e.g. after a
sweep whose W&B logging failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Literal, cast

import numpy as np

from analysis import plots, self_repair
from analysis.attribution import DERIVED, AttributionResults, head_grid, top_edges_table, top_nodes_table
from analysis.backup import (
    BackupResults,
    compensation_by_layer,
    compensation_matrix,
    grid,
    legible_columns,
    legible_rows,
    meaningful,
    meaningful_rule,
    summary_table,
)
from analysis.results import report_dir, sampled
from analysis.scale import MIN_BREAK, ScaleResults, status_lines, summary_tables, wide
from sweeps.runtime import console
from sweeps.runtime.location import Location

WANDB_TABLE_MAX_ROWS = 10_000  # W&B refuses larger tables


LEGIBLE_ROWS, LEGIBLE_COLUMNS = 25, 30  # the compensation matrix's PNG: this many ablated and responding heads


def backup_figures(
    results: BackupResults,
    scatter_heads: list[tuple[int, int]] | None = None,
    min_de_fraction: float = 0.1,
    min_r2: float = 0.0,
) -> dict[str, Path]:
    """Write every figure under ``OUT/plots``; returns name -> PNG path (HTML beside it).

    Heads whose fit is not ``meaningful`` are grey in the slope heatmap (the caption says
    the rule) and left out of the compensation PNGs; their numbers stay in the HTML and
    the Parquet datasets."""
    folder = report_dir(results.out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    L, H = results.n_layers, results.n_heads
    where = sampled(results.spec)
    n_swept = len(results.slopes)
    figures = {}
    ok = meaningful(results.slopes, min_de_fraction, min_r2)
    keep = grid(results.slopes.assign(ok=ok.astype(float)), "ok", L, H)
    rule = meaningful_rule(results.slopes, min_de_fraction, min_r2)
    figures["slopes"], _ = plots.heatmap(
        grid(results.slopes, "slope", L, H),
        f"Backup slope per ablated head ({where}; {n_swept} of {L * H} heads swept)",
        folder / "slopes",
        colorbar="slope (> 0: later heads compensate)",
        mask=keep == 0,
        caption=f"Grey: {int((~ok).sum())} heads whose fit is not meaningful (meaningful: "
        f"{rule}); white: not swept. Every head's value: slopes.html.",
    )
    figures["direct_effects"], _ = plots.heatmap(
        grid(results.slopes, "mean_de", L, H),
        f"Mean clean direct effect per head ({where})",
        folder / "direct_effects",
        colorbar="mean direct effect",
        caption="White: not swept.",
    )
    matrix = compensation_matrix(results.responses, L, H)
    up_names = [f"L{l}H{h}" for l, h in zip(results.slopes.layer, results.slopes["head"])]
    chosen = [name for name, good in zip(up_names, ok) if good]
    rows = legible_rows(matrix, chosen, LEGIBLE_ROWS)
    others = matrix.mask(np.equal.outer(matrix.index.to_numpy(), matrix.columns.to_numpy()))  # no self cells
    columns = legible_columns(others.loc[rows], LEGIBLE_COLUMNS) if rows else []
    title = f"Compensatory response: mean change of each downstream head's direct effect ({where})"
    itself = np.equal.outer(np.array(rows, dtype=object), np.array(columns, dtype=object)).reshape(
        len(rows), len(columns)
    )
    plots.heatmap_png(
        matrix.loc[rows, columns].to_numpy(),
        title,
        folder / "compensation",
        xlabel="downstream head",
        ylabel="ablated head",
        colorbar="mean Δ direct effect",
        xticks=columns,
        yticks=rows,
        mask=itself,
        caption=f"{len(rows)} of the {matrix.shape[0]} ablated heads (the largest summed responses among the "
        f"{len(chosen)} with a meaningful fit: {rule}) x the {len(columns)} of {matrix.shape[1]} downstream heads "
        "that respond most."
        + (" Grey: the ablated head itself (its own loss, not a response)." if itself.any() else "")
        + " The full matrix: compensation.html and the responses/ dataset.",
    )
    figures["compensation"] = folder / "compensation.png"
    plots.heatmap_html(
        matrix.to_numpy(),
        title,
        folder / "compensation",
        xlabel="downstream head",
        ylabel="ablated head",
        colorbar="mean Δ direct effect",
        xticks=list(matrix.columns),
        yticks=list(matrix.index),
        mask=others.isna().to_numpy() & matrix.notna().to_numpy(),
        caption="every ablated head x every downstream head; grey: the ablated head itself",
    )
    by_layer = compensation_by_layer(results.responses, L, H)
    layer_rows = legible_rows(by_layer, chosen, 2 * LEGIBLE_ROWS)
    layer_columns = [c for c in by_layer.columns if by_layer.loc[layer_rows, c].abs().max() > 0]
    title = f"Compensatory response by downstream layer: its heads summed, then its MLP ({where})"
    plots.heatmap_png(
        by_layer.loc[layer_rows, layer_columns].to_numpy(),
        title,
        folder / "compensation_by_layer",
        xlabel="downstream layer",
        ylabel="ablated head",
        colorbar="summed mean Δ direct effect",
        xticks=layer_columns,
        yticks=layer_rows,
        caption=f"{len(layer_rows)} of the {by_layer.shape[0]} ablated heads (the largest summed response among "
        f"the meaningful ones). Every head: compensation_by_layer.html.",
    )
    figures["compensation_by_layer"] = folder / "compensation_by_layer.png"
    plots.heatmap_html(
        by_layer.to_numpy(),
        title,
        folder / "compensation_by_layer",
        xlabel="downstream layer",
        ylabel="ablated head",
        colorbar="summed mean Δ direct effect",
        xticks=list(by_layer.columns),
        yticks=list(by_layer.index),
    )
    figures.update(self_repair.figures(results.self_repair, folder, where))
    if scatter_heads is None:  # the heads of the summary table
        table = summary_table(results, 2, min_de_fraction, min_r2)
        scatter_heads = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in table["head"]]
    for layer, head in scatter_heads:
        row = results.slopes[(results.slopes.layer == layer) & (results.slopes["head"] == head)]
        if row.empty:
            print(f"warning: L{layer}H{head} was not swept; no scatter", file=sys.stderr)
            continue
        pts = results.head_points(layer, head)
        figures[f"scatter_L{layer}H{head}"], _ = plots.scatter_with_fit(
            pts.de_clean.to_numpy(),
            pts.backup.to_numpy(),
            float(row.slope.iloc[0]),
            float(row.intercept.iloc[0]),
            f"Accumulated backup of L{layer}H{head} ({where})",
            folder / f"scatter_L{layer}H{head}",
            hover=[f"prompt {p}, pos {t}" for p, t in zip(pts.prompt, pts.pos)],
        )
    return figures


def log_run(
    kind: str,
    out: Path | Location,
    spec: dict,
    manifest: dict,
    tables: dict,
    figures: dict[str, Path],
    summary: dict,
    datasets: tuple[str, ...],
    mode: str,
    project: str,
    pages: dict[str, Path] | None = None,
) -> str | None:
    """One W&B run: tables, figures (PNG + HTML), extra HTML ``pages``, summary, and the
    Parquet datasets as an artifact.

    A results directory has one W&B run (its id made from the spec and the directory): a
    resumed sweep continues it. When nothing it would log changed since the last time (the
    same shards, summary and figures: a re-run with nothing to compute), nothing is logged
    again and the console says so."""
    if mode == "disabled":
        return None
    import hashlib
    import json

    import wandb

    out = Location.parse(out)
    os.environ.setdefault("WANDB_SILENT", "true")
    spec_id = manifest.get("spec_id", "")
    where = str(out.local.resolve()) if out.local is not None else str(out)
    run_id = f"{kind}-{spec_id}-{hashlib.blake2b(where.encode(), digest_size=4).hexdigest()}"
    logged = {
        "mode": mode,
        "project": project,
        "shards": {k: v.get("checksums") for k, v in sorted(manifest.get("shards", {}).items())},
        "derived": manifest.get("derived"),
        "summary": summary,
        "figures": sorted(figures),
    }
    fingerprint = hashlib.blake2b(json.dumps(logged, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
    state = report_dir(out) / ".wandb_logged.json"
    try:
        last = json.loads(state.read_text())
    except (OSError, ValueError):
        last = {}
    if last.get("fingerprint") == fingerprint:
        print(f"W&B: nothing new since run {run_id} was logged; not logged again", file=sys.stderr)
        return None
    settings: dict[str, Any] = dict(
        project=project,
        mode=cast(Literal["online", "offline", "disabled", "shared"], mode),  # a --wandb choice
        job_type=f"{kind}-sweep",
        config=spec,
        name=f"{kind}-{spec.get('model')}-{spec.get('task')}-{spec_id}",
        dir=os.environ.get("WANDB_DIR", str(report_dir(out))),
        reinit="finish_previous",
    )
    try:
        run = wandb.init(**settings, id=run_id, resume="allow")
    except Exception:  # the directory's run cannot be continued (an earlier attempt that failed holds it): a new one
        run = wandb.init(**settings)
    try:
        payload: dict[str, wandb.Table | wandb.Image | wandb.Html] = {
            name: wandb.Table(dataframe=frame.head(WANDB_TABLE_MAX_ROWS)) for name, frame in tables.items()
        }
        for name, png in figures.items():
            payload[f"plots/{name}"] = wandb.Image(str(png))
            payload[f"html/{name}"] = wandb.Html(plots.standalone_html(png.with_suffix(".html")), inject=False)
        for name, page in (pages or {}).items():
            payload[f"html/{name}"] = wandb.Html(page.read_text(), inject=False)
        run.log(payload)
        run.summary.update(
            {**summary, "weight_hash": manifest.get("weight_hash"), "code_version": manifest.get("code_version")}
        )
        artifact = wandb.Artifact(f"{kind}-results-{spec_id or 'run'}", type="dataset", metadata={"spec": spec})
        for name in datasets:  # remote results are logged by reference, not copied
            if out.local is not None:
                artifact.add_dir(str(out.local / name), name=name)
            else:
                artifact.add_reference(str(out / name), name=name)
        if out.local is not None:
            artifact.add_file(str(out.local / "manifest.json"))
        else:
            artifact.add_reference(str(out / "manifest.json"))
        run.log_artifact(artifact)
        directory = run.dir
    finally:
        run.finish()
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"fingerprint": fingerprint, "run_id": run_id}))
    return directory


def log_to_wandb(results: BackupResults, figures: dict[str, Path], mode: str, project: str) -> str | None:
    slopes = results.slopes.drop(columns=[c for c in ("shard",) if c in results.slopes])
    responses = results.responses
    if len(responses) > WANDB_TABLE_MAX_ROWS:  # keep the strongest responses
        responses = responses.reindex(responses.mean_delta.abs().sort_values(ascending=False).index)
    tables = {
        "slopes": slopes,
        "top_heads": summary_table(results),
        "responses_top": responses[["up_layer", "up_head", "down_layer", "down_head", "down_kind", "mean_delta"]],
    }
    if not results.self_repair.empty:
        tables["self_repair_heads"] = self_repair.head_table(results.self_repair, "top")
        tables["self_repair_layers"] = self_repair.layer_table(results.self_repair, "top")
    if not results.neurons.empty:
        tables["self_repair_neurons"] = self_repair.neuron_table(results.neurons, "top")
    finite = results.slopes.dropna(subset=["slope"])
    summary = {
        "n_heads_swept": int(len(results.slopes)),
        "median_slope": float(np.median(finite.slope)) if len(finite) else float("nan"),
    }
    return log_run(
        "backup",
        results.out,
        results.spec,
        results.manifest,
        tables,
        figures,
        summary,
        ("slopes", "responses", "points", "self_repair", "neurons"),
        mode,
        project,
    )


def log_safely(kind: str, out: Path | Location, log: Callable[[], str | None], wandb_mode: str) -> None:
    """Log to W&B; a failure there is a warning: the Parquet results are complete regardless."""
    print(f"plots: {report_dir(Location.parse(out)) / 'plots'}", file=sys.stderr)
    try:
        run_dir = log()
    except Exception as err:  # noqa: BLE001 - results are complete whatever W&B does
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"warning: W&B logging failed ({type(err).__name__}: {reason}); the Parquet results are "
            f"complete; retry with: {console.command('-m analysis', kind, str(out), '--wandb', wandb_mode)}",
            file=sys.stderr,
        )
        return
    if run_dir:
        hint = " (upload later with `wandb sync`)" if wandb_mode == "offline" else ""
        print(f"W&B run: {Path(run_dir).parent}{hint}", file=sys.stderr)


def write_backup_report(
    results: BackupResults,
    wandb_mode: str = "offline",
    project: str = "interp-sweeps",
    scatter_heads: list[tuple[int, int]] | None = None,
    min_de_fraction: float = 0.1,
    min_r2: float = 0.0,
) -> dict[str, Path]:
    """Figures under ``OUT/plots`` and a W&B run, from results already loaded (``load_results``)."""
    figures = backup_figures(results, scatter_heads, min_de_fraction, min_r2)
    log_safely("backup", results.out, lambda: log_to_wandb(results, figures, wandb_mode, project), wandb_mode)
    return figures


# --------------------------------------------------------------------------- #
# Scale sweep
# --------------------------------------------------------------------------- #


def scale_figures(results: ScaleResults) -> dict[str, Path]:
    """The scale-ablation line plots (causal effect and metric change against scale) and a heatmap."""
    folder = report_dir(results.out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    spec = results.spec
    n_pairs = int(results.effects["n_pairs"].max()) if "n_pairs" in results.effects else "?"
    where = f"{sampled(spec)}, {spec.get('subspace', 'full')} activations, " + (
        f"self-patch of {n_pairs} prompts" if spec.get("self_patch") else f"{n_pairs} {spec.get('pairs', '?')} pairs"
    )
    scales = results.scales
    figures = {}
    figures["causal_effect"], _ = plots.effect_lines(
        scales,
        status_lines(results.effects, "causal_effect"),
        f"Causal effect against scale ({where})",
        folder / "causal_effect",
    )
    figures["metric_change"], _ = plots.effect_lines(
        scales,
        status_lines(results.effects, "metric_change"),
        f"Normalised metric change against scale ({where})",
        folder / "metric_change",
        ylabel="metric change (0 clean, 1 corrupt)",
    )
    table = wide(results.effects)
    values = table.drop(columns="status")
    names = [f"{n} *" if s == "in_circuit" else n for n, s in zip(table.index, table.status)]
    circuit = "; *: in the circuit" if (table.status == "in_circuit").any() else ""
    title = f"Causal effect per node and scale ({where})"
    shown = values.mean(axis=1).nlargest(LEGIBLE_NODES).index if len(values) > LEGIBLE_NODES else values.index
    rows = [i for i, node in enumerate(values.index) if node in set(shown)]
    plots.heatmap_png(
        values.iloc[rows].to_numpy(dtype=float),
        title,
        folder / "causal_effect_heatmap",
        xlabel="scale",
        ylabel="node",
        colorbar="causal effect (fraction of answers changed)",
        xticks=list(values.columns),
        yticks=[names[i] for i in rows],
        value_range=(0.0, 1.0),
        caption=(
            f"The {len(rows)} of {len(values)} nodes with the largest mean effect over the scales, in model order"
            if len(rows) < len(values)
            else f"Every node ({len(values)}), in model order"
        )
        + f"{circuit}. Every node: causal_effect_heatmap.html and the effects/ dataset.",
    )
    figures["causal_effect_heatmap"] = folder / "causal_effect_heatmap.png"
    plots.heatmap_html(
        values.to_numpy(dtype=float),
        title,
        folder / "causal_effect_heatmap",
        xlabel="scale",
        ylabel="node",
        colorbar="causal effect",
        xticks=list(values.columns),
        yticks=names,
        value_range=(0.0, 1.0),
    )
    return figures


LEGIBLE_NODES = 40  # rows of the scale sweep's heatmap PNG


def log_scale_to_wandb(
    results: ScaleResults, figures: dict[str, Path], mode: str, project: str, min_break: float = MIN_BREAK
) -> str | None:
    effects = results.effects.drop(columns=[c for c in ("shard",) if c in results.effects])
    tables = {"effects": effects, "effects_wide": wide(results.effects).reset_index()}
    for title, table in summary_tables(results, min_break=min_break).items():
        key = "summary/" + "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")[:60]
        tables[key] = table.reset_index()
    summary = {"n_nodes": int(results.effects["node"].nunique()), "n_scales": len(results.scales)}
    return log_run(
        "scale", results.out, results.spec, results.manifest, tables, figures, summary, ("effects",), mode, project
    )


def write_scale_report(
    results: ScaleResults, wandb_mode: str = "offline", project: str = "interp-sweeps", min_break: float = MIN_BREAK
) -> dict[str, Path]:
    """Figures under ``OUT/plots`` and a W&B run, from results already loaded (``load_scale_results``)."""
    figures = scale_figures(results)
    log_safely(
        "scale", results.out, lambda: log_scale_to_wandb(results, figures, wandb_mode, project, min_break), wandb_mode
    )
    return figures


# --------------------------------------------------------------------------- #
# Attribution sweep
# --------------------------------------------------------------------------- #


def attribution_figures(results: AttributionResults, n_edges: int = 30) -> dict[str, Path]:
    """Per-head (and MLP) node scores, the top edges, and attribution against real patching."""
    folder = report_dir(results.out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    where = sampled(results.spec)
    L, H = results.n_layers, results.n_heads
    figures = {}
    embed = results.nodes[results.nodes.kind == "embed"].score
    figures["node_scores"], _ = plots.heatmap(
        head_grid(results.nodes, L, H),
        f"Node scores ({where}; embed {float(embed.iloc[0]) if len(embed) else float('nan'):.3f})",
        folder / "node_scores",
        xlabel="head (last column: MLP)",
        colorbar="score (>0: helps)",
        xticks=[str(h) for h in range(H)] + ["MLP"],
        yticks=[str(layer) for layer in range(L)],
    )
    top = top_edges_table(results, n_edges)
    figures["top_edges"], _ = plots.bars(
        list(top.edge), top.score.to_numpy(), f"Top {len(top)} edges by |score| ({where})", folder / "top_edges"
    )
    if not results.verify.empty:
        groups = {}
        for kind, group in results.verify.groupby("kind", sort=False):
            groups[f"{kind}s"] = (group.score.to_numpy(), group.patch_effect.to_numpy(), list(group.target))
        figures["faithfulness"], _ = plots.agreement(
            groups,
            f"Attribution against real patching, top {results.spec.get('verify_top')} ({where})",
            folder / "faithfulness",
            ylabel="real patching effect (clean − patched metric)",
        )
    return figures


def log_attribution_to_wandb(
    results: AttributionResults, figures: dict[str, Path], mode: str, project: str
) -> str | None:
    tables = {
        "nodes": results.nodes.assign(head=results.nodes["head"].astype("float64")),  # W&B tables have no nullable ints
        "edges_top": results.edges.head(WANDB_TABLE_MAX_ROWS),
        "top_edges": top_edges_table(results, 50),
        "top_nodes": top_nodes_table(results, 50),
    }
    summary = {
        "clean_metric": results.clean_metric,
        "corrupt_metric": results.corrupt_metric,
        "n_prompts": results.n_prompts,
        "n_edges": int(len(results.edges)),
    }
    if not results.verify.empty:
        tables["verify"] = results.verify
        faith = results.faithfulness()
        tables["faithfulness"] = faith
        for row in faith.itertuples():
            summary[f"faithfulness/{row.kind}_pearson"] = row.pearson
            summary[f"faithfulness/{row.kind}_sign_agreement"] = row.sign_agreement
    return log_run(
        "attribution",
        results.out,
        results.spec,
        results.manifest,
        tables,
        figures,
        summary,
        tuple(d for d in DERIVED if (results.out / d).is_dir()),
        mode,
        project,
    )


def write_attribution_report(
    results: AttributionResults, wandb_mode: str = "offline", project: str = "interp-sweeps"
) -> dict[str, Path]:
    """Figures under ``OUT/plots`` and a W&B run, from ``load_attribution_results``."""
    figures = attribution_figures(results)
    log_safely(
        "attribution", results.out, lambda: log_attribution_to_wandb(results, figures, wandb_mode, project), wandb_mode
    )
    return figures


def write_circuit_report(results, wandb_mode: str = "offline", project: str = "interp-sweeps") -> dict[str, Path]:
    """The faithfulness plot under ``OUT/plots`` and a W&B run, from ``load_circuit_results``."""
    from analysis.circuit import DERIVED as CIRCUIT_DERIVED
    from analysis.circuit import curve_figure

    folder = report_dir(results.out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"faithfulness": curve_figure(results, folder)}
    summary = results.summary()

    def log() -> str | None:
        values = {"clean_metric": results.clean_metric, "corrupt_metric": results.corrupt_metric}
        for row in summary.itertuples():
            values[f"cpr/{row.circuit}"], values[f"cmd/{row.circuit}"] = row.cpr, row.cmd
        for (label, _, _), block in results.mib_blocks().items():  # --sizes mib
            values[f"mib_cpr/{label}"], values[f"mib_cmd/{label}"] = block["cpr"], block["cmd"]
        return log_run(
            "circuit",
            results.out,
            results.spec,
            results.manifest,
            {"faithfulness": results.faithfulness, "summary": summary},
            figures,
            values,
            tuple(d for d in CIRCUIT_DERIVED if (results.out / d).is_dir()),
            wandb_mode,
            project,
        )

    log_safely("circuit", results.out, log, wandb_mode)
    return figures
