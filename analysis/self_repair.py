"""The self-repair decomposition (Rushing & Nanda 2024) from a backup sweep's ``self_repair/`` rows.

Per ablated head, on its ``top`` points (the top ``--top-fraction`` by its clean direct effect,
the paper's setting) or on ``all`` of them: the total effect on the logit (difference), the
head's own change, and the repair by the other heads, the MLPs and the final norm (means, and
the paper's mean clipped shares ``clip(term / DE, 0, 1)``); and from ``neurons/``, the last
layer's MLP term split per neuron (anti-erasure). Pandas and matplotlib only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis import plots  # noqa: E402

TERMS = ("own_change", "heads", "mlps", "final_norm")
LABELS = {"own_change": "own (the ablated head)", "heads": "other heads", "mlps": "MLPs", "final_norm": "final norm"}


def head_table(repair: pd.DataFrame, selection: str = "top") -> pd.DataFrame:
    """One row a head: its clean direct effect, the terms, and the self-repair fraction
    ``self_repair / DE`` (of the means; > 0: the rest of the model repairs, < 0: it breaks further)."""
    rows = repair[repair.selection == selection].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        rows["self_repair_fraction"] = rows["self_repair"] / rows["mean_de"]
    columns = [
        "layer",
        "head",
        "n_points",
        "mean_de",
        "total_effect",
        "total_effect_metric",  # only under --metric
        "own_change",
        "self_repair",
        "heads",
        "same_layer",
        "mlps",
        "final_norm",
        "frac_heads",
        "frac_mlps",
        "frac_final_norm",
        "self_repair_fraction",
    ]
    return rows[[c for c in columns if c in rows]].reset_index(drop=True)


def layer_table(repair: pd.DataFrame, selection: str = "top") -> pd.DataFrame:
    """The per-layer means of every head's terms, relative to the mean direct effect."""
    heads = head_table(repair, selection)
    table = heads.groupby("layer")[
        [
            "mean_de",
            "total_effect",
            *TERMS,
            "self_repair",
            "frac_heads",
            "frac_mlps",
            "frac_final_norm",
            "self_repair_fraction",
        ]
    ].mean()
    return table.reset_index()


def neuron_table(neurons: pd.DataFrame, selection: str = "top") -> pd.DataFrame:
    """Each head's top neurons of the last MLP, rank 1 first: the mean change of each one's
    direct effect (``delta_de``), its clean direct effect, its share of the MLP's term and the
    running share down to its rank."""
    rows = neurons[neurons.selection == selection]
    columns = [
        "layer",
        "head",
        "rank",
        "neuron",
        "mlp_layer",
        "delta_de",
        "clean_de",
        "share",
        "cum_share",
        "top_share",
        "mlp_term",
        "n_points",
    ]
    return rows.sort_values(["layer", "head", "rank"])[[c for c in columns if c in rows]].reset_index(drop=True)


def neuron_lines(neurons: pd.DataFrame, k: int = 3) -> list[str]:
    """The ``k`` heads whose last-MLP term (on their top points) is largest, in words: how much of
    it their top neurons carry. Where the top neurons push both ways and mostly cancel, the line
    says so and gives both sides, instead of a small net share alone."""
    if neurons is None or neurons.empty:
        return []
    table = neuron_table(neurons, "top")
    table = table.assign(with_term=table.share.clip(lower=0), against_term=table.share.clip(upper=0))
    heads = table.groupby(["layer", "head"], as_index=False).agg(
        n=("rank", "size"),
        mlp_layer=("mlp_layer", "first"),
        mlp_term=("mlp_term", "first"),
        top_share=("top_share", "first"),
        first=("neuron", "first"),
        first_share=("share", "first"),
        with_term=("with_term", "sum"),
        against_term=("against_term", "sum"),
    )
    heads = heads.reindex(heads.mlp_term.abs().sort_values(ascending=False).index).head(k)
    lines = []
    for row in heads.itertuples():
        what = "repair" if row.mlp_term > 0 else "anti-repair (it deepens the ablation)"
        start = (
            f"  the top {row.n} neurons of layer {row.mlp_layer}'s MLP carry {row.top_share:.0%} of its "
            f"{what} of L{row.layer}H{row.head} ({row.mlp_term:+.3f}"
        )
        if cancelling(row.with_term, row.against_term):
            lines.append(
                f"{start}), but only as a balance: {row.with_term:.0%} with the term, "
                f"{row.against_term:.0%} against it (neuron {row.first} alone {row.first_share:.0%})"
            )
        else:
            lines.append(f"{start}; neuron {row.first} alone {row.first_share:.0%})")
    return lines


def cancelling(with_term: float, against_term: float) -> bool:
    """Neurons that push both ways by more than their net share: each side is over half the term,
    and the two together more than twice what is left of it."""
    return with_term > 0.5 and against_term < -0.5 and with_term - against_term > 2 * abs(with_term + against_term)


# Fewer points than this a head, and the self-repair shares are noise: the summary says so.
FEW_POINTS = 10


