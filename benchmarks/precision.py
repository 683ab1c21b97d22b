"""How far bfloat16 and float16 are from float32 on the same run, per family and on the
embedded model: what a user choosing ``--dtype`` needs to know.

For each model, the same IOI prompts in float32, bfloat16 and float16:

- direct effects of every head (the decomposition of the clean run);
- backup (accumulated change of every other head) of the heads of the last four layers;
- EAP attribution scores of every edge;
- faithfulness of the circuit of the top 5 % of edges by float32's scores.

Each is reported as the largest |error| relative to the largest |value| in float32 (for
faithfulness, the absolute difference: it is a ratio already), and, for direct effects,
backup and edges, the share of float32's top 20 (by magnitude) that the dtype also ranks in
its top 20. Nothing is timed; nothing here is asserted by the tests.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import Ratio, print_table
from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from sweeps.core import effects
from sweeps.core import transformer as tf
from sweeps.jobs.backup import BackupJob
from sweeps.runtime import loading, models
from sweeps.runtime.tiny_models import FAMILY_TINY_MODELS
from tasks import TaskSpec, build_task

DTYPES = ("bfloat16", "float16")
TOP = 20


def _measures(weights: tf.ModelWeights, task) -> dict[str, np.ndarray | float]:
    """Direct effects, backup, edge scores and the faithfulness curve's inputs of one model."""
    L = weights.cfg.n_layers
    run = tf.run(weights, task.clean)
    points = effects.effect_points(weights, task)
    de = effects.decompose(weights, task.clean, run, points).heads.mean(1)  # [L, H]: mean over points
    job = BackupJob(task, "resample", task.n_prompts, self_repair=False).bind(weights)
    backup = [r.backup.mean() for layer in range(max(0, L - 4), L) for r in job.run_heads(layer, list(range(weights.cfg.n_heads)))]
    graph = A.build_graph(weights.cfg)
    edges = A.attribute(weights, graph, task).edges
    return {"de": de.flatten().double().numpy(), "backup": np.array(backup), "edges": edges.numpy(), "graph": graph}


def _faithfulness(weights: tf.ModelWeights, task, graph, mask: torch.Tensor) -> float:
    runner = CE.CircuitRunner(weights, graph, task)
    return CE.faithfulness(runner.metric(mask), runner.clean_metric, runner.corrupt_metric)


def _compare(exact: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |error| / max |exact|, share of exact's top 20 by magnitude in got's top 20)."""
    error = float(np.abs(got - exact).max() / max(np.abs(exact).max(), 1e-12))
    k = min(TOP, exact.size)
    top = lambda x: set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())  # noqa: E731
    return error, len(top(exact) & top(got)) / k


def run(quick: bool, n_prompts: int = 16) -> list[Ratio]:
    names = list(FAMILY_TINY_MODELS[:1] if quick else ("smollm2-135m", *FAMILY_TINY_MODELS))
    n_prompts = 8 if quick else n_prompts
    rows, ratios = [], []
    for name in names:
        info = models.describe_model(name)
        task = build_task(TaskSpec("ioi"), loading.load_tokenizer(info), n_prompts, 0)
        exact_weights = loading.load_model(info).weights
        exact = _measures(exact_weights, task)
        graph = exact["graph"]
        k = max(1, graph.n_edges // 20)
        mask = CE.top_mask(torch.as_tensor(exact["edges"]), k)
        faith32 = _faithfulness(exact_weights, task, graph, mask)
        for dtype in DTYPES:
            weights = loading.load_model(info, dtype=dtype).weights
            got = _measures(weights, task)
            de, backup, edges = (_compare(exact[m], got[m]) for m in ("de", "backup", "edges"))
            faith = _faithfulness(weights, task, graph, mask)
            rows.append(
                [name, dtype, f"{de[0]:.1e}", f"{de[1]:.0%}", f"{backup[0]:.1e}", f"{backup[1]:.0%}",
                 f"{edges[0]:.1e}", f"{edges[1]:.0%}", f"{faith32:.3f}", f"{abs(faith - faith32):.1e}"]
            )
            ratios.append(Ratio("precision", f"{name} {dtype}: top-20 edges kept", edges[1]))
    print(f"## precision: {', '.join(DTYPES)} against float32 on the same IOI run ({n_prompts} prompts)")
    print("error: max |dtype − float32| / max |float32|; top 20: float32's 20 largest the dtype also ranks "
          "in its 20 largest; faithfulness of float32's top 5 % of edges, and how far the dtype's is from it\n")
    print_table(
        ["model", "dtype", "DE error", "DE top 20", "backup error", "backup top 20", "edge error",
         "edge top 20", "faithfulness", "faith. diff"],
        rows,
    )
    return ratios
