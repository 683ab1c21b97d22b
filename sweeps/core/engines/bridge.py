"""The bridge engine: TransformerLens's own forward and hooks, for models with no fast path.

Nothing restarts from the middle: each edit is one full forward of the bridge (in
compatibility mode, so with HookedTransformer numerics) with a hook where the edit lands.
The functions it calls are in ``core/bridge_path.py`` (what the sweeps read through hooks,
and the sum check that refuses a model the definitions do not fit); this module only adapts
them to ``engines.base.Engine``.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.core import attribution as A
from sweeps.core import bridge_path, effects, footprint, lens
from sweeps.core import transformer as tf
from sweeps.core.engines.base import Patcher
from sweeps.core.nodes import Node
from tasks.base import TaskData


class BridgeEngine:
    """``Engine`` on a TransformerLens bridge."""

    name: str = "bridge"
    # eap-ig-activations interpolates one group's output at a time: our own forward only
    attribution_methods: tuple[str, ...] = tuple(m for m in A.METHODS if m != "eap-ig-activations")

    def __init__(self, bridge: Any):
        self.bridge = bridge
        self.cfg = bridge.cfg
        self.readout = bridge_path.view(bridge)  # the unembedding, W_O and norm in the fast path's shape
        self.device = self.readout.device
        self.dtype = next(bridge.parameters()).dtype
        learned = getattr(self.cfg, "positional_embedding_type", "") == "standard"
        self.shape = footprint.shape_of_config(self.cfg, int(self.cfg.n_ctx) if learned else 0)

    def check(self, task: TaskData) -> None:
        """The components' direct effects must add up to the bridge's own logits."""
        bridge_path.sum_check(self.bridge, task)

    def graph(self) -> A.Graph:
        return A.build_graph(bridge_path.graph_config(self.bridge))

    # -- the backup sweep ---------------------------------------------------------

    @torch.no_grad()
    def backup_state(
        self, sub: TaskData, start: int, ablation: str, keep_neurons: bool
    ) -> tuple[effects.BatchState, tf.CleanRun]:
        bridge, L = self.bridge, self.cfg.n_layers
        _, cache = bridge_path.run(bridge, sub.clean)
        points = bridge_path.effect_points(bridge, sub)
        decomposition = bridge_path.decompose(bridge, cache, points)
        z = torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(L)])
        replacement = None
        if ablation == "resample":
            _, corrupt = bridge_path.run(bridge, sub.corrupt)
            replacement = torch.stack([corrupt[f"blocks.{l}.attn.hook_z"] for l in range(L)])
        state = effects.BatchState(
            start=start,
            points=points,
            scale=decomposition.scale,
            resid_pre=None,
            tokens=sub.clean,
            replacement_z=replacement,
            de_heads=decomposition.heads,
            de_mlps=decomposition.mlps,
            clean_dot=bridge_path.final_dot(bridge, cache, points),
            # kept for the --metric change of each ablation
            clean_normed=bridge_path.final_normed(bridge, cache, points) if sub.metric is not None else None,
        )
        W_out = bridge_path.last_mlp_out(bridge, cache) if keep_neurons else None
        if W_out is not None:  # None for a mixture of experts, or no MLP: neurons/ stays empty
            state.neuron_dirs = torch.einsum("md,pd->pm", W_out, points.u) / decomposition.scale[:, None]
            state.de_neurons = effects.neuron_direct_effects(
                state.neuron_dirs, bridge_path.last_hidden(bridge, cache, points), None
            )
        # Mean ablation reads only ``z``; the other fields are left empty.
        return state, tf.CleanRun(resid_pre=None, z=z, mlp_out=None, resid_final=None)  # type: ignore[arg-type]

    def ablate_heads(
        self,
        state: effects.BatchState,
        layer: int,
        heads: list[int],
        replacement: Float[Tensor, "G B T E"],
        read_final: bool,
    ) -> effects.LayerAblation:
        """One full forward per head, stacked as the fast engine's group."""
        neurons, normed = state.neuron_dirs is not None, state.clean_normed is not None
        outs = [
            bridge_path.ablate_head(
                self.bridge, state.tokens, layer, h, replacement[g], state.points, state.scale, neurons, normed
            )
            for g, h in enumerate(heads)
        ]
        return effects.LayerAblation(
            layer,
            list(heads),
            torch.cat([o.heads for o in outs]),
            torch.cat([o.mlps for o in outs]),
            None,
            torch.cat([o.final_dot for o in outs]),  # type: ignore[misc]
            torch.cat([o.final_scale for o in outs]),  # type: ignore[misc]
            final_normed=torch.cat([o.final_normed for o in outs]) if normed else None,  # type: ignore[misc]
            last_hidden=torch.cat([o.last_hidden for o in outs]) if neurons else None,  # type: ignore[misc]
        )

    # -- the scale sweep ------------------------------------------------------------

    def clean_run(self, tokens: Int[Tensor, "N T"], batch_size: int) -> tf.CleanRun:
        return bridge_path.clean_run(self.bridge, tokens, batch_size)

    def patcher(
        self, node: Node, clean: tf.CleanRun, tokens: Int[Tensor, "N T"], positions: Int[Tensor, " Q"]
    ) -> Patcher:
        """One full forward a row, with the patch hooked where the node writes (every position)."""

        def patch(base: Tensor, delta: Tensor, first_change: Tensor | None = None) -> Tensor:
            return bridge_path.patched_final(self.bridge, node, tokens[base], delta)[:, positions]

        return patch

    # -- attribution and circuits -----------------------------------------------------

    def attribute(
        self, graph: A.Graph, batch: TaskData, method: str, steps: int, split_kv: bool = False
    ) -> A.BatchAttribution:
        if method not in self.attribution_methods or split_kv:
            raise ValueError(f"{method}{' with split k/v' if split_kv else ''} runs on the fast path's families only")
        return bridge_path.attribute(self.bridge, graph, batch, steps)

    def exact_scores(self, graph: A.Graph, batch: TaskData, with_edges: bool) -> A.BatchAttribution:
        targets = A.every_target(graph, with_edges)
        clean, patched = self.patched_metric(graph, batch, targets)
        with torch.no_grad():
            reference = bridge_path.metric_reference(self.bridge, batch)
            corrupt = float(bridge_path.metric_sum(self.bridge(batch.corrupt), batch, reference))
        n_points = int(bridge_path.effect_points(self.bridge, batch).n)
        return A.exact_attribution(graph, patched, clean, corrupt, n_points, with_edges)

    def patched_metric(self, graph: A.Graph, batch: TaskData, targets: list[A.Target]) -> tuple[float, Tensor]:
        with torch.no_grad():
            clean_logits = self.bridge(batch.clean)
            reference = bridge_path.metric_reference(self.bridge, batch, clean_logits)
            clean = float(bridge_path.metric_sum(clean_logits, batch, reference))
        return clean, bridge_path.patch_metric(self.bridge, graph, batch, targets)

    def circuit_runner(self, graph: A.Graph, batch: TaskData) -> bridge_path.CircuitRunner:
        return bridge_path.CircuitRunner(self.bridge, graph, batch)

    def task_report(self, task: TaskData, prompt: int | None = 0) -> lens.TaskReport:
        return bridge_path.task_report(self.bridge, task, prompt)
