"""The backup-slope sweep on one worker: per-batch clean state, per-shard work.

``BackupJob`` holds one task and the sweep's settings (picklable: that is what
the executors send to a worker); ``bind`` gives it one model replica. It computes
the clean run of every batch once (block inputs, clean direct effects, the
corrupt run's head outputs) and then serves shards: a shard is a group of
upstream heads in one layer, ablated together as one batched restart from that
layer. ``run_heads`` returns plain numpy arrays; ``shard_tables`` turns them
into Arrow tables. No Ray here: the executors (``sweeps/runtime/executors.py``) run this class.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sweeps.core import effects, metrics
from sweeps.core import transformer as tf
from sweeps.core.effects import BatchState
from sweeps.jobs.base import Job
from sweeps.jobs.plan import Shard
from sweeps.runtime.chunking import map_chunks, memory_gauge
from tasks.base import TaskData

# Per point, for every ablated head: the self-repair decomposition (docs/self-repair.md).
# ``last_mlp`` is the part of ``mlps`` from the last layer's MLP (split per neuron in neurons/).
# ``total_effect_metric`` (``METRIC_TERM``, a column only with ``--metric``): the change of the chosen
# metric; every other term is the logit-linear decomposition, in logit differences whatever the metric.
SELF_REPAIR_TERMS = (
    "total_effect",
    "own_change",
    "self_repair",
    "heads",
    "mlps",
    "last_mlp",
    "final_norm",
    "total_effect_capped",
)
# With ``--metric`` only (the default's tables keep their columns): the chosen metric's change.
METRIC_TERM = "total_effect_metric"

# neurons/: per (ablated head, selection), the last MLP's top neurons by |mean change of direct effect|.
NEURON_SCHEMA = pa.schema(
    [
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("selection", pa.string()),
        ("top_fraction", pa.float64()),
        ("n_points", pa.int64()),
        ("mlp_layer", pa.int32()),
        ("rank", pa.int32()),
        ("neuron", pa.int32()),
        ("delta_de", pa.float64()),
        ("clean_de", pa.float64()),
        ("share", pa.float64()),
        ("cum_share", pa.float64()),
        ("top_share", pa.float64()),
        ("mlp_term", pa.float64()),
        ("mlp_bias", pa.float64()),
    ]
)


@dataclass
class Reference:
    """What an ablation's changes are taken from, for layers ``l*..L-1``: the clean run's
    values (``BatchState``), or in reduced precision the un-ablated copy that ran in the same
    pass (``LayerAblation.baseline``: its roundings are the ablated copies')."""

    heads: torch.Tensor  # [L_rest, P, H] direct effects
    mlps: torch.Tensor  # [L_rest, P]
    attn_bias: torch.Tensor | None  # [L_rest, P] b_O's share (post-norm models)
    final_dot: torch.Tensor | None  # [P] x · u of the final stream
    de_neurons: torch.Tensor | None  # [P, M] the last MLP's neurons' direct effects
    last_inv_rms: torch.Tensor | None  # [P] (post-norm models)
    final_normed: torch.Tensor | None  # [P, D] (soft-capped models)

    @classmethod
    def of(cls, state: BatchState, layer: int, result: effects.LayerAblation) -> "Reference":
        base = result.baseline
        if base is None:
            return cls(
                state.de_heads[layer:],
                state.de_mlps[layer:],
                None if state.de_bias is None else state.de_bias[layer:],
                state.clean_dot,
                state.de_neurons,
                state.last_inv_rms,
                state.clean_normed,
            )
        first = lambda t: None if t is None else t[0]  # noqa: E731
        neurons = None
        if state.neuron_dirs is not None and base.last_hidden is not None:
            neurons = effects.neuron_direct_effects(state.neuron_dirs, base.last_hidden[0], first(base.last_inv_rms))
        return cls(
            base.heads[0],
            base.mlps[0],
            first(base.attn_bias),
            first(base.final_dot),
            neurons,
            first(base.last_inv_rms),
            first(base.final_normed),
        )


@dataclass
class HeadResult:
    """One upstream head's outcome over the whole task."""

    layer: int
    head: int
    prompt: np.ndarray  # [P_total] global prompt index of each point
    pos: np.ndarray
    de_clean: np.ndarray  # the ablated head's own clean direct effect
    backup: np.ndarray  # accumulated change of every other head: later layers, and its own layer's (same_layer)
    same_layer: np.ndarray  # the part of ``backup`` from the other heads of its own layer (non-zero under post-norms)
    repair: dict[str, np.ndarray]  # per point: the self-repair decomposition (``SELF_REPAIR_TERMS``)
    mean_delta_heads: np.ndarray  # [L, H] mean change of every head's direct effect
    mean_delta_mlps: np.ndarray  # [L]
    neurons: dict[str, "NeuronSplit"] | None = None  # per selection: the last MLP's term split per neuron


@dataclass
class NeuronSplit:
    """One head's ``last_mlp`` term split per neuron of the last layer's MLP, as means over one
    selection of points: ``delta.sum() + bias = mlp_term`` (the bias moves only under a post-norm)."""

    top_fraction: float
    n_points: int
    delta: np.ndarray  # [M] mean change of each neuron's direct effect (clean scale)
    clean: np.ndarray  # [M] mean clean direct effect of each neuron
    bias: float  # mean change of b_out's share
    mlp_term: float  # mean of ``last_mlp``


def selections(de_clean: np.ndarray, top_fraction: float) -> list[tuple[str, np.ndarray, float]]:
    """(name, indices of the points, fraction) of the two selections: ``all`` the points, and the
    ``top`` ``top_fraction`` of them by the head's signed clean direct effect (at least one)."""
    n = de_clean.size
    order = np.argsort(-de_clean, kind="stable")
    return [("all", np.arange(n), 1.0), ("top", order[: max(1, int(np.ceil(top_fraction * n)))], top_fraction)]


@dataclass
class BackupJob(Job):
    """The backup sweep on one worker, bound (``Job.bind``) to its model's engine there: the
    executors send the job unbound."""

    task: TaskData
    ablation: str = "resample"
    batch_size: int = 32
    fit_threshold: float = 0.0
    n_boot: int = 200
    seed: int = 0
    top_fraction: float = 0.02  # self_repair/'s and neurons/' "top" selection
    top_neurons: int = 20
    self_repair: bool = True  # also the self-repair decomposition (off only to measure what it costs)
    _batches: list[BatchState] | None = field(default=None, repr=False)
    _warned: bool = field(default=False, repr=False)

    def sizing(self):
        per_prompt = 1 if self.task.kind == "logit_diff" else int(self.task.clean.shape[1]) - 1
        return "backup", {"batch_size": self.batch_size, "ablation": self.ablation, "points_per_prompt": per_prompt}

    def on_bind(self) -> None:
        self._batches = None

    def run_shard(self, shard: Shard) -> dict[str, pa.Table]:
        results = self.run_heads(shard.layer, list(shard.heads))
        return shard_tables(results, self.fit_threshold, self.n_boot, self.seed, self.top_fraction, self.top_neurons)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, heads, d_head)."""
        cfg = self.engine.cfg
        return cfg.n_layers, cfg.n_heads, cfg.d_head

    @torch.no_grad()
    def batches(self) -> list[BatchState]:
        """Clean state of every batch, computed on first use and kept."""
        if self._batches is not None:
            return self._batches
        clean_runs, states = [], []
        for start in range(0, self.task.n_prompts, self.batch_size):
            sub = self.task.select(slice(start, start + self.batch_size))
            state, run = self.engine.backup_state(sub, start, self.ablation, self.self_repair)
            if self.self_repair and state.neuron_dirs is None and not self._warned:
                self._warned = True
                print(
                    "note: the last MLP cannot be split per neuron on this model (a mixture of experts, "
                    "or no MLP): neurons/ stays empty",
                    file=sys.stderr,
                )
            states.append(state)
            if self.ablation == "mean":
                clean_runs.append((run, sub.lengths.to(state.tokens.device)))
        if self.ablation == "mean":
            mean = effects.mean_z(clean_runs)  # over the whole task, not per batch
            for state in states:
                L, (B, T) = self.shape[0], state.tokens.shape
                state.replacement_z = mean[:, None, None].expand(L, B, T, *mean.shape[1:])
        self._batches = states
        return states

    def notes(self) -> dict:
        """How the restarts ran (``effects.restart_notes``): prefix-shared for a resample
        ablation (the corrupt prompts' values) on the fast path, else full."""
        batches = [
            self.task.select(slice(i, i + self.batch_size)) for i in range(0, self.task.n_prompts, self.batch_size)
        ]
        shared = self.ablation == "resample" and self.engine.name == "fast"
        return effects.restart_notes(batches, prefix_shared=shared)

    def _self_repair(
        self,
        state: BatchState,
        ref: Reference,
        chunk: list[int],
        result: effects.LayerAblation,
        delta_heads: torch.Tensor,
        delta_mlps: torch.Tensor,
        backup: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Each ablated head's total effect split exactly into its own change and the repair by
        the other heads, the MLPs and the final norm, at every point ([G, P] each).

        ``total_effect`` is the change of the logit (difference) read with each run's own final
        scale (``s′`` for the ablated run), before any soft-cap; every other term uses the clean
        ``s``. With ``x`` / ``x′`` the clean / ablated final streams (``· u`` at the point), the
        components' changes add up to ``(x′ − x)·u / s``, so
        ``final_norm = (s/s′ − 1)·(x′·u)/s`` makes ``own + heads + mlps + final_norm = total``."""
        s, s_ablated = state.scale, result.final_scale
        g = torch.arange(len(chunk))
        own = delta_heads[g, 0, :, torch.tensor(chunk)]  # [G, P]
        heads = backup
        if result.attn_bias is not None and ref.attn_bias is not None:  # b_O's share moves under a post-norm
            heads = heads + (result.attn_bias - ref.attn_bias[None]).sum(1)
        mlps = delta_mlps.sum(1)
        assert result.final_dot is not None and s_ablated is not None and ref.final_dot is not None  # read_final
        total = result.final_dot / s_ablated - ref.final_dot / s
        final_norm = (s / s_ablated - 1) * result.final_dot / s
        out = {
            "total_effect": total,
            "own_change": own,
            "self_repair": total - own,
            "heads": heads,
            "mlps": mlps,
            "last_mlp": delta_mlps[:, -1],
            "final_norm": final_norm,
        }
        out["total_effect_capped"] = (
            self._capped_change(state, ref, result)
            if result.final_normed is not None and self.engine.readout.cfg.final_softcap
            else torch.full_like(total, float("nan"))
        )
        if self.task.metric is not None:
            assert result.final_normed is not None  # kept under --metric (``keep_normed``)
            out[METRIC_TERM] = self._metric_change(state, ref, result)
        return out

    def terms(self) -> tuple[str, ...]:
        """The self-repair columns: ``SELF_REPAIR_TERMS``, and ``METRIC_TERM`` under ``--metric``."""
        return SELF_REPAIR_TERMS + ((METRIC_TERM,) if self.task.metric is not None else ())

    def _metric_change(self, state: BatchState, ref: Reference, result: effects.LayerAblation) -> torch.Tensor:
        """The change of the ``--metric`` metric at each point, [G, P]: the ablated run's minus the
        clean run's (the same pass's baseline in reduced precision), each from its own full logits
        at the point (its normalised final stream, ``final_normed``). Not a sum of the direct
        effects: a non-linear metric has no such decomposition; the other terms stay logit-linear."""
        w = self.engine.readout
        sub = self.task.select(slice(state.start, state.start + state.tokens.shape[0]))
        points = state.points
        assert result.final_normed is not None and ref.final_normed is not None and state.clean_normed is not None

        def logits(x: torch.Tensor) -> torch.Tensor:  # [*G, P, D] normalised -> [*G, P, V] real logits
            return tf.cap_logits(w, (x.to(w.W_U.dtype) @ w.W_U + w.b_U).float(), x.float())

        name = sub.metric_name
        reference = torch.log_softmax(logits(state.clean_normed), -1) if name in metrics.NEEDS_REFERENCE else None
        correct: torch.Tensor | None = None
        incorrect: torch.Tensor | None = None
        if sub.kind == "logit_diff":
            correct, incorrect = (s.to(w.device)[points.batch] for s in sub.answer_sets())
        elif name == "log_prob":  # each point's next token
            correct = sub.clean.to(w.device)[points.batch, points.pos + 1][:, None]
        G, P = result.final_normed.shape[:2]
        ablated = metrics.metric_from_logits(
            name,
            logits(result.final_normed).flatten(0, 1),
            None if correct is None else correct.repeat(G, 1),
            None if incorrect is None else incorrect.repeat(G, 1),
            None if reference is None else reference.repeat(G, 1),
        ).view(G, P)
        return ablated - metrics.metric_from_logits(name, logits(ref.final_normed), correct, incorrect, reference)[None]

    def _neuron_changes(
        self, state: BatchState, ref: Reference, result: effects.LayerAblation
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The change of each last-MLP neuron's direct effect (clean ``s``), [G, P, M], and of its
        bias's share, [G, P]: together they sum to the ``last_mlp`` term at every point."""
        assert state.neuron_dirs is not None and ref.de_neurons is not None and result.last_hidden is not None
        ablated = effects.neuron_direct_effects(state.neuron_dirs, result.last_hidden, result.last_inv_rms)
        delta = ablated.sub_(ref.de_neurons)  # in place: a pass over [G, P, M] less
        if ref.last_inv_rms is None:  # without a post-norm b_out's share cannot move
            return delta, torch.zeros(delta.shape[:2], device=delta.device)
        assert state.last_bias_dir is not None and result.last_inv_rms is not None  # set under a post-norm
        return delta, state.last_bias_dir * (result.last_inv_rms - ref.last_inv_rms[None])

    def _capped_change(self, state: BatchState, ref: Reference, result: effects.LayerAblation) -> torch.Tensor:
        """The change of the model's real, soft-capped logit (difference) at each point."""
        w, task = self.engine.readout, self.task
        sub = task.select(slice(state.start, state.start + state.tokens.shape[0]))
        points = state.points
        assert result.final_normed is not None and ref.final_normed is not None  # soft-capped models
        if sub.kind == "logit_diff":
            assert sub.correct is not None and sub.incorrect is not None
            tokens = [sub.correct.to(w.device)[points.batch], sub.incorrect.to(w.device)[points.batch]]
        else:
            tokens = [state.tokens[points.batch, points.pos + 1]]

        def metric(x: torch.Tensor) -> torch.Tensor:  # x: [*G, P, D] normalised
            values = []
            for t in tokens:
                raw = (x * (w.W_U[:, t].T + w.W_U_mean)).sum(-1) + w.b_U[t] + w.b_U_mean
                values.append(w.cfg.final_softcap * torch.tanh(raw / w.cfg.final_softcap))
            return values[0] - values[1] if len(values) == 2 else values[0]

        return metric(result.final_normed) - metric(ref.final_normed)[None]

    def _replacement(self, state: BatchState, layer: int, heads: list[int]) -> torch.Tensor:
        """What each of ``heads``' ``z`` is replaced with, at every position: [G, B, T, E]."""
        if self.ablation not in effects.ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(effects.ABLATIONS)}")
        if self.ablation == "zero":
            B, T = state.tokens.shape
            return torch.zeros(len(heads), B, T, self.shape[2], device=state.tokens.device)
        assert state.replacement_z is not None  # resample and mean ablations keep it
        return torch.stack([state.replacement_z[layer, :, :, h] for h in heads])

    @torch.no_grad()
    def run_heads(self, layer: int, heads: list[int]) -> list[HeadResult]:
        """Ablate each of ``heads`` (all in ``layer``) and collect its backup."""
        L, H, _ = self.shape
        per_head: dict[int, dict[str, list]] = {
            h: {k: [] for k in ("prompt", "pos", "de", "backup", "same_layer", *self.terms())} for h in heads
        }
        sum_heads = {h: torch.zeros(L, H, dtype=torch.float64) for h in heads}
        sum_mlps = {h: torch.zeros(L, dtype=torch.float64) for h in heads}
        n_points = 0
        batches = self.batches()
        neurons = None
        if self.self_repair and batches[0].neuron_dirs is not None:
            neurons = _NeuronSums(batches, layer, heads, self.top_fraction)
        for index, state in enumerate(batches):
            B, T = state.tokens.shape

            def ablate(start: int, stop: int, state=state) -> effects.LayerAblation:
                chunk = heads[start:stop]
                return self.engine.ablate_heads(
                    state, layer, chunk, self._replacement(state, layer, chunk), self.self_repair
                )

            def advice(B=B, T=T) -> str:
                return (
                    f"out of memory restarting from layer {layer} with one head x {B} prompts x {T} "
                    f"tokens; use a smaller --batch-size (now {self.batch_size})"
                )

            device = state.tokens.device
            per_pass = self.pass_tokens(device) // (B * T)
            for start, stop, result in map_chunks(len(heads), per_pass, ablate, advice, memory_gauge(device)):
                chunk = heads[start:stop]
                ref = Reference.of(state, layer, result)
                delta_heads = result.heads - ref.heads[None]  # [G, L_rest, P, H]
                delta_mlps = result.mlps - ref.mlps[None]
                # Under a post-norm the other heads of `layer` change too (their shares of its
                # output divide by its rms): they are backup like the later layers' heads.
                others = torch.ones(len(chunk), delta_heads.shape[-1], device=delta_heads.device)
                others[torch.arange(len(chunk)), torch.tensor(chunk)] = 0.0
                same_layer = (delta_heads[:, 0] * others[:, None, :]).sum(-1)  # [G, P]
                backup = delta_heads[:, 1:].sum(dim=(1, 3)) + same_layer  # every other head, this layer and later
                if self.self_repair:
                    repair = self._self_repair(state, ref, chunk, result, delta_heads, delta_mlps, backup)
                else:
                    repair = {t: torch.full_like(backup, float("nan")) for t in self.terms()}
                if neurons is not None:
                    neurons.add(index, state, chunk, *self._neuron_changes(state, ref, result))
                for g, h in enumerate(chunk):
                    rec = per_head[h]
                    rec["prompt"].append((state.points.batch + state.start).cpu().numpy())
                    rec["pos"].append(state.points.pos.cpu().numpy())
                    rec["de"].append(state.de_heads[layer, :, h].double().cpu().numpy())
                    rec["backup"].append(backup[g].double().cpu().numpy())
                    rec["same_layer"].append(same_layer[g].double().cpu().numpy())
                    for term, values in repair.items():
                        rec[term].append(values[g].double().cpu().numpy())
                    sum_heads[h][layer:] += delta_heads[g].sum(1).double().cpu()
                    sum_mlps[h][layer:] += delta_mlps[g].sum(1).double().cpu()
            n_points += state.points.n
        results = [
            HeadResult(
                layer=layer,
                head=h,
                prompt=np.concatenate(per_head[h]["prompt"]),
                pos=np.concatenate(per_head[h]["pos"]),
                de_clean=np.concatenate(per_head[h]["de"]),
                backup=np.concatenate(per_head[h]["backup"]),
                same_layer=np.concatenate(per_head[h]["same_layer"]),
                repair={term: np.concatenate(per_head[h][term]) for term in self.terms()},
                mean_delta_heads=(sum_heads[h] / n_points).numpy(),
                mean_delta_mlps=(sum_mlps[h] / n_points).numpy(),
            )
            for h in heads
        ]
        if neurons is not None:
            for r in results:
                r.neurons = neurons.splits(r)
        return results


