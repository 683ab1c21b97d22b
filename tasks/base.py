"""What every task produces: token tensors, answer positions, answers, a metric.

A task turns a tokenizer into a ``TaskData``.  Conventions:
- every prompt starts with BOS and is padded on the **right**, so a prompt's
  answer position is its own last real token (``lengths - 1``), never ``-1``;
- the clean and corrupt prompt of one pair tokenize to the same length;
- logit-difference tasks name one correct and one incorrect single token (the pair the
  logit difference reads) and may name **sets** of correct and incorrect tokens (greater-than's
  years above and at or below the threshold, a multiple-choice question's other letters): the
  set metrics (``greater_than``, ``accuracy``; ``sweeps/core/metrics.py``) read the sets, the
  pair is each set's first token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

TaskKind = Literal["logit_diff", "next_token"]


class TaskError(ValueError):
    """Bad task input; the message says what and how to fix it."""


@dataclass
class TaskData:
    name: str
    kind: TaskKind
    params: dict[str, Any]  # JSON-serialisable; with the tokenizer, reproduces the task
    clean: Int[Tensor, "N T"]
    corrupt: Int[Tensor, "N T"]
    lengths: Int[Tensor, " N"]  # real tokens of each prompt, BOS included
    correct: Int[Tensor, " N"] | None = None  # logit_diff tasks only
    incorrect: Int[Tensor, " N"] | None = None
    prompts: list[str] = field(default_factory=list)
    # Answer sets (None: the single pair above), padded with -1; column 0 is ``correct`` /
    # ``incorrect``. Only tasks that name several answers per prompt carry them.
    correct_set: Int[Tensor, "N Kc"] | None = None
    incorrect_set: Int[Tensor, "N Ki"] | None = None
    # The metric every sweep reads (``sweeps/core/metrics.py``); None: the task's own (the
    # logit difference, or the next token's log-probability for text). Set by ``--metric``.
    metric: str | None = None

    @property
    def metric_name(self) -> str:
        """The metric in force: ``metric``, or the task's own."""
        return self.metric or ("logit_diff" if self.kind == "logit_diff" else "log_prob")

    def answer_sets(self) -> tuple[Int[Tensor, "N Kc"], Int[Tensor, "N Ki"]]:
        """(correct, incorrect) token sets, -1 padded; the single pair as sets of one."""
        assert self.correct is not None and self.incorrect is not None  # logit_diff tasks only
        c = self.correct[:, None] if self.correct_set is None else self.correct_set
        i = self.incorrect[:, None] if self.incorrect_set is None else self.incorrect_set
        return c, i

    @property
    def n_prompts(self) -> int:
        return self.clean.shape[0]

    @property
    def answer_pos(self) -> Int[Tensor, " N"]:
        return self.lengths - 1

    def select(self, index: Sequence[int] | slice) -> "TaskData":
        """A sub-batch (same task, fewer prompts), trimmed to its longest prompt."""
        idx = torch.arange(self.n_prompts)[index]
        lengths = self.lengths[idx]
        T = int(lengths.max())
        return TaskData(
            name=self.name,
            kind=self.kind,
            params=self.params,
            clean=self.clean[idx, :T],
            corrupt=self.corrupt[idx, :T],
            lengths=lengths,
            correct=None if self.correct is None else self.correct[idx],
            incorrect=None if self.incorrect is None else self.incorrect[idx],
            prompts=[self.prompts[i] for i in idx.tolist()] if self.prompts else [],
            correct_set=None if self.correct_set is None else self.correct_set[idx],
            incorrect_set=None if self.incorrect_set is None else self.incorrect_set[idx],
            metric=self.metric,
        )

    def fingerprint(self) -> str:
        """Content hash of the tensors: two runs used the same data iff equal."""
        digest = hashlib.blake2b(digest_size=8)
        for t in (
            self.clean,
            self.corrupt,
            self.lengths,
            self.correct,
            self.incorrect,
            self.correct_set,
            self.incorrect_set,
        ):
            if t is not None:
                digest.update(t.cpu().numpy().tobytes())
        return digest.hexdigest()


# --------------------------------------------------------------------------- #
# Tokenizer helpers shared by the tasks
# --------------------------------------------------------------------------- #


def bos_id(tokenizer) -> int:
    """The token TransformerLens prepends (BOS, or EOS for GPT-2-style vocabularies)."""
    value = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if value is None:
        raise TaskError("the tokenizer has neither a BOS nor an EOS token to prepend")
    return int(value)


