"""The task report as a command: one clean run, in this process (no shards, no Ray)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeps.registry.base import Sweep
from sweeps.registry.cli import (
    UserError,
    add_model_task_options,
    add_verbose_option,
    default_out,
    non_negative_int,
    positive_int,
)

SUM_CHECK_TOLERANCE = 1e-3  # float32 sums of ~300 components of size ~1


def sum_check_tolerance(parts, dtype: str) -> float:
    """How far the components' sum may miss the metric: ``SUM_CHECK_TOLERANCE`` in float32; in
    bfloat16 or float16 two roundings of the sum of the terms' magnitudes (the stream is the
    dtype's running sum of them; ``docs/planning.md``)."""
    from sweeps.core import precision

    magnitude = float(parts.magnitude().max())
    return max(SUM_CHECK_TOLERANCE, 2 * precision.unit_roundoff(precision.dtype_of(dtype)) * magnitude)


class ReportSweep(Sweep):
    """Task report: direct logit attribution, logit lens and attention patterns.

    For any task (ioi, sentiment, text, a .jsonl file), one clean run of the model gives:
    the mean logit difference (or next-token logit) and accuracy; the direct logit
    attribution of every layer and every head (a layers x heads heatmap); the logit
    lens of the accumulated residual stream over layers; the attention patterns of
    the top --top-heads positive and negative heads on one prompt, as a
    self-contained HTML page (the answer position's row first, a long prompt
    windowed to its last --attention-window positions); and the sum check:
    embeddings + every head + every MLP + biases add up to the real logit
    difference (the usual assert_close of a DLA walkthrough).
    A failed sum check exits with code 1.

    Writes plots/, tables/*.csv, attention.html and manifest.json under --out, and
    logs everything to one W&B run (offline by default). Runs in this process: one
    forward pass of the task, no Ray.

    Examples:
      .venv/bin/interp-sweeps report                       # SmolLM2 on IOI
      .venv/bin/interp-sweeps report --task sentiment --prompt-index 3
      .venv/bin/interp-sweeps report --model gpt2-small --task ioi --top-heads 3
    """

    name = "report"
    script = "sweeps/report.py"
    order = 50
    summary_line = "the task report: direct logit attribution, logit lens, attention patterns"
    help_sections = 3
    analyzable = False  # its outputs are the report itself

    @classmethod
    def add_options(cls, parser: argparse.ArgumentParser) -> None:
        add_model_task_options(parser)
        g = parser.add_argument_group("report")
        g.add_argument(
            "--prompt-index",
            type=non_negative_int,
            default=0,
            metavar="I",
            help="the prompt whose attention patterns are shown (default 0)",
        )
        g.add_argument(
            "--top-heads",
            type=positive_int,
            default=3,
            metavar="K",
            help="heads shown per sign in the attention page (default 3)",
        )
        g.add_argument(
            "--attention-window",
            type=non_negative_int,
            default=32,  # analysis.attention_html.WINDOW
            metavar="N",
            help="the attention page draws, per head, the last N positions of the prompt as query rows (the "
            "answer position first) and key columns, plus the 8 earlier keys the answer position attends to "
            "most; the page says what it leaves out (default 32; 0: the whole prompt, a page that grows with "
            "its square)",
        )
        g.add_argument(
            "--out", type=Path, metavar="DIR", help="output directory (default results/report/<model>__<task>)"
        )
        g.add_argument(
            "--wandb",
            choices=("online", "offline", "disabled"),
            default="offline",
            help="W&B logging: offline (default), online or disabled",
        )
        g.add_argument("--wandb-project", default="interp-sweeps", help="W&B project (default interp-sweeps)")
        add_verbose_option(g)

    def run(self, argv: list[str]) -> int:
        """One clean forward of the task; tables, plots, the attention page and a W&B run.
        A failed sum check (the components do not add up to the metric) exits with code 1."""
        from sweeps.registry.driver import prepare_inputs

        args = self.args
        args.out = args.out or default_out("report", args.model, args.task, args.dtype)
        try:
            inputs = self.inputs = prepare_inputs(args, "report")
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except self.input_errors() as err:
            raise UserError(str(err)) from None
        except OSError as err:  # what check_out_dir could not foresee, e.g. a read-only filesystem
            raise UserError(f"--out {args.out}: cannot create it ({err.strerror or err})") from None
        task, info = inputs.task, inputs.info
        if args.prompt_index >= task.n_prompts:
            raise UserError(
                f"--prompt-index {args.prompt_index} is out of range: the task has {task.n_prompts} prompts"
            )
        print(info.describe, file=sys.stderr)

        import torch

        from analysis.task_report import build_report, summary_lines, write_task_report
        from sweeps.core.engines import engine_for
        from sweeps.runtime.loading import load_model, load_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(info, device, args.dtype)
        report = engine_for(model).task_report(task, args.prompt_index)
        tables = build_report(report, info.n_layers, info.n_heads, task.kind)
        tokenizer = load_tokenizer(info)
        ids = task.clean[args.prompt_index, : int(task.lengths[args.prompt_index])].tolist()
        tokens = [tokenizer.decode([i]) for i in ids]
        spec = {
            **self.base_spec(),
            "prompt_index": args.prompt_index,
            "n_layers": info.n_layers,
            "n_heads": info.n_heads,
            "weight_hash": model.weight_hash,
            "engine_path": info.path,
        }
        for line in summary_lines(tables, args.top_heads):
            print(line)
        write_task_report(
            args.out,
            tables,
            report,
            spec,
            tokens,
            args.top_heads,
            args.wandb,
            args.wandb_project,
            attention_window=args.attention_window,
        )
        print(f"attention patterns: {args.out / 'attention.html'}", file=sys.stderr)
        if tables.summary["sum_check_max_abs_error"] > sum_check_tolerance(report.parts, args.dtype):
            print(
                f"error: the components do not add up to the {tables.summary['metric']} "
                f"(max error {tables.summary['sum_check_max_abs_error']:.2e})",
                file=sys.stderr,
            )
            return 1
        return 0
