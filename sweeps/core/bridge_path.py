"""The bridge path: models without a fast path, through TransformerLens's own forward and hooks.

Every decoder-only causal language model that TransformerLens 4.3 boots and that has no
family in ``architectures.FAMILIES`` (StableLM, Falcon, Cohere, Mixtral, StarCoder 2,
Granite, ...) runs the backup sweep, the scale sweep and the task report here. Nothing restarts from the
middle: each ablation is one full forward of the bridge (in compatibility mode, so with
HookedTransformer numerics) with a hook on ``hook_z``, as TransformerLens's own patching
does. It is slower than the fast path and exactly as definitional: a head's direct effect is
its ``hook_result`` (``z_h W_O[h]``) dotted with the unembedding direction over the clean
run's ``ln_final.hook_scale``.

That definition holds when every component's write reaches the final norm unchanged, which
an unknown architecture may break (a post-norm, a logit scale). So the first thing a worker
does with a model here is the sum check: every component's direct effect must add up to the
bridge's own logit (difference); a model that fails it is refused with the error, never swept.

Plain functions on a bridge and tensors; no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sweeps.core import effects, metrics, precision
from sweeps.core import transformer as tf
from sweeps.core.attribution import GraphConfig
from sweeps.core.nodes import Node, node_from_name
from tasks.base import TaskData

SUM_CHECK_TOLERANCE = 1e-3  # of the largest |logit difference|, as the report's check


def check_tolerance(bridge) -> float:
    """How far the identities the bridge path checks (the sum check, a node's edges against
    its score, the full and empty circuits) may miss: ``SUM_CHECK_TOLERANCE`` in float32, and
    what a few roundings of the model's dtype explain in bfloat16 or float16 (an architecture
    the definitions do not fit misses by far more, of the order of the values themselves)."""
    return max(SUM_CHECK_TOLERANCE, 16 * precision.unit_roundoff(bridge.W_U.dtype))


class BridgePathError(ValueError):
    """A model the bridge path cannot sweep correctly (found before any shard runs)."""


def stacked(bridge, name: str, shape: tuple[int, ...]) -> Tensor:
    """A stacked weight of the bridge; an absent bias is zero (the bridge raises for one)."""
    try:
        value = getattr(bridge, name)
    except (AttributeError, KeyError):
        value = None
    return torch.zeros(shape) if value is None else value.detach()


def norm_kind(bridge) -> str:
    kind = bridge.cfg.normalization_type
    return "none" if kind is None else "rmsnorm" if kind in ("RMS", "RMSPre") else "layernorm"


def effect_points(bridge, task: TaskData) -> effects.Points:
    """``effects.effect_points`` with the bridge's (compatibility-mode) unembedding."""
    W_U = bridge.W_U.detach().float()  # the directions in float32 (``precision.py``)
    b_U = stacked(bridge, "b_U", (W_U.shape[1],)).to(W_U.device).float()
    if task.kind == "logit_diff":
        batch, pos = torch.arange(task.n_prompts), task.answer_pos
        u = (W_U[:, task.correct] - W_U[:, task.incorrect]).T
        bias = b_U[task.correct] - b_U[task.incorrect]
    else:
        rows = [(b, t) for b in range(task.n_prompts) for t in range(int(task.lengths[b]) - 1)]
        batch = torch.tensor([b for b, _ in rows])
        pos = torch.tensor([t for _, t in rows])
        targets = task.clean[batch, pos + 1]
        u, bias = W_U[:, targets].T, b_U[targets]
    if norm_kind(bridge) == "layernorm":
        u = u - u.mean(-1, keepdim=True)
    return effects.Points(batch, pos, u.contiguous(), bias)


def _names(bridge) -> set[str]:
    L = bridge.cfg.n_layers
    names = {
        "ln_final.hook_scale",
        "hook_embed",
        "hook_pos_embed",
        f"blocks.{L - 1}.hook_resid_post",
        f"blocks.{L - 1}.mlp.hook_post",
    }
    for l in range(L):
        names |= {
            f"blocks.{l}.attn.hook_z",
            f"blocks.{l}.hook_mlp_out",
            f"blocks.{l}.hook_resid_pre",
            f"blocks.{l}.hook_attn_out",
        }
    return names