class _NeuronSums:
    """Per ablated head and selection (``all``, ``top``: the points ``self_repair_rows`` keeps),
    the sums over the selected points of each last-MLP neuron's change of direct effect, of its
    clean direct effect and of the bias's change, batch by batch."""

    def __init__(self, batches: list[BatchState], layer: int, heads: list[int], top_fraction: float):
        offsets = np.cumsum([0] + [s.points.n for s in batches])
        self.top_fraction = top_fraction
        self.masks: dict[int, list[torch.Tensor]] = {}  # the top selection's points, per batch
        self.sums: dict[int, dict[str, dict[str, Any]]] = {}
        for h in heads:
            de = np.concatenate([s.de_heads[layer, :, h].double().cpu().numpy() for s in batches])
            self.sums[h] = {}
            for selection, keep, fraction in selections(de, top_fraction):
                self.sums[h][selection] = dict(n=int(keep.size), fraction=fraction, delta=0.0, clean=0.0, bias=0.0)
                if selection == "top":
                    mask = np.zeros(de.size, bool)
                    mask[keep] = True
                    self.masks[h] = [
                        torch.from_numpy(mask[a:b]).to(s.tokens.device)
                        for s, a, b in zip(batches, offsets[:-1], offsets[1:])
                    ]
        self._clean_all: tuple[int, torch.Tensor] | None = None

    def add(self, index: int, state: BatchState, chunk: list[int], delta: torch.Tensor, bias: torch.Tensor) -> None:
        """Batch ``index``'s changes for the heads of ``chunk``: ``delta`` [G, P, M], ``bias`` [G, P]."""
        assert state.de_neurons is not None  # only made where the last MLP splits per neuron
        de_neurons = state.de_neurons
        # Sums over a batch's points in float32 (pairwise: exact to float32's precision; a float64
        # copy of [G, P, M] would cost more than the rest of the split), across batches in float64.
        if self._clean_all is None or self._clean_all[0] != index:  # the same for every head
            self._clean_all = index, de_neurons.sum(0).double().cpu()
        everything = delta.sum(1).double().cpu()  # [G, M]
        for g, h in enumerate(chunk):
            for selection, sums in self.sums[h].items():
                keep: slice | torch.Tensor
                if selection == "all":
                    keep, clean, changed = slice(None), self._clean_all[1], everything[g]
                else:
                    keep = self.masks[h][index]
                    clean = de_neurons[keep].sum(0).double().cpu()
                    changed = delta[g][keep].sum(0).double().cpu()
                sums["delta"] = sums["delta"] + changed
                sums["clean"] = sums["clean"] + clean
                sums["bias"] += float(bias[g][keep].double().sum())

    def splits(self, r: HeadResult) -> dict[str, NeuronSplit]:
        out = {}
        for selection, keep, _ in selections(r.de_clean, self.top_fraction):
            sums = self.sums[r.head][selection]
            n = sums["n"]
            out[selection] = NeuronSplit(
                top_fraction=sums["fraction"],
                n_points=n,
                delta=(sums["delta"] / n).numpy(),
                clean=(sums["clean"] / n).numpy(),
                bias=sums["bias"] / n,
                mlp_term=float(np.mean(r.repair["last_mlp"][keep])),
            )
        return out


