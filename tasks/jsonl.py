"""A user's logit-difference task with no code: a ``.jsonl`` file.

One JSON object a line: ``{"clean": str, "corrupt": str, "correct": str | [str, ...],
"incorrect": str | [str, ...]}``. The answer is read at each prompt's own last token;
``correct``/``incorrect`` must be single tokens (mind the leading space). A list names a set
of answers (for the set metrics, ``--metric greater_than`` and ``accuracy``); its first is the
one the logit difference reads.
Lines are split on ``\n`` only, as JSON Lines says: a string may hold U+2028 or
any other character ``str.splitlines`` would also break at. Blank lines are
skipped. Errors name the line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.base import Answers, TaskData, TaskError, logit_diff_task

FIELDS = ("clean", "corrupt", "correct", "incorrect")


def _text_or_texts(value: object, lists: bool) -> bool:
    """A non-empty string, or (answers) a non-empty list of non-empty strings."""
    if isinstance(value, str):
        return bool(value)
    return lists and isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def read_pairs(path: str | Path) -> tuple[list[tuple[str, str, Answers, Answers]], list[str]]:
    """Parse and check the file (no tokenizer needed): pairs and their line labels."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TaskError(f"cannot read task file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise TaskError(f"task file {path} is not UTF-8 text") from None
    pairs: list[tuple[str, str, Answers, Answers]] = []
    where: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        label = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{label}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{label}: expected a JSON object with keys {', '.join(FIELDS)}")
        missing = [k for k in FIELDS if not _text_or_texts(row.get(k), lists=k in ("correct", "incorrect"))]
        if missing:
            raise TaskError(
                f"{label}: missing or non-string field(s) {', '.join(missing)}; each line needs {', '.join(FIELDS)} "
                "(correct and incorrect: a string or a list of strings)"
            )
        pairs.append((row["clean"], row["corrupt"], row["correct"], row["incorrect"]))
        where.append(label)
    if not pairs:
        raise TaskError(f"task file {path} holds no prompts")
    return pairs, where


def build(tokenizer, path: str | Path, n_prompts: int | None = None, prepend_bos: bool = True) -> TaskData:
    pairs, where = read_pairs(path)
    if n_prompts is not None:
        if n_prompts > len(pairs):
            raise TaskError(f"--n-prompts {n_prompts} is more than the {len(pairs)} prompts in {path}")
        pairs, where = pairs[:n_prompts], where[:n_prompts]
    digest = hashlib.blake2b(Path(path).read_bytes(), digest_size=8).hexdigest()
    params = {"file": str(Path(path).resolve()), "file_hash": digest, "n_prompts": len(pairs)}
    if not prepend_bos:  # recorded only when off: the default's parameters (and results) stay as they were
        params["prepend_bos"] = False
    return logit_diff_task(Path(path).stem, params, tokenizer, pairs, where)
