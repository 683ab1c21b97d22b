"""The first GPU's prepared command: ``python -m benchmarks --only gpu``.

On a CUDA machine, for random-weight models of Llama-3.2-1B's, Gemma-2-2B's and
Llama-3.1-8B's shapes in bfloat16 (built straight on the GPU from their shapes, so no host
copy of the weights is ever made), it runs

- the planner (``footprint``), and compares its per-replica bytes with the peak torch's
  allocator reports (``torch.cuda.max_memory_allocated``) for the backup sweep's clean state
  and one layer's shard, and for one attribution shard;
- the backup sweep's shard (every head of the middle layer) and one attribution shard, timed:
  heads per second and attribution prompts per second;
- a forced out-of-memory recovery: the GPU's free memory is filled until one layer's shard
  cannot run whole, and the shard must still finish, its passes halved, with the same numbers;
- a replica in two stages (``core/stages.py``) on two devices, the host's CPU and the GPU
  (one GPU is enough to move the stream between devices): a backup and an attribution shard
  of a few prompts must give the numbers of the unstaged model.

On a CPU it runs the same on shapes scaled down (``--quick``-sized), so that it is tested
here. Timings on a GPU are the figures docs/performance.md records, with the GPU's name.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

from benchmarks.common import Ratio, print_table
from sweeps.core import footprint as F
from sweeps.core import stages
from sweeps.core import transformer as tf
from sweeps.core.footprint import ModelShape
from sweeps.jobs.attribution import AttributionJob, AttributionShard
from sweeps.jobs.backup import BackupJob
from sweeps.jobs.plan import Shard
from sweeps.runtime.chunking import tokens_per_pass
from tasks.base import TaskData

SHAPES = {
    "Llama-3.2-1B": ModelShape(16, 2048, 32, 8, 64, 8192, 128256, 131072),
    "Gemma-2-2B": ModelShape(26, 2304, 8, 4, 256, 9216, 256000, 8192, post_norm=True, final_softcap=True),
    "Llama-3.1-8B": ModelShape(32, 4096, 32, 8, 128, 14336, 128256, 131072),
}


def scaled_down(shape: ModelShape) -> ModelShape:
    """A shape of the same family small enough for a CPU run (a few layers, narrow)."""
    H = max(2, shape.n_heads // 8)
    K = max(1, H // max(1, shape.n_heads // shape.n_kv_heads))
    return replace(shape, n_layers=2, d_model=32 * H, n_heads=H, n_kv_heads=K, d_head=32, d_mlp=64 * H, d_vocab=1024)


def random_weights(shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tf.ModelWeights:
    """Random weights of ``shape``, made on ``device`` in ``dtype`` (Llama's pieces; Gemma 2's
    post-norms, soft-caps, alternating windows and scaled embeddings where the shape has them)."""
    g = torch.Generator(device=device).manual_seed(seed)
    L, D, H, K, E, M, V = (shape.n_layers, shape.d_model, shape.n_heads, shape.n_kv_heads, shape.d_head,
                           shape.d_mlp, shape.d_vocab)

    def rand(*size: int, scale: float) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device, dtype=dtype) * scale)

    def zeros(*size: int) -> torch.Tensor:
        return torch.zeros(*size, device=device, dtype=dtype)

    gemma = shape.post_norm
    cfg = tf.ModelConfig(
        n_layers=L, n_heads=H, n_kv_heads=K, d_model=D, d_head=E, d_mlp=M, d_vocab=V, norm="rmsnorm", eps=1e-6,
        positional="rotary", act_fn="gelu_pytorch_tanh" if gemma else "silu", gated_mlp=True, rotary_dim=E,
        family="gemma2" if gemma else "llama", post_norm=gemma, attn_softcap=50.0 if gemma else 0.0,
        final_softcap=30.0 if gemma else 0.0, windows=tuple((4096 if l % 2 == 0 else 0) if gemma else 0 for l in range(L)),
        embed_scale=math.sqrt(D) if gemma else 1.0,
    )
    return tf.ModelWeights(
        cfg=cfg,
        W_E=rand(V, D, scale=1.0 / math.sqrt(D) if gemma else 1.0),
        W_pos=None,
        W_Q=rand(L, H, D, E, scale=D**-0.5), b_Q=zeros(L, H, E),
        W_K=rand(L, K, D, E, scale=D**-0.5), b_K=zeros(L, K, E),
        W_V=rand(L, K, D, E, scale=D**-0.5), b_V=zeros(L, K, E),
        W_O=rand(L, H, E, D, scale=(H * E) ** -0.5), b_O=zeros(L, D),
        W_in=rand(L, D, M, scale=D**-0.5), W_gate=rand(L, D, M, scale=D**-0.5), b_in=zeros(L, M),
        W_out=rand(L, M, D, scale=M**-0.5), b_out=zeros(L, D),
        W_U=rand(D, V, scale=D**-0.5), b_U=zeros(V),
        rotary_inv_freq=1.0 / (10000 ** (torch.arange(0, E, 2, device=device, dtype=torch.float32) / E)),
        ln_attn_post=1 + rand(L, D, scale=0.1) if gemma else None,
        ln_mlp_post=1 + rand(L, D, scale=0.1) if gemma else None,
        W_U_mean=zeros(D), b_U_mean=zeros(()),
    )


def random_task(shape: ModelShape, n_prompts: int, seq_len: int, seed: int = 0) -> TaskData:
    """A logit-difference task of random tokens (timings and memory depend only on its sizes)."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda: torch.randint(0, shape.d_vocab, (n_prompts, seq_len), generator=g)  # noqa: E731
    answers = torch.randint(0, shape.d_vocab, (2, n_prompts), generator=g)
    return TaskData("random", "logit_diff", {}, tokens(), tokens(), torch.full((n_prompts,), seq_len),
                    answers[0], answers[1])


