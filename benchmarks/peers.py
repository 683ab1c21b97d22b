"""Patching every head, side by side with the peers a researcher would otherwise use.

Per upstream head, on the same prompts, each replacing the head's ``z`` (its output
projection's input) at every position by the corrupt run's and reading the mean logit
difference at the answers:
- ours: the backup sweep (``BackupJob``, the self-repair decomposition included), whose
  restarts start at the ablated layer and, for minimal pairs, compute only the positions from
  each pair's first difference on (prefix-shared restarts); also with full restarts, to show
  what the prefix saves;
- TransformerLens 4.3: its activation patching (``patching.generic_activation_patch`` with
  ``get_act_patch_attn_head_out_all_pos``'s patch setter, on the sampled heads): one full
  hooked forward per head through the bridge;
- nnsight 0.8 (the ``bench`` extra): a straightforward loop, one ``trace`` per head of the
  Hugging Face model setting the slice of ``o_proj``'s input.

Three tasks: IOI as the sweeps run it (the ABC corruption replaces all three names, so the
pair differs from the first name on); IOI with only the repeated subject corrupted (S2: the
pair shares everything before it); and a paragraph of shared context before IOI (the pair
differs near the end). Each time is per head over one forward of the batch to logits (our
forward; the unit), and the heads' values are compared: they must agree to 1e-5 of the
largest logit difference.
"""

from __future__ import annotations

import contextlib
import io
import statistics

import pandas as pd
import torch

from benchmarks.backup import middle_layers
from benchmarks.common import Ratio, Setup, forward_logits, print_timings, timed
from sweeps.jobs.backup import BackupJob
from sweeps.runtime import loading, models
from tasks import ioi
from tasks.base import TaskData

CONTEXT_TOKENS = 96  # the shared paragraph before the long task's IOI sentence


def tasks(tokenizer, n_prompts: int) -> dict[str, TaskData]:
    from tasks.text import DEFAULT_CORPUS, read_documents

    documents, _ = read_documents(str(DEFAULT_CORPUS))
    words = tokenizer(" ".join(documents))["input_ids"][:CONTEXT_TOKENS]
    context = tokenizer.decode(words).strip() + "\n\n"
    return {
        "IOI (ABC)": ioi.build(tokenizer, n_prompts),
        "IOI (S2 corrupted)": ioi.build(tokenizer, n_prompts, corruption="S2"),
        f"{CONTEXT_TOKENS} tokens of context, then IOI (ABC)": ioi.build(tokenizer, n_prompts, context=context),
    }


def mean_logit_diffs(job: BackupJob, layer: int, clean: torch.Tensor) -> torch.Tensor:
    """[H] mean logit difference at the answers with each head of ``layer`` resampled (the
    clean run's plus each head's total effect, the self-repair decomposition's first term)."""
    results = job.run_heads(layer, list(range(job.shape[1])))
    return torch.tensor([clean.mean().item() + r.repair["total_effect"].mean() for r in results])


def transformer_lens_heads(bridge, task: TaskData, heads: list[tuple[int, int]]) -> torch.Tensor:
    """TransformerLens's activation patching of each head's ``z`` from the corrupt run."""
    from transformer_lens import patching

    b, pos = torch.arange(task.n_prompts), task.lengths - 1

    def metric(logits):
        return (logits[b, pos, task.correct] - logits[b, pos, task.incorrect]).mean()

    # its progress bar (tqdm, on stderr) is not part of the table
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        _, corrupt_cache = bridge.run_with_cache(task.corrupt)
        index = pd.DataFrame(heads, columns=["layer", "head"])
        return patching.generic_activation_patch(
            bridge, task.clean, corrupt_cache, metric, patching.layer_head_vector_patch_setter, "z", index_df=index
        ).flatten()