def pad_id(tokenizer) -> int:
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(value if value is not None else 0)


def encode(tokenizer, text: str, prepend_bos: bool = True) -> list[int]:
    """BOS + the text's tokens (what ``bridge.to_tokens`` gives for one prompt); without the
    BOS for models whose rule is to prepend none (Qwen)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [bos_id(tokenizer), *ids] if prepend_bos else list(ids)


def is_single_token(tokenizer, word: str) -> bool:
    return len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1


def single_token(tokenizer, word: str, where: str = "") -> int:
    """The id of ``word`` if it is exactly one token, else a clear TaskError."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        at = f" ({where})" if where else ""
        raise TaskError(
            f"answer {word!r}{at} is {len(ids)} tokens {pieces} in this tokenizer; "
            "answers must be single tokens (mind the leading space, e.g. ' Mary')"
        )
    return int(ids[0])


def pad_right(rows: list[list[int]], pad: int) -> Tensor:
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


Answers = str | Sequence[str]  # one answer, or a set (its first is the pair's)


def logit_diff_task(
    name: str,
    params: dict[str, Any],
    tokenizer,
    pairs: Sequence[tuple[str, str, Answers, Answers]],
    where: list[str] | None = None,
) -> TaskData:
    """Build a logit-difference task from (clean, corrupt, correct, incorrect) strings.

    ``correct``/``incorrect`` are one answer or a list of answers (a set: the first is the pair
    the logit difference reads; every one must be a single token, and no token may be in both
    sets). ``where`` labels each pair in error messages (e.g. ``"line 7"``).
    """
    if not pairs:
        raise TaskError(f"task {name!r} has no prompts")
    where = where or [f"prompt {i}" for i in range(len(pairs))]
    clean_rows, corrupt_rows = [], []
    right_sets: list[list[int]] = []
    wrong_sets: list[list[int]] = []
    for (clean, corrupt, right, wrong), label in zip(pairs, where):
        bos = params.get("prepend_bos", True)
        c, x = encode(tokenizer, clean, bos), encode(tokenizer, corrupt, bos)
        if len(c) != len(x):
            raise TaskError(
                f"{label}: clean and corrupt prompts tokenize to different lengths "
                f"({len(c)} vs {len(x)} tokens); they must align position by position"
            )
        clean_rows.append(c)
        corrupt_rows.append(x)
        rights = [right] if isinstance(right, str) else list(right)
        wrongs = [wrong] if isinstance(wrong, str) else list(wrong)
        if not rights or not wrongs:
            raise TaskError(f"{label}: an empty answer list; name at least one correct and one incorrect answer")
        if rights[0] == wrongs[0]:
            raise TaskError(
                f"{label}: correct and incorrect are the same answer ({rights[0]!r}); "
                "the logit difference would be 0 for every prompt"
            )
        right_ids = [single_token(tokenizer, a, label) for a in rights]
        wrong_ids = [single_token(tokenizer, a, label) for a in wrongs]
        if right_ids[0] == wrong_ids[0]:
            raise TaskError(
                f"{label}: correct {rights[0]!r} and incorrect {wrongs[0]!r} are the same token "
                f"(id {right_ids[0]}); the logit difference would be 0 for every prompt"
            )
        both = set(right_ids) & set(wrong_ids)
        if both:
            raise TaskError(
                f"{label}: token(s) {sorted(tokenizer.decode([t]) for t in both)} are both correct and incorrect"
            )
        if len(set(right_ids)) != len(right_ids) or len(set(wrong_ids)) != len(wrong_ids):
            raise TaskError(f"{label}: an answer set names the same token twice")
        right_sets.append(right_ids)
        wrong_sets.append(wrong_ids)
    pad = pad_id(tokenizer)
    with_sets = any(len(r) > 1 for r in right_sets) or any(len(r) > 1 for r in wrong_sets)
    return TaskData(
        name=name,
        kind="logit_diff",
        params=params,
        clean=pad_right(clean_rows, pad),
        corrupt=pad_right(corrupt_rows, pad),
        lengths=torch.tensor([len(r) for r in clean_rows]),
        correct=torch.tensor([r[0] for r in right_sets]),
        incorrect=torch.tensor([r[0] for r in wrong_sets]),
        prompts=[p[0] for p in pairs],
        correct_set=pad_right(right_sets, -1) if with_sets else None,
        incorrect_set=pad_right(wrong_sets, -1) if with_sets else None,
    )
