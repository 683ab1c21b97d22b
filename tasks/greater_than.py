"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a
year after 1732.

The correct answers are a **set**: every continuation that makes the second year greater than
the first; the incorrect ones are the rest of the candidates (at or below it). The corrupt prompt
starts in the year ``XX01`` (as in the paper), after which almost every year is greater, so it
carries no information about the threshold.

Two tokenizations, chosen by the tokenizer:

- **two-digit** (GPT-2 and others, where ``32`` in ``1732`` is one token): ``YY`` runs over
  02..98 as in the paper; the candidates are the two-digit tokens 00..99, correct = ``YY+1..99``,
  incorrect = ``00..YY``.
- **digit** (SmolLM2, Llama 2, Qwen, Gemma: every digit its own token): the next token is the
  tens digit of the second year, which decides "greater" only when the first year ends in 9:
  so ``YY`` is ``d9`` (d = 0..8), the candidates are the digits 0..9, correct = ``d+1..9``,
  incorrect = ``0..d`` (exact: ``XXd?`` is at most ``XXd9``).

The pair the logit difference reads is each set's first answer: ``YY+1`` (or ``d+1``) against
``YY`` (or ``d``), the years just above and at the threshold.
"""

from __future__ import annotations

import random

from tasks.base import TaskData, TaskError, encode, logit_diff_task

TEMPLATE = "The {noun} lasted from the year {century}{yy} to the year {century}"
NOUNS = [
    "war",
    "expedition",
    "drought",
    "famine",
    "siege",
    "rebellion",
    "pilgrimage",
    "dynasty",
    "epidemic",
    "voyage",
    "occupation",
    "reign",
    "strike",
    "conflict",
    "crisis",
]
CENTURIES = [str(c) for c in range(11, 18)]  # 11xx .. 17xx, as in the paper
CORRUPT_YY = "01"
DEFAULT_N_PROMPTS = 64


def digit_mode(tokenizer) -> bool:
    """True where the tokenizer splits ``1732`` into single digits (no two-digit ``32`` token)."""
    ids = tokenizer(" 1732", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[-1:]) != "32"


def build(tokenizer, n_prompts: int | None = None, seed: int = 0, prepend_bos: bool = True) -> TaskData:
    n = DEFAULT_N_PROMPTS if n_prompts is None else n_prompts
    digits = digit_mode(tokenizer)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        noun, century = rng.choice(NOUNS), rng.choice(CENTURIES)
        if digits:
            d = rng.randrange(0, 9)
            yy = f"{d}9"
            right = [str(k) for k in range(d + 1, 10)]
            wrong = [str(k) for k in range(d, -1, -1)]
        else:
            y = rng.randrange(2, 99)
            yy = f"{y:02d}"
            right = [f"{k:02d}" for k in range(y + 1, 100)]
            wrong = [f"{k:02d}" for k in range(y, -1, -1)]
        clean = TEMPLATE.format(noun=noun, century=century, yy=yy)
        corrupt = TEMPLATE.format(noun=noun, century=century, yy=CORRUPT_YY)
        pairs.append((clean, corrupt, right, wrong))
    check_last_token(tokenizer, pairs[0][0], pairs[0][2][0], prepend_bos)
    params = {"n_prompts": n, "seed": seed, "tokens": "digit" if digits else "two-digit"}
    if not prepend_bos:  # recorded only when off, as every task does
        params["prepend_bos"] = False
    return logit_diff_task("greater-than", params, tokenizer, pairs)


def check_last_token(tokenizer, prompt: str, answer: str, prepend_bos: bool) -> None:
    """The answer must be the token that follows the prompt's own tokens (the century's last
    token must not merge with the year's first digits)."""
    alone = encode(tokenizer, prompt, prepend_bos)
    joined = encode(tokenizer, prompt + answer, prepend_bos)
    if joined[: len(alone)] != alone or len(joined) != len(alone) + 1:
        raise TaskError(
            "greater-than: this tokenizer merges the century with the year's digits "
            f"({prompt + answer!r}); the next token is not a year"
        )
