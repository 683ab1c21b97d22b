"""The fast engine: our own forward on a family's processed weights.

Every edit restarts from the block it touches, from the clean state kept once per batch,
and a group of edits runs as one batch of copies (a layer's heads ablated together, many
(scale, pair) patches of one node together). The math is in ``core/transformer.py``,
``core/effects.py``, ``core/scaling.py``, ``core/attribution.py`` and
``core/circuit_eval.py``; this module only adapts it to ``engines.base.Engine``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from sweeps.core import effects, footprint, lens, scaling
from sweeps.core import transformer as tf
from sweeps.core.engines.base import Patcher
from sweeps.core.nodes import Node
from tasks.base import TaskData


class FastEngine:
    """``Engine`` on fast-path ``ModelWeights``."""

    name: str = "fast"
    attribution_methods: tuple[str, ...] = A.METHODS

    def __init__(self, weights: tf.ModelWeights):
        self.weights = weights
        self.cfg = weights.cfg
        self.device = weights.device
        self.dtype = weights.dtype
        self.shape = footprint.shape_of_config(self.cfg, 0 if weights.W_pos is None else int(weights.W_pos.shape[0]))
        self.readout = weights
        self._scratch = A.Scratch()  # large buffers every attribution pass reuses

    def check(self, task: TaskData) -> None:
        """Nothing to check: every family's definitions are tested against TransformerLens."""

    def graph(self) -> A.Graph:
        return A.build_graph(self.cfg)

    # -- the backup sweep ---------------------------------------------------------

    @torch.no_grad()
    def backup_state(
        self, sub: TaskData, start: int, ablation: str, keep_neurons: bool
    ) -> tuple[effects.BatchState, tf.CleanRun]:
        w = self.weights
        tokens = sub.clean.to(self.device)
        run = tf.run(w, tokens, keep_last_hidden=keep_neurons)
        points = effects.effect_points(w, sub)
        decomposition = effects.decompose(w, tokens, run, points)
        replacement = tf.run(w, sub.corrupt.to(self.device)).z if ablation == "resample" else None
        dot, _, normed = effects.final_read(w, run.resid_final, points)
        state = effects.BatchState(
            start=start,
            points=points,
            scale=decomposition.scale,
            resid_pre=run.resid_pre,
            tokens=tokens,
            replacement_z=replacement,
            de_heads=decomposition.heads,
            de_mlps=decomposition.mlps,
            de_bias=decomposition.attn_bias,
            clean_dot=dot,
            # kept for soft-capped models' real logits, and for the --metric change of each ablation
            clean_normed=normed if w.cfg.final_softcap or sub.metric is not None else None,
            first_change=effects.first_difference(tokens, sub.corrupt.to(self.device))
            if ablation == "resample"
            else None,
        )
        if run.last_hidden is not None:  # the last MLP split per neuron (self-repair decomposition)
            state.neuron_dirs = effects.neuron_directions(w, points, decomposition.scale)
            if w.cfg.post_norm:
                assert run.mlp_raw is not None
                state.last_inv_rms = tf.post_norm_inv_rms(w.cfg, effects.gather(run.mlp_raw[-1], points, 0))[..., 0]
                state.last_bias_dir = effects.mlp_bias_direction(w, points, decomposition.scale)
            state.de_neurons = effects.neuron_direct_effects(
                state.neuron_dirs, effects.gather(run.last_hidden, points, 0), state.last_inv_rms
            )
        return state, run

    def ablate_heads(
        self,
        state: effects.BatchState,
        layer: int,
        heads: list[int],
        replacement: Float[Tensor, "G B T E"],
        read_final: bool,
    ) -> effects.LayerAblation:
        """One batched restart from ``layer`` for the whole group; in reduced precision with the
        un-ablated baseline in the same pass (``effects.ablate_heads_of_layer``)."""
        assert state.resid_pre is not None  # the fast engine's states keep the block inputs
        return effects.ablate_heads_of_layer(
            self.weights,
            layer,
            heads,
            state.resid_pre[layer],
            replacement,
            state.points,
            state.scale,
            read_final,
            baseline=self.weights.dtype != torch.float32,
            first_change=state.first_change,
            clean=state.resid_pre,
            keep_normed=state.clean_normed is not None,
        )

    # -- the scale sweep ------------------------------------------------------------

    @torch.no_grad()
    def clean_run(self, tokens: Int[Tensor, "N T"], batch_size: int) -> tf.CleanRun:
        """``tf.run`` in batches of ``batch_size`` prompts, concatenated."""
        w = self.weights
        runs = [tf.run(w, tokens[i : i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]
        if len(runs) == 1:
            return runs[0]
        return tf.CleanRun(
            resid_pre=torch.cat([r.resid_pre for r in runs], 1),
            z=torch.cat([r.z for r in runs], 1),
            mlp_out=None if runs[0].mlp_out is None else torch.cat([r.mlp_out for r in runs], 1),  # type: ignore[misc]
            resid_final=torch.cat([r.resid_final for r in runs], 0),
            mlp_raw=None if runs[0].mlp_raw is None else torch.cat([r.mlp_raw for r in runs], 1),  # type: ignore[misc]
        )

    def patcher(
        self, node: Node, clean: tf.CleanRun, tokens: Int[Tensor, "N T"], positions: Int[Tensor, " Q"]
    ) -> Patcher:
        """Patches restart where the node writes (``scaling.restart_point``); rows whose patch
        is zero before ``first_change`` restart in a window from there when that saves enough
        (``scaling.WindowedPatcher``)."""
        return scaling.WindowedPatcher(self.weights, node, clean, int(tokens.shape[1]), positions)

    # -- attribution and circuits -----------------------------------------------------

    def attribute(
        self, graph: A.Graph, batch: TaskData, method: str, steps: int, split_kv: bool = False
    ) -> A.BatchAttribution:
        return A.attribute(self.weights, graph, batch, self._scratch, method, steps, split_kv)

    def exact_scores(self, graph: A.Graph, batch: TaskData, with_edges: bool) -> A.BatchAttribution:
        return A.exact_scores(self.weights, graph, batch, with_edges)

    @torch.no_grad()
    def patched_metric(self, graph: A.Graph, batch: TaskData, targets: list[A.Target]) -> tuple[float, Tensor]:
        patched = A.patch_targets(self.weights, graph, batch, targets)
        return float(patched.clean_terms.sum()), patched.metric

    def circuit_runner(self, graph: A.Graph, batch: TaskData) -> CE.CircuitRunner:
        return CE.CircuitRunner(self.weights, graph, batch)

    def task_report(self, task: TaskData, prompt: int | None = 0) -> lens.TaskReport:
        return lens.task_report(self.weights, task, prompt)
