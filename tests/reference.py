"""Independent, straightforward implementations to check the engine against.

Everything here goes through the TransformerLens bridge (full forwards, full
activation caches, hooks), the way a hooked notebook loop does it, never through
``sweeps.core.transformer``.
"""

from __future__ import annotations

import numpy as np
import torch


def answer_directions(bridge, task):
    """[B, D] correct-minus-incorrect unembedding directions and answer positions."""
    W_U = bridge.W_U
    return (W_U[:, task.correct] - W_U[:, task.incorrect]).T, task.lengths - 1


def logit_diffs(bridge, task) -> torch.Tensor:
    logits = bridge(task.clean)
    b = torch.arange(task.n_prompts)
    pos = task.lengths - 1
    return logits[b, pos, task.correct] - logits[b, pos, task.incorrect]


def head_direct_effects(bridge, cache, clean_scale, task) -> torch.Tensor:
    """[L, B, H] direct effect of every head at the answer, from the full hook_result cache."""
    dirs, pos = answer_directions(bridge, task)
    b = torch.arange(task.n_prompts)
    L = bridge.cfg.n_layers
    out = []
    for layer in range(L):
        result = cache[f"blocks.{layer}.attn.hook_result"][b, pos]  # [B, H, D]
        if bridge.cfg.normalization_type not in ("RMS", "RMSPre"):
            result = result - result.mean(-1, keepdim=True)
        out.append(torch.einsum("bhd,bd->bh", result, dirs) / clean_scale[:, None])
    return torch.stack(out)


def mlp_direct_effects(bridge, cache, clean_scale, task) -> torch.Tensor:
    """[L, B] direct effect of every MLP's output at the answer."""
    dirs, pos = answer_directions(bridge, task)
    b = torch.arange(task.n_prompts)
    out = []
    for layer in range(bridge.cfg.n_layers):
        mlp = cache[f"blocks.{layer}.hook_mlp_out"][b, pos]
        if bridge.cfg.normalization_type not in ("RMS", "RMSPre"):
            mlp = mlp - mlp.mean(-1, keepdim=True)
        out.append(torch.einsum("bd,bd->b", mlp, dirs) / clean_scale)
    return torch.stack(out)


def resample_caches(bridge, task, layer: int, head: int):
    """Full activation caches of the clean run and of the run with one head's ``hook_z``
    resampled from the corrupt prompts (a hook on a full forward, as a hooked notebook loop does)."""
    _, clean_cache = bridge.run_with_cache(task.clean)
    _, corrupt_cache = bridge.run_with_cache(task.corrupt)
    name = f"blocks.{layer}.attn.hook_z"

    def patch(z, hook):
        z = z.clone()
        z[:, :, head] = corrupt_cache[name][:, :, head]
        return z

    with bridge.hooks(fwd_hooks=[(name, patch)]):
        _, ablated_cache = bridge.run_with_cache(task.clean)
    return clean_cache, ablated_cache


def resample_backup(bridge, task, layer: int, head: int):
    """the hooked reference recipe for one head: (clean DE [L,B,H], ablated DE [L,B,H], slope, intercept,
    change of every MLP's direct effect [L, B])."""
    b = torch.arange(task.n_prompts)
    pos = task.lengths - 1
    clean_cache, ablated_cache = resample_caches(bridge, task, layer, head)
    clean_scale = clean_cache["ln_final.hook_scale"][b, pos, 0]
    clean = head_direct_effects(bridge, clean_cache, clean_scale, task)
    ablated = head_direct_effects(bridge, ablated_cache, clean_scale, task)
    backup = (ablated - clean)[layer + 1 :].sum((0, 2)).numpy()
    x = clean[layer, :, head].numpy()
    slope, intercept = np.linalg.lstsq(np.vstack([x, np.ones_like(x)]).T, backup, rcond=None)[0]
    mlp_delta = mlp_direct_effects(bridge, ablated_cache, clean_scale, task) - mlp_direct_effects(
        bridge, clean_cache, clean_scale, task
    )
    return clean, ablated, float(slope), float(intercept), mlp_delta