def summary_lines(
    repair: pd.DataFrame,
    top_fraction: float,
    n_layers: int,
    neurons: pd.DataFrame | None = None,
    min_de_fraction: float = 0.1,
) -> list[str]:
    """What the decomposition says, in words. The self-repair fraction is a ratio to the
    head's direct effect, noise for a head with almost none: its layer means take only heads
    whose |mean direct effect| is at least ``min_de_fraction`` of the largest (Figure 1's line),
    and the line compares the first and the last third of those layer means, naming their
    layers (the swept layers, which need not be the model's first or last)."""
    if repair.empty:
        return []
    layers = layer_table(repair, "top")
    where = f"the top {top_fraction:.0%} of points by each head's direct effect" if top_fraction < 1 else "every point"
    counts = head_table(repair, "top").n_points if "n_points" in repair else pd.Series(dtype=float)
    low, high = (int(counts.min()), int(counts.max())) if len(counts) else (0, 0)
    n = "" if not len(counts) else f" ({low}{'' if low == high else f'-{high}'} point{'s' * (high != 1)} a head)"
    lines = [f"Self-repair (Rushing & Nanda 2024), on {where}{n}:"]
    if len(counts) and low < FEW_POINTS:
        lines.append(
            f"  note: {low} point{'s' * (low != 1)} a head is too few for these shares to mean much; more "
            "prompts (--n-prompts), a next-token task (every position a point) or a larger --top-fraction gives more"
        )
    overall = head_table(repair, "top")[["frac_heads", "frac_mlps", "frac_final_norm"]].mean()
    lines.append(
        f"  mean clipped shares of a head's direct effect over every swept head: other heads "
        f"{overall.frac_heads:.0%}, MLPs {overall.frac_mlps:.0%}, final norm {overall.frac_final_norm:.0%}"
    )
    if "total_effect_metric" in repair:  # --metric: its own change, beside the logit-linear shares
        every = head_table(repair, "all")
        top = every.reindex(every.total_effect_metric.abs().sort_values(ascending=False).index).head(3)
        named = ", ".join(f"L{int(r.layer)}H{int(r.head)} {r.total_effect_metric:+.3g}" for r in top.itertuples())
        lines.append(
            f"  --metric: the heads whose ablation moves it most (mean change over every point): {named}; "
            "the shares here are of the logit difference, which the decomposition is linear in"
        )
    for layer in sorted({int(layers.layer.max()), max(0, n_layers - 2)} & set(layers.layer.astype(int))):
        row = layers[layers.layer == layer].iloc[0]
        lines.append(
            f"  the final norm repairs {row.frac_final_norm:.0%} of the direct effect of layer {layer}'s "
            f"heads; other heads {row.frac_heads:.0%}, MLPs {row.frac_mlps:.0%}"
        )
    heads, means = fraction_points(repair, min_de_fraction)
    if len(means) >= 2:
        # Figure 1's line, a third of its layer means at each end. These are the swept layers
        # that have such a head, not the model's first and last layers (a sweep of L20–L29
        # compares L20–L22 with L27–L29), so the line names them.
        third = max(1, len(means) // 3)
        first, last = means.iloc[:third], means.iloc[-third:]
        lines.append(
            f"  self-repair fraction (self-repair / direct effect, layer means over the {int(heads.meaningful.sum())} "
            f"heads whose |direct effect| is at least {min_de_fraction:.0%} of the largest, in the first and the "
            f"last {third} of the {len(means)} swept layers that have such heads): "
            f"{first.mean():+.2f} in the earliest ({layer_span(first.index)}), "
            f"{last.mean():+.2f} in the latest ({layer_span(last.index)}) (> 0: repaired, < 0: made worse)"
        )
    return lines + neuron_lines(neurons)


def layer_span(layers) -> str:
    """Layers by name, consecutive ones as a range: ``[1, 4, 8, 9, 10]`` is ``"L1, L4, L8–L10"``.
    A swept layer without a meaningful head has no layer mean, so the layers the summary
    compares need not be consecutive."""
    runs: list[list[int]] = []
    for layer in sorted(int(x) for x in layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"L{r[0]}" if len(r) == 1 else f"L{r[0]}–L{r[-1]}" for r in runs)


def legend_outside(ax, **kwargs):
    """The axes' legend to the right of the axes, where it cannot cover a point, a line or a bar
    (inside, even matplotlib's "best" place covers data when the points fill the axes); the
    figure's ``tight_layout`` narrows the axes to make room for it."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, **kwargs)


def fraction_points(repair: pd.DataFrame, min_de_fraction: float = 0.1) -> tuple[pd.DataFrame, pd.Series]:
    """Figure 1's data: the heads of ``head_table`` with a finite self-repair fraction, with a
    ``meaningful`` column (|mean direct effect| on their top points at least ``min_de_fraction``
    of the largest), and the layer means over the meaningful ones (the figure's line).

    A fraction over a head with almost no direct effect is noise (a ratio to nearly 0): those
    heads are grey in the figure, clipped to the y-range of the others and left out of the
    layer mean (they are still in the HTML page and the tables)."""
    finite = head_table(repair, "top").dropna(subset=["self_repair_fraction"])
    finite = finite.assign(meaningful=finite.mean_de.abs() >= min_de_fraction * finite.mean_de.abs().max())
    return finite, finite[finite.meaningful].groupby("layer").self_repair_fraction.mean()


def fraction_figure(repair: pd.DataFrame, title: str, min_de_fraction: float = 0.1):
    """The paper's Figure 1 as a matplotlib ``(fig, ax)``: every head's self-repair fraction
    against its layer, the layer mean as a line (``fraction_points``), the legend outside the axes."""
    finite, means = fraction_points(repair, min_de_fraction)
    fig, ax = plt.subplots(figsize=(7, 4))
    shown, noise = finite[finite.meaningful], finite[~finite.meaningful]
    ax.scatter(shown.layer, shown.self_repair_fraction, s=12, alpha=0.7, label="one head")
    ax.plot(means.index, means.values, color="black", lw=1.5, label="layer mean")
    if len(shown):
        lo, hi = float(shown.self_repair_fraction.min()), float(shown.self_repair_fraction.max())
        pad = 0.1 * (hi - lo or 1.0)
        ax.scatter(
            noise.layer,
            noise.self_repair_fraction.clip(lo - pad, hi + pad),
            s=8,
            color=plots.MASKED_GREY,
            label=f"direct effect < {min_de_fraction:g} x\nthe largest (noise;\nclipped to the axis)",
        )
        ax.set_ylim(lo - 1.5 * pad, hi + 1.5 * pad)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(plots.fit_text(f"Self-repair fraction per head\n{title}", 6.5, 11), fontsize=11)
    ax.set(xlabel="layer of the ablated head", ylabel="self-repair / direct effect")
    legend_outside(ax, fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig, ax


def layers_figure(repair: pd.DataFrame, title: str):
    """The per-layer breakdown as a matplotlib ``(fig, ax)``: the layer means (``layer_table``) of
    each term of the total effect stacked (positive terms up from 0, negative ones down), the
    total effect as a dot, the legend outside the axes."""
    layers = layer_table(repair, "top")
    fig, ax = plt.subplots(figsize=(7, 4))
    pos_bottom = np.zeros(len(layers))
    neg_bottom = np.zeros(len(layers))
    for term, color in zip(TERMS, ("#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e")):
        values = layers[term].to_numpy()
        bottom = np.where(values >= 0, pos_bottom, neg_bottom)
        ax.bar(layers.layer, values, bottom=bottom, color=color, label=LABELS[term])
        pos_bottom += np.clip(values, 0, None)
        neg_bottom += np.clip(values, None, 0)
    ax.plot(layers.layer, layers.total_effect, "k.", label="total effect")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(
        plots.fit_text(f"What makes up a head's total effect, by layer (layer means)\n{title}", 6.5, 11), fontsize=11
    )
    ax.set(xlabel="layer of the ablated head", ylabel="change of the logit (difference)")
    legend_outside(ax, fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig, ax


def figures(repair: pd.DataFrame, folder: Path, title: str, min_de_fraction: float = 0.1) -> dict[str, Path]:
    """The paper's Figure 1 (``fraction_figure``) and the per-layer stacked breakdown of the
    total effect (``layers_figure``): PNGs under ``folder``, each with its interactive HTML page."""
    if repair.empty:
        return {}
    out = {}
    fig, _ = fraction_figure(repair, title, min_de_fraction)
    out["self_repair"] = plots.save_png(fig, folder / "self_repair.png", bbox_inches="tight")
    finite, means = fraction_points(repair, min_de_fraction)
    plots.write_html(
        go.Figure(
            [
                go.Scatter(
                    x=finite.layer,
                    y=finite.self_repair_fraction,
                    mode="markers",
                    name="one head",
                    text=[f"L{l}H{h}" for l, h in zip(finite.layer, finite["head"])],
                ),
                go.Scatter(x=means.index, y=means.values, mode="lines", name="layer mean"),
            ],
            layout=dict(
                title="Self-repair fraction per head",
                xaxis_title="layer",
                yaxis_title="self-repair / direct effect",
                template="plotly_white",
            ),
        ),
        out["self_repair"].with_suffix(".html"),
    )

    fig, _ = layers_figure(repair, title)
    out["self_repair_layers"] = plots.save_png(fig, folder / "self_repair_layers.png", bbox_inches="tight")
    layers = layer_table(repair, "top")
    plots.write_html(
        go.Figure(
            [go.Bar(x=layers.layer, y=layers[t], name=LABELS[t]) for t in TERMS]
            + [go.Scatter(x=layers.layer, y=layers.total_effect, mode="markers", name="total effect")],
            layout=dict(
                title="What makes up a head's total effect, by layer",
                barmode="relative",
                xaxis_title="layer",
                yaxis_title="change of the logit (difference)",
                template="plotly_white",
            ),
        ),
        out["self_repair_layers"].with_suffix(".html"),
    )
    return out
