"""A circuit sweep's results: faithfulness of each circuit, curves, CPR and CMD.

Each shard holds one circuit's raw sums over every prompt (``sweeps/jobs/circuit.py``):
the metric with the circuit, and the clean and corrupt metric. Faithfulness is
``(m(C) − m(corrupt)) / (m(clean) − m(corrupt))`` of the sums. A curve (one ranking,
circuits of growing size) gets MIB's two areas over the fraction of edges or nodes kept:
CPR, the area under the curve (higher: smaller circuits already do the task), and CMD, the
area between the curve and 1 (lower: closer to the full model everywhere). The curve starts
at (0, 0): the empty circuit is the corrupt run, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import ResultsError, open_results, read_committed
from sweeps.core.circuit_eval import area_scores, faithfulness
from sweeps.jobs import datasets
from sweeps.runtime.location import Location

DATASETS, DERIVED = datasets.SHARDS["circuit"], datasets.DERIVED["circuit"]  # shards', finish's
COLUMNS = ["circuit", "source", "level", "size", "k", "n_nodes", "n_edges", "metric", "faithfulness"]


@dataclass
class CircuitResults:
    out: Location
    spec: dict
    manifest: dict
    faithfulness: pd.DataFrame  # COLUMNS, one row a circuit, by curve then size
    clean_metric: float  # mean per point
    corrupt_metric: float
    n_points: int

    @property
    def complete(self) -> bool:
        return len(self.faithfulness) == int(self.spec.get("n_circuits", -1))

    def summary(self) -> pd.DataFrame:
        """Per curve: its CPR and CMD (rankings of several sizes) and the size where it first
        reaches 80 % faithfulness."""
        rows = []
        for (label, source, level), curve in self.faithfulness.groupby(["circuit", "source", "level"], sort=False):
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


def load_circuit_results(out: str | Path | Location, allow_mixed: bool = False) -> CircuitResults:
    out = open_results(out)
    spec, manifest, frames = read_committed(out, DATASETS, "circuit", allow_mixed)
    sums = frames["circuit_sums"]
    if sums.empty:
        raise ResultsError(f"{out} holds no finished circuit shards yet; re-run the sweep command")
    sums = sums.sort_values(["curve", "size"]).reset_index(drop=True)
    frame = pd.DataFrame(
        {
            "circuit": sums.circuit.astype(str),
            "source": sums.source.astype(str),
            "level": sums.level.astype(str),
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
    lines = [
        f"clean metric {results.clean_metric:.4f}, corrupt {results.corrupt_metric:.4f} "
        f"(mean over {results.n_points} points); faithfulness = (m(C) - m(corrupt)) / (m(clean) - m(corrupt))"
    ]
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
    return lines


def curve_figure(results: CircuitResults, folder: Path) -> Path:
    """Faithfulness against the fraction of edges (nodes) kept, one line per curve (log x):
    PNG and self-contained HTML beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    from analysis import plots

    model, task = results.spec.get("model", "?"), results.spec.get("task", "?")
    level = results.spec.get("level", "edge")
    title = f"Circuit faithfulness ({model}, {task}, {results.n_points} points)"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    traces = []
    summary = results.summary().set_index(["circuit", "source"])
    for (label, source), curve in results.faithfulness.groupby(["circuit", "source"], sort=False):
        curve = curve.sort_values("size")
        row = summary.loc[(label, source)]
        name = f"{label}: CPR {row.cpr:.2f}, CMD {row.cmd:.2f}" if row.n_sizes > 1 else label
        ax.plot(curve["size"], curve.faithfulness, marker="o", ms=3, lw=1.5, label=name)
        traces.append(
            go.Scatter(
                x=curve["size"],
                y=curve.faithfulness,
                mode="lines+markers",
                name=name,
                customdata=np.stack([curve.n_edges, curve.n_nodes], 1),
                hovertemplate="%{x:.3%} kept: faithfulness %{y:.3f}<br>%{customdata[0]} edges, %{customdata[1]} nodes",
            )
        )
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set(
        title=title,
        xlabel=f"fraction of {level}s kept (top by |score|)",
        ylabel="faithfulness (1 = full model, 0 = corrupt)",
    )
    ax.legend(loc="best", fontsize=8)
    png = plots._save(fig, folder / "faithfulness")
    plots.write_html(
        go.Figure(
            traces,
            layout=dict(
                title=title,
                xaxis=dict(type="log", title=f"fraction of {level}s kept"),
                yaxis_title="faithfulness",
                template="plotly_white",
            ),
        ),
        png.with_suffix(".html"),
    )
    return png
