"""Two-digit addition and subtraction: "12+35=" -> "47".

Operands are two-digit numbers; the result is kept two-digit (10..99) so that every prompt and
answer tokenizes alike. The corrupt prompt has other operands of the same operation, whose
result starts with another token.

**Multi-token answers: the first token is scored.** In tokenizers that split digits (SmolLM2,
Llama 2, Qwen, Gemma) "47" is ``4``, ``7``; the answer read at the prompt's last position is its
first token, the tens digit, against the corrupt result's first token (the model's next token;
nothing is generated). ``TaskData.prompts`` holds the clean prompts, from which the full answers
follow. MIB's arithmetic sets (``--data hf:...``) keep only single-token results; here nothing
is dropped: the first token is what the model must get right first.
"""

from __future__ import annotations

import random

from tasks.base import TaskData, TaskError, logit_diff_task

OPERATIONS = {"addition": "+", "subtraction": "-"}
TEMPLATE = "{a}{op}{b}="
DEFAULT_N_PROMPTS = 64
MAX_DRAWS = 1000  # corrupt operands tried per prompt before the tokenizer is deemed unable


def first_token(tokenizer, text: str) -> str:
    """The text of ``text``'s first token (what the model predicts next)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:1])


def _operands(rng: random.Random, op: str) -> tuple[int, int, int]:
    while True:
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        result = a + b if op == "+" else a - b
        if 10 <= result <= 99:
            return a, b, result


def build(tokenizer, operation: str, n_prompts: int | None = None, seed: int = 0, prepend_bos: bool = True) -> TaskData:
    if operation not in OPERATIONS:
        raise TaskError(f"unknown arithmetic operation {operation!r}; {' or '.join(OPERATIONS)}")
    op = OPERATIONS[operation]
    n = DEFAULT_N_PROMPTS if n_prompts is None else n_prompts
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b, result = _operands(rng, op)
        right = first_token(tokenizer, str(result))
        for _ in range(MAX_DRAWS):  # other operands whose answer starts with another token
            c, d, other = _operands(rng, op)
            wrong = first_token(tokenizer, str(other))
            if wrong != right:
                break
        else:
            raise TaskError(
                f"{operation}: every result's first token is {right!r} with this tokenizer, so no corrupt "
                "prompt has another answer; use a .jsonl task with the answers as this model tokenizes them"
            )
        pairs.append((TEMPLATE.format(a=a, op=op, b=b), TEMPLATE.format(a=c, op=op, b=d), right, wrong))
    params = {"n_prompts": n, "seed": seed, "operation": operation, "scored": "first answer token"}
    if not prepend_bos:
        params["prepend_bos"] = False
    return logit_diff_task(operation, params, tokenizer, pairs)
