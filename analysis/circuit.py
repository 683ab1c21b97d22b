"""A circuit sweep's results: faithfulness of each circuit, curves, CPR and CMD.

Each shard holds one circuit's raw sums over every prompt (``sweeps/jobs/circuit.py``):
the metric with the circuit, and the clean and corrupt metric. Faithfulness is
``(m(C) − m(corrupt)) / (m(clean) − m(corrupt))`` of the sums. A curve (one ranking,
circuits of growing size) gets two areas over the (linear) fraction of edges or nodes
kept: CPR, the area under the curve (higher: smaller circuits already do the task), and
CMD, the area between the curve and 1 (lower: closer to the full model everywhere). The
curve starts at (0, 0): the empty circuit is the corrupt run, exactly.

A sweep run with ``--sizes mib`` also has each ranking's curve top by score (``ranking``
``signed``) and MIB's two areas (``mib_blocks``): CPR of the signed curve and CMD of the
absolute one, from MIB's first fraction (``circuit_eval.mib_areas``). Ours stay beside them,
from the absolute curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import ResultsError, open_results, read_committed
from sweeps.core.circuit_eval import MIB_FRACTIONS, area_scores, faithfulness, mib_areas
from sweeps.jobs import datasets
from sweeps.runtime.location import Location

DATASETS, DERIVED = datasets.SHARDS["circuit"], datasets.DERIVED["circuit"]  # shards', finish's
COLUMNS = ["circuit", "source", "level", "ranking", "size", "k", "n_nodes", "n_edges", "metric", "faithfulness"]
CURVE = ["circuit", "source", "level"]  # what names a curve (a ranking's two orders: ``ranking``)


@dataclass
class CircuitResults:
    out: Location
    spec: dict
    manifest: dict
    faithfulness: pd.DataFrame  # COLUMNS, one row a circuit, by curve, ranking, then size
    clean_metric: float  # mean per point
    corrupt_metric: float
    n_points: int

    @property
    def complete(self) -> bool:
        return len(self.faithfulness) == int(self.spec.get("n_circuits", -1))

    @property
    def mib(self) -> bool:
        """Whether the sweep evaluated its rankings as MIB does (``--sizes mib``)."""
        return bool(self.spec.get("mib"))

    def summary(self) -> pd.DataFrame:
        """Per curve (top by |score|): its CPR and CMD (rankings of several sizes) and the
        size where it first reaches 80 % faithfulness."""
        rows = []
        absolute = self.faithfulness[self.faithfulness.ranking == "absolute"]
        for (label, source, level), curve in absolute.groupby(CURVE, sort=False):
            curve = curve.sort_values("size")
            x = [0.0, *curve["size"]]
            f = [0.0, *curve.faithfulness]
            cpr, cmd = area_scores(x, f) if len(curve) > 1 else (float("nan"), float("nan"))
            reached = curve[curve.faithfulness >= 0.8]
            rows.append(
                {
                    "circuit": label,
                    "source": source,
                    "level": level,
                    "n_sizes": len(curve),
                    "cpr": cpr,
                    "cmd": cmd,
                    "size_at_80pct": float(reached["size"].iloc[0]) if len(reached) else float("nan"),
                    "faithfulness_at_full": float(curve.faithfulness.iloc[-1]),
                }
            )
        return pd.DataFrame(rows)

    def mib_blocks(self) -> dict[tuple[str, str, str], dict]:
        """MIB's evaluation of each ranking, by (circuit, source, level): ``fractions`` (MIB's
        ten), the faithfulness at each of the circuits top by score (``signed``) and by |score|
        (``absolute``), MIB's ``cpr`` (of the signed) and ``cmd`` (of the absolute), and each
        circuit's edges after pruning (``n_edges``: what MIB reports). Empty unless the sweep
        ran with ``--sizes mib``; a circuit not in yet is NaN, and so are the areas."""
        if not self.mib:
            return {}
        blocks = {}
        for key, curve in self.faithfulness.groupby(CURVE, sort=False):
            values, edges = {}, {}
            for ranking in ("signed", "absolute"):
                rows = curve[curve.ranking == ranking].set_index("size")
                values[ranking] = [float(rows.faithfulness.get(p, np.nan)) for p in MIB_FRACTIONS]
                edges[ranking] = [int(rows.n_edges[p]) if p in rows.index else None for p in MIB_FRACTIONS]
            cpr, cmd = mib_areas(MIB_FRACTIONS, values["signed"], values["absolute"])
            blocks[key] = {"fractions": list(MIB_FRACTIONS), **values, "cpr": cpr, "cmd": cmd, "n_edges": edges}
        return blocks


def load_circuit_results(out: str | Path | Location, allow_mixed: bool = False) -> CircuitResults:
    out = open_results(out)
    spec, manifest, frames = read_committed(out, DATASETS, "circuit", allow_mixed)
    sums = frames["circuit_sums"]
    if sums.empty:
        raise ResultsError(f"{out} holds no finished circuit shards yet; re-run the sweep command")
    # results from before MIB's evaluation have only the ranking by |score|
    sums["ranking"] = sums["ranking"].fillna("absolute") if "ranking" in sums else "absolute"
    sums = sums.sort_values(["curve", "ranking", "size"]).reset_index(drop=True)
    frame = pd.DataFrame(
        {
            "circuit": sums.circuit.astype(str),
            "source": sums.source.astype(str),
            "level": sums.level.astype(str),
            "ranking": sums.ranking.astype(str),
            "size": sums["size"].astype(float),
            "k": sums.k.astype("int64"),
            "n_nodes": sums.n_nodes.astype("int64"),
            "n_edges": sums.n_edges.astype("int64"),
            "metric": sums.metric_sum / sums.n_points,
            "faithfulness": [
                faithfulness(m, c, x) for m, c, x in zip(sums.metric_sum, sums.clean_sum, sums.corrupt_sum)
            ],
        }
    )[COLUMNS]
    first = sums.iloc[0]
    n = int(first.n_points)
    return CircuitResults(out, spec, manifest, frame, float(first.clean_sum) / n, float(first.corrupt_sum) / n, n)


def summary_lines(results: CircuitResults) -> list[str]:
    """The curves in words: CPR, CMD, and how small a circuit reaches 80 %."""
    from sweeps.core.metrics import label_of

    lines = [
        f"clean {label_of(results.spec.get('metric'))} {results.clean_metric:.4f}, corrupt {results.corrupt_metric:.4f} "
        f"(mean over {results.n_points} points); faithfulness = (m(C) - m(corrupt)) / (m(clean) - m(corrupt))"
    ]
    mib = results.mib_blocks()
    for row in results.summary().itertuples():
        what = f"{row.circuit} ({row.level}s)"
        if row.n_sizes > 1:
            reach = (
                f"reaches 80 % faithfulness with {row.size_at_80pct:.2%} of the {row.level}s"
                if np.isfinite(row.size_at_80pct)
                else "never reaches 80 % faithfulness"
            )
            lines.append(
                f"{what}: CPR {row.cpr:.3f} (area under the curve; higher is better), "
                f"CMD {row.cmd:.3f} (area between the curve and 1; lower is better); {reach}"
            )
        else:
            lines.append(f"{what}: faithfulness {row.faithfulness_at_full:.3f}")
        block = mib.get((row.circuit, row.source, row.level))
        if block:
            lines.append(
                f"{what}, MIB's evaluation: CPR {block['cpr']:.3f} (top by score), CMD {block['cmd']:.3f} "
                f"(top by |score|); MIB's 10 fractions, pruned circuits, trapezoids from 0.1 % to 100 % "
                "on the linear axis"
            )
    return lines


def curve_figure(results: CircuitResults, folder: Path) -> Path:
    """Faithfulness against the fraction of edges (nodes) kept, PNG and self-contained HTML
    beside it, in two panels with the same curves: a log fraction axis (left), which spreads
    out the small circuits, and the linear axis (right) over which CPR and CMD are areas,
    with the area under each curve shaded. A curve top by |score| is a solid line labelled
    with our CPR and CMD (and, with ``--sizes mib``, MIB's CMD); MIB's curve top by score is
    dashed, labelled with MIB's CPR: every area in the legend is one the right panel shows
    (a log axis alone makes a curve that is low over most of it look at odds with a high CPR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from analysis import plots

    model, task = results.spec.get("model", "?"), results.spec.get("task", "?")
    level = results.spec.get("level", "edge")
    title = f"Circuit faithfulness ({model}, {task}, {results.n_points} points)"
    panels = (
        "log axis: the small circuits spread out",
        "linear axis, over which the areas are taken:\nCPR = area under a curve, CMD = area between it and 1",
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    html = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[p.replace("\n", "<br>") for p in panels])
    colours = [matplotlib.colors.to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    summary = results.summary().set_index(CURVE)
    mib = results.mib_blocks()
    for i, (key, curve) in enumerate(results.faithfulness.groupby(CURVE, sort=False)):
        label, colour, block = key[0], colours[i % len(colours)], mib.get(key)
        for ranking, part in curve.groupby("ranking", sort=False):
            part = part.sort_values("size")
            x, y = part["size"].to_numpy(), part.faithfulness.to_numpy()
            counts = np.stack([part.n_edges, part.n_nodes], 1)
            signed, ranked = ranking == "signed", len(part) > 1
            row = summary.loc[key] if key in summary.index else None  # None: no circuit by |score| in yet
            name = _legend_name(label, signed, ranked, row, block)
            # The linear panel draws each curve over the points its area is taken from: ours
            # from the empty circuit (0, 0), MIB's from its first fraction.
            if ranked and not signed:
                x_lin, y_lin, counts_lin = np.r_[0.0, x], np.r_[0.0, y], np.r_[[[0, 0]], counts]
            else:
                x_lin, y_lin, counts_lin = x, y, counts
            style = dict(color=colour, marker="o", ms=3, lw=1.5, ls="--" if signed else "-")
            axes[0].plot(x, y, **style)
            axes[1].plot(x_lin, y_lin, label=name, **style)
            if ranked:
                axes[1].fill_between(x_lin, y_lin, color=colour, alpha=0.06, lw=0)
            for col, (xs, ys, cs) in enumerate(((x, y, counts), (x_lin, y_lin, counts_lin)), start=1):
                html.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        mode="lines+markers",
                        name=name,
                        legendgroup=name,
                        showlegend=col == 1,
                        line=dict(color=colour, dash="dash" if signed else "solid"),
                        customdata=cs,
                        hovertemplate="%{x:.3%} kept: faithfulness %{y:.3f}<br>%{customdata[0]} edges, "
                        "%{customdata[1]} nodes",
                    ),
                    row=1,
                    col=col,
                )
    for ax, panel in zip(axes, panels):
        ax.axhline(1, color="grey", lw=0.8, ls="--")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(panel, fontsize=9)
    axes[0].set_xscale("log")
    axes[0].set(xlabel=f"fraction of {level}s kept (log)", ylabel="faithfulness (1 = full model, 0 = corrupt)")
    axes[1].set(xlabel=f"fraction of {level}s kept", xlim=(0, 1))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.legend(
        *axes[1].get_legend_handles_labels(),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        fontsize=8,
        frameon=False,
        ncol=1 if len(axes[1].lines) > 4 else 2,
    )
    png = plots.save_png(fig, folder / "faithfulness.png", bbox_inches="tight")
    html.update_xaxes(type="log", title_text=f"fraction of {level}s kept (log)", row=1, col=1)
    html.update_xaxes(range=[0, 1], title_text=f"fraction of {level}s kept", row=1, col=2)
    html.update_yaxes(title_text="faithfulness", row=1, col=1)
    html.update_layout(title=title, template="plotly_white", legend=dict(orientation="h", y=-0.2))
    plots.write_html(html, png.with_suffix(".html"))
    return png


def _legend_name(label: str, signed: bool, ranked: bool, row, block: dict | None) -> str:
    """A curve's legend entry, naming the areas taken from that curve: ours (CPR, CMD) and
    MIB's CMD from the ranking by |score|, MIB's CPR from the ranking by score."""
    if signed:
        return f"{label}, top by score: MIB's CPR {block['cpr']:.2f}" if block else f"{label}, top by score"
    if not ranked or row is None:
        return label
    mine = f"CPR {row.cpr:.2f}, CMD {row.cmd:.2f}"
    return f"{label}, top by |score|: {mine}; MIB's CMD {block['cmd']:.2f}" if block else f"{label}: {mine}"
