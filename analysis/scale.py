"""Read a scale sweep's results directory (``effects/``) into pandas, and the tables people look at.

Only the Parquet dataset and the manifest are read; no model is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import open_results, read_committed
from sweeps.jobs.datasets import SHARDS
from sweeps.runtime.location import Location

STATUS_ORDER = ("in_circuit", "not_in_circuit", "unlabelled")


@dataclass
class ScaleResults:
    out: Location  # the results directory or URI
    spec: dict
    manifest: dict
    effects: pd.DataFrame  # one row per (node, scale)

    @property
    def scales(self) -> list[float]:
        return sorted(self.effects["scale"].unique())


def load_scale_results(out: str | Path | Location, allow_mixed: bool = False) -> ScaleResults:
    out = open_results(out)
    spec, manifest, frames = read_committed(out, SHARDS["scale"], "scale", allow_mixed)
    effects = frames["effects"]
    if not effects.empty:
        order = effects["head"].fillna(1 << 30)  # a layer's heads, then its MLP
        effects = effects.assign(_order=order).sort_values(["layer", "_order", "scale"]).drop(columns="_order")
        effects = effects.reset_index(drop=True)
    return ScaleResults(out, spec, manifest, effects)


def wide(effects: pd.DataFrame, column: str = "causal_effect") -> pd.DataFrame:
    """Nodes × scales (the usual scale-ablation loop's table), nodes in model order, with their status."""
    nodes = effects.drop_duplicates("node")[["node", "status"]]
    table = effects.pivot(index="node", columns="scale", values=column)
    table = table.loc[nodes["node"]]
    table.columns = [f"{s:g}" for s in table.columns]
    table.insert(0, "status", nodes.set_index("node")["status"])
    return table


def _reference_scale(scales: list[float]) -> float:
    """Scale 1 (no change), or the swept scale closest to it."""
    return min(scales, key=lambda s: abs(s - 1.0))


QUIET_AT_ONE = 0.05  # "does not matter at scale 1": at most this causal effect there
MIN_BREAK = 0.5  # "breaks the model": at least this causal effect at an extreme scale (default)


def summary_tables(results: ScaleResults, k: int = 10, min_break: float = MIN_BREAK) -> dict[str, pd.DataFrame]:
    """What the sweep found, as the few tables a researcher reads first.

    A node "breaks the model off-distribution" when its causal effect at the smallest or
    the largest scale is at least ``min_break`` (the fraction of answers that change)
    while at scale 1 it is at most ``QUIET_AT_ONE``; both bounds are in the table's title.
    """
    effects = results.effects
    scales = results.scales
    one = _reference_scale(scales)
    table = wide(effects)
    by_status = effects.groupby(["status", "scale"])["causal_effect"].mean().unstack("scale")
    by_status = by_status.reindex([s for s in STATUS_ORDER if s in by_status.index])
    by_status.columns = [f"{s:g}" for s in by_status.columns]
    by_status.insert(0, "nodes", effects.drop_duplicates("node").groupby("status").size())
    tables = {"Mean causal effect by circuit status (columns: scale)": by_status.round(3)}

    at_one = table[f"{one:g}"]
    extremes = [f"{s:g}" for s in (scales[0], scales[-1]) if s != one]
    show = ["status", *dict.fromkeys([f"{scales[0]:g}", f"{one:g}", f"{scales[-1]:g}"])]
    circuit = results.spec.get("circuit")
    if circuit:  # the circuit's own nodes (e.g. top:K@DIR of an attribution result, any method)
        inside = table[table.status == "in_circuit"]
        tables[f"The circuit {circuit['label']}: {len(circuit['nodes'])} nodes, {len(inside)} swept"] = inside[
            show
        ].round(3)
    top = table.loc[at_one.sort_values(ascending=False).index[:k], show]
    tables[f"Nodes with the largest causal effect at scale {one:g}"] = top.round(3)
    if extremes:
        quiet = table[at_one <= QUIET_AT_ONE]
        breaks = quiet[extremes].max(axis=1)
        breaks = breaks[breaks >= min_break].sort_values(ascending=False)
        title = (
            f"Nodes that do not matter at scale {one:g} (causal effect <= {QUIET_AT_ONE:g}) but break the model "
            f"off-distribution (causal effect >= {min_break:g} at scale {' or '.join(extremes)}; "
            f"{len(breaks)} nodes)"
        )
        tables[title] = quiet.loc[breaks.index[:k], show].round(3)
    return tables


def table_text(title: str, table: pd.DataFrame) -> str:
    """A summary table as printed: its title, then its rows (or that there are none)."""
    return f"\n{title}\n" + ("  (none)" if table.empty else table.to_string())


def status_lines(effects: pd.DataFrame, column: str = "causal_effect") -> dict[str, list[tuple[str, np.ndarray]]]:
    """Per status, (node, values over the sorted scales) for the line plot."""
    scales = sorted(effects["scale"].unique())
    table = effects.pivot(index="node", columns="scale", values=column)[scales]
    status = effects.drop_duplicates("node").set_index("node")["status"]
    lines: dict[str, list[tuple[str, np.ndarray]]] = {}
    for node in effects.drop_duplicates("node")["node"]:
        lines.setdefault(status[node], []).append((node, table.loc[node].to_numpy()))
    return lines