def next_token_backup(bridge, task, layer: int, head: int):
    """The hooked reference on text: (clean DE of the head, accumulated backup), both [B * (T-1)], row-major."""
    clean_cache, ablated_cache = resample_caches(bridge, task, layer, head)
    scale = clean_cache["ln_final.hook_scale"][:, :-1]  # [B, T-1, 1]
    directions = bridge.W_U[:, task.clean[:, 1:]].permute(1, 2, 0)  # [B, T-1, D]: next tokens

    def effects(cache):  # [L, B, T-1, H], centring each head's write as LayerNorm does
        out = []
        for l in range(bridge.cfg.n_layers):
            r = cache[f"blocks.{l}.attn.hook_result"][:, :-1]
            r = r - r.mean(-1, keepdim=True)
            out.append(torch.einsum("bthd,btd->bth", r / scale[..., None], directions))
        return torch.stack(out)

    clean, ablated = effects(clean_cache), effects(ablated_cache)
    backup = (ablated - clean)[layer + 1 :].sum((0, 3))
    return clean[layer, :, :, head].flatten().numpy(), backup.flatten().numpy()


def node_hook(layer: int, head: int | None) -> str:
    return f"blocks.{layer}.hook_mlp_out" if head is None else f"blocks.{layer}.attn.hook_result"


def scale_patch_effects(bridge, task, pairs, layer, head, scales, replace=None, source_tokens=None):
    """The hooked reference recipe, one (base, source) pair at a time with hooks on full forwards,
    for each scale in ``scales``: a pair's source activation and unpatched logits do not depend
    on the scale, so each pair runs them once, then one patched forward per scale.

    ``replace(a_base, a_source, scale) -> a_new`` acts on one prompt's [T, D]
    activation (default: ``scale * a_source``, the usual scale-ablation loop's first half).
    ``source_tokens`` defaults to the clean prompts. Returns, per scale, (fraction of
    answer points whose top-1 token changed, summed clean - patched metric,
    number of points).
    """
    replace = replace or (lambda a, s, k: k * s)
    name = node_hook(layer, head)
    source_tokens = task.clean if source_tokens is None else source_tokens
    changed, drop = [0.0] * len(scales), [0.0] * len(scales)
    points = 0.0
    for base, source in pairs:
        T = int(task.lengths[base])
        _, src_cache = bridge.run_with_cache(source_tokens[source : source + 1, :T])
        src = src_cache[name][0] if head is None else src_cache[name][0, :, head]
        tokens = task.clean[base : base + 1, :T]
        clean_logits = bridge(tokens)[0]
        if task.metric not in (None, "logit_diff", "log_prob"):  # chosen with --metric: by hand
            one = task.select([base])
            pos = [T - 1] if task.kind == "logit_diff" else list(range(T - 1))
            metric = lambda lg, one=one, clean=clean_logits: metric_by_hand(lg[None], one, lambda: clean[None])  # noqa: E731
        elif task.kind == "logit_diff":
            pos = [T - 1]
            right, wrong = int(task.correct[base]), int(task.incorrect[base])
            metric = lambda lg: lg[pos, right] - lg[pos, wrong]  # noqa: E731
        else:
            pos = list(range(T - 1))
            targets = tokens[0, 1:]
            metric = lambda lg: lg[pos].log_softmax(-1)[torch.arange(T - 1), targets]  # noqa: E731
        for i, scale in enumerate(scales):

            def patch(act, hook, scale=scale):
                act = act.clone()
                if head is None:
                    act[0] = replace(act[0], src, scale)
                else:
                    act[0, :, head] = replace(act[0, :, head], src, scale)
                return act

            with bridge.hooks(fwd_hooks=[(name, patch)]):
                logits = bridge(tokens)[0]
            changed[i] += float((logits[pos].argmax(-1) != clean_logits[pos].argmax(-1)).sum())
            drop[i] += float((metric(clean_logits) - metric(logits)).sum())
        points += len(pos)
    return [(c / points, d, points) for c, d in zip(changed, drop)]


def scale_patch_effect(bridge, task, pairs, layer, head, scale, replace=None, source_tokens=None):
    """``scale_patch_effects`` for one scale: (fraction changed, summed metric drop, points)."""
    return scale_patch_effects(bridge, task, pairs, layer, head, [scale], replace, source_tokens)[0]


# --------------------------------------------------------------------------- #
# Attribution patching (the textbook recipe: hooks on split q/k/v inputs)
# --------------------------------------------------------------------------- #


def _upstream_hook(name: str) -> tuple[str, int | None]:
    if name == "embed":
        return "blocks.0.hook_resid_pre", None
    if name.startswith("mlp"):
        return f"blocks.{int(name[3:])}.hook_mlp_out", None
    layer, head = map(int, name[1:].split("H"))
    return f"blocks.{layer}.attn.hook_result", head