def nnsight_heads(hf, tokenizer, task: TaskData, heads: list[tuple[int, int]]) -> torch.Tensor:
    """A straightforward nnsight loop: one trace of the corrupt prompts saving every layer's
    ``o_proj`` input, then one trace per head setting that head's slice of it."""
    import nnsight

    lm = nnsight.LanguageModel(hf, tokenizer=tokenizer)
    layers = lm.model.layers
    E = (
        hf.config.head_dim
        if getattr(hf.config, "head_dim", None)
        else hf.config.hidden_size // hf.config.num_attention_heads
    )
    b, pos = torch.arange(task.n_prompts), task.lengths - 1
    values = []
    saved = []  # nnsight runs a trace's body its own way: a plain loop, not a comprehension
    with torch.no_grad():
        with lm.trace(task.corrupt):
            for l in range(len(layers)):
                saved.append(layers[l].self_attn.o_proj.input.save())
        for layer, head in heads:
            corrupt = saved[layer][:, :, head * E : (head + 1) * E]
            with lm.trace(task.clean):
                layers[layer].self_attn.o_proj.input[:, :, head * E : (head + 1) * E] = corrupt
                logits = lm.lm_head.output.save()
            values.append((logits[b, pos, task.correct] - logits[b, pos, task.incorrect]).mean())
    return torch.stack(values)


@contextlib.contextmanager
def full_restarts():
    """Every window turned off (no window is worth it): today's full restarts, for comparison."""
    from sweeps.core import effects

    saved = effects.WINDOW_WORTH
    effects.WINDOW_WORTH = 0.0
    try:
        yield
    finally:
        effects.WINDOW_WORTH = saved


