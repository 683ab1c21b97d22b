"""The planner's arithmetic (``sweeps/core/footprint.py``) against what the code really holds:
the parameters of every family's processed weights, tensor by tensor; the published sizes of
Llama 3.1 8B and 70B; the backup sweep's kept clean state, byte for byte; stages that cover
every layer with the smallest largest stage."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from sweeps.core import footprint as F
from sweeps.jobs.backup import BackupJob
from sweeps.runtime import loading, models, shapes
from tasks import TaskSpec, build_task

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"


# every piece that changes the count: learned positions and an ungated MLP (GPT-2), grouped
# queries (Llama 3), post-norms (Gemma 2), per-head and all-head QK-norms (Qwen 3, OLMo 2),
# fused projections (Phi-3), parallel blocks (Pythia), and the embedded model
COUNTED = ["smollm2-135m", "tiny-gpt2", "tiny-pythia", "tiny-llama3", "tiny-qwen3", "tiny-gemma2", "tiny-olmo2", "tiny-phi3"]


@pytest.mark.parametrize("name", COUNTED)
def test_parameters_from_the_config_are_the_weights_the_fast_path_holds(name):
    """Counted from the configuration alone, equal to the numbers in every tensor of the
    processed weights (the rotary frequencies aside: a table, not weights)."""
    shape = shapes.model_shape(name)
    w = loading.load_model(models.describe_model(name)).weights
    held = sum(v.numel() for k, v in vars(w).items() if isinstance(v, torch.Tensor) and k != "rotary_inv_freq")
    assert shape.parameters == held
    assert (shape.n_layers, shape.d_model, shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_vocab) == (
        w.cfg.n_layers, w.cfg.d_model, w.cfg.n_heads, w.cfg.n_kv_heads, w.cfg.d_head, w.cfg.d_vocab
    )


@pytest.mark.parametrize("config, published", [("llama-3.1-8b.json", 8_030_261_248), ("llama-3.1-70b.json", 70_553_706_496)])
def test_parameters_of_research_size_models_are_their_published_sizes(config, published):
    """Meta's counts; ours add the zero biases the fast path holds (under 0.01 %)."""
    shape = shapes.model_shape(str(CONFIGS / config))
    assert 0 <= shape.parameters - published < 1e-4 * published


@pytest.mark.parametrize("name, kind", [("tiny-llama3", "ioi"), ("tiny-gemma2", "text"), ("smollm2-135m", "ioi")])
def test_the_backup_sweeps_clean_state_is_what_its_job_keeps(name, kind):
    info = models.describe_model(name)
    extra = {"seq_len": 24} if kind == "text" else {}
    task = build_task(TaskSpec(kind), loading.load_tokenizer(info), 12, 0, **extra)
    job = BackupJob(task, "resample", 8).bind(loading.load_model(info))
    held = sum(v.nbytes for s in job.batches() for k, v in vars(s).items() if isinstance(v, torch.Tensor) and k != "tokens")
    T = task.clean.shape[1]
    planned = F.backup(shapes.model_shape(name), task.n_prompts, T, 8, 4, 8192, 1, points_per_prompt=T - 1 if kind == "text" else 1)
    assert abs(planned.clean_bytes - held) <= 0.01 * held


def test_stages_cover_every_layer_with_the_smallest_largest_stage():
    shape = shapes.model_shape(str(CONFIGS / "llama-3.1-70b.json"))
    small = F.ModelShape(n_layers=7, d_model=8, n_heads=2, n_kv_heads=2, d_head=4, d_mlp=16, d_vocab=300, n_ctx=32)
    for s, k in ((shape, 8), (shape, 3), (small, 3), (small, 7)):
        staged = F.stages(s, k, 2)
        assert len(staged) == k and all(len(r) >= 1 for r, _ in staged)
        assert [layer for r, _ in staged for layer in r] == list(range(s.n_layers))
        assert sum(b for _, b in staged) == s.parameters * 2
        if s is small:  # against every way of cutting 7 layers into k stages
            layer, first, last = s.layer_parameters() * 2, s.embedding_parameters() * 2, s.unembedding_parameters() * 2
            sizes = [layer] * 7
            sizes[0] += first
            sizes[-1] += last
            best = min(
                max(sum(sizes[a:b]) for a, b in zip((0, *cut), (*cut, 7)))
                for cut in itertools.combinations(range(1, 7), k - 1)
            )
            assert max(b for _, b in staged) == best