def run(bridge, tokens: Int[Tensor, "B T"], fwd_hooks=()) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, cache) of one full forward with ``fwd_hooks``, caching what the sweeps read."""
    names = _names(bridge)
    with bridge.hooks(fwd_hooks=list(fwd_hooks)):
        logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in names)
    return logits, {k: v for k, v in cache.items()}


def head_writes(bridge, cache: dict[str, Tensor], layer: int) -> Float[Tensor, "B T H D"]:
    """Each head's ``z_h W_O[h]`` (TransformerLens's ``hook_result``)."""
    return torch.einsum("bthe,hed->bthd", cache[f"blocks.{layer}.attn.hook_z"], bridge.W_O[layer].detach())


def final_scale(cache: dict[str, Tensor], points: effects.Points) -> Float[Tensor, " P"]:
    return cache["ln_final.hook_scale"][points.batch, points.pos, 0].float()


def head_effects(bridge, cache, layer: int, points: effects.Points, scale: Tensor) -> Float[Tensor, "P H"]:
    z = cache[f"blocks.{layer}.attn.hook_z"][points.batch, points.pos].float()  # [P, H, E]
    dirs = torch.einsum("hed,pd->phe", bridge.W_O[layer].detach().float(), points.u) / scale[:, None, None]
    return torch.einsum("phe,phe->ph", z, dirs)


def mlp_effects(cache, layer: int, points: effects.Points, scale: Tensor) -> Float[Tensor, " P"]:
    out = cache.get(f"blocks.{layer}.hook_mlp_out")
    if out is None:
        return torch.zeros(points.n)
    return (out[points.batch, points.pos].float() * points.u).sum(-1) / scale


def last_mlp_out(bridge, cache: dict[str, Tensor]) -> Tensor | None:
    """``W_out`` [M, D] of the last layer's MLP when its neurons (``mlp.hook_post``) rebuild the
    MLP's output in this cached run (``Σ_n a_n W_out[n] + b_out = hook_mlp_out``), else None: a
    mixture of experts, or an MLP whose hooks do not see its neurons this way."""
    L = bridge.cfg.n_layers
    hidden, out = cache.get(f"blocks.{L - 1}.mlp.hook_post"), cache.get(f"blocks.{L - 1}.hook_mlp_out")
    try:
        W_out = bridge.W_out[L - 1].detach().float()
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    if hidden is None or out is None or hidden.shape[-1] != W_out.shape[0]:
        return None
    b_out = stacked(bridge, "b_out", (L, W_out.shape[1])).to(W_out.device)[L - 1].float()
    error = float((hidden.float() @ W_out + b_out - out.float()).abs().max() / out.float().abs().max().clamp(min=1e-6))
    return W_out if error <= check_tolerance(bridge) else None


def last_hidden(bridge, cache: dict[str, Tensor], points: effects.Points) -> Float[Tensor, "P M"]:
    """The last MLP's neuron activations at the points."""
    return cache[f"blocks.{bridge.cfg.n_layers - 1}.mlp.hook_post"][points.batch, points.pos].float()


def decompose(bridge, cache, points: effects.Points) -> effects.Decomposition:
    """Every component's direct effect, from one cached forward."""
    L = bridge.cfg.n_layers
    scale = final_scale(cache, points)
    embed = cache["hook_embed"] + (cache["hook_pos_embed"] if "hook_pos_embed" in cache else 0)
    b_O = stacked(bridge, "b_O", (L, bridge.cfg.d_model)).float()
    return effects.Decomposition(
        embed=(embed[points.batch, points.pos].float() * points.u).sum(-1) / scale,
        heads=torch.stack([head_effects(bridge, cache, l, points, scale) for l in range(L)]),
        attn_bias=torch.stack([(points.u @ b_O[l]) / scale for l in range(L)]),
        mlps=torch.stack([mlp_effects(cache, l, points, scale) for l in range(L)]),
        unembed_bias=points.bias,
        scale=scale,
    )


