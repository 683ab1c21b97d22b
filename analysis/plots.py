"""Figures: every one as a PNG (matplotlib) and an interactive HTML page (plotly)."""

from __future__ import annotations

import os
import re
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from sweeps.runtime.location import storage_error  # noqa: E402

PLOTLY_JS = "plotly.min.js"  # plotly's JavaScript, one copy beside the pages of a folder
_LOCAL_SCRIPT = re.compile(r'<script[^>]*src="plotly\.min\.js"[^>]*></script>')


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A hidden sibling of ``path`` (same suffix, so writers pick the format from it) to write;
    moved into place only once written whole. A full disk or a crash leaves the old file (or
    none), never half a file that a later run would take for done."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # some writers (matplotlib, plotly) name no file: name it
            raise storage_error(err, path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def save_png(fig, png: Path, **savefig) -> Path:
    """``fig`` saved (atomically) as ``png``, then closed."""
    with atomic_output(png) as tmp:
        fig.savefig(tmp, dpi=120, **savefig)
    plt.close(fig)
    return png


def ensure_plotly_js(folder: Path) -> Path:
    """``folder/plotly.min.js``, exactly plotly's own JavaScript: written (atomically) when it is
    missing or differs (say, half-written by a run that hit a full disk; plotly itself only
    checks that the file exists, so such a file would break every page for good)."""
    from plotly.offline import get_plotlyjs

    path = folder / PLOTLY_JS
    expected = get_plotlyjs().encode()
    if not (path.is_file() and path.stat().st_size == len(expected) and path.read_bytes() == expected):
        with atomic_output(path) as tmp:
            tmp.write_bytes(expected)
    return path


def write_html(fig: go.Figure, path: Path) -> Path:
    """``fig`` as an interactive page that needs no network: plotly's JavaScript is read from
    ``plotly.min.js`` beside it, written once per folder and shared by every page there
    (a CDN would leave the page blank offline). Both are written atomically."""
    ensure_plotly_js(path.parent)
    with atomic_output(path) as tmp:
        fig.write_html(tmp, include_plotlyjs="directory", include_mathjax=False)
    return path


def standalone_html(page: Path) -> str:
    """A page of ``write_html`` with plotly's JavaScript inlined: a copy that works away from
    its folder (the copies logged to W&B)."""
    from plotly.offline import get_plotlyjs

    text = page.read_text()
    return _LOCAL_SCRIPT.sub(lambda _: f'<script charset="utf-8">{get_plotlyjs()}</script>', text, count=1)


MASKED_GREY = "#c8c8c8"  # cells whose value is not meaningful (a caption says why)
MAX_CELLS_MARKED = 3000  # overflow markers are drawn on heatmaps up to this many cells


@dataclass(frozen=True)
class ColourScale:
    """The colour limits of a heatmap, and what they leave out.

    ``clip`` is None when the limits span every shown value; else the limits stop at a
    quantile of |value| and ``note`` says so (it goes on the colourbar), and the cells
    beyond are marked."""

    vmin: float
    vmax: float
    diverging: bool
    clip: float | None = None
    note: str = ""

    def beyond(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cells above ``vmax`` and below ``vmin`` (both False where NaN)."""
        with np.errstate(invalid="ignore"):
            return values > self.vmax, values < self.vmin


def colour_scale(
    shown: np.ndarray, clip_quantile: float | None = None, value_range: tuple[float, float] | None = None
) -> ColourScale:
    """Limits over the real range of ``shown`` (finite, unmasked values): symmetric about 0,
    or ``value_range`` for a sequential map. With ``clip_quantile`` the symmetric limit is that
    quantile of |value| when it is below the largest |value|: a few extreme cells then do not
    wash out the rest, and the colourbar says where it stops."""
    finite = shown[np.isfinite(shown)]
    if value_range is not None:
        lo, hi = value_range
        outside = finite.size and (finite.max() > hi or finite.min() < lo)
        return ColourScale(lo, hi, False, None, f"colours span {lo:g} to {hi:g}; ▲▼ cells beyond" if outside else "")
    largest = float(np.abs(finite).max()) if finite.size else 1.0
    largest = largest or 1.0
    if clip_quantile is not None and finite.size:
        limit = float(np.quantile(np.abs(finite), clip_quantile))
        if 0 < limit < largest:
            return ColourScale(
                -limit,
                limit,
                True,
                limit,
                f"clipped at ±{limit:.3g} ({clip_quantile:.0%} of |values| within; "
                f"largest {largest:.3g}); ▲▼ cells beyond",
            )
    return ColourScale(-largest, largest, True)


def fit_text(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` wrapped to lines that fit ``width_inches`` at ``fontsize`` points."""
    chars = max(20, int(width_inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))


def _tick_labels(ax, axis: str, n: int, labels: list[str] | None, cell_inches: float) -> None:
    """Every label when cells are tall (wide) enough for a readable font, else every k-th."""
    fontsize = float(np.clip(cell_inches * 72 * 0.75, 6, 9))
    step = max(1, int(np.ceil(6 / (cell_inches * 72))))  # 6 pt: the smallest readable font
    positions = list(range(0, n, step))
    text = [labels[i] for i in positions] if labels is not None else [str(i) for i in positions]
    if axis == "x":
        rotation = 90 if labels is not None and max(map(len, text), default=0) > 3 else 0
        ax.set_xticks(positions, text, fontsize=fontsize, rotation=rotation)
    else:
        ax.set_yticks(positions, text, fontsize=fontsize)


def heatmap_png(values: np.ndarray, title: str, path: Path, **kwargs) -> Path:
    """``heatmap_figure`` saved as ``path`` with suffix ``.png``."""
    fig, _, _ = heatmap_figure(values, title, **kwargs)
    return save_png(fig, path.with_suffix(".png"), bbox_inches="tight")


def heatmap_figure(
    values: np.ndarray,
    title: str,
    xlabel: str = "head",
    ylabel: str = "layer",
    colorbar: str = "",
    xticks: list[str] | None = None,
    yticks: list[str] | None = None,
    clip_quantile: float | None = None,
    value_range: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
    caption: str = "",
):
    """A heatmap a reader can take in at once: (figure, axes, its ``ColourScale``).

    Colours go only to meaningful cells: ``mask`` marks cells drawn grey (the caption says
    why); NaN cells (nothing measured) stay white. The colour scale spans the real range
    of the coloured cells (``colour_scale``); when it is clipped the colourbar says where,
    and cells beyond carry ▲ (above) or ▼ (below). Labels are sized to their cells (every
    k-th when cells are too small for a readable font); the title and caption are wrapped
    to the figure's width.
    """
    values = np.asarray(values, dtype=float)
    rows, cols = values.shape
    mask = np.zeros(values.shape, bool) if mask is None else np.asarray(mask, bool) & np.isfinite(values)
    shown = np.where(mask, np.nan, values)
    scale = colour_scale(shown, clip_quantile, value_range)
    # cells large enough for a label each where the figure allows (at most 20 x 22 inches of cells)
    cell_w = min(float(np.clip(12 / max(cols, 1), 0.12, 0.5)), 20 / max(cols, 1))
    cell_h = min(float(np.clip(14 / max(rows, 1), 0.12, 0.4)), 22 / max(rows, 1))
    width, height = 2.8 + cell_w * cols, 1.8 + cell_h * rows
    fig, ax = plt.subplots(figsize=(max(width, 6.0), max(height, 3.0)))
    cmap = plt.get_cmap("RdBu" if scale.diverging else "viridis").with_extremes(bad=(0, 0, 0, 0))  # NaN: white
    extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
    if mask.any():
        ax.imshow(
            np.where(mask, 1.0, np.nan),
            cmap=ListedColormap([MASKED_GREY]),
            vmin=0,
            vmax=1,
            aspect="auto",
            interpolation="nearest",
            extent=extent,
        )
    im = ax.imshow(
        np.ma.masked_invalid(shown),
        cmap=cmap,
        vmin=scale.vmin,
        vmax=scale.vmax,
        aspect="auto",
        interpolation="nearest",
        extent=extent,
    )
    above, below = scale.beyond(shown)
    if (above.any() or below.any()) and rows * cols <= MAX_CELLS_MARKED:
        size = float(np.clip(min(cell_w, cell_h) * 72 * 0.6, 4, 9))
        for (r, c), up in [(rc, True) for rc in zip(*np.nonzero(above))] + [
            (rc, False) for rc in zip(*np.nonzero(below))
        ]:
            ax.text(
                c,
                r,
                "▲" if up else "▼",
                ha="center",
                va="center",
                fontsize=size,
                color="white" if scale.diverging else "black",
            )
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    _tick_labels(ax, "x", cols, xticks, cell_w)
    _tick_labels(ax, "y", rows, yticks, cell_h)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig_width = fig.get_size_inches()[0]
    ax.set_title(fit_text(title, fig_width - 0.5, 11), fontsize=11)
    extend = {(True, True): "both", (True, False): "max", (False, True): "min"}.get(
        (bool(above.any()), bool(below.any())), "neither"
    )
    label = colorbar + (f"\n{scale.note}" if scale.note else "")
    bar = fig.colorbar(im, ax=ax, extend=extend, fraction=0.08 if cols > 8 else 0.12, pad=0.02)
    bar.set_label(fit_text(label, max(height - 1.0, 2.5), 8), fontsize=8)
    if caption:
        ax.annotate(
            fit_text(caption, fig_width - 0.3, 8),
            xy=(0, 0),
            xycoords=("axes fraction", ax.xaxis.label),
            xytext=(0, -6),
            textcoords="offset points",
            va="top",
            ha="left",
            fontsize=8,
            color="#333333",
        )
    return fig, ax, scale


def heatmap_html(
    values: np.ndarray,
    title: str,
    path: Path,
    xlabel: str = "head",
    ylabel: str = "layer",
    colorbar: str = "",
    xticks: list[str] | None = None,
    yticks: list[str] | None = None,
    clip_quantile: float | None = None,
    value_range: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
    caption: str = "",
) -> Path:
    """The interactive version of ``heatmap_png``: the same colours (masked cells grey), every
    cell's true value on hover, zoomable, so it can hold the full matrix."""
    values = np.asarray(values, dtype=float)
    mask = np.zeros(values.shape, bool) if mask is None else np.asarray(mask, bool) & np.isfinite(values)
    shown = np.where(mask, np.nan, values)
    scale = colour_scale(shown, clip_quantile, value_range)
    rows, cols = values.shape
    x = xticks if xticks is not None else [str(i) for i in range(cols)]
    y = yticks if yticks is not None else [str(i) for i in range(rows)]
    hover = f"{ylabel} %{{y}}, {xlabel} %{{x}}: %{{customdata:.4g}}"
    traces = [
        go.Heatmap(
            z=shown,
            x=x,
            y=y,
            customdata=values,
            colorscale="RdBu" if scale.diverging else "Viridis",
            reversescale=False,
            zmin=scale.vmin,
            zmax=scale.vmax,
            hoverongaps=False,
            colorbar=dict(title=dict(text=colorbar + (f"<br><sub>{scale.note}</sub>" if scale.note else ""))),
            hovertemplate=hover + "<extra></extra>",
            name="value",
        )
    ]
    if mask.any():
        traces.append(
            go.Heatmap(
                z=np.where(mask, 1.0, np.nan),
                x=x,
                y=y,
                customdata=values,
                showscale=False,
                hoverongaps=False,
                colorscale=[[0, MASKED_GREY], [1, MASKED_GREY]],
                name="not meaningful",
                hovertemplate=hover + " (grey: not meaningful)<extra></extra>",
            )
        )
    subtitle = f"<br><sup>{caption}</sup>" if caption else ""
    write_html(
        go.Figure(
            traces,
            layout=dict(
                title=dict(text=title + subtitle),
                xaxis_title=xlabel,
                yaxis_title=ylabel,
                yaxis_autorange="reversed",
                template="plotly_white",
                xaxis=dict(type="category"),
                yaxis=dict(type="category"),
            ),
        ),
        path.with_suffix(".html"),
    )
    return path.with_suffix(".html")


def heatmap(values: np.ndarray, title: str, path: Path, **kwargs) -> tuple[Path, Path]:
    """``heatmap_png`` and ``heatmap_html`` of the same values (arguments as theirs)."""
    return heatmap_png(values, title, path, **kwargs), heatmap_html(values, title, path, **kwargs)


def scatter_with_fit(
    x: np.ndarray,
    y: np.ndarray,
    slope: float,
    intercept: float,
    title: str,
    path: Path,
    hover: list[str] | None = None,
) -> tuple[Path, Path]:
    """The backup scatter: clean direct effect vs accumulated backup, with the fitted line."""
    lo, hi = (float(np.min(x)), float(np.max(x))) if len(x) else (0.0, 1.0)
    line_x = np.linspace(lo, hi, 50)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(x, y, s=6, alpha=0.6)
    if np.isfinite(slope):
        ax.plot(line_x, slope * line_x + intercept, color="C3", label=f"slope {slope:.4f}, intercept {intercept:.4f}")
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_title(fit_text(title, fig.get_size_inches()[0] - 0.5, 11), fontsize=11)
    ax.set(xlabel="direct effect of the head (clean)", ylabel="accumulated backup")
    fig.tight_layout()
    png = save_png(fig, path.with_suffix(".png"))
    html = path.with_suffix(".html")
    traces = [go.Scatter(x=x, y=y, mode="markers", marker=dict(size=4, opacity=0.7), text=hover, name="points")]
    if np.isfinite(slope):
        traces.append(go.Scatter(x=line_x, y=slope * line_x + intercept, mode="lines", name=f"fit (slope {slope:.4f})"))
    write_html(
        go.Figure(
            traces,
            layout=dict(title=title, xaxis_title="direct effect of the head (clean)", yaxis_title="accumulated backup"),
        ),
        html,
    )
    return png, html


STATUS_COLOURS = {"in_circuit": "#2ca02c", "not_in_circuit": "#ff7f0e", "unlabelled": "#8c8c8c"}
NAMED_COLOURS = ("#1f77b4", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#000000")


NAMED_LINES = 8  # effect_lines names this many nodes in its PNG


def effect_lines(
    scales: list[float],
    lines: dict[str, list[tuple[str, np.ndarray]]],
    title: str,
    path: Path,
    ylabel: str = "causal effect",
    named: int = NAMED_LINES,
) -> tuple[Path, Path]:
    """The scale-ablation figure: effect against scale, one line per node, coloured by circuit status.

    The ``named`` nodes with the largest mean |effect| over the scales are drawn bold, each in its
    own colour and named in the legend with its status, so the PNG reads without hovering;
    every other node is a thin line in its status colour. The scale axis is symlog (0 and 10
    on one axis, linear below 1). The HTML version names every line on hover.
    """
    every = [
        (status, node, np.asarray(values, dtype=float)) for status, nodes in lines.items() for node, values in nodes
    ]
    # ranked by mean |effect| over the scales (many nodes reach the maximum at some extreme scale)
    peak = [float(np.nanmean(np.abs(v))) if np.isfinite(v).any() else -1.0 for _, _, v in every]
    top = set(np.argsort(peak, kind="stable")[::-1][:named].tolist())
    fig, ax = plt.subplots(figsize=(9, 5))
    counts = {status: sum(1 for i, (s, _, _) in enumerate(every) if s == status and i not in top) for status in lines}
    labelled = set()
    for i, (status, _, values) in enumerate(every):
        if i in top:
            continue
        colour = STATUS_COLOURS.get(status, "grey")
        alpha = max(0.12, min(0.8, 8 / max(counts[status], 1)))
        ax.plot(
            scales,
            values,
            color=colour,
            alpha=alpha,
            lw=0.8,
            marker=".",
            ms=2,
            label=f"other {status.replace('_', ' ')} nodes ({counts[status]})" if status not in labelled else None,
        )
        labelled.add(status)
    for rank, i in enumerate(sorted(top, key=lambda j: -peak[j])):
        status, node, values = every[i]
        suffix = "" if status == "unlabelled" else f" ({status.replace('_', ' ')})"
        ax.plot(
            scales,
            values,
            color=NAMED_COLOURS[rank % len(NAMED_COLOURS)],
            lw=2.0,
            marker="o",
            ms=3.5,
            label=f"{node}{suffix}",
            ls="-" if status != "not_in_circuit" else "--",
        )
    ax.set_xscale("symlog", linthresh=1.0)
    if len(scales) <= 16:
        ax.set_xticks(scales, [f"{s:g}" for s in scales], fontsize=7)
        ax.minorticks_off()
    ax.axvline(1.0, color="grey", lw=0.5, ls="--")
    ax.set_title(fit_text(title, 8.5, 11), fontsize=11)
    ax.set(xlabel="scale (symlog)", ylabel=ylabel)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        title=f"top {len(top)} by mean |effect| over the scales",
        title_fontsize=8,
    )
    png = save_png(fig, path.with_suffix(".png"), bbox_inches="tight")
    traces = []
    for status, nodes in lines.items():
        colour = STATUS_COLOURS.get(status, "grey")
        for i, (node, values) in enumerate(nodes):
            traces.append(
                go.Scatter(
                    x=scales,
                    y=values,
                    mode="lines+markers",
                    line=dict(color=colour, width=1),
                    marker=dict(size=4),
                    name=status,
                    legendgroup=status,
                    showlegend=i == 0,
                    hovertext=f"{node} ({status})",
                    hovertemplate="%{hovertext}<br>scale %{x}: %{y:.3f}<extra></extra>",
                )
            )
    html = path.with_suffix(".html")
    write_html(
        go.Figure(
            traces,
            layout=dict(
                title=title,
                xaxis=dict(title="scale", type="log" if min(scales) > 0 else "linear"),
                yaxis_title=ylabel,
                template="plotly_white",
            ),
        ),
        html,
    )
    return png, html


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_png(fig, path.with_suffix(".png"))


def bars(labels: list[str], values: np.ndarray, title: str, path: Path, xlabel: str = "score") -> tuple[Path, Path]:
    """Horizontal bars, the first label on top (e.g. the top edges by |score|)."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.25 * len(labels)))
    ax.barh(range(len(labels)), values, color=["#1f77b4" if v >= 0 else "#d62728" for v in values])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_title(fit_text(title, fig.get_size_inches()[0] - 0.5, 11), fontsize=11)
    ax.set(xlabel=xlabel)
    png = _save(fig, path)
    html = path.with_suffix(".html")
    write_html(
        go.Figure(
            go.Bar(x=values, y=labels, orientation="h"),
            layout=dict(title=title, xaxis_title=xlabel, yaxis_autorange="reversed", template="plotly_white"),
        ),
        html,
    )
    return png, html


def agreement(
    groups: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
    title: str,
    path: Path,
    xlabel: str = "attribution score",
    ylabel: str = "real patching effect",
) -> tuple[Path, Path]:
    """Predicted against measured, one colour per group, with the line y = x: points off
    the line are where the linear approximation is wrong (labels on hover and for the worst)."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    every = np.concatenate([np.concatenate([x, y]) for x, y, _ in groups.values()]) if groups else np.zeros(1)
    lo, hi = float(np.nanmin(every)), float(np.nanmax(every))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--", label="y = x")
    traces = [
        go.Scatter(
            x=[lo - pad, hi + pad],
            y=[lo - pad, hi + pad],
            mode="lines",
            name="y = x",
            line=dict(color="grey", dash="dash"),
        )
    ]
    for i, (name, (x, y, labels)) in enumerate(groups.items()):
        ax.scatter(x, y, s=18, alpha=0.8, color=f"C{i}", label=name)
        worst = np.argsort(-np.abs(np.asarray(y) - np.asarray(x)))[:3]
        for j in worst:  # each group's labels on its own side, so that a node and its edge do not overlap
            ax.annotate(
                labels[j],
                (x[j], y[j]),
                xytext=(5, 4 if i % 2 == 0 else -10),
                textcoords="offset points",
                fontsize=7,
                alpha=0.9,
                color=f"C{i}",
            )
        traces.append(
            go.Scatter(
                x=x,
                y=y,
                mode="markers",
                name=name,
                text=labels,
                hovertemplate="%{text}<br>score %{x:.4f}<br>patched %{y:.4f}<extra></extra>",
            )
        )
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_title(fit_text(title, fig.get_size_inches()[0] - 0.5, 11), fontsize=11)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="best", fontsize=8)
    png = _save(fig, path)
    html = path.with_suffix(".html")
    write_html(
        go.Figure(traces, layout=dict(title=title, xaxis_title=xlabel, yaxis_title=ylabel, template="plotly_white")),
        html,
    )
    return png, html


def lines(
    x_labels: list[str],
    series: dict[str, np.ndarray],
    title: str,
    path: Path,
    xlabel: str,
    ylabel: str,
) -> tuple[Path, Path]:
    """A few named lines over categorical x positions (e.g. the logit lens over layers)."""
    fig, ax = plt.subplots(figsize=(max(6.5, 0.12 * len(x_labels)), 4))
    for name, values in series.items():
        ax.plot(range(len(x_labels)), values, marker=".", lw=1.2, label=name)
    step = max(1, len(x_labels) // 30)
    ax.set_xticks(range(0, len(x_labels), step), x_labels[::step], rotation=90, fontsize=6)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(fit_text(title, fig.get_size_inches()[0] - 0.5, 11), fontsize=11)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="best", fontsize=8)
    png = _save(fig, path)
    html = path.with_suffix(".html")
    write_html(
        go.Figure(
            [go.Scatter(x=x_labels, y=v, mode="lines+markers", name=n) for n, v in series.items()],
            layout=dict(
                title=title, xaxis_title=xlabel, yaxis_title=ylabel, hovermode="x unified", template="plotly_white"
            ),
        ),
        html,
    )
    return png, html