def _input_hook(bridge, layer: int, input: str) -> str:
    """Where a downstream input is read. The bridge's ``hook_mlp_in`` is not a
    separate copy of the stream (its gradient includes the skip connection), so
    the MLP's input is taken at ``ln2.hook_in`` and cloned there."""
    if input in ("q", "k", "v"):
        return f"blocks.{layer}.hook_{input}_input"
    if input == "mlp":
        return f"blocks.{layer}.ln2.hook_in"
    return "ln_final.hook_in"


def _n_kv(bridge) -> int:
    return getattr(bridge.cfg, "n_key_value_heads", None) or bridge.cfg.n_heads


def _select_head(bridge, act, input: str, head: int | None):
    """One head's slice of a split q/k/v input. A key/value input split per query
    head (rather than per key/value head) is summed over the heads sharing it."""
    if head is None:
        return act
    if input in ("k", "v") and act.shape[2] != _n_kv(bridge):
        group = act.shape[2] // _n_kv(bridge)
        return act[:, :, head * group : (head + 1) * group].sum(2)
    return act[:, :, head]


def ld_or_logp_sum(bridge, logits, task):
    """Σ over the task's points of its metric, from full logits, by hand (``metric_by_hand``
    for a metric chosen with ``--metric``)."""
    if task.metric not in (None, "logit_diff", "log_prob"):
        return metric_by_hand(logits, task, lambda: bridge(task.clean)).sum()
    b = torch.arange(task.n_prompts)
    if task.kind == "logit_diff":
        pos = task.lengths - 1
        return (logits[b, pos, task.correct] - logits[b, pos, task.incorrect]).sum()
    total = 0.0
    for i in range(task.n_prompts):
        T = int(task.lengths[i])
        logp = logits[i, : T - 1].log_softmax(-1)
        total = total + logp[torch.arange(T - 1), task.clean[i, 1:T]].sum()
    return total


class split_inputs:
    """Context: the bridge with split q/k/v inputs and an MLP-input hook (restored after)."""

    def __init__(self, bridge):
        self.bridge = bridge

    def __enter__(self):
        self.bridge.set_use_split_qkv_input(True)
        return self.bridge

    def __exit__(self, *exc):
        self.bridge.set_use_split_qkv_input(False)


def attribution_by_hooks(bridge, task, graph, downstream=lambda d: True) -> tuple[np.ndarray, np.ndarray]:
    """(node scores, edge scores in graph order), raw sums: the textbook recipe's two forwards and one
    backward with gradients cached at every split input, then grad · (clean − corrupt).
    Edges into downstream inputs that ``downstream(d)`` rejects are left NaN."""
    L = bridge.cfg.n_layers
    with split_inputs(bridge):
        ups = sorted({_upstream_hook(u)[0] for u in graph.upstream})
        reads = sorted({_input_hook(bridge, d.layer, d.input) for d in graph.downstream})
        _, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n in ups)
        acts = {}

        def keep(name):
            def hook(act, hook):
                if name.endswith("ln2.hook_in") or name == "ln_final.hook_in":
                    act = act.clone()
                act.retain_grad()
                acts[name] = act
                return act

            return hook

        with torch.enable_grad():
            logits = bridge.run_with_hooks(task.clean, fwd_hooks=[(n, keep(n)) for n in sorted(set(ups) | set(reads))])
            ld_or_logp_sum(bridge, logits, task).backward()

    def delta(u):
        name, head = _upstream_hook(u)
        d = acts[name].detach() - corrupt[name]
        return d if head is None else d[:, :, head]

    def grad_after(u):  # gradient of the stream the node writes into
        name, head = _upstream_hook(u)
        g = acts[name].grad
        return g if head is None else g[:, :, head]

    nodes = np.array([float((grad_after(u) * delta(u)).sum()) for u in graph.upstream])
    edges = []
    for d, p in zip(graph.downstream, graph.prefix):
        if not downstream(d):
            edges.extend([float("nan")] * p)
            continue
        g = _select_head(bridge, acts[_input_hook(bridge, d.layer, d.input)].grad, d.input, d.head)
        edges.extend(float((g * delta(u)).sum()) for u in graph.upstream[:p])
    assert len(edges) == graph.n_edges and L == bridge.cfg.n_layers
    return nodes, np.array(edges)