def final_dot(bridge, cache, points: effects.Points) -> Float[Tensor, " P"]:
    """``x · u`` of a cached run's final stream at the points (``effects.final_read``)."""
    return effects.final_read(view(bridge), cache[f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"], points)[0]


def final_normed(bridge, cache, points: effects.Points) -> Float[Tensor, "P D"]:
    """A cached run's final stream at the points, normalised as the read-out reads it (its
    logits are ``x @ W_U + b_U`` of ``view(bridge)``): what ``--metric`` reads in the backup sweep."""
    final = cache[f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"][points.batch, points.pos]
    return tf.normalize(view(bridge).cfg, final)


def pre_cap_metric(bridge, cache, points: effects.Points) -> Float[Tensor, " P"]:
    """The (centred, pre-cap) logit (difference) at the points, from the final residual."""
    return final_dot(bridge, cache, points) / final_scale(cache, points) + points.bias


@torch.no_grad()
def sum_check(bridge, task: TaskData) -> float:
    """Max |Σ direct effects − the bridge's own logit (difference)| over the task's first prompts,
    relative to the largest |logit (difference)|; raises ``BridgePathError`` above tolerance."""
    small = task.select(slice(0, min(4, task.n_prompts)))
    logits, cache = run(bridge, small.clean)
    points = effect_points(bridge, small)
    total = decompose(bridge, cache, points).total()
    if small.kind == "logit_diff":
        b = points.batch
        real = logits[b, points.pos, small.correct] - logits[b, points.pos, small.incorrect]
    else:
        real = logits[points.batch, points.pos].gather(-1, small.clean[points.batch, points.pos + 1][:, None])[:, 0]
        real = real - logits[points.batch, points.pos].mean(-1)  # the direct effects sum to centred logits
    error = float((total - real).abs().max() / real.abs().max().clamp(min=1e-6))
    if error > check_tolerance(bridge):
        raise BridgePathError(
            f"{bridge.cfg.model_name if hasattr(bridge.cfg, 'model_name') else 'this model'}: its components' direct "
            f"effects do not add up to its logits through TransformerLens's hooks (relative error {error:.1e}); "
            "its architecture writes to the residual stream in a way the sweeps' definitions do not cover yet"
        )
    return error


@torch.no_grad()
def ablate_head(
    bridge,
    tokens: Int[Tensor, "B T"],
    layer: int,
    head: int,
    replacement: Float[Tensor, "B T E"],
    points: effects.Points,
    scale: Float[Tensor, " P"],
    neurons: bool = False,
    keep_normed: bool = False,
) -> effects.LayerAblation:
    """One full forward with head ``(layer, head)``'s ``z`` replaced: every head's and MLP's
    direct effect (clean scale) in layers ``layer..L-1``, and the run's own final stream at
    the points (``G`` = 1); with ``neurons``, the last MLP's neuron activations at the points;
    with ``keep_normed``, the normalised final stream there (``final_normed``)."""

    def patch(z, hook):
        z = z.clone()
        z[:, :, head] = replacement
        return z

    _, cache = run(bridge, tokens, [(f"blocks.{layer}.attn.hook_z", patch)])
    L = bridge.cfg.n_layers
    heads = torch.stack([head_effects(bridge, cache, l, points, scale) for l in range(layer, L)])
    mlps = torch.stack([mlp_effects(cache, l, points, scale) for l in range(layer, L)])
    return effects.LayerAblation(
        layer,
        [head],
        heads[None],
        mlps[None],
        None,
        final_dot(bridge, cache, points)[None],
        final_scale(cache, points)[None],
        final_normed=final_normed(bridge, cache, points)[None] if keep_normed else None,
        last_hidden=last_hidden(bridge, cache, points)[None] if neurons else None,
    )


@torch.no_grad()
def task_report(bridge, task: TaskData, prompt: int | None = 0):
    """``lens.task_report`` through the bridge's hooks: direct logit attribution, the logit
    lens and the attention patterns of one prompt, from one cached forward."""
    from sweeps.core.lens import TaskReport

    L = bridge.cfg.n_layers
    names = _names(bridge) | {f"blocks.{l}.attn.hook_pattern" for l in range(L)}
    logits, cache = bridge.run_with_cache(task.clean, names_filter=lambda name: name in names)
    cache = {k: v for k, v in cache.items()}
    points = effect_points(bridge, task)
    parts = decompose(bridge, cache, points)
    metric = pre_cap_metric(bridge, cache, points)
    if task.kind == "logit_diff":
        correct = (metric > 0).float()
    else:
        targets = task.clean[points.batch, points.pos + 1]
        correct = (logits[points.batch, points.pos].argmax(-1) == targets).float()

    cfg = view(bridge).cfg

    def read(resid: Tensor) -> Tensor:  # normalise this stream with its own scale, unembed
        return (tf.normalize(cfg, resid[points.batch, points.pos]) * points.u).sum(-1) + points.bias

    labels, final_scale, own_scale = ["embed"], [parts.embed], [read(cache["blocks.0.hook_resid_pre"])]
    running = parts.embed
    for layer in range(L):
        running = running + parts.heads[layer].sum(-1) + parts.attn_bias[layer]
        labels.append(f"{layer}_attn")
        final_scale.append(running.clone())
        own_scale.append(read(cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]))
        running = running + parts.mlps[layer]
        after = (
            cache[f"blocks.{layer + 1}.hook_resid_pre"] if layer + 1 < L else cache[f"blocks.{L - 1}.hook_resid_post"]
        )
        labels.append(f"{layer}_mlp")
        final_scale.append(running.clone())
        own_scale.append(read(after))
    patterns = None
    if prompt is not None:
        T = int(task.lengths[prompt])
        patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][prompt, :, :T, :T] for l in range(L)]).float()
    return TaskReport(
        points=points,
        metric=metric,
        correct=correct,
        parts=parts,
        lens_labels=labels,
        lens_final_scale=torch.stack(final_scale) + points.bias,
        lens_own_scale=torch.stack(own_scale),
        patterns=patterns,
    )


