"""Movie-review sentiment: does the model continue with " great" or " awful"?

"This movie was a {adj1} viewing experience, and the plot and acting were
{adj2}. Overall, the film was" -> " great" after positive adjectives, " awful"
after negative ones. Prompts alternate positive and negative; each prompt's
corrupt partner is the mirrored prompt (same template, adjectives of the other
sentiment), and its incorrect answer is the other sentiment's word. Only
adjectives that are one token (with a leading space) in the model's tokenizer
are used, so clean and corrupt prompts always align. (The seed labels its
negative prompts with (" great", " awful") too; here each prompt's correct
answer is its own sentiment's word.)
"""

from __future__ import annotations

import random

from tasks.base import TaskData, TaskError, is_single_token, logit_diff_task

TEMPLATE = "This movie was a{a} viewing experience, and the plot and acting were{b}. Overall, the film was"
POSITIVE = [
    " perfect",
    " fantastic",
    " delightful",
    " cheerful",
    " marvelous",
    " good",
    " remarkable",
    " wonderful",
    " fabulous",
    " outstanding",
    " awesome",
    " exceptional",
    " incredible",
    " extraordinary",
    " amazing",
    " lovely",
    " brilliant",
    " charming",
    " terrific",
    " superb",
    " spectacular",
    " great",
    " splendid",
    " beautiful",
    " joyful",
    " positive",
    " excellent",
]
NEGATIVE = [
    " dreadful",
    " bad",
    " dull",
    " depressing",
    " miserable",
    " tragic",
    " nasty",
    " inferior",
    " horrific",
    " terrible",
    " ugly",
    " disgusting",
    " disastrous",
    " horrendous",
    " annoying",
    " boring",
    " offensive",
    " frustrating",
    " wretched",
    " dire",
    " awful",
    " unpleasant",
    " horrible",
    " mediocre",
    " disappointing",
    " inadequate",
]
ANSWERS = {"positive": " great", "negative": " awful"}
DEFAULT_N_PROMPTS = 50  # as in the seed (25 + 25), or as many as the tokenizer's single-token adjectives allow


def build(tokenizer, n_prompts: int | None = None, seed: int = 0, prepend_bos: bool = True) -> TaskData:
    rng = random.Random(seed)
    pos = [w for w in POSITIVE if is_single_token(tokenizer, w)]
    neg = [w for w in NEGATIVE if is_single_token(tokenizer, w)]
    rng.shuffle(pos)
    rng.shuffle(neg)
    available = 2 * min(len(pos), len(neg))
    if available < 2:
        raise TaskError("fewer than two positive or negative adjectives are single tokens in this tokenizer")
    n = min(DEFAULT_N_PROMPTS, available) if n_prompts is None else n_prompts
    if n > available:
        raise TaskError(
            f"--n-prompts {n} is more than the {available} distinct sentiment prompts this tokenizer allows"
        )

    def prompt(words: list[str], i: int) -> str:
        return TEMPLATE.format(a=words[i % len(words)], b=words[(i + 1) % len(words)])

    pairs = []
    for i in range(n):
        k = i // 2
        if i % 2 == 0:  # positive prompt, its negative mirror as the corrupt one
            pairs.append((prompt(pos, k), prompt(neg, k), ANSWERS["positive"], ANSWERS["negative"]))
        else:
            pairs.append((prompt(neg, k), prompt(pos, k), ANSWERS["negative"], ANSWERS["positive"]))
    params = {"n_prompts": n, "seed": seed, "n_positive_adjectives": len(pos), "n_negative_adjectives": len(neg)}
    if not prepend_bos:  # recorded only when off: the default's parameters (and results) stay as they were
        params["prepend_bos"] = False
    return logit_diff_task("sentiment", params, tokenizer, pairs)
