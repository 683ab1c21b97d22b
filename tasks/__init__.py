"""Task registry: a name (or a ``.jsonl`` path) -> a ``TaskData`` builder.

``check_task`` validates a task name before anything expensive loads and
suggests the closest names ("did you mean"); ``build_task`` builds it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass

from tasks.base import TaskData, TaskError

TASKS = {
    "ioi": "indirect object identification, BABA + ABBA templates, ABC corruption (logit difference)",
    "ioi-s2": "IOI with only the repeated subject corrupted (S2 -> a third name): each pair shares its prefix",
    "text": "next-token prediction on documents (--data FILE | hf:NAME; default: a shipped offline corpus)",
    "sentiment": "movie-review sentiment, ' great' vs ' awful', mirrored corrupt prompts (logit difference)",
    "greater-than": "Hanna et al. 2023 years: 'from the year 1739 to the year 17' -> a later year (answer sets)",
    "addition": "two-digit addition '12+35=', corrupt = other operands (first answer token scored)",
    "subtraction": "two-digit subtraction '57-23=', corrupt = other operands (first answer token scored)",
    "mcqa": "multiple-choice questions, letters A-D; corrupt = options rotated so another letter is correct",
}
# Tasks ``--data hf:NAME`` can read from the hub (MIB's datasets, ``tasks/hub.py``).
HUB_TASKS = ("ioi", "addition", "subtraction", "mcqa", "greater-than")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # a registered name, or "jsonl"
    path: str | None = None


def check_task(name_or_file: str) -> TaskSpec:
    """Resolve ``--task``; raise a one-line TaskError for unknown names or bad files."""
    if name_or_file in TASKS:
        return TaskSpec(name_or_file)
    if name_or_file.endswith(".jsonl") or os.path.sep in name_or_file:
        from tasks.jsonl import read_pairs

        read_pairs(name_or_file)  # reads and checks every line now
        return TaskSpec("jsonl", name_or_file)
    close = difflib.get_close_matches(name_or_file, list(TASKS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise TaskError(
        f"unknown task {name_or_file!r}.{hint} Known tasks: {', '.join(TASKS)}; "
        "or give a .jsonl file of {clean, corrupt, correct, incorrect} lines."
    )


def check_data(spec: TaskSpec, seq_len: int | None, data: str | None) -> None:
    """``--seq-len`` is for text; ``--data`` is documents for text, or ``hf:NAME`` (MIB's
    datasets) for the tasks in ``HUB_TASKS``."""
    if spec.name != "text" and seq_len is not None:
        raise TaskError("--seq-len applies only to --task text")
    if spec.name == "text" or data is None:
        return
    if spec.name not in HUB_TASKS or not data.startswith("hf:"):
        raise TaskError(
            f"--data for --task {spec.name}: only hf:NAME (a MIB dataset on the hub) for the tasks "
            f"{', '.join(HUB_TASKS)}; --data FILE is for --task text"
        )


def build_task(
    spec: TaskSpec,
    tokenizer,
    n_prompts: int | None = None,
    seed: int = 0,
    seq_len: int | None = None,
    data: str | None = None,
    prepend_bos: bool = True,
) -> TaskData:
    """The task's tensors in ``tokenizer``'s vocabulary. ``prepend_bos``: the model's own rule
    (``ModelInfo.prepend_bos``): every prompt starts with BOS, or (Qwen) with its first word."""
    if n_prompts is not None and n_prompts <= 0:
        raise TaskError(f"--n-prompts must be positive, got {n_prompts}")
    check_data(spec, seq_len, data)
    if data is not None and spec.name != "text":
        from tasks import hub

        return hub.build(tokenizer, spec.name, data, n_prompts=n_prompts, prepend_bos=prepend_bos)
    if spec.name in ("ioi", "ioi-s2"):
        from tasks import ioi

        corruption = "S2" if spec.name == "ioi-s2" else "ABC"
        task = ioi.build(tokenizer, n_prompts=n_prompts, seed=seed, prepend_bos=prepend_bos, corruption=corruption)
        task.name = spec.name
        return task
    if spec.name == "sentiment":
        from tasks import sentiment

        return sentiment.build(tokenizer, n_prompts=n_prompts, seed=seed, prepend_bos=prepend_bos)
    if spec.name == "greater-than":
        from tasks import greater_than

        return greater_than.build(tokenizer, n_prompts=n_prompts, seed=seed, prepend_bos=prepend_bos)
    if spec.name in ("addition", "subtraction"):
        from tasks import arithmetic

        return arithmetic.build(tokenizer, spec.name, n_prompts=n_prompts, seed=seed, prepend_bos=prepend_bos)
    if spec.name == "mcqa":
        from tasks import mcqa

        return mcqa.build(tokenizer, n_prompts=n_prompts, seed=seed, prepend_bos=prepend_bos)
    if spec.name == "text":
        from tasks import text

        return text.build(
            tokenizer, data=data, n_prompts=n_prompts, seq_len=seq_len, seed=seed, prepend_bos=prepend_bos
        )
    from tasks import jsonl

    assert spec.path is not None  # check_task sets the path of every jsonl spec
    return jsonl.build(tokenizer, spec.path, n_prompts=n_prompts, prepend_bos=prepend_bos)


__all__ = ["HUB_TASKS", "TASKS", "TaskData", "TaskError", "TaskSpec", "build_task", "check_task"]