# --------------------------------------------------------------------------- #
# The scale sweep through the bridge
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ReadoutConfig:
    """What ``scaling.readout``, ``scaling.node_activation``, ``transformer.normalize`` and
    ``attribution.norm_vjp_`` read of a model's spec (compatibility mode folds the norms'
    weights, so they are weight-free as the fast path's are)."""

    norm: str
    eps: float
    d_vocab: int
    final_softcap: float = 0.0
    post_norm: bool = False
    pre_norm: bool = True


@dataclass
class BridgeView:
    """The bridge's unembedding and output projections in the shape ``scaling`` reads
    (``cfg``, ``W_U``, ``b_U``, ``W_O``, ``device``): the read-out and the node activations
    of the scale sweep are then the fast path's own functions."""

    cfg: ReadoutConfig
    W_U: Tensor
    b_U: Tensor
    W_O: Tensor
    device: torch.device


def view(bridge) -> BridgeView:
    c = bridge.cfg
    W_U = bridge.W_U.detach()
    return BridgeView(
        ReadoutConfig(norm_kind(bridge), float(c.eps), W_U.shape[1]),
        W_U,
        stacked(bridge, "b_U", (W_U.shape[1],)).to(W_U.device, W_U.dtype),
        bridge.W_O.detach(),
        W_U.device,
    )


@torch.no_grad()
def clean_run(bridge, tokens: Int[Tensor, "N T"], batch_size: int) -> tf.CleanRun:
    """A ``CleanRun`` (block inputs, every head's ``z``, every MLP's output, the final stream)
    from the bridge's cached forwards, ``batch_size`` prompts at a time."""
    L = bridge.cfg.n_layers
    parts = []
    for i in range(0, tokens.shape[0], batch_size):
        _, cache = run(bridge, tokens[i : i + batch_size])
        parts.append(
            tf.CleanRun(
                resid_pre=torch.stack([cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)]),
                z=torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(L)]),
                mlp_out=torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)]),
                resid_final=cache[f"blocks.{L - 1}.hook_resid_post"],
            )
        )
    if len(parts) == 1:
        return parts[0]
    return tf.CleanRun(
        *(
            torch.cat([getattr(p, f) for p in parts], 0 if f == "resid_final" else 1)
            for f in ("resid_pre", "z", "mlp_out", "resid_final")
        )
    )


@torch.no_grad()
def patched_final(
    bridge, node: Node, tokens: Int[Tensor, "G T"], delta: Float[Tensor, "G T D"]
) -> Float[Tensor, "G T D"]:
    """The final residual stream of a full forward of ``tokens`` with ``delta`` added where
    ``node`` writes (a head's share of ``hook_attn_out``, or ``hook_mlp_out``)."""
    site = f"blocks.{node.layer}.hook_attn_out" if node.head is not None else f"blocks.{node.layer}.hook_mlp_out"
    L = bridge.cfg.n_layers
    final = f"blocks.{L - 1}.hook_resid_post"
    with bridge.hooks(fwd_hooks=[(site, lambda act, hook: act + delta.to(act.dtype))]):
        _, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name == final)
    return cache[final]


# --------------------------------------------------------------------------- #
# Attribution through the bridge (the textbook recipe: gradients at split q/k/v inputs)
# --------------------------------------------------------------------------- #


def graph_config(bridge) -> GraphConfig:
    c = bridge.cfg
    return GraphConfig(
        c.n_layers,
        c.n_heads,
        getattr(c, "n_key_value_heads", None) or c.n_heads,
        bool(getattr(c, "attn_only", False)),
        bool(getattr(c, "parallel_attn_mlp", False)),
    )


