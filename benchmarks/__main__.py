"""Sweep speed and memory, as ratios measured side by side in one run.

    python -m benchmarks                  # SmolLM2-135M, text task, 16 prompts x 64 tokens (~5 min, 2 cores)
    python -m benchmarks --prompts 32     # the same at 32 prompts x 64 tokens (~8 min; about the same ratios)
    python -m benchmarks --quick          # tiny models, small batches: a smoke test for CI (~1 min)
    python -m benchmarks --only scale,ray # some sections

Sections (each prints its own table, then one summary table of every ratio):
  backup       cost per upstream head / one forward pass to logits; the usual hooked recipe beside it
  scale        cost per (node, scale, pair) / one prompt's forward, on text and on IOI; the usual scale-ablation loop's loop
  attribution  the whole attribution sweep / one forward of the dataset; against autograd's floor
  circuits     EAP, one EAP-IG step and one circuit evaluation / one forward, on IOI
  peers        patching every head per head / one forward: the backup sweep (prefix-shared and full
               restarts), TransformerLens's activation patching and an nnsight loop, values compared,
               on IOI, IOI with only S2 corrupted, and a long shared context before IOI
  families     backup per head and scale per row / a forward on SmolLM2, Gemma-3-270M's and
               Qwen2.5-0.5B's shapes (random weights; a 262k and a 152k vocabulary)
  ray          the Ray executor with one and two workers against the in-process one
  memory       peak RSS of a worker: 10 heads against all, and against prompts x tokens
  growth       per-head cost against layers, heads, prompts and tokens; whole-sweep estimates
  throughput   backup heads/s and scale (node, scale)/s on the GPU, its utilisation and peak
               memory (goal 7; in the default run only when a GPU is present, and in --quick)
  profile      (only with --only) the torch profiler's top operators per workload
  precision    (with --only, and in --quick) bfloat16 and float16 against float32 on the same run,
               per family and on SmolLM2: direct effects, backup, edge scores, faithfulness
  planner      (with --only, and in --quick) `interp-sweeps plan`'s memory against a worker's measured peak
  gpu          (with --only, and in --quick) the first GPU's command: Llama-3.2-1B, Gemma-2-2B and
               Llama-3.1-8B shapes in bfloat16 (random weights, made on the GPU): backup and attribution
               throughput, the planner against the allocator's peak, a forced out-of-memory
               recovery (on a CPU: the same on shapes scaled down)
  loading      (with --only, and in --quick) host memory of a cold and a cached load of a safetensors
               checkpoint (processed a layer at a time) over the processed weights, and of the
               whole-model load beside them

Every figure but throughput's rates is a ratio of two timings taken in the same run on
the same machine (this one is noisy); nothing here is asserted by the tests, which check
only that every section runs and the fast paths give the numbers the straightforward
ones give.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from benchmarks import (
    attribution,
    backup,
    circuits,
    families,
    gpu,
    growth,
    loading,
    memory,
    planner,
    precision,
    profile,
    peers,
    ray_overhead,
    scale,
    throughput,
)
from benchmarks.common import Ratio, Setup, load_setup, machine, print_table
from sweeps.runtime.allocator import keep_freed_memory

SECTIONS = ("backup", "scale", "attribution", "circuits", "peers", "families", "ray", "memory", "growth")
# only when asked for (throughput: also with a GPU; all but profile in --quick)
EXTRA = ("profile", "throughput", "precision", "planner", "gpu", "loading")


def default_sections(quick: bool) -> list[str]:
    return [*SECTIONS, *(["throughput"] if quick or torch.cuda.is_available() else []), *(["precision", "planner", "gpu", "loading"] if quick else [])]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def parse_sections(text: str) -> list[str]:
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS + EXTRA]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section {unknown[0]!r}; choose from "
                                         f"{', '.join(SECTIONS + EXTRA)}")
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, small batches (CI smoke test)")
    parser.add_argument("--only", type=parse_sections, default=None, metavar="LIST",
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)}, and "
                             "throughput with a GPU or --quick)")
    parser.add_argument("--prompts", type=_positive, default=16, metavar="N",
                        help="prompts in the batch the backup, scale and attribution sections measure on "
                             "(default 16, about 5 minutes on 2 cores; the Ray section takes a quarter of "
                             "them). 32 takes about 8 minutes and gave about the same ratios")
    parser.add_argument("--tokens", type=_positive, default=64, metavar="T",
                        help="tokens per prompt of that batch (default 64; both are ignored with --quick)")
    args = parser.parse_args(argv)
    if args.only is None:
        args.only = default_sections(args.quick)
    torch.set_grad_enabled(False)
    # As a CPU worker does (run.ShardWorker): the sections time the engine as a sweep runs it.
    kept = not torch.cuda.is_available() and keep_freed_memory()
    began = time.perf_counter()
    if args.quick:
        name, n, T, repeat = "tiny-llama", 8, 32, 2
    else:
        name, n, T, repeat = "smollm2-135m", args.prompts, args.tokens, 2
    print(f"benchmarks, {datetime.date.today()}: {machine()}{'; malloc keeps freed memory' if kept else ''}\n")
    ratios: list[Ratio] = []
    in_process = [s for s in args.only if s not in ("memory", "precision", "planner", "gpu", "loading")]
    load = time.perf_counter()
    setup = load_setup(name, n, T, repeat) if in_process else None
    load = time.perf_counter() - load
    sections = {
        "backup": lambda: backup.run(setup),
        "scale": lambda: scale.run(setup),
        "attribution": lambda: attribution.run(setup),
        "circuits": lambda: circuits.run(setup),
        "peers": lambda: peers.run(setup, n_prompts=n if args.quick else 16),
        "families": lambda: families.run(args.quick),
        "ray": lambda: ray_overhead.run(setup),
        "memory": lambda: (memory.run("tiny-llama", 12, small=(4, 16), large=(8, 32)) if args.quick
                           else memory.run(name, 270, small=(4, 16), large=(8, 32))),
        "profile": lambda: profile.run(setup),
        "growth": lambda: _growth(setup, name, args.quick),
        "throughput": lambda: _throughput(setup, name, args.quick),
        "precision": lambda: precision.run(args.quick, args.prompts),
        "planner": lambda: planner.run(args.quick),
        "gpu": lambda: gpu.run(args.quick),
        "loading": lambda: loading.run(args.quick),
    }
    seconds = {}
    for section in sections:
        if section in args.only:
            start = time.perf_counter()
            ratios += sections[section]()
            seconds[section] = time.perf_counter() - start

    took = ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    print(f"## summary ({name}; every ratio measured side by side in this run; {time.perf_counter() - began:.0f} s: "
          f"model load {load:.0f}, {took})")
    print_table(["section", "measure", "ratio", "goal", ""],
                [[r.section, r.measure, f"{r.value:.3g}", r.goal, r.verdict] for r in ratios])
    return 0


def _growth(setup: Setup, name: str, quick: bool) -> list[Ratio]:
    if quick:
        others = growth.load_weights(["tiny-gpt2"])
        return growth.run({**others, name: setup.weights}, setup.bridge.tokenizer, (4, 16),
                          prompts=[4, 8], tokens=[16, 32], grow_on=name)
    others = growth.load_weights(["tiny-gpt2", "tiny-llama", "random-gpt2-small"])
    return growth.run({**others, name: setup.weights}, setup.bridge.tokenizer, (4, 32),
                      prompts=[4, 8, 16], tokens=[16, 32, 64], grow_on=name)


def _throughput(setup: Setup, name: str, quick: bool) -> list[Ratio]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    others = growth.load_weights(["tiny-gpt2"] if quick else ["random-gpt2-small"])
    # On a GPU, as many prompts as the text corpus gives at 64 tokens: passes of 65,536 tokens.
    n_prompts, seq_len = (4, 16) if quick else ((128, 64) if device.type == "cuda" else (32, 64))
    return throughput.run({name: setup.weights, **others}, setup.bridge.tokenizer, n_prompts, seq_len, device)


if __name__ == "__main__":
    raise SystemExit(main())
