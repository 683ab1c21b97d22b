"""MIB's datasets on the Hugging Face hub as tasks: ``--task T --data hf:NAME[:SPLIT]``.

The files are fetched with ``huggingface_hub`` (``snapshot_download``; with ``HF_HUB_OFFLINE=1``
from the local cache alone) and read with pyarrow (parquet) or as JSON Lines: the ``datasets``
library is not needed. The split's files are those whose name starts with the split
(``train-00000-of-00001.parquet``, ``train.jsonl``), under the task's configuration folder where
the repository has one (MCQA: ``4_answer_choices``).

Column mapping, as MIB's own loader (``MIB_circuit_track/dataset.py``, ``HFEAPDataset``) reads
them (read from its code; the dataset cards were not available offline):

========================  ===================================================================
task                      columns read
========================  ===================================================================
``ioi``                   ``prompt``; corrupt ``s2_io_flip_counterfactual.prompt``; correct
                          ``" " + metadata.indirect_object``, incorrect ``" " + metadata.subject``
``addition``,             ``prompt``, ``label``; corrupt ``random_counterfactual.prompt`` and
``subtraction``           ``.label``; rows of the other ``operator`` are skipped. The first
                          token of each label is scored (``tasks/arithmetic.py``).
``mcqa``                  ``prompt``; correct ``choices.label[answerKey]``; corrupt
                          ``symbol_counterfactual.prompt``, incorrect its own
                          ``choices.label[answerKey]`` (tokenized as given, as MIB does)
``greater-than``          ``clean``, ``corrupted``, ``year``: the candidates and sets of
                          ``tasks/greater_than.py`` from the year's last two digits (digit
                          tokenizers: the tens digit; exact only for years ending in 9, an
                          approximation otherwise: the threshold's own tens digit counts as
                          incorrect)
========================  ===================================================================

Rows whose clean and corrupt prompts tokenize to different lengths, whose answers are not
single tokens in this tokenizer (an IOI name of two pieces), or whose correct and incorrect
first tokens coincide, are skipped (MIB filters such rows too); ``params`` records how many.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.base import Answers, TaskData, TaskError, encode, is_single_token, logit_diff_task

HUB_TASKS = ("ioi", "addition", "subtraction", "mcqa", "greater-than")
CONFIGS = {"mcqa": "4_answer_choices"}
DEFAULT_N_PROMPTS = 64


def parse_source(data: str) -> tuple[str, str]:
    """``hf:NAME[:SPLIT]`` -> (NAME, SPLIT), the split ``train`` by default."""
    _, _, rest = data.partition(":")
    name, _, split = rest.partition(":")
    if name.count("/") != 1 or not all(name.split("/")):
        raise TaskError(f"--data {data!r}: expected hf:ORG/NAME[:SPLIT], e.g. hf:mib-bench/ioi")
    return name, split or "train"


def read_rows(data: str, task: str) -> tuple[list[dict[str, Any]], str]:
    """The split's rows (dicts, nested columns as dicts) and a label of their source."""
    name, split = parse_source(data)
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(name, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl", "*.json"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown dataset, no access: one line
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TaskError(f"cannot load Hugging Face dataset {name!r}: {message}") from None
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
    config = CONFIGS.get(task)
    if config and any(config in p.relative_to(root).parts for p in files):
        files = [p for p in files if config in p.relative_to(root).parts]
    files = [p for p in files if p.name.startswith(split)]
    if not files:
        raise TaskError(f"Hugging Face dataset {name!r} has no {split!r} split files (parquet or jsonl)")
    rows: list[dict[str, Any]] = []
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(path).to_pylist()
        else:  # JSON Lines, or one JSON array of rows
            text = path.read_text(encoding="utf-8")
            try:
                if text.lstrip().startswith("["):
                    rows += json.loads(text)
                else:
                    rows += [json.loads(line) for line in text.split("\n") if line.strip()]
            except json.JSONDecodeError as err:
                raise TaskError(f"{name}: {path.name} is not JSON Lines or a JSON array ({err})") from None
    return rows, f"hf:{name}:{split}"


def _column(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise TaskError(f"MIB row has no column {path!r} (columns: {', '.join(row)})")
        value = value[key]
    return value


def _choice(block: dict[str, Any]) -> str:
    """The correct option's label: ``choices.label[answerKey]`` (``answerKey`` an index, as MIB reads it)."""
    return str(_column(block, "choices.label")[int(_column(block, "answerKey"))])


def to_pair(task: str, row: dict[str, Any], digits: bool) -> tuple[str, str, Any, Any] | None:
    """One MIB row as (clean, corrupt, correct, incorrect), or None to skip it."""
    if task == "ioi":
        return (
            _column(row, "prompt"),
            _column(row, "s2_io_flip_counterfactual.prompt"),
            " " + _column(row, "metadata.indirect_object"),
            " " + _column(row, "metadata.subject"),
        )
    if task in ("addition", "subtraction"):
        op = "+" if task == "addition" else "-"
        cf = row.get("random_counterfactual")
        if row.get("operator", op) != op or not cf or cf.get("prompt") is None:
            return None
        return _column(row, "prompt"), cf["prompt"], str(_column(row, "label")), str(cf["label"])
    if task == "mcqa":
        cf = _column(row, "symbol_counterfactual")
        return _column(row, "prompt"), _column(cf, "prompt"), _choice(row), _choice(cf)
    if task == "greater-than":
        yy = int(str(_column(row, "year"))[-2:])
        if digits:
            d = yy // 10
            return (
                _column(row, "clean"),
                _column(row, "corrupted"),
                [str(k) for k in range(d + 1, 10)] or None,
                [str(k) for k in range(d, -1, -1)],
            )
        return (
            _column(row, "clean"),
            _column(row, "corrupted"),
            [f"{k:02d}" for k in range(yy + 1, 100)] or None,
            [f"{k:02d}" for k in range(yy, -1, -1)],
        )
    raise TaskError(f"--data hf:... has no MIB mapping for task {task!r}; tasks: {', '.join(HUB_TASKS)}")


def build(tokenizer, task: str, data: str, n_prompts: int | None = None, prepend_bos: bool = True) -> TaskData:
    from tasks.arithmetic import first_token
    from tasks.greater_than import digit_mode

    rows, source = read_rows(data, task)
    n = DEFAULT_N_PROMPTS if n_prompts is None else n_prompts
    digits = digit_mode(tokenizer)
    pairs: list[tuple[str, str, Answers, Answers]] = []
    where: list[str] = []
    skipped = 0
    for index, row in enumerate(rows):
        if len(pairs) == n:
            break
        pair = to_pair(task, row, digits)
        if pair is None or pair[2] is None:
            skipped += 1
            continue
        clean, corrupt, right, wrong = pair
        if task in ("addition", "subtraction", "mcqa"):  # the first token is scored
            right, wrong = first_token(tokenizer, right), first_token(tokenizer, wrong)
        same_answer = (right if isinstance(right, str) else right[0]) == (wrong if isinstance(wrong, str) else wrong[0])
        answers = [a for side in (right, wrong) for a in ([side] if isinstance(side, str) else side)]
        if (
            same_answer
            or not all(is_single_token(tokenizer, a) for a in answers)  # a name of several tokens (MIB skips it too)
            or len(encode(tokenizer, clean, prepend_bos)) != len(encode(tokenizer, corrupt, prepend_bos))
        ):
            skipped += 1
            continue
        pairs.append((clean, corrupt, right, wrong))
        where.append(f"{source} row {index}")
    if len(pairs) < n and n_prompts is not None:
        raise TaskError(f"--n-prompts {n} is more than the {len(pairs)} usable rows of {source}")
    params = {"source": source, "n_prompts": len(pairs), "skipped_rows": skipped}
    if not prepend_bos:
        params["prepend_bos"] = False
    return logit_diff_task(task, params, tokenizer, pairs, where)