def metric_reference(
    bridge, task: TaskData, clean_logits: Float[Tensor, "B T V"] | None = None
) -> Float[Tensor, "P V"] | None:
    """The clean run's log-probabilities at the task's points, for a metric that compares with
    them (``metrics.NEEDS_REFERENCE``: ``kl``); None for the others. From ``clean_logits`` where
    the caller has run the clean prompts already, else from a forward of them."""
    if task.metric_name not in metrics.NEEDS_REFERENCE:
        return None
    b, pos = effects.point_positions(task)
    with torch.no_grad():
        logits = bridge(task.clean) if clean_logits is None else clean_logits
        return logits[b, pos].float().log_softmax(-1)


def metric_sum(logits: Float[Tensor, "B T V"], task: TaskData, reference: Float[Tensor, "P V"] | None = None) -> Tensor:
    """Σ over the points of the task's metric, in float32 whatever the model's dtype: the logit
    difference, or each next token's log-probability, or the one ``task.metric`` names
    (``metrics.metric_from_logits`` on the bridge's logits at the points; ``reference`` from
    ``metric_reference``)."""
    logits = logits.float()
    name = task.metric_name
    if name not in ("logit_diff", "log_prob"):
        b, pos = effects.point_positions(task)
        at = logits[b.to(logits.device), pos.to(logits.device)]  # [P, V]
        if name in metrics.NEEDS_REFERENCE and reference is None:
            raise ValueError(f"metric {name} needs the clean run's log-probabilities (metric_reference)")
        if task.kind != "logit_diff":
            return metrics.metric_from_logits(name, at, reference=reference).sum()
        correct, incorrect = (t.to(logits.device)[b] for t in task.answer_sets())
        return metrics.metric_from_logits(name, at, correct, incorrect, reference).sum()
    b = torch.arange(task.n_prompts)
    if task.kind == "logit_diff":
        pos = task.answer_pos
        return (logits[b, pos, task.correct] - logits[b, pos, task.incorrect]).sum()
    total = logits.new_zeros(())
    for i in range(task.n_prompts):
        T = int(task.lengths[i])
        total = total + logits[i, : T - 1].log_softmax(-1).gather(-1, task.clean[i, 1:T, None]).sum()
    return total


def node_write_names(n_layers: int) -> set[str]:
    """The hooks ``node_write`` reads: cache these to take every node's write from a run."""
    return (
        {"blocks.0.hook_resid_pre"}
        | {f"blocks.{l}.attn.hook_z" for l in range(n_layers)}
        | {f"blocks.{l}.hook_mlp_out" for l in range(n_layers)}
    )


def node_write(cache, W_O: Tensor, u: str) -> Tensor:
    """What upstream node ``u`` of the attribution graph adds to the stream, from a run's
    ``cache``: the embedding (block 0's input), ``z_h W_O[h]`` of a head, an MLP's output."""
    if u == "embed":
        return cache["blocks.0.hook_resid_pre"]
    node = node_from_name(u)
    if node.head is None:
        return cache[f"blocks.{node.layer}.hook_mlp_out"]
    return cache[f"blocks.{node.layer}.attn.hook_z"][:, :, node.head] @ W_O[node.layer, node.head]


def mlp_stream(layer: int, parallel: bool) -> str:
    """The hook on the residual stream an MLP reads (before its weight-free norm)."""
    return f"blocks.{layer}.{'hook_resid_pre' if parallel else 'ln2.hook_in'}"


def mlp_input_hooks(cfg, layer: int, parallel: bool, edit) -> list:
    """Hooks that give the MLP of ``layer`` alone ``normalize(edit(x))`` for its input, ``x``
    the stream it reads in this run; every other reader of that stream still sees ``x``."""
    seen: dict[str, Tensor] = {}

    def keep(act, hook):
        seen["x"] = act
        return act

    return [
        (mlp_stream(layer, parallel), keep),
        (f"blocks.{layer}.mlp.hook_in", lambda act, hook: tf.normalize(cfg, edit(seen["x"]))),
    ]


