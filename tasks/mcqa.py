"""Multiple-choice questions with letter answers: which option belongs to a category?

    Question: Which of these is a fruit?
    A. hammer
    B. apple
    C. violin
    D. tiger
    Answer:          -> " B"

One option is of the asked category, the others of three other categories. The correct answer
is its letter; the incorrect **set** is the other letters, first the letter the corrupt prompt
makes correct. The corrupt prompt asks the same question with the same options rotated, so
another letter is correct (the "symbol counterfactual" of MIB's MCQA): the options carry the
same tokens, only their order (and so the letter to pick) changes.
"""

from __future__ import annotations

import random

from tasks.base import TaskData, TaskError, encode, logit_diff_task

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach"],
    "animal": ["tiger", "horse", "rabbit", "dog", "cat", "lion", "sheep", "mouse"],
    "color": ["red", "blue", "green", "yellow", "purple", "black", "white", "brown"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "axe", "knife", "rake"],
    "instrument": ["violin", "piano", "guitar", "drum", "flute", "trumpet", "harp", "cello"],
    "country": ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Spain", "Mexico"],
    "vehicle": ["car", "bus", "train", "truck", "bicycle", "boat", "plane", "tractor"],
}
LETTERS = "ABCD"
DEFAULT_N_PROMPTS = 64


def render(category: str, options: list[str]) -> str:
    article = "an" if category[0] in "aeiou" else "a"
    lines = [f"Question: Which of these is {article} {category}?"]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join(lines) + "\nAnswer:"


def build(tokenizer, n_prompts: int | None = None, seed: int = 0, prepend_bos: bool = True) -> TaskData:
    n = DEFAULT_N_PROMPTS if n_prompts is None else n_prompts
    rng = random.Random(seed)
    letters = [" " + x for x in LETTERS]
    pairs: list[tuple[str, str, str, list[str]]] = []
    tries = 0
    while len(pairs) < n:
        tries += 1
        if tries > 50 * n:
            raise TaskError("mcqa: too few option sets tokenize alike in this tokenizer")
        asked, *others = rng.sample(sorted(CATEGORIES), len(LETTERS))
        options = [rng.choice(CATEGORIES[asked])] + [rng.choice(CATEGORIES[c]) for c in others]
        rng.shuffle(options)
        k = options.index(next(o for o in options if o in CATEGORIES[asked]))
        shift = rng.randrange(1, len(LETTERS))
        rotated = options[-shift:] + options[:-shift]  # option i moves to (i + shift) mod 4
        k_corrupt = (k + shift) % len(LETTERS)
        clean, corrupt = render(asked, options), render(asked, rotated)
        if len(encode(tokenizer, clean, prepend_bos)) != len(encode(tokenizer, corrupt, prepend_bos)):
            continue  # a merge across lines changed the length: draw another
        wrong = [letters[k_corrupt]] + [x for i, x in enumerate(letters) if i not in (k, k_corrupt)]
        pairs.append((clean, corrupt, letters[k], wrong))
    params = {"n_prompts": n, "seed": seed, "choices": len(LETTERS)}
    if not prepend_bos:
        params["prepend_bos"] = False
    return logit_diff_task("mcqa", params, tokenizer, pairs)
