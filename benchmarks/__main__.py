"""Sweep speed and memory, as ratios measured side by side in one run.

    python -m benchmarks                  # SmolLM2-135M, text task, 32 prompts x 64 tokens (a few minutes)
    python -m benchmarks --quick          # tiny models, small batches: a smoke test for CI (seconds)
    python -m benchmarks --only scale,ray # some sections

Sections (each prints its own table, then one summary table of every ratio):
  backup       cost per upstream head / one forward pass to logits; seed 000's recipe beside it
  scale        cost per (node, scale, pair) / one pair's forward; seed 004's loop beside it
  attribution  the whole attribution sweep / one forward of the dataset
  ray          the Ray executor with one and two workers against the in-process one
  memory       peak RSS of a worker: 10 heads against all, and against prompts x tokens
  growth       per-head cost against layers, heads, prompts and tokens; whole-sweep estimates
  profile      (only with --only) the torch profiler's top operators per workload

Every figure is a ratio of two timings taken in the same run on the same machine
(this one is noisy); nothing here is asserted by the tests, which check only that
the fast paths give the numbers the straightforward ones give.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from benchmarks import attribution, backup, growth, memory, profile, ray_overhead, scale
from benchmarks.common import Ratio, load_setup, machine, print_table

SECTIONS = ("backup", "scale", "attribution", "ray", "memory", "growth")
EXTRA = ("profile",)  # only when asked for


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
    parser.add_argument("--only", type=parse_sections, default=list(SECTIONS), metavar="LIST",
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    began = time.perf_counter()
    if args.quick:
        name, n, T, repeat = "tiny-llama", 8, 32, 2
    else:
        name, n, T, repeat = "smollm2-135m", 32, 64, 2
    print(f"benchmarks, {datetime.date.today()}: {machine()}\n")
    ratios: list[Ratio] = []
    in_process = [s for s in args.only if s != "memory"]
    setup = load_setup(name, n, T, repeat) if in_process else None
    if "backup" in args.only:
        ratios += backup.run(setup)
    if "scale" in args.only:
        ratios += scale.run(setup)
    if "attribution" in args.only:
        ratios += attribution.run(setup)
    if "ray" in args.only:
        ratios += ray_overhead.run(setup)
    if "memory" in args.only:
        if args.quick:
            ratios += memory.run("tiny-llama", 12, small=(4, 16), large=(8, 32))
        else:
            ratios += memory.run(name, 270, small=(8, 32), large=(16, 64))
    if "profile" in args.only:
        profile.run(setup)
    if "growth" in args.only:
        if args.quick:
            others = growth.load_weights(["tiny-gpt2"])
            ratios += growth.run({**others, name: setup.weights}, setup.bridge.tokenizer, (4, 16),
                                 prompts=[4, 8], tokens=[16, 32], grow_on=name)
        else:
            others = growth.load_weights(["tiny-gpt2", "tiny-llama", "random-gpt2-small"])
            ratios += growth.run({**others, name: setup.weights}, setup.bridge.tokenizer, (8, 32),
                                 prompts=[8, 16, 32], tokens=[16, 32, 64], grow_on=name)

    print(f"## summary ({name}; every ratio measured side by side in this run; {time.perf_counter() - began:.0f} s)")
    print_table(["section", "measure", "ratio", "goal", ""],
                [[r.section, r.measure, f"{r.value:.3g}", r.goal, r.verdict] for r in ratios])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