def self_repair_rows(r: HeadResult, top_fraction: float) -> list[dict]:
    """One head's self-repair rows: the means of each term over every point (``all``) and over
    the top ``top_fraction`` of points by the head's signed clean direct effect (``top``), and
    the mean clipped shares ``clip(term / DE, 0, 1)`` of the heads, the MLPs and the final norm."""
    rows = []
    for selection, keep, fraction in selections(r.de_clean, top_fraction):
        de = r.de_clean[keep]
        terms = {"same_layer": r.same_layer[keep], **{t: v[keep] for t, v in r.repair.items()}}
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = {
                f"frac_{t}": float(np.nanmean(np.clip(terms[t] / de, 0, 1))) for t in ("heads", "mlps", "final_norm")
            }
        rows.append(
            dict(
                layer=r.layer,
                head=r.head,
                selection=selection,
                top_fraction=fraction,
                n_points=int(keep.size),
                mean_de=float(de.mean()),
                **{t: float(np.mean(v)) for t, v in terms.items()},
                **shares,
            )
        )
    return rows


def neuron_rows(r: HeadResult, top_neurons: int, n_layers: int) -> list[dict]:
    """One head's neurons/ rows: per selection, the ``top_neurons`` neurons of the last MLP with
    the largest |mean change of direct effect|, rank 1 first; ``share`` is that change over the
    MLP's mean term (``mlp_term``), ``cum_share`` the running sum of the shares down to this
    rank, ``top_share`` the share of all the rows shown."""
    rows = []
    for selection, split in (r.neurons or {}).items():
        order = np.argsort(-np.abs(split.delta), kind="stable")[:top_neurons]
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = split.delta[order] / split.mlp_term if split.mlp_term != 0 else np.full(order.size, np.nan)
        cumulative = np.cumsum(shares)
        for rank, (neuron, share, cum) in enumerate(zip(order, shares, cumulative), start=1):
            rows.append(
                dict(
                    layer=r.layer,
                    head=r.head,
                    selection=selection,
                    top_fraction=split.top_fraction,
                    n_points=split.n_points,
                    mlp_layer=n_layers - 1,
                    rank=rank,
                    neuron=int(neuron),
                    delta_de=float(split.delta[neuron]),
                    clean_de=float(split.clean[neuron]),
                    share=float(share),
                    cum_share=float(cum),
                    top_share=float(cumulative[-1]),
                    mlp_term=split.mlp_term,
                    mlp_bias=split.bias,
                )
            )
    return rows