def _peak(device: torch.device, run) -> tuple[float, int]:
    """(seconds, peak bytes the allocator held: CUDA only, else 0) of ``run()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def _forced_oom(job_factory, shard: Shard, device: torch.device, one_head_bytes: int) -> str:
    """Leave free only about two single-head passes' memory, so the shard's first pass (every
    head of its layer at once) cannot run whole; it must still finish, its passes halved,
    with the numbers of an unhindered run. The clean state is built before the memory fills."""
    from sweeps.core import effects

    want = job_factory().run_heads(shard.layer, list(shard.heads))
    job = job_factory()
    job.batches()
    blocker, real, sizes = None, effects.ablate_heads_of_layer, []

    def recorded(w, layer, heads, *args, **kwargs):
        sizes.append(len(heads))
        if device.type != "cuda" and len(heads) > 1:  # no allocator to fill on a CPU: a stand-in
            raise torch.OutOfMemoryError("out of memory (stand-in)")
        return real(w, layer, heads, *args, **kwargs)

    effects.ablate_heads_of_layer = recorded
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        blocker = torch.empty(max(0, int(free - 2 * one_head_bytes)), dtype=torch.uint8, device=device)
    try:
        got = job.run_heads(shard.layer, list(shard.heads))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        return f"FAILED: {str(err).splitlines()[0]}"
    finally:
        del blocker
        effects.ablate_heads_of_layer = real
    same = all(np.allclose(a.backup, b.backup, atol=1e-2) for a, b in zip(want, got))
    how = "a filled GPU" if device.type == "cuda" else "a stand-in out-of-memory"
    verdict = "ok" if same and len(sizes) > 1 and sizes[0] > min(sizes) else "NOT EXERCISED" if same else "FAILED"
    return f"{verdict} (on {how}, heads a pass: {' '.join(map(str, sizes[:8]))}; same backup: {'yes' if same else 'NO'})"


def _staged_difference(w: tf.ModelWeights, shape: ModelShape, device: torch.device) -> float:
    """The largest difference between a two-stage replica (the CPU, then ``device``; on a CPU
    both stages are the CPU) and the model on one device, over a backup shard's slopes and
    direct effects and an attribution shard's edge scores, relative to the largest value."""
    task = random_task(shape, 4, 16, seed=1)
    shard = Shard(shape.n_layers - 1, (0, 1))
    split = stages.stage(w.to("cpu"), ["cpu", device])

    def numbers(weights) -> np.ndarray:
        b = BackupJob(task, "resample", 4, n_boot=0).bind(weights).run_shard(shard)["slopes"]
        a = AttributionJob(task).bind(weights).run_shard(AttributionShard(0, 4))["edge_sums"]
        return np.concatenate([b.column("slope").to_numpy(), b.column("mean_de").to_numpy(),
                               a.column("raw").to_numpy()]).astype(np.float64)

    one, two = numbers(w), numbers(split)
    return float(np.abs(one - two).max() / max(np.abs(one).max(), 1e-12))


