"""Host memory while loading a model: a cold load (no model-cache entry), a cached load, and,
beside them, the whole-model load a layer-at-a-time load replaced.

Each model is first saved as a Hugging Face directory of safetensors files (what a download
leaves), in bfloat16 as research checkpoints ship, except the embedded SmolLM2, saved in the
float32 its GGUF file de-quantises to. Each load is then its own process
(``python -m benchmarks.loading DIR MODE CACHE``) that imports everything, resets the kernel's
peak-RSS counter (``/proc/self/clear_refs``), loads, and reports its peak resident memory above
what it held before the load, over the processed weights' bytes. Goals: a cold load at most
1.5 times the processed weights, a cached load at most 1.2 times. The whole-model load is
measured only where it fits this machine. Nothing is timed; nothing here is asserted by tests.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Ratio, print_table
from benchmarks.memory import _status_kb

# (model, saved dtype, why the whole-model load is not measured beside it, or None): the whole
# load of the 1B shape peaks near 25 GB, beyond this machine.
FULL = [("smollm2-135m", "float32", None), ("random-qwen2.5-0.5b", "bfloat16", None),
        ("random-llama3.2-1b", "bfloat16", "(does not fit)")]
QUICK = [("tiny-llama3", "float32", "(not in --quick)")]


def save(name: str, dtype: str, directory: Path) -> None:
    """Model ``name`` saved into ``directory`` as a Hugging Face safetensors checkpoint."""
    import torch

    from sweeps.runtime import loading, models

    hf, tokenizer, _ = loading.load_hf_model(models.describe_model(name))
    hf.hf_quantizer = None  # a de-quantised GGUF model saves as a plain one
    hf.config.quantization_config = None
    hf.to(getattr(torch, dtype)).save_pretrained(directory, max_shard_size="1GB")
    tokenizer.save_pretrained(directory)


def probe(directory: str, mode: str, cache: str) -> dict:
    """Run in the child: the peak resident memory of one load above what the process held before."""
    import os

    os.environ["SWEEPS_CACHE_DIR"] = cache
    import torch

    from sweeps.runtime import loading, models

    info = models.describe_model(directory)
    # What any load imports and reads first (modules, the tokenizer) is not the load's memory.
    import transformer_lens.model_bridge  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    AutoConfig.from_pretrained(directory)
    loading.load_tokenizer(info)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kb("VmRSS") * 1024
    weights = loading.whole_weights(info) if mode == "whole" else loading.load_model(info).weights
    peak = _status_kb("VmHWM") * 1024 - before
    processed = sum(v.nbytes for v in vars(weights).values() if isinstance(v, torch.Tensor))
    return {"peak": peak, "processed": processed}


def measure(directory: Path, mode: str, cache: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.loading", str(directory), mode, str(cache)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"loading probe {directory.name} {mode} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[Ratio]:
    rows, ratios = [], []
    for name, dtype, skipped in QUICK if quick else FULL:
        work = Path(tempfile.mkdtemp(prefix="sweeps-loading-"))
        try:
            saved = subprocess.run([sys.executable, "-c", f"from benchmarks.loading import save; from pathlib import "
                                    f"Path; save({name!r}, {dtype!r}, Path({str(work / 'model')!r}))"],
                                   capture_output=True, text=True, timeout=1800)
            if saved.returncode:
                raise RuntimeError(f"saving {name} failed:\n{saved.stderr[-2000:]}")
            cold = measure(work / "model", "load", work / "cache")
            cached = measure(work / "model", "load", work / "cache")
            old = None if skipped else measure(work / "model", "whole", work / "no-cache")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        gb = cold["processed"] / 1e9
        r_cold, r_cached = cold["peak"] / cold["processed"], cached["peak"] / cold["processed"]
        r_old = old["peak"] / old["processed"] if old else None
        rows.append([name, dtype, f"{gb:.2f} GB", f"{r_cold:.2f}", f"{r_cached:.2f}",
                     f"{r_old:.2f}" if r_old else skipped])
        # the goals are for real sizes: a tiny model's load is mostly fixed costs
        ratios.append(Ratio("loading", f"{name}: cold load peak / processed weights", r_cold, "" if quick else "<= 1.5"))
        ratios.append(
            Ratio("loading", f"{name}: cached load peak / processed weights", r_cached, "" if quick else "<= 1.2")
        )
        if r_old:
            ratios.append(Ratio("loading", f"{name}: whole-model load peak / processed weights (before)", r_old))
    print("## loading: peak resident memory of a load above what the process held, over the processed "
          "float32 weights (a safetensors checkpoint, processed a layer at a time)")
    print_table(["model", "saved as", "processed weights", "cold load", "cached load", "whole-model load"], rows)
    return ratios


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], sys.argv[2], sys.argv[3])))
