"""The task report for any task: tables, figures, the attention page and a W&B run.

``build_report`` turns a ``lens.TaskReport`` (tensors) into pandas tables;
``write_task_report`` writes them with the figures under ``OUT`` and logs one
W&B run. The numbers are means over the task's points (answer positions, or
every next-token position for text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.attention_html import WINDOW, attention_page
from analysis.results import sampled


@dataclass
class TaskTables:
    summary: dict  # metric, accuracy, the sum check
    heads: pd.DataFrame  # layer, head, node, dla (mean direct logit attribution)
    layers: pd.DataFrame  # component (embed, L_attn, L_mlp, biases), dla
    lens: pd.DataFrame  # checkpoint, final_scale, own_scale


def build_report(report, n_layers: int, n_heads: int, kind: str) -> TaskTables:
    parts = report.parts
    heads = parts.heads.mean(1).cpu().numpy()  # [L, H]
    head_rows = pd.DataFrame(
        [
            {"layer": layer, "head": h, "node": f"L{layer}H{h}", "dla": float(heads[layer, h])}
            for layer in range(n_layers)
            for h in range(n_heads)
        ]
    )
    layer_rows = [("embed", float(parts.embed.mean()))]
    for layer in range(n_layers):
        layer_rows.append((f"{layer}_attn", float((parts.heads[layer].sum(-1) + parts.attn_bias[layer]).mean())))
        layer_rows.append((f"{layer}_mlp", float(parts.mlps[layer].mean())))
    layer_rows.append(("unembed_bias", float(parts.unembed_bias.mean())))
    total = parts.total()
    error = (total - report.metric).abs()
    summary = {
        "metric": "logit difference" if kind == "logit_diff" else "next-token logit",
        "mean": float(report.metric.mean()),
        "accuracy": float(report.correct.mean()),
        "n_points": int(report.metric.shape[0]),
        "sum_of_components": float(total.mean()),
        "sum_check_max_abs_error": float(error.max()),
    }
    lens = pd.DataFrame(
        {
            "checkpoint": report.lens_labels,
            "final_scale": report.lens_final_scale.mean(1).cpu().numpy(),
            "own_scale": report.lens_own_scale.mean(1).cpu().numpy(),
        }
    )
    return TaskTables(summary, head_rows, pd.DataFrame(layer_rows, columns=["component", "dla"]), lens)


def top_heads(heads: pd.DataFrame, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The k most positive and the k most negative heads by mean direct logit attribution."""
    ordered = heads.sort_values("dla")
    return ordered.tail(k)[::-1], ordered.head(k)


def write_task_report(
    out: Path,
    tables: TaskTables,
    report,
    spec: dict,
    tokens: list[str],
    k: int,
    wandb_mode: str = "offline",
    project: str = "interp-sweeps",
    attention_window: int = WINDOW,
) -> dict[str, Path]:
    """Figures, ``attention.html``, ``tables/*.csv`` and ``manifest.json`` under ``out``; one W&B run.
    ``attention_window``: the last positions the attention page draws per head (0: every one)."""
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "plots"
    folder.mkdir(exist_ok=True)
    where = sampled(spec)
    metric = tables.summary["metric"]
    L, H = int(spec["n_layers"]), int(spec["n_heads"])
    figures = {}
    figures["dla_heads"], _ = plots.heatmap(
        tables.heads.dla.to_numpy().reshape(L, H),
        f"Direct logit attribution per head ({where})",
        folder / "dla_heads",
        colorbar=f"mean {metric}",
    )
    layers = tables.layers[tables.layers.component.str.contains("_")]
    figures["dla_layers"], _ = plots.lines(
        list(layers.component),
        {"direct logit attribution": layers.dla.to_numpy()},
        f"{metric.capitalize()} from each layer ({where})",
        folder / "dla_layers",
        "component",
        metric,
    )
    figures["logit_lens"], _ = plots.lines(
        list(tables.lens.checkpoint),
        {
            "divided by the final norm's scale": tables.lens.final_scale.to_numpy(),
            "normalised at each checkpoint (logit lens)": tables.lens.own_scale.to_numpy(),
        },
        f"{metric.capitalize()} from the accumulated residual stream ({where})",
        folder / "logit_lens",
        "accumulated up to",
        metric,
    )
    positive, negative = top_heads(tables.heads, k)
    pages = {}
    if report.patterns is not None:
        patterns = report.patterns.cpu().numpy()

        def entries(frame):
            return [(r.node, r.dla, patterns[r.layer, r.head]) for r in frame.itertuples()]

        pages["attention"] = attention_page(
            out / "attention.html",
            f"Attention of the top heads by direct logit attribution ({where})",
            tokens,
            {f"Top {k} positive heads": entries(positive), f"Top {k} negative heads": entries(negative)},
            attention_window,
        )
    table_dir = out / "tables"
    table_dir.mkdir(exist_ok=True)
    frames = {
        "heads": tables.heads,
        "layers": tables.layers,
        "logit_lens": tables.lens,
        "top_positive_heads": positive,
        "top_negative_heads": negative,
    }
    for name, frame in frames.items():
        with plots.atomic_output(table_dir / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
    manifest = {"spec": spec, "summary": tables.summary, "lines": summary_lines(tables, k)}  # lines: what it printed
    with plots.atomic_output(out / "manifest.json") as tmp:  # written last: the report's commit record
        tmp.write_text(json.dumps(manifest, indent=2, default=str))

    from analysis.report import log_run, log_safely

    log_safely(
        "report",
        out,
        lambda: log_run("report", out, spec, manifest, frames, figures, tables.summary, (), wandb_mode, project, pages),
        wandb_mode,
    )
    return {**figures, **pages}


def summary_lines(tables: TaskTables, k: int) -> list[str]:
    s = tables.summary
    positive, negative = top_heads(tables.heads, k)
    return [
        f"{s['metric']}: mean {s['mean']:.4f} over {s['n_points']} points, accuracy {s['accuracy']:.3f}",
        f"sum check: embeddings + every head + every MLP + biases = {s['sum_of_components']:.4f} "
        f"(max |error| {s['sum_check_max_abs_error']:.2e})",
        "top positive heads: " + ", ".join(f"{r.node} {r.dla:+.3f}" for r in positive.itertuples()),
        "top negative heads: " + ", ".join(f"{r.node} {r.dla:+.3f}" for r in negative.itertuples()),
        "logit lens (last 4 checkpoints): "
        + ", ".join(f"{c} {v:.3f}" for c, v in zip(tables.lens.checkpoint[-4:], tables.lens.own_scale[-4:])),
    ]
