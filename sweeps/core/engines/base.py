"""``Engine``: the operations the sweeps' jobs run on a model, defined once.

A job never asks how its model runs. It is bound to an engine (``engines.engine_for``,
chosen once when a model binds) and calls these operations; each algorithm's own logic
(what to ablate, what to sum, how to read the result) lives above them, in the job and in
the core math. Two engines implement them:

- ``FastEngine`` (``engines/fast.py``): our own forward (``core/transformer.py``) on the
  processed weights of a family in ``architectures.FAMILIES``. Edits restart from the
  block they touch, with many edits batched into one pass.
- ``BridgeEngine`` (``engines/bridge.py``): TransformerLens's own forward and hooks, for
  every other decoder it boots. Each edit is one full forward with a hook
  (``core/bridge_path.py`` holds those functions).

Both give the same numbers where both run (``tests/core/test_bridge_path.py``).
No Ray, no I/O.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sweeps.core import attribution as A
from sweeps.core import effects, footprint
from sweeps.core import transformer as tf
from sweeps.core.nodes import Node
from tasks.base import TaskData

# A scale-sweep patch: rows ``base`` of a clean run with ``delta`` added where a node writes,
# run to the final residual stream, read at the patcher's ``positions`` ([G, Q, D]). With
# ``first_change`` ([G], or None) each row's ``delta`` is zero before that position, which a
# patcher may use to recompute only the positions from there (prefix-shared restarts).
Patcher = Callable[[Int[Tensor, " G"], Float[Tensor, "G T D"], Optional[Int[Tensor, " G"]]], Float[Tensor, "G Q D"]]


class Engine(Protocol):
    """What every job needs of a model replica."""

    name: str  # "fast" | "bridge": for messages only, never for branching
    cfg: Any  # n_layers, n_heads, d_head, d_model of the model
    device: torch.device
    dtype: torch.dtype  # what the model runs in
    shape: footprint.ModelShape  # its sizes, for the memory estimate (``jobs.sizing``)
    readout: Any  # what ``scaling.readout``/``node_activation`` read: unembedding, W_O, norm spec
    attribution_methods: tuple[str, ...]  # the ``attribution.METHODS`` this engine runs

    # -- every job ---------------------------------------------------------------
    def check(self, task: TaskData) -> None:
        """Raise (one clear error) if the sweeps' definitions do not hold for this model."""
        ...

    def graph(self) -> A.Graph:
        """The attribution graph of the model (upstream nodes, downstream inputs, edges)."""
        ...

    # -- the backup sweep ----------------------------------------------------------
    def backup_state(
        self, sub: TaskData, start: int, ablation: str, keep_neurons: bool
    ) -> tuple[effects.BatchState, tf.CleanRun]:
        """One batch's clean state (``effects.BatchState``: points, clean direct effects, the
        corrupt run's ``z`` for resample ablation, and with ``keep_neurons`` the last MLP per
        neuron where the model exposes it), and a run whose ``z`` mean ablation averages."""
        ...

    def ablate_heads(
        self,
        state: effects.BatchState,
        layer: int,
        heads: list[int],
        replacement: Float[Tensor, "G B T E"],
        read_final: bool,
    ) -> effects.LayerAblation:
        """Every direct effect of layers ``layer..L-1`` with head ``heads[g]``'s ``z``
        replaced by ``replacement[g]`` (``effects.LayerAblation``)."""
        ...

    # -- the scale sweep -------------------------------------------------------------
    def clean_run(self, tokens: Int[Tensor, "N T"], batch_size: int) -> tf.CleanRun:
        """Block inputs, every head's ``z``, every MLP's output and the final stream."""
        ...

    def patcher(
        self, node: Node, clean: tf.CleanRun, tokens: Int[Tensor, "N T"], positions: Int[Tensor, " Q"]
    ) -> Patcher:
        """A function patching ``node``'s write in rows of the clean run of ``tokens``, reading
        the final residual stream at ``positions``."""
        ...

    # -- attribution and circuits ----------------------------------------------------
    def attribute(
        self, graph: A.Graph, batch: TaskData, method: str, steps: int, split_kv: bool = False
    ) -> A.BatchAttribution:
        """Node and edge scores of one batch by a gradient ``method`` (raw sums); ``split_kv``:
        each query head's own k/v edges too (fast path only)."""
        ...

    def exact_scores(self, graph: A.Graph, batch: TaskData, with_edges: bool) -> A.BatchAttribution:
        """Scores by real patching of every node (and edge) on one batch (raw sums)."""
        ...

    def patched_metric(self, graph: A.Graph, batch: TaskData, targets: list[A.Target]) -> tuple[float, Tensor]:
        """(Σ clean metric, Σ metric with each target patched) over one batch."""
        ...

    def circuit_runner(self, graph: A.Graph, batch: TaskData) -> Any:
        """An evaluator of circuits on one batch: ``metric(mask)``, ``clean_metric``,
        ``corrupt_metric``, ``n_points`` (as ``circuit_eval.CircuitRunner``)."""
        ...

    # -- the task report ---------------------------------------------------------------
    def task_report(self, task: TaskData, prompt: int | None = 0) -> Any:
        """Direct logit attribution, logit lens and attention patterns (``lens.TaskReport``)."""
        ...
