"""Plots of a backup sweep and their W&B run, from the results directory alone.

``write_backup_report(load_results(out))`` can be re-run at any time (``python -m analysis
backup OUT``), e.g. after a sweep whose W&B logging failed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from analysis import plots
from analysis.backup import (
    BackupResults,
    compensation_by_layer,
    compensation_matrix,
    grid,
    summary_table,
)

WANDB_TABLE_MAX_ROWS = 10_000  # W&B refuses larger tables


def backup_figures(results: BackupResults, scatter_heads: list[tuple[int, int]] | None = None) -> dict[str, Path]:
    """Write every figure under ``OUT/plots``; returns name -> PNG path (HTML beside it)."""
    folder = results.out / "plots"
    folder.mkdir(exist_ok=True)
    L, H = results.n_layers, results.n_heads
    model, task = results.spec.get("model", "?"), results.spec.get("task", "?")
    figures = {}
    figures["slopes"], _ = plots.heatmap(
        grid(results.slopes, "slope", L, H), f"Backup slope per head ({model}, {task})",
        folder / "slopes", colorbar="slope (>0: backed up)", clip_quantile=0.95,
    )
    figures["direct_effects"], _ = plots.heatmap(
        grid(results.slopes, "mean_de", L, H), f"Mean clean direct effect per head ({model}, {task})",
        folder / "direct_effects", colorbar="direct effect",
    )
    matrix = compensation_matrix(results.responses, L, H)
    figures["compensation"], _ = plots.heatmap(
        matrix.to_numpy(), "Compensatory response: mean change of each downstream head's direct effect",
        folder / "compensation", xlabel="downstream head", ylabel="ablated head", colorbar="mean Δ direct effect",
        xticks=list(matrix.columns), yticks=list(matrix.index),
    )
    by_layer = compensation_by_layer(results.responses, L, H)
    figures["compensation_by_layer"], _ = plots.heatmap(
        by_layer.to_numpy(), "Compensatory response by downstream layer (attention heads, then MLPs)",
        folder / "compensation_by_layer", xlabel="downstream layer", ylabel="ablated head",
        colorbar="summed mean Δ direct effect", xticks=list(by_layer.columns), yticks=list(by_layer.index),
    )
    if scatter_heads is None:  # the heads of the summary table
        table = summary_table(results, k=2)
        scatter_heads = [(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in table["head"]]
    for layer, head in scatter_heads:
        row = results.slopes[(results.slopes.layer == layer) & (results.slopes["head"] == head)]
        if row.empty:
            print(f"warning: L{layer}H{head} was not swept; no scatter", file=sys.stderr)
            continue
        pts = results.head_points(layer, head)
        figures[f"scatter_L{layer}H{head}"], _ = plots.scatter_with_fit(
            pts.de_clean.to_numpy(), pts.backup.to_numpy(), float(row.slope.iloc[0]),
            float(row.intercept.iloc[0]), f"Accumulated backup of L{layer}H{head} ({model}, {task})",
            folder / f"scatter_L{layer}H{head}",
            hover=[f"prompt {p}, pos {t}" for p, t in zip(pts.prompt, pts.pos)],
        )
    return figures


def log_to_wandb(results: BackupResults, figures: dict[str, Path], mode: str, project: str) -> str | None:
    """One W&B run: tables, figures (PNG + HTML), summary, and the Parquet dataset as an artifact."""
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    spec = results.spec
    run = wandb.init(
        project=project, mode=mode, job_type="backup-sweep", config=spec,
        name=f"backup-{spec.get('model')}-{spec.get('task')}-{results.manifest.get('spec_id', '')}",
        dir=os.environ.get("WANDB_DIR", str(results.out)), reinit="finish_previous",
    )
    try:
        slopes = results.slopes.drop(columns=[c for c in ("shard",) if c in results.slopes])
        responses = results.responses
        if len(responses) > WANDB_TABLE_MAX_ROWS:  # keep the strongest responses
            responses = responses.reindex(responses.mean_delta.abs().sort_values(ascending=False).index)
            responses = responses.head(WANDB_TABLE_MAX_ROWS)
        payload = {
            "slopes": wandb.Table(dataframe=slopes),
            "top_heads": wandb.Table(dataframe=summary_table(results)),
            "responses_top": wandb.Table(dataframe=responses[
                ["up_layer", "up_head", "down_layer", "down_head", "down_kind", "mean_delta"]
            ]),
        }
        for name, png in figures.items():
            payload[f"plots/{name}"] = wandb.Image(str(png))
            payload[f"html/{name}"] = wandb.Html(png.with_suffix(".html").read_text(), inject=False)
        run.log(payload)
        finite = results.slopes.dropna(subset=["slope"])
        run.summary.update(
            {
                "n_heads_swept": int(len(results.slopes)),
                "median_slope": float(np.median(finite.slope)) if len(finite) else float("nan"),
                "weight_hash": results.manifest.get("weight_hash"),
                "code_version": results.manifest.get("code_version"),
            }
        )
        artifact = wandb.Artifact(f"backup-results-{results.manifest.get('spec_id', 'run')}", type="dataset",
                                  metadata={"spec": spec})
        for name in ("slopes", "responses", "points"):
            artifact.add_dir(str(results.out / name), name=name)
        artifact.add_file(str(results.out / "manifest.json"))
        run.log_artifact(artifact)
        return run.dir
    finally:
        run.finish()


def write_backup_report(results: BackupResults, wandb_mode: str = "offline", project: str = "interp-sweeps",
                        scatter_heads: list[tuple[int, int]] | None = None) -> dict[str, Path]:
    """Figures under ``OUT/plots`` and a W&B run, from results already loaded (``load_results``)."""
    out = results.out
    figures = backup_figures(results, scatter_heads)
    print(f"plots: {results.out / 'plots'}", file=sys.stderr)
    try:
        run_dir = log_to_wandb(results, figures, wandb_mode, project)
    except Exception as err:  # noqa: BLE001 - results are complete whatever W&B does
        print(f"warning: W&B logging failed ({type(err).__name__}: {err}); the Parquet results are "
              f"complete; retry with: python -m analysis backup {out} --wandb {wandb_mode}", file=sys.stderr)
        return figures
    if run_dir:
        hint = " (upload later with `wandb sync`)" if wandb_mode == "offline" else ""
        print(f"W&B run: {Path(run_dir).parent}{hint}", file=sys.stderr)
    return figures
