"""Indirect object identification (Wang et al. 2022), with ABC corruption.

"When Mary and John went to the shops, John gave the bag to" -> " Mary".
Correct = the indirect object (IO), incorrect = the repeated subject (S).
Half the prompts are ABBA (IO named first), half BABA (S named first).
The corrupt prompt keeps the template, place and object and replaces the
three name slots with three fresh, distinct names (the "ABC" distribution),
so it carries no information about which name is the answer.
Names are kept only if they are one token (with a leading space) in the
model's tokenizer, so clean and corrupt prompts always align.
"""

from __future__ import annotations

import random

from tasks.base import TaskData, TaskError, is_single_token, logit_diff_task

# {A} and {B} are the first two names; {S} is the repeated subject.
TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave {obj} to",
    "Then, {A} and {B} went to the {place}. {S} gave {obj} to",
    "After {A} and {B} went to the {place}, {S} gave {obj} to",
    "While {A} and {B} were working at the {place}, {S} gave {obj} to",
    "Friends {A} and {B} went to the {place}. {S} gave {obj} to",
    "When {A} and {B} got {obj} at the {place}, {S} decided to give it to",
    "Afterwards, {A} and {B} went to the {place}. {S} handed {obj} to",
    "Then, {A} and {B} had a long argument at the {place}, and afterwards {S} said to",
]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "shops"]
OBJECTS = [
    "a drink",
    "the bag",
    "a ring",
    "the ball",
    "a computer",
    "a necklace",
    "a snack",
    "an apple",
    "a book",
    "the keys",
]
NAMES = [
    "Mary",
    "John",
    "Tom",
    "James",
    "Dan",
    "Sid",
    "Martin",
    "Amy",
    "Alice",
    "Bob",
    "Sarah",
    "Michael",
    "David",
    "Paul",
    "Kate",
    "Lisa",
    "Anna",
    "Mark",
    "Peter",
    "Emma",
    "Jack",
    "Ryan",
    "Laura",
    "Rachel",
    "Daniel",
    "Chris",
    "Steve",
    "Jane",
    "Robert",
    "William",
    "George",
    "Thomas",
    "Kevin",
    "Andrew",
    "Sam",
    "Alex",
    "Ben",
    "Lucy",
    "Grace",
    "Emily",
    "Joe",
    "Anne",
    "Richard",
    "Edward",
    "Henry",
    "Charles",
]
DEFAULT_N_PROMPTS = 64


def build(
    tokenizer,
    n_prompts: int | None = None,
    seed: int = 0,
    prepend_bos: bool = True,
    corruption: str = "ABC",
    context: str = "",
) -> TaskData:
    """``corruption``: "ABC" (the three names replaced, the default) or "S2" (only the repeated
    subject, by a third name: the pair then shares everything before it). ``context``: text put
    before every clean and corrupt prompt (a long shared prefix; the benchmarks use both)."""
    if corruption not in ("ABC", "S2"):
        raise TaskError(f"unknown IOI corruption {corruption!r}; ABC or S2")
    n = DEFAULT_N_PROMPTS if n_prompts is None else n_prompts
    names = [n for n in NAMES if is_single_token(tokenizer, " " + n)]
    if len(names) < 5:
        raise TaskError(f"only {len(names)} IOI names are single tokens in this tokenizer; need at least 5")
    rng = random.Random(seed)
    pairs, orders = [], []
    for i in range(n):
        template = rng.choice(TEMPLATES)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        io, s, c1, c2, c3 = rng.sample(names, 5)
        order = "ABBA" if i % 2 == 0 else "BABA"
        first, second = (io, s) if order == "ABBA" else (s, io)
        clean = context + template.format(A=first, B=second, S=s, place=place, obj=obj)
        if corruption == "ABC":
            corrupt = context + template.format(A=c1, B=c2, S=c3, place=place, obj=obj)
        else:
            corrupt = context + template.format(A=first, B=second, S=c3, place=place, obj=obj)
        pairs.append((clean, corrupt, " " + io, " " + s))
        orders.append(order)
    params = {"n_prompts": n, "seed": seed, "orders": "ABBA+BABA", "corruption": corruption}
    if context:  # recorded only when given, as prepend_bos below
        params["context"] = context
    if not prepend_bos:  # recorded only when off: the default's parameters (and results) stay as they were
        params["prepend_bos"] = False
    return logit_diff_task("ioi", params, tokenizer, pairs)
