"""Circuit discovery's costs as multiples of a forward: EAP, one EAP-IG step, one circuit evaluation.

On IOI (the contrastive task circuits are found on), the dataset's forward to logits is the
unit. EAP is one clean forward + backward and one corrupt forward; each EAP-IG step is one
interpolated forward + backward and its edge products (the corrupt forward is shared, so a
step costs a little less than EAP); one circuit evaluation is one forward
in which every downstream input subtracts its out-of-circuit upstream changes (the corrupt
run's node outputs, taken once for all the circuits of a batch, are timed apart).
"""

from __future__ import annotations

import torch

from benchmarks.common import Ratio, Setup, forward_logits, print_timings, timed
from sweeps.core import attribution as A
from sweeps.core import circuit_eval as CE
from tasks import TaskSpec, build_task


def run(s: Setup, steps: int = 3) -> list[Ratio]:
    w = s.weights
    task = build_task(TaskSpec("ioi"), s.bridge.tokenizer, n_prompts=s.task.n_prompts)
    graph = A.build_graph(w.cfg)
    tokens = task.clean.to(w.device)
    forward = timed(lambda: forward_logits(w, tokens), s.repeat, warmup=True)
    eap = timed(lambda: A.attribute(w, graph, task), s.repeat, warmup=True)
    ig = timed(lambda: A.attribute(w, graph, task, method="eap-ig-inputs", steps=steps), s.repeat, warmup=True)
    setup = timed(lambda: CE.CircuitRunner(w, graph, task), s.repeat)
    runner = CE.CircuitRunner(w, graph, task)
    scores = A.attribute(w, graph, task).edges
    mask = CE.top_mask(scores, max(1, graph.n_edges // 10))
    evaluate = timed(lambda: runner.metric(mask), s.repeat, warmup=True)
    per_step = ig / steps
    print(f"## circuits: {s.name}, IOI, {task.n_prompts} prompts, {graph.n_edges} edges")
    print_timings([
        ("forward of the dataset to logits (the unit)", forward),
        ("EAP: every edge", eap),
        (f"EAP-IG-inputs, {steps} steps", ig),
        ("EAP-IG-inputs per step", per_step),
        ("circuit evaluation: the corrupt run's node outputs (once a batch)", setup),
        ("circuit evaluation: one circuit (10 % of the edges)", evaluate),
    ], forward)
    print()
    return [
        Ratio("circuits", "IOI: EAP / forward", eap / forward),
        Ratio("circuits", "IOI: one EAP-IG step / forward", per_step / forward),
        Ratio("circuits", "IOI: one circuit evaluation / forward", evaluate / forward),
    ]
