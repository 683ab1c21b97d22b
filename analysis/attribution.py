"""An attribution sweep's results: the shards' raw sums added up into scores.

Each shard holds raw sums over its batch of prompts (``sweeps/jobs/attribution.py``).
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

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import ResultsError, open_results, read_committed
from sweeps.core.nodes import edge_name
from sweeps.jobs import datasets
from sweeps.runtime.location import Location

DATASETS, DERIVED = datasets.SHARDS["attribution"], datasets.DERIVED["attribution"]  # shards', finish's


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
    # --split-kv: upstream, head (the query head), input (k or v), score: each query head's own
    # copy of its shared key/value input; empty where not split
    kv_heads: pd.DataFrame = field(default_factory=pd.DataFrame)

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
            rows.append(
                {
                    "kind": kind,
                    "n": int(len(x)),
                    "pearson": _correlation(x, y),
                    "spearman": _correlation(pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()),
                    "sign_agreement": float(np.mean(np.sign(x) == np.sign(y))) if len(x) else float("nan"),
                    "median_ratio": float(np.median(y / np.where(x == 0, np.nan, x))) if len(x) else float("nan"),
                }
            )
        return pd.DataFrame(rows, columns=["kind", "n", "pearson", "spearman", "sign_agreement", "median_ratio"])


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def node_columns(names: pd.Series) -> pd.DataFrame:
    """layer, head and kind of node names ``embed``, ``L9H6``, ``mlp9``."""
    layer: list[int] = []
    head: list[int | None] = []
    kind: list[str] = []
    for name in names:
        if name == "embed":
            layer.append(-1)
            head.append(None)
            kind.append("embed")
        elif name.startswith("mlp"):
            layer.append(int(name[3:]))
            head.append(None)
            kind.append("mlp")
        else:
            lh = name[1:].split("H")
            layer.append(int(lh[0]))
            head.append(int(lh[1]))
            kind.append("attn_head")
    return pd.DataFrame({"layer": layer, "head": pd.array(head, dtype="Int64"), "kind": kind}, index=names.index)


def _ranked(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.assign(abs_rank=frame.score.abs().rank(ascending=False, method="first").astype("int64"))
    return frame.sort_values("abs_rank").reset_index(drop=True)


def top_targets(nodes: pd.DataFrame, edges: pd.DataFrame, k: int) -> list:
    """The K highest-|score| nodes and the K highest-|score| edges, in rank order."""
    from sweeps.core.attribution import Target

    top_nodes = [Target(n) for n in nodes.sort_values("abs_rank").node.head(k)]
    top_edges = [Target(r.upstream, r.downstream, r.input) for r in edges.sort_values("abs_rank").head(k).itertuples()]
    return top_nodes + top_edges


def load_attribution_results(out: str | Path | Location, allow_mixed: bool = False) -> AttributionResults:
    out = open_results(out)
    spec, manifest, frames = read_committed(out, DATASETS, "attribution", allow_mixed)
    batches = frames["batches"]
    if batches.empty:
        raise ResultsError(f"{out} holds no finished attribution shards yet; re-run the sweep command")
    n_points = int(batches.n_points.sum())
    clean, corrupt = float(batches.clean_metric.sum()), float(batches.corrupt_metric.sum())
    # Answer metrics (and kl) normalise by clean − corrupt; next-token log-probabilities by the points.
    normaliser = float(n_points) if spec.get("metric") in (None, "next_token", "log_prob") else clean - corrupt
    if abs(normaliser) <= 1e-9 * n_points:  # every score would be inf or NaN
        raise ResultsError(
            f"{out}: the clean and corrupt runs give the same {spec.get('metric')} ({clean / n_points:.4g} a point), "
            "so scores normalised by their difference are undefined; choose a metric or task on which they differ"
        )
    node_sums = frames["node_sums"]
    nodes = node_sums.groupby("node", sort=False, observed=True)["raw"].sum()
    nodes = pd.DataFrame({"node": nodes.index.astype(str), "score": nodes.to_numpy() / normaliser})
    nodes = _ranked(pd.concat([nodes, node_columns(nodes.node)], axis=1)[["node", "layer", "head", "kind", "score"]])
    edge_sums = frames["edge_sums"]
    keys = ["upstream", "downstream", "input"]
    edges = edge_sums.groupby(keys, sort=False, observed=True)["raw"].sum(min_count=1).reset_index()
    edges = edges[np.isfinite(edges.raw.to_numpy(dtype=float))]  # all-NaN sums (exact, nodes only) stay NaN and go
    edges = _ranked(
        pd.DataFrame({**{k: edges[k].astype(str) for k in keys}, "score": edges.raw.to_numpy() / normaliser})
    )
    method = spec.get("method", "eap")
    nodes, edges = nodes.assign(method=method), edges.assign(method=method)
    verify = _verify_table(spec, frames["verify_sums"], nodes, edges, normaliser)
    kv_sums = frames.get("kv_head_sums", pd.DataFrame())
    kv_heads = pd.DataFrame(columns=["upstream", "head", "input", "score"])
    if not kv_sums.empty:
        keys = ["upstream", "head", "input"]
        kv = kv_sums.groupby(keys, sort=False, observed=True)["raw"].sum().reset_index()
        kv_heads = pd.DataFrame({**{k: kv[k].astype(str) for k in keys}, "score": kv.raw.to_numpy() / normaliser})
    return AttributionResults(
        out=out,
        spec=spec,
        manifest=manifest,
        nodes=nodes,
        edges=edges,
        verify=verify,
        n_prompts=int(batches.prompts.sum()),
        n_points=n_points,
        clean_metric=clean / n_points,
        corrupt_metric=corrupt / n_points,
        normaliser=normaliser,
        kv_heads=kv_heads,
    )


def _verify_table(
    spec: dict, sums: pd.DataFrame, nodes: pd.DataFrame, edges: pd.DataFrame, normaliser: float
) -> pd.DataFrame:
    """Score against the real patch effect for the current top targets (complete batches only)."""
    from sweeps.jobs.attribution import VerifyShard, batch_ranges

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
        rows.append(
            [
                "node" if t.downstream is None else "edge",
                t.label,
                t.upstream,
                t.downstream,
                t.input,
                float(score),
                float(effect),
            ]
        )
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


KIND_WORDS = {"attn_head": "head", "mlp": "MLP", "embed": "embeddings"}


def top_edges_table(results: AttributionResults, k: int = 10) -> pd.DataFrame:
    top = results.edges.head(k)
    return pd.DataFrame(
        {
            "rank": top.abs_rank,
            "edge": [edge_name(u, d, i) for u, d, i in zip(top.upstream, top.downstream, top.input)],
            "score": top.score,
        }
    )


def top_nodes_table(results: AttributionResults, k: int = 10, kind: str | None = None) -> pd.DataFrame:
    """The ``k`` nodes with the largest |score|: every kind (heads, MLPs, the embeddings)
    unless ``kind`` picks one."""
    nodes = results.nodes if kind is None else results.nodes[results.nodes.kind == kind]
    top = nodes.head(k)
    return pd.DataFrame(
        {"rank": top.abs_rank, "node": top.node, "kind": top.kind.map(KIND_WORDS).fillna(top.kind), "score": top.score}
    )


def best_of_each_kind(results: AttributionResults) -> str:
    """One line: the top node of each kind, so an MLP or the embeddings never hide behind heads
    (or heads behind them)."""
    parts = []
    for kind, word in KIND_WORDS.items():
        nodes = results.nodes[results.nodes.kind == kind]
        if len(nodes):
            best = nodes.iloc[0]
            parts.append(f"{word} {best.node} {best.score:+.3f} (rank {best.abs_rank})")
    return "top node of each kind: " + ", ".join(parts)


AGREES = 0.8  # a Pearson r of score against real effect from which the summary calls them in agreement
NAMED_OUTLIERS = 3  # at most this many targets named as furthest off
WHY = (
    "Attribution is first-order: it predicts each patch from the gradient of the clean run, as if the "
    "metric were linear in the patched activation. A patch that moves the model far from the clean run "
    "breaks that, above all in the embeddings and early MLPs, which rewrite the model's input. Where "
    "score and real effect differ, trust the real effect (verify/, plots/faithfulness.png)."
)


def faithfulness_lines(results: AttributionResults, agrees: float = AGREES) -> list[str]:
    """What the verification says, in words: per kind (nodes, edges), whether attribution
    predicted the real patches; where it did not, the targets furthest off (those off by at
    least a quarter of the largest miss), the correlation without them, and why that happens."""
    lines, disagree = [], False
    for row in results.faithfulness().itertuples():
        group = results.verify[results.verify.kind == row.kind]
        what = f"top {row.n} {row.kind}s"
        numbers = f"Pearson r {row.pearson:.2f}, signs agree on {row.sign_agreement:.0%}"
        if np.isfinite(row.pearson) and row.pearson >= agrees:
            lines.append(f"{what}: attribution predicts real patching ({numbers}).")
            continue
        disagree = True
        miss = (group.patch_effect - group.score).abs().sort_values(ascending=False)
        off = miss[miss >= 0.25 * miss.iloc[0]].index[:NAMED_OUTLIERS] if len(miss) else miss.index
        named = ", ".join(
            f"{group.target[i]} (score {group.score[i]:+.2f}, real {group.patch_effect[i]:+.2f})" for i in off
        )
        rest = group.drop(index=off)
        without = _correlation(rest.score.to_numpy(float), rest.patch_effect.to_numpy(float))
        lines.append(
            f"{what}: attribution and real patching DISAGREE ({numbers}); furthest off: {named}"
            + (f"; without {'it' if len(off) == 1 else 'them'} r = {without:.2f}" if np.isfinite(without) else "")
            + "."
        )
    return lines + ([WHY] if disagree else [])


def summary_text(results: AttributionResults, k: int = 10) -> str:
    """What the attribution commands print: the top edges and nodes, and the verification."""
    edges = (
        f"Top {k} edges by |score|\n{top_edges_table(results, k).to_string(index=False)}"
        if len(results.edges)
        else f"No edge scores: --method {results.method} scored the nodes only"
    )
    blocks = [
        edges,
        f"Top {k} nodes by |score| (heads, MLPs and the embeddings)\n"
        f"{top_nodes_table(results, k).to_string(index=False)}\n{best_of_each_kind(results)}",
    ]
    if not results.verify.empty:
        blocks.append(
            f"Attribution against real patching (top {results.spec.get('verify_top')})\n"
            f"{results.faithfulness().to_string(index=False)}\n"
            + "\n".join(textwrap.fill(line, 100, subsequent_indent="  ") for line in faithfulness_lines(results))
        )
    return "\n\n".join(blocks)