def shard_tables(
    results: list[HeadResult],
    fit_threshold: float = 0.0,
    n_boot: int = 200,
    seed: int = 0,
    top_fraction: float = 0.02,
    top_neurons: int = 20,
) -> dict[str, pa.Table]:
    """The shard's rows of the five datasets (provenance is added by the store)."""
    slopes, responses, points, repair, neurons = [], [], [], [], []
    for r in results:
        repair += self_repair_rows(r, top_fraction)
        neurons += neuron_rows(r, top_neurons, r.mean_delta_mlps.size)
        fit = effects.fit_line(r.de_clean, r.backup, fit_threshold)
        keep = np.abs(r.de_clean) > fit_threshold if fit_threshold > 0 else slice(None)
        lo, hi = effects.bootstrap_slope_ci(r.de_clean[keep], r.backup[keep], r.prompt[keep], n_boot, seed)
        slopes.append(
            dict(
                layer=r.layer,
                head=r.head,
                slope=fit.slope,
                intercept=fit.intercept,
                r2=fit.r2,
                n_points=fit.n_points,
                mean_de=float(r.de_clean.mean()),
                mean_abs_de=float(np.abs(r.de_clean).mean()),
                mean_backup=float(r.backup.mean()),
                mean_same_layer=float(r.same_layer.mean()),
                slope_ci_low=lo,
                slope_ci_high=hi,
            )
        )
        L, H = r.mean_delta_heads.shape
        down_layer = np.repeat(np.arange(L), H)
        down_head = np.tile(np.arange(H), L)
        responses.append(
            pa.table(
                {
                    "up_layer": np.full(L * H + L, r.layer, dtype=np.int32),
                    "up_head": np.full(L * H + L, r.head, dtype=np.int32),
                    "down_layer": np.concatenate([down_layer, np.arange(L)]).astype(np.int32),
                    "down_head": pa.array(
                        np.concatenate([down_head, np.zeros(L)]).astype(np.int32),
                        mask=np.concatenate([np.zeros(L * H, bool), np.ones(L, bool)]),
                    ),
                    "down_kind": ["attn_head"] * (L * H) + ["mlp"] * L,
                    "mean_delta": np.concatenate([r.mean_delta_heads.ravel(), r.mean_delta_mlps]),
                }
            )
        )
        n = r.prompt.size
        points.append(
            pa.table(
                {
                    "layer": np.full(n, r.layer, dtype=np.int32),
                    "head": np.full(n, r.head, dtype=np.int32),
                    "prompt": r.prompt.astype(np.int32),
                    "pos": r.pos.astype(np.int32),
                    "de_clean": r.de_clean,
                    "backup": r.backup,
                    "same_layer": r.same_layer,
                    **r.repair,
                }
            )
        )
    return {
        "slopes": pa.Table.from_pylist(slopes),
        "responses": pa.concat_tables(responses),
        "points": pa.concat_tables(points),
        "self_repair": pa.Table.from_pylist(repair),
        "neurons": pa.Table.from_pylist(neurons, schema=NEURON_SCHEMA),
    }