def run(quick: bool) -> list[Ratio]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    n_prompts, seq_len = (8, 16) if device.type == "cpu" or quick else (32, 64)
    rows, ratios = [], []
    for name, full in SHAPES.items():
        shape = full if device.type == "cuda" and not quick else scaled_down(full)
        torch.manual_seed(0)
        w = random_weights(shape, dtype, device)
        task = random_task(shape, n_prompts, seq_len)
        layer = shape.n_layers // 2
        shard = Shard(layer, tuple(range(shape.n_heads)))
        plan_b = F.backup(shape, n_prompts, seq_len, n_prompts, 2, tokens_per_pass(device), shape.n_heads)
        plan_a = F.attribution(shape, n_prompts, seq_len, n_prompts, 2, budget_bytes=(8 << 30) if device.type == "cuda" else (2 << 30))
        job = BackupJob(task, "resample", n_prompts, n_boot=0).bind(w)
        seconds_b, peak_b = _peak(device, lambda: job.run_shard(shard))
        attribution = AttributionJob(task).bind(w)
        seconds_a, peak_a = _peak(device, lambda: attribution.run_shard(AttributionShard(0, n_prompts)))
        one_head = n_prompts * seq_len * (shape.block_activations() + shape.d_model) * 2
        oom = _forced_oom(lambda: BackupJob(task, "resample", n_prompts, n_boot=0, self_repair=False).bind(w), shard, device,
                          one_head)
        staged = f"{_staged_difference(w, shape, device):.1e}" if name == next(iter(SHAPES)) else ""
        accuracy_b = plan_b.per_replica_bytes / peak_b if peak_b else float("nan")
        accuracy_a = plan_a.per_replica_bytes / peak_a if peak_a else float("nan")
        def planned(plan: int, peak: int) -> str:
            return f"{plan / 1e9:.2f} / {peak / 1e9:.2f} GB" if peak else f"{plan / 1e6:.1f} MB / n/a"

        count = f"{shape.parameters / 1e9:.2f} B" if shape.parameters >= 1e8 else f"{shape.parameters / 1e6:.2f} M"
        rows.append([name, count, f"{shape.n_heads / seconds_b:.1f}", f"{n_prompts / seconds_a:.1f}",
                     planned(plan_b.per_replica_bytes, peak_b), planned(plan_a.per_replica_bytes, peak_a), oom,
                     staged])
        ratios.append(Ratio("gpu", f"{name}: backup heads/s", shape.n_heads / seconds_b))
        if peak_b:
            ratios.append(Ratio("gpu", f"{name}: backup planned / peak bytes", accuracy_b))
            ratios.append(Ratio("gpu", f"{name}: attribution planned / peak bytes", accuracy_a))
        del w, job, attribution
        if device.type == "cuda":
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (shapes scaled down)"
    print(f"## gpu: {where}, bfloat16, {n_prompts} prompts x {seq_len} tokens, random weights")
    print_table(["model shape", "parameters", "backup heads/s", "attribution prompts/s",
                 "backup planned / peak", "attribution planned / peak", "forced out of memory",
                 "2 stages (CPU + this device) vs 1: largest difference"], rows)
    return ratios


if __name__ == "__main__":  # the GPU machine lacks transformer-lens, Ray, W&B, gguf and plotly: none is imported
    import sys

    run("--quick" in sys.argv)
