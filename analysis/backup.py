"""Read a backup sweep's results directory into pandas, and the tables people look at.

Only the Parquet datasets and the manifest are read; no model is needed.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import ResultsError, open_results, read_committed
from sweeps.jobs.datasets import SHARDS
from sweeps.runtime.location import Location

__all__ = ["BackupResults", "ResultsError", "load_results"]


@dataclass
class BackupResults:
    out: Location  # the results directory or URI
    spec: dict
    manifest: dict
    slopes: pd.DataFrame
    responses: pd.DataFrame
    points: pd.DataFrame
    self_repair: pd.DataFrame  # per (head, selection): the self-repair decomposition's means
    neurons: pd.DataFrame  # per (head, selection, rank): the last MLP's top neurons by |change of direct effect|

    @property
    def n_layers(self) -> int:
        return int(self.manifest["model"]["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.manifest["model"]["n_heads"])

    def head_points(self, layer: int, head: int) -> pd.DataFrame:
        return self.points[(self.points["layer"] == layer) & (self.points["head"] == head)]


def load_results(out: str | Path | Location, allow_mixed: bool = False) -> BackupResults:
    out = open_results(out)
    spec, manifest, frames = read_committed(out, SHARDS["backup"], "backup", allow_mixed)
    slopes = frames["slopes"]
    if not slopes.empty:
        slopes = slopes.sort_values(["layer", "head"]).reset_index(drop=True)
    repair = frames["self_repair"]
    if not repair.empty:
        repair = repair.sort_values(["selection", "layer", "head"]).reset_index(drop=True)
    neurons = frames["neurons"]
    if not neurons.empty:
        neurons = neurons.sort_values(["selection", "layer", "head", "rank"]).reset_index(drop=True)
    return BackupResults(out, spec, manifest, slopes, frames["responses"], frames["points"], repair, neurons)


def grid(slopes: pd.DataFrame, column: str, n_layers: int, n_heads: int) -> np.ndarray:
    """A layers × heads array of one column (NaN where a head was not swept)."""
    values = np.full((n_layers, n_heads), np.nan)
    values[slopes["layer"].to_numpy(), slopes["head"].to_numpy()] = slopes[column].to_numpy()
    return values


def compensation_matrix(responses: pd.DataFrame, n_layers: int, n_heads: int) -> pd.DataFrame:
    """Upstream head × downstream head mean change in direct effect (heads only)."""
    heads = responses[responses.down_kind == "attn_head"]
    up = heads.up_layer * n_heads + heads.up_head
    down = heads.down_layer * n_heads + heads.down_head.astype(int)
    labels = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
    matrix = np.full((n_layers * n_heads, n_layers * n_heads), np.nan)
    matrix[up.to_numpy(), down.to_numpy()] = heads.mean_delta.to_numpy()
    swept = sorted(set(up.tolist()))
    return pd.DataFrame(matrix[swept], index=[labels[i] for i in swept], columns=labels)


def compensation_by_layer(responses: pd.DataFrame, n_layers: int, n_heads: int) -> pd.DataFrame:
    """Upstream head × downstream layer: summed mean change of that layer's heads (column
    ``L5H*``, the pattern that names them), then each MLP (``mlp5``) as a separate block of
    columns; the readable summary of the full matrix. The
    ablated head's own change (its lost direct effect) is no response and is left out."""
    labels = [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
    itself = (
        (responses.down_kind == "attn_head")
        & (responses.down_layer == responses.up_layer)
        & (responses.down_head == responses.up_head)
    )
    responses = responses[~itself.fillna(False).astype(bool)]
    table = responses.assign(
        up=[labels[l * n_heads + h] for l, h in zip(responses.up_layer, responses.up_head)],
        column=[f"mlp{l}" if k == "mlp" else f"L{l}H*" for k, l in zip(responses.down_kind, responses.down_layer)],
    ).pivot_table(index="up", columns="column", values="mean_delta", aggfunc="sum")
    order = [f"L{l}H*" for l in range(n_layers)] + [f"mlp{l}" for l in range(n_layers)]
    rows = [label for label in labels if label in table.index]
    return table.reindex(index=rows, columns=[c for c in order if c in table.columns])


def meaningful(slopes: pd.DataFrame, min_de_fraction: float = 0.1, min_r2: float = 0.0) -> pd.Series:
    """Per head (a row of ``slopes``): whether its backup fit means something.

    A head with almost no direct effect has a tiny x-range, and a slope that is mostly
    noise (on SmolLM2's IOI, L0H3's slope is 33 with r² 0.03 and mean |DE| 0.0008). So a
    head counts only when its mean |direct effect| is at least ``min_de_fraction`` of the
    largest head's, and its fit's r² at least ``min_r2`` (0: no r² condition). The console
    table ranks only these heads, and the heatmaps colour only these.
    """
    largest = slopes.mean_abs_de.max()
    return (slopes.mean_abs_de >= min_de_fraction * largest) & (slopes.r2.fillna(0.0) >= min_r2)


def meaningful_rule(slopes: pd.DataFrame, min_de_fraction: float = 0.1, min_r2: float = 0.0) -> str:
    """``meaningful``'s condition in words, with its threshold on these results."""
    rule = (
        f"mean |direct effect| >= {min_de_fraction:g} x the largest head's "
        f"= {min_de_fraction * slopes.mean_abs_de.max():.3g}, --min-de-fraction"
    )
    return rule + (f"; r² >= {min_r2:g}, --min-r2" if min_r2 > 0 else "")


def legible_rows(matrix: pd.DataFrame, rows: list[str], k: int) -> list[str]:
    """Of ``rows`` (labels of ``matrix``), the ``k`` with the largest summed |value|, in the
    matrix's own order."""
    rows = [r for r in matrix.index if r in set(rows)]
    if len(rows) <= k:
        return rows
    strongest = set(matrix.loc[rows].abs().sum(axis=1).nlargest(k).index)
    return [r for r in rows if r in strongest]


def legible_columns(matrix: pd.DataFrame, k: int) -> list[str]:
    """The ``k`` columns with the largest |value| anywhere, in the matrix's own order; columns
    that are empty or all 0 never."""
    peak = matrix.abs().max(axis=0).fillna(0.0)
    peak = peak[peak > 0]
    strongest = set(peak.nlargest(k).index)
    return [c for c in matrix.columns if c in strongest]


def summary_text(table: pd.DataFrame, min_de_fraction: float = 0.1) -> str:
    """``summary_table`` as printed: the table and its legend, or why there is none."""
    if table.empty:
        return (
            "no head is clearly backed up or anti-backed-up (no slope's 95 % interval excludes 0 "
            "among heads with a sizeable direct effect)"
        )
    legend = (
        "backed up: the heads after it make up for its ablation (slope > 0); anti-backup: they deepen it "
        "(slope < 0). ci95: the slope's bootstrap interval over prompts; ranked by its end nearer 0, among "
        f"heads whose mean |direct effect| is at least {min_de_fraction:g} x the largest head's"
    )
    return table.to_string(index=False) + "\n" + textwrap.fill(legend, 100)


# More heads asked for than this, and the summary counts them by reason instead of a line each.
MAX_ASKED_LINES = 12


def asked_heads_lines(
    results: BackupResults,
    heads: list[tuple[int, int]],
    table: pd.DataFrame,
    k: int = 8,
    min_de_fraction: float = 0.1,
    min_r2: float = 0.0,
) -> list[str]:
    """For each head asked for (``--heads``): its fit, and whether ``table`` ranks it or why not;
    for more than ``MAX_ASKED_LINES`` heads, how many for each reason."""
    s = results.slopes
    largest = s.mean_abs_de.max()
    ranked = set(table["head"]) if not table.empty else set()
    reasons = {
        "ranked": "ranked in the table above",
        "no fit": "no fit (too few points, or no spread in its direct effect)",
        "small": f"not ranked: its mean |direct effect| is under {min_de_fraction:g} x the largest head's "
        f"({min_de_fraction * largest:.3g}; --min-de-fraction), so its slope is mostly noise",
        "r2": f"not ranked: r² under {min_r2:g} (--min-r2)",
        "last": "not ranked: no head is downstream of the last layer",
        "zero": "not ranked: its 95 % interval includes 0 (neither backed up nor anti-backup with confidence)",
        "top": f"not ranked: not in the top {k} of its kind (--top)",
        "absent": "not in these results",
    }
    short = {"ranked": "ranked", "no fit": "without a fit", "small": "with too small a direct effect",
             "r2": "under --min-r2", "last": "in the last layer", "zero": "whose interval includes 0",
             "top": "outside the top --top", "absent": "not in these results"}  # fmt: skip
    found: list[tuple[str, str, str]] = []  # (name, fit, reason)
    for layer, head in heads:
        name = f"L{layer}H{head}"
        rows = s[(s.layer == layer) & (s["head"] == head)]
        if rows.empty:
            found.append((name, "", "absent"))
            continue
        r = rows.iloc[0]
        ci = "" if pd.isna(r.slope_ci_low) else f" [{r.slope_ci_low:.3f}, {r.slope_ci_high:.3f}]"
        fit = f"slope {r.slope:+.4f}{ci}, r² {r.r2:.3f}, mean |DE| {r.mean_abs_de:.4f} over {int(r.n_points)} points; "
        if name in ranked:
            reason = "ranked"
        elif pd.isna(r.slope):
            reason = "no fit"
        elif r.mean_abs_de < min_de_fraction * largest:
            reason = "small"
        elif r.r2 < min_r2:
            reason = "r2"
        elif r.mean_backup == 0 and r.slope == 0:
            reason = "last"
        elif not pd.isna(r.slope_ci_low) and r.slope_ci_low <= 0 <= r.slope_ci_high:
            reason = "zero"
        else:
            reason = "top"
        found.append((name, fit, reason))
    if len(found) > MAX_ASKED_LINES:  # many heads (whole layers): how many for each reason
        counts = pd.Series([reason for _, _, reason in found]).value_counts()
        parts = ", ".join(f"{n} {short[reason]}" for reason, n in counts.items())
        return [f"the {len(found)} heads asked for: {parts} (--heads with fewer heads says which and why)"]
    return ["heads asked for:", *(f"  {name}: {fit}{reasons[reason]}" for name, fit, reason in found)]


def summary_table(
    results: BackupResults, k: int = 8, min_de_fraction: float = 0.1, min_r2: float = 0.0
) -> pd.DataFrame:
    """The most backed-up and most anti-backed-up heads, ranked conservatively.

    Backup is compensation of a head's *direct* effect, so only heads whose fit is
    ``meaningful`` are ranked. They are ranked by the cautious end of the
    slope's 95 % bootstrap interval: backed-up heads by its lower bound,
    anti-backup heads by its upper bound (by the slope itself when the sweep
    ran no bootstrap).
    """
    s = results.slopes[meaningful(results.slopes, min_de_fraction, min_r2)].dropna(subset=["slope"])
    s = s[s.mean_backup.abs() + s.slope.abs() > 0]  # the last layer has no downstream heads
    columns = ["kind", "head", "slope", "ci95", "r2", "mean_de", "mean_abs_de", "n_points"]
    if s.empty:
        return pd.DataFrame(columns=columns)
    low = s.slope_ci_low.fillna(s.slope)
    high = s.slope_ci_high.fillna(s.slope)
    top = s.loc[low[low > 0].nlargest(k).index].assign(kind="backed up")
    bottom = s.loc[high[high < 0].nsmallest(k).index].assign(kind="anti-backup")
    table = pd.concat([top, bottom])
    return pd.DataFrame(
        {
            "kind": table.kind,
            "head": [f"L{l}H{h}" for l, h in zip(table.layer, table["head"])],
            "slope": table.slope.round(4),
            "ci95": [f"[{a:.3f}, {b:.3f}]" for a, b in zip(table.slope_ci_low, table.slope_ci_high)],
            "r2": table.r2.round(3),
            "mean_de": table.mean_de.round(4),
            "mean_abs_de": table.mean_abs_de.round(4),
            "n_points": table.n_points,
        },
        columns=columns,
    )