def attribute(bridge, graph, task: TaskData, steps: int = 1):
    """Node and edge scores of one batch (``attribution.BatchAttribution``) from one corrupt
    forward and ``steps`` forwards and backwards of the bridge, with gradients kept at every
    downstream input: each head's own copy of the stream for q, k and v (split inputs), the
    MLP's normalised input (pulled back through its weight-free norm by hand) and the final
    stream. Node scores are taken directly (the gradient where the node writes), and the
    edges are checked against them: by the chain rule a node's edges sum to its score, so a
    bridge whose hooks do not see the graph this way raises instead of returning scores.

    ``steps`` > 1 is EAP-IG-inputs: the gradients are averaged over runs whose embedded
    inputs (``blocks.0.hook_resid_pre``) lie at ``k / steps`` (k = steps..1) of the way from
    the corrupt to the clean ones, the first of them the clean run itself; the changes they
    multiply stay ``clean − corrupt`` (as ``attribution.attribute``)."""
    from sweeps.core.attribution import BatchAttribution, ig_alphas, node_scores, norm_vjp_

    L, cfg = bridge.cfg.n_layers, view(bridge).cfg
    parallel = graph_config(bridge).parallel_attn_mlp
    W_O = bridge.W_O.detach()
    # Every node's write, and where the heads' writes land (a head's gradient after it)
    writes = node_write_names(L) | {f"blocks.{l}.hook_attn_out" for l in range(L)}
    reads = (
        [f"blocks.{l}.hook_{x}_input" for l in range(L) for x in "qkv"]
        + [f"blocks.{l}.mlp.hook_in" for l in range(L)]
        + ["ln_final.hook_in"]
        + [mlp_stream(l, parallel) for l in range(L)]
    )
    with torch.no_grad():
        corrupt_logits, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n in writes)
    reference = metric_reference(bridge, task)

    def run_with_grads(alpha: float) -> tuple[dict[str, Tensor], Tensor]:
        """One forward (inputs ``alpha`` of the way from corrupt to clean) and backward: every
        write and read with its gradient, and the metric."""
        acts: dict[str, Tensor] = {}

        def interpolate(act, hook):
            base = corrupt["blocks.0.hook_resid_pre"]
            return base + alpha * (act - base)

        def keep(name: str):
            def hook(act, hook):
                if name.endswith("mlp.hook_in") or name == "ln_final.hook_in":
                    act = act.clone()  # a copy read by this input alone
                if act.requires_grad:
                    act.retain_grad()
                acts[name] = act
                return act

            return hook

        hooks = [] if alpha == 1 else [("blocks.0.hook_resid_pre", interpolate)]
        hooks += [(n, keep(n)) for n in sorted(set(writes) | set(reads))]
        bridge.set_use_split_qkv_input(True)
        try:
            with torch.enable_grad():
                metric = metric_sum(bridge.run_with_hooks(task.clean, fwd_hooks=hooks), task, reference)
                metric.backward()
        finally:
            bridge.set_use_split_qkv_input(False)
        return acts, metric.detach()

    acts, clean_metric = run_with_grads(1.0)
    clean_acts = acts

    def delta(u: str) -> Tensor:
        return node_write(clean_acts, W_O, u).detach() - node_write(corrupt, W_O, u)

    def grad(name: str) -> Tensor:
        value = acts[name].grad
        assert value is not None, f"no gradient reached {name}"
        return value

    def grad_after(u: str) -> Tensor:
        if u == "embed":
            return grad("blocks.0.hook_resid_pre")
        node = node_from_name(u)
        return grad(f"blocks.{node.layer}.{'hook_mlp_out' if node.head is None else 'hook_attn_out'}")

    def grad_at(d) -> Tensor:
        if d.input in ("q", "k", "v"):
            return grad(f"blocks.{d.layer}.hook_{d.input}_input")[:, :, d.head]
        if d.input == "mlp":
            x = acts[mlp_stream(d.layer, parallel)].detach()
            return norm_vjp_(cfg, x, grad(f"blocks.{d.layer}.mlp.hook_in")[None].clone())[0]
        return grad("ln_final.hook_in")

    with torch.no_grad():
        deltas = {u: delta(u).float() for u in graph.upstream}
    nodes = torch.zeros(len(graph.upstream), dtype=torch.float64)
    edges = torch.zeros(graph.n_edges, dtype=torch.float64)
    for alpha in ig_alphas(steps):
        if alpha != 1:
            acts, _ = run_with_grads(alpha)
        with torch.no_grad():
            nodes += torch.tensor(
                [float((grad_after(u).float() * deltas[u]).sum()) for u in graph.upstream], dtype=torch.float64
            )
            run_edges = []
            for d, p in zip(graph.downstream, graph.prefix):
                g = grad_at(d).float()
                run_edges += [float((g * deltas[u]).sum()) for u in graph.upstream[:p]]
            edges += torch.tensor(run_edges, dtype=torch.float64)
    nodes, edges = nodes / steps, edges / steps
    summed = node_scores(graph, edges)
    error = float((summed - nodes).abs().max() / nodes.abs().max().clamp(min=1e-6))
    if error > check_tolerance(bridge):
        raise BridgePathError(
            f"attribution through the bridge's hooks: a node's edges do not sum to its score "
            f"(relative error {error:.1e}); this architecture's inputs are not hooked as the graph assumes"
        )
    return BatchAttribution(
        nodes=nodes,
        edges=edges,
        clean_metric=float(clean_metric),
        corrupt_metric=float(metric_sum(corrupt_logits, task, reference)),
        n_points=int(effect_points(bridge, task).n),
    )


