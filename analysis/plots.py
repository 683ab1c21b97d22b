"""Figures: every one as a PNG (matplotlib) and an interactive HTML page (plotly)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402


def _symmetric_limit(values: np.ndarray, quantile: float) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(np.quantile(finite, quantile)) if finite.size else 1.0


def heatmap(
    values: np.ndarray, title: str, path: Path, xlabel: str = "head", ylabel: str = "layer",
    colorbar: str = "", xticks: list[str] | None = None, yticks: list[str] | None = None,
    clip_quantile: float = 0.99, value_range: tuple[float, float] | None = None,
) -> tuple[Path, Path]:
    """Diverging heatmap centred on 0; colours saturate at a quantile of |values|
    so that a few noisy cells do not wash out the rest (hover shows true values).
    With ``value_range`` a sequential map over that fixed range instead (e.g. 0..1)."""
    lim = _symmetric_limit(values, clip_quantile) or 1.0
    cmap, vmin, vmax, plotly_scale = "RdBu", -lim, lim, "RdBu"
    if value_range is not None:
        (vmin, vmax), cmap, plotly_scale = value_range, "viridis", "Viridis"
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.45 * cols, 24), min(1.5 + 0.3 * rows, 24)))
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if xticks is None and cols <= 40:
        ax.set_xticks(range(cols))
    if yticks is None and rows <= 60:
        ax.set_yticks(range(rows))
    if xticks is not None:
        step = max(1, len(xticks) // 40)
        ax.set_xticks(range(0, cols, step), xticks[::step], rotation=90, fontsize=6)
    if yticks is not None:
        step = max(1, len(yticks) // 60)
        ax.set_yticks(range(0, rows, step), yticks[::step], fontsize=6)
    fig.colorbar(im, ax=ax, label=colorbar)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    html = path.with_suffix(".html")
    go.Figure(
        go.Heatmap(
            z=values, x=xticks, y=yticks, colorscale=plotly_scale, zmin=vmin, zmax=vmax,
            colorbar=dict(title=colorbar), hovertemplate=f"{ylabel} %{{y}}, {xlabel} %{{x}}: %{{z:.4f}}<extra></extra>",
        ),
        layout=dict(title=title, xaxis_title=xlabel, yaxis_title=ylabel, yaxis_autorange="reversed"),
    ).write_html(html, include_plotlyjs="cdn")
    return png, html


def scatter_with_fit(
    x: np.ndarray, y: np.ndarray, slope: float, intercept: float, title: str, path: Path,
    hover: list[str] | None = None,
) -> tuple[Path, Path]:
    """Seed 000's scatter: clean direct effect vs accumulated backup, with the fitted line."""
    lo, hi = (float(np.min(x)), float(np.max(x))) if len(x) else (0.0, 1.0)
    line_x = np.linspace(lo, hi, 50)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(x, y, s=6, alpha=0.6)
    if np.isfinite(slope):
        ax.plot(line_x, slope * line_x + intercept, color="C3", label=f"slope {slope:.4f}, intercept {intercept:.4f}")
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(title=title, xlabel="direct effect of the head (clean)", ylabel="accumulated backup")
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    html = path.with_suffix(".html")
    traces = [go.Scatter(x=x, y=y, mode="markers", marker=dict(size=4, opacity=0.7), text=hover, name="points")]
    if np.isfinite(slope):
        traces.append(go.Scatter(x=line_x, y=slope * line_x + intercept, mode="lines", name=f"fit (slope {slope:.4f})"))
    go.Figure(traces, layout=dict(title=title, xaxis_title="direct effect of the head (clean)",
                                  yaxis_title="accumulated backup")).write_html(html, include_plotlyjs="cdn")
    return png, html


STATUS_COLOURS = {"in_circuit": "#2ca02c", "not_in_circuit": "#ff7f0e", "unlabelled": "#1f77b4"}