def patched_metric_by_hooks(bridge, task, upstream: str, downstream=None) -> float:
    """Σ metric with node ``upstream`` (or only edge ``upstream → downstream``) patched
    to its corrupt value, by hooks on full forwards."""
    name, head = _upstream_hook(upstream)
    with split_inputs(bridge):
        _, clean = bridge.run_with_cache(task.clean, names_filter=lambda n: n == name)
        _, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n == name)
        change = corrupt[name] - clean[name]
        if head is not None:
            change = change[:, :, head]
        if downstream is None:
            def hook(act, hook):
                act = act.clone()
                if head is None:
                    return act + change
                act[:, :, head] = act[:, :, head] + change
                return act

            where = name
        else:
            where = _input_hook(bridge, downstream.layer, downstream.input)

            def hook(act, hook):
                act = act.clone()
                if downstream.head is None:
                    return act + change
                h = downstream.head
                if downstream.input in ("k", "v") and act.shape[2] != _n_kv(bridge):
                    g = act.shape[2] // _n_kv(bridge)
                    act[:, :, h * g : (h + 1) * g] += change[:, :, None]
                else:
                    act[:, :, h] = act[:, :, h] + change
                return act

        logits = bridge.run_with_hooks(task.clean, fwd_hooks=[(where, hook)])
    return float(ld_or_logp_sum(bridge, logits, task))


def ig_attribution_by_hooks(bridge, task, graph, steps: int, activations: bool = False) -> np.ndarray:
    """EAP-IG edge scores (raw sums, graph order) by hooks on full forwards of the clean
    prompts: the gradient at each split input, averaged over ``steps`` runs with an activation
    set to ``corrupt + k/steps (clean − corrupt)`` (k = 1..steps), times ``clean_u − corrupt_u``.
    Inputs: the interpolated activation is the embedding (``blocks.0.hook_resid_pre``) and
    every edge uses those runs. Activations: one group at a time (the embedding, one layer's
    heads' results, one MLP's output), and the edges out of a group use its own runs."""
    with split_inputs(bridge):
        ups = sorted({_upstream_hook(u)[0] for u in graph.upstream})
        reads = sorted({_input_hook(bridge, d.layer, d.input) for d in graph.downstream})
        _, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n in ups)
        _, clean = bridge.run_with_cache(task.clean, names_filter=lambda n: n in ups)

        def gradients(name: str, alpha: float) -> dict:
            acts = {}

            def interpolate(act, hook):  # a leaf: the gradient flows from here on
                return (corrupt[name] + alpha * (clean[name] - corrupt[name])).requires_grad_(True)

            def keep(read):
                def hook(act, hook):
                    act = act.clone()
                    act.retain_grad()
                    acts[read] = act
                    return act

                return hook

            with torch.enable_grad():
                logits = bridge.run_with_hooks(task.clean, fwd_hooks=[(name, interpolate)] + [(r, keep(r)) for r in reads])
                ld_or_logp_sum(bridge, logits, task).backward()
            return {r: acts[r].grad for r in reads}

        groups = sorted({_upstream_hook(u)[0] for u in graph.upstream}) if activations else ["blocks.0.hook_resid_pre"]
        edges = np.zeros(graph.n_edges)
        for group in groups:
            for k in range(1, steps + 1):
                grads = gradients(group, k / steps)
                i = 0
                for d, p in zip(graph.downstream, graph.prefix):
                    g = grads[_input_hook(bridge, d.layer, d.input)]
                    if g is None:  # read before the interpolated group: no gradient reaches it
                        i += p
                        continue
                    g = _select_head(bridge, g, d.input, d.head)
                    for j, u in enumerate(graph.upstream[:p]):
                        name, head = _upstream_hook(u)
                        if not activations or name == group:
                            change = clean[name] - corrupt[name]
                            change = change if head is None else change[:, :, head]
                            edges[i + j] += float((g * change).sum())
                    i += p
    return edges / steps