@torch.no_grad()
def patch_metric(bridge, graph, task: TaskData, targets) -> Float[Tensor, " n"]:
    """``attribution.patch_metric`` through hooks: Σ metric with each target's corrupt value
    patched into a full clean forward. A node: its write is replaced by its corrupt write for
    every reader. An edge ``u → d``: only ``d``'s input sees it (``d``'s own split q/k/v input,
    the MLP's normalised input recomputed from the changed stream, or the final stream)."""
    L, cfg = bridge.cfg.n_layers, view(bridge).cfg
    parallel = graph_config(bridge).parallel_attn_mlp
    W_O = bridge.W_O.detach()
    writes = node_write_names(L)
    _, clean = bridge.run_with_cache(task.clean, names_filter=lambda n: n in writes)
    _, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n in writes)
    reference = metric_reference(bridge, task)

    def change(u: str) -> tuple[str, Tensor]:
        """(where u writes, corrupt − clean of its write)."""
        if u == "embed":
            site = "blocks.0.hook_resid_pre"
        else:
            node = node_from_name(u)
            site = f"blocks.{node.layer}.{'hook_mlp_out' if node.head is None else 'hook_attn_out'}"
        return site, node_write(corrupt, W_O, u) - node_write(clean, W_O, u)

    out = []
    bridge.set_use_split_qkv_input(True)
    try:
        for target in targets:
            site, delta = change(target.upstream)
            hooks = []
            if target.downstream is None:
                hooks.append((site, lambda act, hook, delta=delta: act + delta))
            else:
                d = next(x for x in graph.downstream if x.name == target.downstream and x.input == target.input)
                if d.input in ("q", "k", "v"):

                    def one_head(act, hook, delta=delta, h=d.head):
                        act = act.clone()
                        act[:, :, h] = act[:, :, h] + delta
                        return act

                    hooks.append((f"blocks.{d.layer}.hook_{d.input}_input", one_head))
                elif d.input == "mlp":
                    hooks += mlp_input_hooks(cfg, d.layer, parallel, lambda x, delta=delta: x + delta)
                else:
                    hooks.append(("ln_final.hook_in", lambda act, hook, delta=delta: act + delta))
            logits = bridge.run_with_hooks(task.clean, fwd_hooks=hooks)
            out.append(float(metric_sum(logits, task, reference)))
    finally:
        bridge.set_use_split_qkv_input(False)
    return torch.tensor(out, dtype=torch.float64)