def effect_lines(
    scales: list[float], lines: dict[str, list[tuple[str, np.ndarray]]], title: str, path: Path,
    ylabel: str = "causal effect",
) -> tuple[Path, Path]:
    """Seed 004's figure: effect against scale, one line per node, coloured by circuit status.

    The scale axis is symlog (0 and 10 on one axis, linear below 1); hover the
    HTML version for node names.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for status, nodes in lines.items():
        colour = STATUS_COLOURS.get(status, "grey")
        alpha = max(0.15, min(0.9, 8 / max(len(nodes), 1)))
        for i, (_, values) in enumerate(nodes):
            ax.plot(scales, values, color=colour, alpha=alpha, lw=1, marker=".", ms=3,
                    label=f"{status} ({len(nodes)})" if i == 0 else None)
    ax.set_xscale("symlog", linthresh=1.0)
    if len(scales) <= 16:
        ax.set_xticks(scales, [f"{s:g}" for s in scales], fontsize=7)
        ax.minorticks_off()
    ax.axvline(1.0, color="grey", lw=0.5, ls="--")
    ax.set(title=title, xlabel="scale (symlog)", ylabel=ylabel)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    traces = []
    for status, nodes in lines.items():
        colour = STATUS_COLOURS.get(status, "grey")
        for i, (node, values) in enumerate(nodes):
            traces.append(go.Scatter(
                x=scales, y=values, mode="lines+markers", line=dict(color=colour, width=1), marker=dict(size=4),
                name=status, legendgroup=status, showlegend=i == 0, hovertext=f"{node} ({status})",
                hovertemplate="%{hovertext}<br>scale %{x}: %{y:.3f}<extra></extra>",
            ))
    html = path.with_suffix(".html")
    go.Figure(traces, layout=dict(title=title, xaxis=dict(title="scale", type="log" if min(scales) > 0 else "linear"),
                                  yaxis_title=ylabel, template="plotly_white")).write_html(html, include_plotlyjs="cdn")
    return png, html


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def bars(labels: list[str], values: np.ndarray, title: str, path: Path, xlabel: str = "score") -> tuple[Path, Path]:
    """Horizontal bars, the first label on top (e.g. the top edges by |score|)."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.25 * len(labels)))
    ax.barh(range(len(labels)), values, color=["#1f77b4" if v >= 0 else "#d62728" for v in values])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(title=title, xlabel=xlabel)
    png = _save(fig, path)
    html = path.with_suffix(".html")
    go.Figure(go.Bar(x=values, y=labels, orientation="h"),
              layout=dict(title=title, xaxis_title=xlabel, yaxis_autorange="reversed",
                          template="plotly_white")).write_html(html, include_plotlyjs="cdn")
    return png, html


def agreement(
    groups: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], title: str, path: Path,
    xlabel: str = "attribution score", ylabel: str = "real patching effect",
) -> tuple[Path, Path]:
    """Predicted against measured, one colour per group, with the line y = x: points off
    the line are where the linear approximation is wrong (labels on hover and for the worst)."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    every = np.concatenate([np.concatenate([x, y]) for x, y, _ in groups.values()]) if groups else np.zeros(1)
    lo, hi = float(np.nanmin(every)), float(np.nanmax(every))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--", label="y = x")
    traces = [go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="y = x",
                         line=dict(color="grey", dash="dash"))]
    for i, (name, (x, y, labels)) in enumerate(groups.items()):
        ax.scatter(x, y, s=18, alpha=0.8, color=f"C{i}", label=name)
        worst = np.argsort(-np.abs(np.asarray(y) - np.asarray(x)))[:3]
        for j in worst:
            ax.annotate(labels[j], (x[j], y[j]), fontsize=6, alpha=0.8)
        traces.append(go.Scatter(x=x, y=y, mode="markers", name=name, text=labels,
                                 hovertemplate="%{text}<br>score %{x:.4f}<br>patched %{y:.4f}<extra></extra>"))
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="best", fontsize=8)
    png = _save(fig, path)
    html = path.with_suffix(".html")
    go.Figure(traces, layout=dict(title=title, xaxis_title=xlabel, yaxis_title=ylabel,
                                  template="plotly_white")).write_html(html, include_plotlyjs="cdn")
    return png, html


def lines(
    x_labels: list[str], series: dict[str, np.ndarray], title: str, path: Path, xlabel: str, ylabel: str,
) -> tuple[Path, Path]:
    """A few named lines over categorical x positions (e.g. the logit lens over layers)."""
    fig, ax = plt.subplots(figsize=(max(6.5, 0.12 * len(x_labels)), 4))
    for name, values in series.items():
        ax.plot(range(len(x_labels)), values, marker=".", lw=1.2, label=name)
    step = max(1, len(x_labels) // 30)
    ax.set_xticks(range(0, len(x_labels), step), x_labels[::step], rotation=90, fontsize=6)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="best", fontsize=8)
    png = _save(fig, path)
    html = path.with_suffix(".html")
    go.Figure([go.Scatter(x=x_labels, y=v, mode="lines+markers", name=n) for n, v in series.items()],
              layout=dict(title=title, xaxis_title=xlabel, yaxis_title=ylabel, hovermode="x unified",
                          template="plotly_white")).write_html(html, include_plotlyjs="cdn")
    return png, html
