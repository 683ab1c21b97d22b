"""An attribution sweep's results: the shards' raw sums added up into scores.

Each shard holds raw sums over its batch of prompts (``sweeps/engine/attribution_sweep.py``).
Summed over every batch and divided once by the task's normaliser, they are
the scores of the whole dataset, exactly: the mean of the metric's gradient
over prompts is the sum of the batches' sums over the number of prompts.

Normaliser (so that a score is in units of the task's metric):
- logit-difference tasks, metric ``(ld − ld_corrupt)/(ld_clean − ld_corrupt)``
  (means over prompts): ``Σ ld_clean − Σ ld_corrupt``;
- next-token tasks, metric = mean log-probability over every next-token
  position: the number of positions.

``score > 0``: the node (edge) carries the clean behaviour; patching its
corrupt value in would lower the metric by about ``score``. ``--verify-top``
measures that patch for real (``patch_effect``, same units).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import ResultsError, open_results, read_committed
from sweeps.engine.location import Location

DATASETS = ("node_sums", "edge_sums", "batches", "verify_sums")
DERIVED = ("nodes", "edges", "verify")


@dataclass
class AttributionResults:
    out: Location  # the results directory or URI
    spec: dict
    manifest: dict
    nodes: pd.DataFrame  # node, layer, head, kind, score, abs_rank, method
    edges: pd.DataFrame  # upstream, downstream, input, score, abs_rank, method (empty: exact, nodes only)
    verify: pd.DataFrame  # kind, target, upstream, downstream, input, score, patch_effect
    n_prompts: int  # prompts whose batches are in
    n_points: int
    clean_metric: float  # mean of the raw metric (logit difference or log-probability) per point
    corrupt_metric: float
    normaliser: float

    @property
    def complete(self) -> bool:
        return self.n_prompts == self.spec.get("n_prompts")

    @property
    def method(self) -> str:
        """How the scores were made: eap, eap-ig-inputs, eap-ig-activations or exact."""
        return str(self.spec.get("method", "eap"))

    @property
    def n_layers(self) -> int:
        return int(self.spec["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.spec["n_heads"])

    def faithfulness(self) -> pd.DataFrame:
        """Per kind (node, edge): how well attribution predicts the real patch."""
        rows = []
        for kind, group in self.verify.groupby("kind", sort=False):
            x, y = group.score.to_numpy(dtype=float), group.patch_effect.to_numpy(dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            rows.append({
                "kind": kind, "n": int(len(x)),
                "pearson": _correlation(x, y),
                "spearman": _correlation(pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()),
                "sign_agreement": float(np.mean(np.sign(x) == np.sign(y))) if len(x) else float("nan"),
                "median_ratio": float(np.median(y / np.where(x == 0, np.nan, x))) if len(x) else float("nan"),
            })
        return pd.DataFrame(rows, columns=["kind", "n", "pearson", "spearman", "sign_agreement", "median_ratio"])


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def node_columns(names: pd.Series) -> pd.DataFrame:
    """layer, head and kind of node names ``embed``, ``L9H6``, ``mlp9``."""
    layer, head, kind = [], [], []
    for name in names:
        if name == "embed":
            layer.append(-1), head.append(None), kind.append("embed")
        elif name.startswith("mlp"):
            layer.append(int(name[3:])), head.append(None), kind.append("mlp")
        else:
            lh = name[1:].split("H")
            layer.append(int(lh[0])), head.append(int(lh[1])), kind.append("attn_head")
    return pd.DataFrame({"layer": layer, "head": pd.array(head, dtype="Int64"), "kind": kind}, index=names.index)


def _ranked(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.assign(abs_rank=frame.score.abs().rank(ascending=False, method="first").astype("int64"))
    return frame.sort_values("abs_rank").reset_index(drop=True)


def top_targets(nodes: pd.DataFrame, edges: pd.DataFrame, k: int) -> list:
    """The K highest-|score| nodes and the K highest-|score| edges, in rank order."""
    from sweeps.engine.attribution import Target

    top_nodes = [Target(n) for n in nodes.sort_values("abs_rank").node.head(k)]
    top_edges = [Target(r.upstream, r.downstream, r.input)
                 for r in edges.sort_values("abs_rank").head(k).itertuples()]
    return top_nodes + top_edges


def load_attribution_results(out: str | Path | Location, allow_mixed: bool = False) -> AttributionResults:
    out = open_results(out)
    spec, manifest, frames = read_committed(out, DATASETS, "attribution", allow_mixed)
    batches = frames["batches"]
    if batches.empty:
        raise ResultsError(f"{out} holds no finished attribution shards yet; re-run the sweep command")
    n_points = int(batches.n_points.sum())
    clean, corrupt = float(batches.clean_metric.sum()), float(batches.corrupt_metric.sum())
    normaliser = clean - corrupt if spec.get("metric") == "logit_diff" else float(n_points)
    node_sums = frames["node_sums"]
    nodes = node_sums.groupby("node", sort=False, observed=True)["raw"].sum()
    nodes = pd.DataFrame({"node": nodes.index.astype(str), "score": nodes.to_numpy() / normaliser})
    nodes = _ranked(pd.concat([nodes, node_columns(nodes.node)], axis=1)[
        ["node", "layer", "head", "kind", "score"]])
    edge_sums = frames["edge_sums"]
    keys = ["upstream", "downstream", "input"]
    edges = edge_sums.groupby(keys, sort=False, observed=True)["raw"].sum().reset_index()
    edges = edges[np.isfinite(edges.raw.to_numpy(dtype=float))]  # --method exact on a large model: nodes only
    edges = _ranked(pd.DataFrame({
        **{k: edges[k].astype(str) for k in keys}, "score": edges.raw.to_numpy() / normaliser}))
    method = spec.get("method", "eap")
    nodes, edges = nodes.assign(method=method), edges.assign(method=method)
    verify = _verify_table(spec, frames["verify_sums"], nodes, edges, normaliser)
    return AttributionResults(
        out=out, spec=spec, manifest=manifest, nodes=nodes, edges=edges, verify=verify,
        n_prompts=int(batches.prompts.sum()), n_points=n_points,
        clean_metric=clean / n_points, corrupt_metric=corrupt / n_points, normaliser=normaliser,
    )


def _verify_table(spec: dict, sums: pd.DataFrame, nodes: pd.DataFrame, edges: pd.DataFrame,
                  normaliser: float) -> pd.DataFrame:
    """Score against the real patch effect for the current top targets (complete batches only)."""
    from sweeps.engine.attribution_sweep import VerifyShard, batch_ranges

    columns = ["kind", "target", "upstream", "downstream", "input", "score", "patch_effect"]
    k = int(spec.get("verify_top") or 0)
    if k == 0 or sums.empty:
        return pd.DataFrame(columns=columns)
    targets = top_targets(nodes, edges, k)
    tag = VerifyShard(0, 1, tuple(targets)).tag
    mine = sums[sums["shard"].astype(str).str.endswith(f"_{tag}")]
    if mine["shard"].nunique() < len(batch_ranges(int(spec["n_prompts"]), int(spec["batch_size"]))):
        return pd.DataFrame(columns=columns)  # not every batch verified yet
    by = mine.groupby("target", sort=False)[["patched_metric", "clean_metric"]].sum()
    node_score = dict(zip(nodes.node, nodes.score))
    edge_score = {(r.upstream, r.downstream, r.input): r.score for r in edges.itertuples()}
    rows = []
    for t in targets:
        score = node_score[t.upstream] if t.downstream is None else edge_score[(t.upstream, t.downstream, t.input)]
        effect = (by.loc[t.label, "clean_metric"] - by.loc[t.label, "patched_metric"]) / normaliser
        rows.append(["node" if t.downstream is None else "edge", t.label, t.upstream, t.downstream, t.input,
                     float(score), float(effect)])
    return pd.DataFrame(rows, columns=columns)


def head_grid(nodes: pd.DataFrame, n_layers: int, n_heads: int, column: str = "score") -> np.ndarray:
    """[layers, heads + 1] values: each head, then the layer's MLP (NaN if none)."""
    grid = np.full((n_layers, n_heads + 1), np.nan)
    for row in nodes.itertuples():
        if row.kind == "attn_head":
            grid[row.layer, row.head] = getattr(row, column)
        elif row.kind == "mlp":
            grid[row.layer, n_heads] = getattr(row, column)
    return grid


def seed_style(name: str) -> str:
    """``L5H5`` -> ``5:5`` (the attribution-patching notebook's notation); other names unchanged."""
    if name.startswith("L") and "H" in name:
        layer, head = name[1:].split("H")
        return f"{layer}:{head}"
    return name


def top_edges_table(results: AttributionResults, k: int = 10) -> pd.DataFrame:
    top = results.edges.head(k)
    return pd.DataFrame({
        "rank": top.abs_rank, "edge": [f"{seed_style(u)} -> {seed_style(d)} ({i})"
                                        for u, d, i in zip(top.upstream, top.downstream, top.input)],
        "score": top.score,
    })


def top_nodes_table(results: AttributionResults, k: int = 10, kind: str | None = "attn_head") -> pd.DataFrame:
    nodes = results.nodes if kind is None else results.nodes[results.nodes.kind == kind]
    top = nodes.head(k)
    return pd.DataFrame({"rank": top.abs_rank, "node": top.node, "score": top.score})