class CircuitRunner:
    """``circuit_eval.CircuitRunner`` through hooks: the metric of circuits of one batch, each a
    full clean forward of the bridge in which every downstream input (each head's own split
    q/k/v input, the MLP's normalised input recomputed from its edited stream, the final
    stream) subtracts ``a_u − a*_u`` of every upstream node whose edge to it is outside the
    circuit, ``a_u`` taken in this same forward as it is written.

    The two identities of the definition are checked on the batch before any circuit runs
    (the full circuit is the clean run, the empty one the corrupt run): a bridge whose hooks do
    not see the graph this way raises ``BridgePathError`` instead of returning wrong numbers."""

    def __init__(self, bridge, graph, task: TaskData):
        self.bridge, self.graph, self.task = bridge, graph, task
        L = bridge.cfg.n_layers
        self.cfg = view(bridge).cfg
        self.parallel = graph_config(bridge).parallel_attn_mlp
        self.W_O = bridge.W_O.detach()
        writes = node_write_names(L)
        with torch.no_grad():
            corrupt_logits, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n in writes)
            self.corrupt_out = torch.stack(
                [node_write(corrupt, self.W_O, u) for u in graph.upstream]
            )  # a*_u: [U B T D]
            clean_logits = bridge(task.clean)
            self.reference = metric_reference(bridge, task, clean_logits)
            self.corrupt_metric = float(metric_sum(corrupt_logits, task, self.reference))
            self.clean_metric = float(metric_sum(clean_logits, task, self.reference))
        self.n_points = int(effect_points(bridge, task).n)
        self.offsets = [0, *np.cumsum(graph.prefix)[:-1].tolist()]
        self.row = {(d.layer, d.input, d.head): i for i, d in enumerate(graph.downstream)}
        self.index = {u: i for i, u in enumerate(graph.upstream)}
        n = graph.n_edges
        for name, mask, expected in (
            ("full", torch.ones(n, dtype=torch.bool), self.clean_metric),
            ("empty", torch.zeros(n, dtype=torch.bool), self.corrupt_metric),
        ):
            got = self.metric(mask)
            if abs(got - expected) > check_tolerance(bridge) * max(1.0, abs(self.clean_metric - self.corrupt_metric)):
                raise BridgePathError(
                    f"circuit evaluation through the bridge's hooks: the {name} circuit gives "
                    f"{got:.4f}, not {expected:.4f}; this architecture's inputs are not hooked "
                    "as the graph assumes"
                )

    @torch.no_grad()
    def metric(self, mask: Bool[Tensor, " n_edges"]) -> float:
        """Σ metric over the batch's points with the edges of ``mask`` carrying this run's values
        and every other edge its upstream node's corrupt-run value."""
        graph, L = self.graph, self.bridge.cfg.n_layers
        if mask.shape[0] != graph.n_edges:
            raise ValueError(f"a circuit mask of {mask.shape[0]} edges for a graph of {graph.n_edges}")
        mask = mask.to(self.corrupt_out.device)
        diff = torch.zeros_like(self.corrupt_out)  # a_u − a*_u of this run: row u is written when u runs
        B, T, D = diff.shape[1:]
        index = self.index

        def removed(rows: list[int]) -> Float[Tensor, "n B T D"]:
            """Σ over each downstream row's out-of-circuit edges of (a_u − a*_u)."""
            p = graph.prefix[rows[-1]]
            outside = torch.stack([~mask[self.offsets[i] : self.offsets[i] + p] for i in rows]).to(diff.dtype)
            return (outside @ diff[:p].flatten(1)).view(len(rows), B, T, D)

        def record(u: str, write=None):
            def hook(act, hook):
                value = act if write is None else write(act)
                diff[index[u]] = value - self.corrupt_out[index[u]]
                return act

            return hook

        def heads_of(layer: int):
            rows = [index[f"L{layer}H{h}"] for h in range(self.bridge.cfg.n_heads)]

            def hook(z, hook):
                writes = head_writes(self.bridge, {f"blocks.{layer}.attn.hook_z": z}, layer)  # [B T H D]
                diff[rows] = writes.permute(2, 0, 1, 3) - self.corrupt_out[rows]
                return z

            return hook

        def split_input(layer: int, which: str):
            def hook(act, hook):  # [B T n D]: each head's own copy of the stream
                rows = [self.row[layer, which, j] for j in range(act.shape[2])]
                return act - removed(rows).permute(1, 2, 0, 3)

            return hook

        hooks = [("blocks.0.hook_resid_pre", record("embed"))]
        for layer in range(L):
            hooks += [(f"blocks.{layer}.hook_{x}_input", split_input(layer, x)) for x in "qkv"]
            hooks.append((f"blocks.{layer}.attn.hook_z", heads_of(layer)))
            if (layer, "mlp", None) in self.row:
                row = self.row[layer, "mlp", None]
                hooks += mlp_input_hooks(self.cfg, layer, self.parallel, lambda x, row=row: x - removed([row])[0])
                hooks.append((f"blocks.{layer}.hook_mlp_out", record(f"mlp{layer}")))
        final = len(graph.downstream) - 1
        hooks.append(("ln_final.hook_in", lambda act, hook: act - removed([final])[0]))
        self.bridge.set_use_split_qkv_input(True)
        try:
            logits = self.bridge.run_with_hooks(self.task.clean, fwd_hooks=hooks)
        finally:
            self.bridge.set_use_split_qkv_input(False)
        return float(metric_sum(logits, self.task, self.reference))