def circuit_metric_by_hooks(bridge, task, graph, edges: set[tuple[str, str, str]]) -> float:
    """Σ metric of the clean prompts where each downstream input reads its stream minus
    (this run's − the corrupt run's) output of every upstream node whose edge to it is not in
    ``edges`` ((upstream, downstream name, input) triples): hooks capture each node's output
    as the run makes it, and every split q/k/v input, MLP input and the final stream is edited."""
    with split_inputs(bridge):
        ups = sorted({_upstream_hook(u)[0] for u in graph.upstream})
        _, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n in ups)
        current = {}
        by_read: dict[str, list] = {}
        for d, p in zip(graph.downstream, graph.prefix):
            by_read.setdefault(_input_hook(bridge, d.layer, d.input), []).append((d, p))

        def capture(name):  # hooks are keyed by the name asked for (the bridge may alias it)
            def hook(act, hook):
                current[name] = act.detach().clone()
                return act
            return hook

        def read(name):
            def hook(act, hook):
                return edited(act, name)
            return hook

        def edited(act, where):
            act = act.clone()
            for d, p in by_read[where]:
                change = torch.zeros(())
                for u in graph.upstream[:p]:
                    if (u, d.name, d.input) in edges:
                        continue
                    name, head = _upstream_hook(u)
                    diff = current[name] - corrupt[name]
                    change = change + (diff if head is None else diff[:, :, head])
                if d.head is None:
                    act = act - change
                elif d.input in ("k", "v") and act.shape[2] != _n_kv(bridge):
                    g = act.shape[2] // _n_kv(bridge)
                    act[:, :, d.head * g : (d.head + 1) * g] -= change[:, :, None]
                else:
                    act[:, :, d.head] -= change
            return act

        logits = bridge.run_with_hooks(task.clean, fwd_hooks=[(n, capture(n)) for n in ups] + [(n, read(n)) for n in by_read])
    return float(ld_or_logp_sum(bridge, logits, task))


def node_circuit_metric_by_hooks(bridge, task, nodes: set[str], upstream: list[str]) -> float:
    """Σ metric of the clean prompts with every node outside ``nodes`` giving its corrupt
    output: hooks replace each such head's result, MLP output or the embedding."""
    outside = [u for u in upstream if u not in nodes]
    names = sorted({_upstream_hook(u)[0] for u in outside})
    _, corrupt = bridge.run_with_cache(task.corrupt, names_filter=lambda n: n in names)
    heads: dict[str, list[int]] = {}
    for u in outside:
        name, head = _upstream_hook(u)
        heads.setdefault(name, []).append(head)

    def patch(name):  # keyed by the name asked for (the bridge may alias it)
        def hook(act, hook):
            act = act.clone()
            for head in heads[name]:
                if head is None:
                    act = corrupt[name].clone()
                else:
                    act[:, :, head] = corrupt[name][:, :, head]
            return act
        return hook

    logits = bridge.run_with_hooks(task.clean, fwd_hooks=[(n, patch(n)) for n in names])
    return float(ld_or_logp_sum(bridge, logits, task))


def metric_by_hand(logits, task, clean_logits):
    """The chosen metric at each point, from a run's full logits ``[B, T, V]``, written out
    plainly (softmax, sums over the answer lists, KL term by term); ``clean_logits()`` gives the
    clean run's logits (``kl``). Answer tasks read each prompt's last real token; text reads every
    position but the last."""
    logits = logits.float()
    if task.kind == "logit_diff":
        rows = [(i, int(task.lengths[i]) - 1) for i in range(task.n_prompts)]
    else:
        rows = [(i, t) for i in range(task.n_prompts) for t in range(int(task.lengths[i]) - 1)]
    out = []
    clean = None
    for i, t in rows:
        z = logits[i, t]
        p = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        if task.metric == "kl":
            if clean is None:
                with torch.no_grad():
                    clean = clean_logits().float()
            q = torch.softmax(clean[i, t], -1)
            out.append(-(q * (torch.log(q) - torch.log(p))).sum())
            continue
        right = [int(x) for x in (task.correct_set[i] if task.correct_set is not None else task.correct[i:i + 1]) if x >= 0]
        wrong = [int(x) for x in (task.incorrect_set[i] if task.incorrect_set is not None else task.incorrect[i:i + 1]) if x >= 0]
        if task.metric in (None, "logit_diff"):
            out.append(z[right[0]] - z[wrong[0]])
        elif task.metric == "prob_diff":
            out.append(p[right[0]] - p[wrong[0]])
        elif task.metric == "greater_than":
            out.append(sum(p[r] for r in right) - sum(p[w] for w in wrong))
        elif task.metric == "accuracy":
            out.append(torch.tensor(float(max(float(z[r]) for r in right) > max(float(z[w]) for w in wrong))))
        else:
            raise ValueError(task.metric)
    return torch.stack(out)