def patching_jobs(w, task: TaskData) -> list[tuple[str, float, float]]:
    """(what, seconds with prefix-shared runs, seconds with full ones), values checked equal:

    - exact attribution of every node;
    - circuit evaluation: a curve's circuits (the top edges by a seeded random score at MIB's
      ten sizes) cost per circuit, and, apart, the clean and corrupt runs a batch's
      evaluator makes once for all its circuits;
    - the scale sweep patching the nodes of two layers with each prompt's corrupt partner's
      value at scale 1 (``--pairs task --source corrupt``), per node."""
    from sweeps.core import attribution as A
    from sweeps.core import circuit_eval as CE
    from sweeps.core.nodes import Node
    from sweeps.jobs.scale import ScaleJob, make_pairs

    graph = A.build_graph(w.cfg)
    score = torch.rand(graph.n_edges, generator=torch.Generator().manual_seed(0))
    masks = [CE.top_mask(score, max(1, int(f * graph.n_edges))) for f in CE.MIB_FRACTIONS]
    L, H = w.cfg.n_layers, w.cfg.n_heads
    nodes = [Node(layer, h) for layer in (L // 3, 2 * L // 3) for h in [*range(H), None]]
    pairs = make_pairs(task, "task", None, 0, False)
    scale_job = ScaleJob(task, pairs, scales=(1.0,), source="corrupt", batch_size=task.n_prompts).bind(w)
    scale_job.groups()
    runners: dict[str, CE.CircuitRunner] = {}

    def runner(key: str) -> CE.CircuitRunner:
        runners[key] = CE.CircuitRunner(w, graph, task)
        return runners[key]

    def circuits(key: str) -> torch.Tensor:
        return torch.tensor([runners[key].metric(mask) for mask in masks])

    def scale_nodes() -> torch.Tensor:
        return torch.tensor([scale_job.run_node(node, [1.0]).metric_drop[0] for node in nodes])

    jobs = (
        ("exact attribution, every node", 1, lambda key: A.exact_scores(w, graph, task, with_edges=False).nodes),
        (
            "circuit evaluation: clean and corrupt runs, once a batch",
            1,
            lambda key: torch.tensor(runner(key).clean_metric),
        ),
        ("circuit evaluation, per circuit (MIB's 10 sizes)", len(masks), circuits),
        ("scale sweep at scale 1 from the corrupt run, per node", len(nodes), lambda key: scale_nodes()),
    )
    out = []
    for what, count, fn in jobs:
        values = {}
        shared = timed(lambda fn=fn: values.__setitem__("shared", fn("shared"))) / count
        with full_restarts():
            full = timed(lambda fn=fn: values.__setitem__("full", fn("full"))) / count
        difference = float((values["shared"] - values["full"]).abs().max())
        assert difference <= 1e-4 * max(1.0, float(values["full"].abs().max())), (what, difference)
        out.append((what, shared, full))
    return out


def goal_of(what: str) -> str:
    """The issue's goal for a prefix-shared job: exact attribution and a circuit evaluation at
    least twice as fast; the rest are reported."""
    return ">= 2" if what.startswith("exact") or "per circuit" in what else ""


def run(s: Setup, n_prompts: int = 16, peer_layers: int = 1) -> list[Ratio]:
    w, bridge = s.weights, s.bridge
    L, H = w.cfg.n_layers, w.cfg.n_heads
    info = models.describe_model(s.name)
    hf, tokenizer, _ = loading.load_hf_model(info)
    try:
        import nnsight  # noqa: F401
    except ImportError:
        hf = None
        print("nnsight is not installed (pip install -e '.[bench]'): its column is left out")
    ratios: list[Ratio] = []
    for label, task in tasks(tokenizer, n_prompts).items():
        layers = middle_layers(L)  # a restart's cost is linear in the layers after it: their mean is a sweep's
        job = BackupJob(task, "resample", batch_size=n_prompts).bind(w)
        job.batches()
        clean = job.batches()[0].clean_dot / job.batches()[0].scale + job.batches()[0].points.bias
        forwards, ours, ours_full, values = [], [], [], {}
        for layer in layers:
            forwards.append(timed(lambda: forward_logits(w, task.clean), warmup=True))
            ours.append(timed(lambda layer=layer: values.__setitem__(layer, mean_logit_diffs(job, layer, clean))) / H)
            with full_restarts():
                ours_full.append(timed(lambda layer=layer: job.run_heads(layer, list(range(H)))) / H)
        forward = statistics.median(forwards)
        heads = [(layer, h) for layer in layers[:peer_layers] for h in range(H)]
        tl_values = None

        def tl_run():
            nonlocal tl_values
            tl_values = transformer_lens_heads(bridge, task, heads)

        tl = timed(tl_run) / len(heads)
        ours_values = torch.cat([values[layer] for layer in layers[:peer_layers]])
        scale = float(ours_values.abs().max())
        assert tl_values is not None
        rows = [
            ("forward to logits (our forward; the unit)", forward),
            ("ours: the backup sweep, per head (prefix-shared restarts)", statistics.mean(ours)),
            ("ours with full restarts, per head", statistics.mean(ours_full)),
            ("TransformerLens 4.3 activation patching, per head", tl),
        ]
        differences = {"TransformerLens": float((tl_values - ours_values).abs().max())}
        nn = None
        if hf is not None:
            nn_values = None

            def nn_run():
                nonlocal nn_values
                nn_values = nnsight_heads(hf, tokenizer, task, heads)

            nn = timed(nn_run) / len(heads)
            assert nn_values is not None
            rows.append(("nnsight 0.8 loop, per head", nn))
            differences["nnsight"] = float((nn_values - ours_values).abs().max())
        T = task.clean.shape[1]
        print(
            f"## peers: {s.name} on {label}, {n_prompts} prompts x {T} tokens; positions recomputed "
            f"{job.notes()['positions_recomputed']:.0%}"
        )
        jobs = patching_jobs(w, task) if "S2" in label else []  # on short prompts: every node's run is a restart
        rows += [(f"{what}, prefix-shared", shared) for what, shared, _ in jobs]
        rows += [(f"{what}, full runs", full) for what, _, full in jobs]
        print_timings(rows, forward)
        per_forward = statistics.mean(o / f for o, f in zip(ours, forwards))
        print(
            f"ours per head / forward: {per_forward:.3f} (full restarts {statistics.mean(ours_full) / forward:.3f}); "
            f"TransformerLens / ours: {tl / statistics.mean(ours):.1f}x"
            + (f"; nnsight / ours: {nn / statistics.mean(ours):.1f}x" if nn else "")
        )
        print(
            "max |peer - ours| mean logit difference over "
            f"{len(heads)} heads: " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()) + f" (of {scale:.2f})\n"
        )
        short = label.split(",")[0].split(" (")[0] if "context" not in label else "long context"
        key = f"{short}{' S2' if 'S2' in label else ''}"
        goal = "<= 0.15" if "context" in label else "<= 0.2" if "S2" in label else ""
        ratios += [
            Ratio("peers", f"{key}: ours per head / forward", per_forward, goal),
            Ratio("peers", f"{key}: TransformerLens per head / ours", tl / statistics.mean(ours), ">= 5"),
            *([Ratio("peers", f"{key}: nnsight per head / ours", nn / statistics.mean(ours), ">= 5")] if nn else []),
            *[
                Ratio("peers", f"{key}: {what}, full / prefix-shared", full / shared, goal_of(what))
                for what, shared, full in jobs
            ],
            Ratio("peers", f"{key}: max |peer - ours| / max |value|", max(differences.values()) / scale, "<= 1e-5"),
        ]
    return ratios
