"""Next-token prediction on documents (the web-text setting of Rushing & Nanda 2024).

Sources for ``--data``:
- nothing: the offline corpus shipped in ``tasks/data/corpus.jsonl``;
- a ``.txt`` file (documents separated by blank lines) or a ``.jsonl`` file
  (one ``{"text": ...}`` object a line);
- ``hf:NAME`` or ``hf:NAME:SPLIT``: a Hugging Face dataset with a ``text``
  column (needs internet, or the dataset in the local cache; with the ``datasets`` library if
  installed, else its parquet/JSON Lines files read directly, ``tasks/hub.py``), e.g.
  ``hf:stas/openwebtext-10k`` as in Rushing & Nanda 2024.

Documents are cut into windows of ``seq_len`` tokens (BOS + ``seq_len - 1``
document tokens), shuffled with ``seed``; the first ``n_prompts`` windows are
the clean prompts and the next ``n_prompts`` windows, each from a different
document than its clean partner, are the corrupt ones.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from tasks.base import TaskData, TaskError, bos_id

DEFAULT_CORPUS = Path(__file__).parent / "data" / "corpus.jsonl"
DEFAULT_N_PROMPTS = 32
DEFAULT_SEQ_LEN = 64


def read_documents(data: str | None) -> tuple[list[str], str]:
    """(documents, a label saying where they came from)."""
    if data is None:
        data = str(DEFAULT_CORPUS)
    if data.startswith("hf:"):
        _, _, rest = data.partition(":")
        name, _, split = rest.partition(":")
        try:
            import datasets  # optional: without it the split's files are read directly (tasks/hub.py)
        except ImportError:
            from tasks.hub import read_rows

            rows, source = read_rows(data, "text")
            lacking = next((i for i, r in enumerate(rows) if "text" not in r), None)
            if lacking is not None:
                columns = ", ".join(rows[lacking])
                raise TaskError(
                    f"Hugging Face dataset {name!r}: row {lacking} has no 'text' column (columns: {columns})"
                )
            return [str(r["text"]) for r in rows], source
        try:
            rows = datasets.load_dataset(name, split=split or "train")
            return [r["text"] for r in rows], data
        except Exception as err:  # noqa: BLE001 - network, missing dataset, missing column
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TaskError(f"cannot load Hugging Face dataset {name!r}: {message}") from None
    path = Path(data)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as err:
        raise TaskError(f"cannot read --data {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise TaskError(f"--data {path} is not UTF-8 text") from None
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(raw.split("\n"), start=1):  # JSON Lines: \n only
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TaskError(f"{path.name} line {number}: expected a JSON object with a 'text' field") from None
    else:
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
    digest = hashlib.blake2b(raw.encode(), digest_size=8).hexdigest()
    return docs, f"{path.resolve()}#{digest}"


def build(
    tokenizer,
    data: str | None = None,
    n_prompts: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    prepend_bos: bool = True,
) -> TaskData:
    n = DEFAULT_N_PROMPTS if n_prompts is None else n_prompts
    T = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if T < 3:
        raise TaskError(f"--seq-len must be at least 3, got {T}")
    docs, source = read_documents(data)
    head = [bos_id(tokenizer)] if prepend_bos else []  # a window is T tokens, BOS included
    width = T - len(head)
    windows: list[tuple[int, list[int]]] = []  # (document index, tokens)
    for doc_index, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - width + 1, width):
            windows.append((doc_index, [*head, *ids[start : start + width]]))
    if len(windows) < 2 * n:
        raise TaskError(
            f"the text task needs {2 * n} windows of {T} tokens (clean + corrupt) but {source} "
            f"gives {len(windows)}; lower --n-prompts or --seq-len, or pass more --data"
        )
    random.Random(seed).shuffle(windows)
    clean = windows[:n]
    pool = windows[n:]
    corrupt = []
    for doc_index, _ in clean:  # the first unused window from another document
        j = next((j for j, (d, _) in enumerate(pool) if d != doc_index), None)
        if j is None:
            raise TaskError(f"{source} has too few distinct documents to corrupt with other documents")
        corrupt.append(pool.pop(j))
    params = {"source": source, "n_prompts": n, "seq_len": T, "seed": seed}
    if not prepend_bos:  # recorded only when off: the default's parameters (and results) stay as they were
        params["prepend_bos"] = False
    return TaskData(
        name="text",
        kind="next_token",
        params=params,
        clean=torch.tensor([w for _, w in clean]),
        corrupt=torch.tensor([w for _, w in corrupt]),
        lengths=torch.full((n,), T),
        prompts=[tokenizer.decode(w[len(head) :]) for _, w in clean],
    )
