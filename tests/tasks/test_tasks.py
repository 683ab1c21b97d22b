"""Tasks: tokenization conventions, determinism, and their one-line errors."""

import json

import pytest
import torch

from tasks import TaskError, TaskSpec, build_task, check_task


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return tiny_llama.tokenizer


def test_ioi_is_deterministic_balanced_and_aligned(tok, tiny_llama):
    a = build_task(TaskSpec("ioi"), tok, n_prompts=10, seed=3)
    b = build_task(TaskSpec("ioi"), tok, n_prompts=10, seed=3)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != build_task(TaskSpec("ioi"), tok, n_prompts=10, seed=4).fingerprint()
    assert a.clean.shape == a.corrupt.shape
    # padding is on the right, and the bridge tokenizes the same way
    assert torch.equal(tiny_llama.bridge.to_tokens(a.prompts), a.clean)
    for i in range(a.n_prompts):
        n = int(a.lengths[i])
        assert (a.clean[i, n:] == a.clean[i, -1]).all()
        assert tok.decode(a.clean[i, n - 1]) == " to"  # the answer position is the last real token
        io, s = tok.decode(a.correct[i]).strip(), tok.decode(a.incorrect[i]).strip()
        assert a.prompts[i].count(s) == 2 and a.prompts[i].count(io) == 1  # S repeated, IO once
        corrupt = tok.decode(a.corrupt[i, 1:n])
        assert io not in corrupt.split() and s not in corrupt.split()  # ABC: fresh names


def test_ioi_s2_corrupts_only_the_repeated_subject(tok):
    """The same prompts as ``ioi``; each corrupt partner differs at exactly one position, the
    second mention of the subject, replaced by a name of neither the IO nor the S."""
    a = build_task(check_task("ioi-s2"), tok, n_prompts=10, seed=3)
    plain = build_task(check_task("ioi"), tok, n_prompts=10, seed=3)
    assert a.name == "ioi-s2" and torch.equal(a.clean, plain.clean) and a.params["corruption"] == "S2"
    for i in range(a.n_prompts):
        differ = (a.clean[i] != a.corrupt[i]).nonzero().flatten().tolist()
        assert len(differ) == 1
        mentions = (a.clean[i] == a.incorrect[i]).nonzero().flatten().tolist()
        assert differ == mentions[1:]  # the subject's second mention (S2), not its first
        s, io = tok.decode(a.incorrect[i]).strip(), tok.decode(a.correct[i]).strip()
        assert tok.decode(a.corrupt[i, differ[0]]).strip() not in (s, io)


def test_text_task_windows_and_other_document_corruption(tok):
    t = build_task(TaskSpec("text"), tok, n_prompts=5, seq_len=20, seed=1)
    assert t.kind == "next_token" and t.clean.shape == (5, 20) and (t.lengths == 20).all()
    assert not torch.equal(t.clean, t.corrupt)
    with pytest.raises(TaskError, match="needs .* windows"):
        build_task(TaskSpec("text"), tok, n_prompts=100000, seq_len=20)


def test_text_task_reads_local_files(tok, tmp_path):
    docs = ["one two three four five six seven eight nine ten " * 3, "alpha beta gamma delta " * 8]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    for name in ("d.txt", "d.jsonl"):
        t = build_task(TaskSpec("text"), tok, n_prompts=1, seq_len=8, data=str(tmp_path / name))
        assert t.clean.shape == (1, 8)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_task_with_prompts_of_different_lengths(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"clean": "When Mary and John went out, John thanked", "corrupt": "When Anna and Paul went out, Mark thanked",
         "correct": " Mary", "incorrect": " John"},
        {"clean": "The capital of France is", "corrupt": "The capital of Spain is",
         "correct": " Paris", "incorrect": " Madrid"},
    ])
    spec = check_task(path)
    t = build_task(spec, tok)
    assert t.kind == "logit_diff" and t.lengths.tolist()[0] > t.lengths.tolist()[1]
    assert tok.decode(t.clean[1, t.answer_pos[1]]) == " is"


@pytest.mark.parametrize("rows,message", [
    (['{"clean": "a b", "corrupt": "c d", "correct": " x", "incorrect": " y"}', "{not json"], "line 2: not valid JSON"),
    ([{"clean": "a b", "corrupt": "c d", "correct": " x"}], "line 1: missing .*incorrect"),
])
def test_jsonl_malformed_lines_name_the_line(tmp_path, rows, message):
    with pytest.raises(TaskError, match=message):
        check_task(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_jsonl_length_mismatch_and_multi_token_answer(tok, tmp_path):
    path = write_jsonl(tmp_path / "len.jsonl", [
        {"clean": "The cat sat", "corrupt": "The extraordinarily ornate cathedral sat", "correct": " on", "incorrect": " in"}])
    with pytest.raises(TaskError, match="line 1: clean and corrupt prompts tokenize to different lengths"):
        build_task(check_task(path), tok)
    path = write_jsonl(tmp_path / "multi.jsonl", [
        {"clean": "The cat sat", "corrupt": "The dog sat", "correct": " Constantinopolitanism", "incorrect": " in"}])
    with pytest.raises(TaskError, match=r"answer ' Constantinopolitanism' \(len.jsonl|multi.jsonl line 1\) is \d+ tokens"):
        build_task(check_task(path), tok)


def test_unknown_task_suggests_close_names_and_missing_file_is_clear(tmp_path):
    with pytest.raises(TaskError, match="unknown task 'iio'. Did you mean ioi"):
        check_task("iio")
    with pytest.raises(TaskError, match="cannot read task file"):
        check_task(str(tmp_path / "missing.jsonl"))


def test_n_prompts_must_be_positive_and_available(tok, tmp_path):
    with pytest.raises(TaskError, match="must be positive"):
        build_task(TaskSpec("ioi"), tok, n_prompts=0)
    path = write_jsonl(tmp_path / "one.jsonl", [
        {"clean": "The cat sat", "corrupt": "The dog sat", "correct": " on", "incorrect": " in"}])
    with pytest.raises(TaskError, match="--n-prompts 5 is more than the 1 prompts"):
        build_task(check_task(path), tok, n_prompts=5)


def test_sentiment_alternates_and_mirrors(tok):
    t = build_task(TaskSpec("sentiment"), tok, n_prompts=10, seed=2)
    assert t.kind == "logit_diff" and t.clean.shape == t.corrupt.shape
    great, awful = tok(" great", add_special_tokens=False)["input_ids"], tok(" awful", add_special_tokens=False)["input_ids"]
    assert t.correct[0::2].tolist() == great * 5 and t.correct[1::2].tolist() == awful * 5
    assert (t.correct != t.incorrect).all()
    # the corrupt prompt of a positive prompt is the negative prompt of the same slot, and back
    assert torch.equal(t.corrupt[0], t.clean[1]) and torch.equal(t.corrupt[1], t.clean[0])
    for i in range(t.n_prompts):
        assert tok.decode(t.clean[i, t.answer_pos[i]]) == " was"
    with pytest.raises(TaskError, match="distinct sentiment prompts"):
        build_task(TaskSpec("sentiment"), tok, n_prompts=10_000)


class SpaceBlindTokenizer:
    """The test tokenizer, but blind to leading spaces: ' on' and 'on' are one token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        return self.tokenizer(text.lstrip(), **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_answers_that_cannot_differ_are_one_line_errors(tok, tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [
        {"clean": "The cat sat", "corrupt": "The dog sat", "correct": " on", "incorrect": " in"},
        {"clean": "The cat sat", "corrupt": "The dog sat", "correct": " on", "incorrect": " on"}])
    with pytest.raises(TaskError, match="same.jsonl line 2: correct and incorrect are the same answer"):
        build_task(check_task(same), tok)
    folded = write_jsonl(tmp_path / "folded.jsonl", [
        {"clean": "The cat sat", "corrupt": "The dog sat", "correct": " on", "incorrect": "on"}])
    build_task(check_task(folded), tok)  # two tokens in the real tokenizer: accepted
    with pytest.raises(TaskError, match=r"line 1: correct ' on' and incorrect 'on' are the same token \(id \d+\)"):
        build_task(check_task(folded), SpaceBlindTokenizer(tok))


def test_jsonl_lines_split_on_newline_only(tok, tmp_path):
    """U+2028 (and the other characters str.splitlines breaks at) are valid inside a JSON
    string on one JSON Lines line."""
    rows = [{"clean": "The cat\u2028sat", "corrupt": "The dog\u2028sat", "correct": " on", "incorrect": " in"},
            {"clean": "The cat\x1csat", "corrupt": "The dog\x1csat", "correct": " on", "incorrect": " in"}]
    path = tmp_path / "sep.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not escaped
    task = build_task(check_task(str(path)), tok)
    assert task.n_prompts == 2 and task.prompts[0] == "The cat\u2028sat"


def _texts(tok, ids):
    return [tok.decode([int(i)]) for i in ids if int(i) >= 0]


def test_greater_than_sets_are_the_years_above_and_at_or_below(tok):
    """SmolLM2's tokenizer splits digits: the first year ends in 9 and the next token (the tens
    digit) decides "greater" exactly; the corrupt prompt starts in XX01."""
    t = build_task(check_task("greater-than"), tok, n_prompts=12, seed=5)
    assert t.params["tokens"] == "digit" and t.correct_set is not None and t.incorrect_set is not None
    for i in range(t.n_prompts):
        prompt = t.prompts[i]
        year = prompt.split("the year ")[1].split(" ")[0]
        assert year.endswith("9") and prompt.endswith("to the year " + year[:2])
        tens = int(year[2])
        right, wrong = _texts(tok, t.correct_set[i]), _texts(tok, t.incorrect_set[i])
        assert sorted(right) == [str(k) for k in range(tens + 1, 10)]
        assert sorted(wrong) == [str(k) for k in range(0, tens + 1)]
        assert tok.decode(t.correct[i:i + 1]) == str(tens + 1) and tok.decode(t.incorrect[i:i + 1]) == str(tens)
        corrupt = tok.decode(t.corrupt[i, 1:int(t.lengths[i])])
        assert corrupt == prompt.replace(year, year[:2] + "01")


@pytest.mark.parametrize("name,op", [("addition", "+"), ("subtraction", "-")])
def test_arithmetic_scores_the_first_answer_token(tok, name, op):
    t = build_task(check_task(name), tok, n_prompts=10, seed=2)
    for i in range(t.n_prompts):
        a, b = t.prompts[i].rstrip("=").split(op)
        result = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert 10 <= result <= 99 and len(a) == len(b) == 2
        assert tok.decode(t.correct[i:i + 1]) == str(result)[0]  # digits are single tokens here
        c, d = tok.decode(t.corrupt[i, 1:int(t.lengths[i])]).rstrip("=").split(op)
        other = int(c) + int(d) if op == "+" else int(c) - int(d)
        assert tok.decode(t.incorrect[i:i + 1]) == str(other)[0] != str(result)[0]


def test_mcqa_letters_and_rotated_options(tok):
    t = build_task(check_task("mcqa"), tok, n_prompts=8, seed=4)
    assert t.incorrect_set is not None and t.incorrect_set.shape[1] == 3
    for i in range(t.n_prompts):
        clean, corrupt = t.prompts[i], tok.decode(t.corrupt[i, 1:int(t.lengths[i])])
        options = {line[0]: line[3:] for line in clean.split("\n")[1:5]}
        rotated = {line[0]: line[3:] for line in corrupt.split("\n")[1:5]}
        assert sorted(options.values()) == sorted(rotated.values()) and options != rotated
        right = tok.decode(t.correct[i:i + 1]).strip()
        moved = tok.decode(t.incorrect[i:i + 1]).strip()
        assert rotated[moved] == options[right] and moved != right  # the same option, another letter
        assert sorted(_texts(tok, t.incorrect_set[i]) + [" " + right]) == [" A", " B", " C", " D"]


def test_jsonl_answer_lists_are_sets(tok, tmp_path):
    path = write_jsonl(tmp_path / "sets.jsonl", [
        {"clean": "The cat sat", "corrupt": "The dog sat", "correct": [" on", " upon"], "incorrect": [" in", " at"]},
        {"clean": "The cat ran", "corrupt": "The dog ran", "correct": " away", "incorrect": " in"}])
    t = build_task(check_task(path), tok)
    assert _texts(tok, t.correct_set[0]) == [" on", " upon"] and _texts(tok, t.incorrect_set[1]) == [" in"]
    assert tok.decode(t.correct[0:1]) == " on" and tok.decode(t.incorrect[1:2]) == " in"
    both = write_jsonl(tmp_path / "both.jsonl", [
        {"clean": "The cat sat", "corrupt": "The dog sat", "correct": [" on", " in"], "incorrect": [" in"]}])
    with pytest.raises(TaskError, match=r"both.jsonl line 1: token\(s\) \[' in'\] are both correct and incorrect"):
        build_task(check_task(both), tok)
    with pytest.raises(TaskError, match="line 1: missing or non-string field"):
        check_task(write_jsonl(tmp_path / "empty.jsonl", [
            {"clean": "a", "corrupt": "b", "correct": [], "incorrect": " in"}]))


def test_unknown_new_task_suggests_and_data_is_hub_only():
    with pytest.raises(TaskError, match="Did you mean greater-than"):
        check_task("greater_than")
    with pytest.raises(TaskError, match="only hf:NAME"):
        build_task(check_task("mcqa"), None, data="rows.jsonl")


def _fake_hub_dataset(tmp_path, monkeypatch, name, files):
    """A Hugging Face cache holding one dataset snapshot (``HF_HOME/hub/datasets--ORG--NAME``),
    read offline: what ``snapshot_download`` finds when the hub cannot be reached."""
    import huggingface_hub.constants as constants

    hub = tmp_path / "hf" / "hub"
    repo = hub / ("datasets--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    for rel, write in files.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        write(snapshot / rel)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _parquet(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return lambda path: pq.write_table(pa.Table.from_pylist(rows), path)


def test_mib_hub_datasets_load_offline_from_the_cache(tok, tmp_path, monkeypatch):
    """MIB's column names (its loader, ``HFEAPDataset``) for IOI, arithmetic and MCQA."""
    ioi = [{"prompt": f"When Mary and John went to the store, John gave a drink to",
            "metadata": {"indirect_object": "Mary", "subject": "John", "random_c": "Tom"},
            "s2_io_flip_counterfactual": {"prompt": "When Mary and John went to the store, Mary gave a drink to"}}] * 3
    long_name = "Constantinopolitanism"  # several tokens: the row is skipped, as MIB skips it
    ioi = ioi + [{"prompt": f"When {long_name} and John went to the store, John gave a drink to",
                  "metadata": {"indirect_object": long_name, "subject": "John", "random_c": "Tom"},
                  "s2_io_flip_counterfactual": {"prompt": f"When {long_name} and John went to the store, "
                                                          f"{long_name} gave a drink to"}}]
    arith = [{"prompt": "12+35=", "label": 47, "operator": "+",
              "random_counterfactual": {"prompt": "61+22=", "label": 83}},
             {"prompt": "50-21=", "label": 29, "operator": "-",
              "random_counterfactual": {"prompt": "90-10=", "label": 80}}]
    mcqa = [{"prompt": "Q: sky?\nA. red\nB. blue\nAnswer:", "answerKey": 1,
             "choices": {"label": ["A", "B"], "text": ["red", "blue"]},
             "symbol_counterfactual": {"prompt": "Q: sky?\nA. blue\nB. red\nAnswer:", "answerKey": 0,
                                       "choices": {"label": ["A", "B"], "text": ["blue", "red"]}}}]
    _fake_hub_dataset(tmp_path, monkeypatch, "mib-bench/ioi", {"data/train-00000-of-00001.parquet": _parquet(ioi),
                                                                "data/test-00000-of-00001.parquet": _parquet(ioi[:1])})
    t = build_task(check_task("ioi"), tok, data="hf:mib-bench/ioi")
    assert t.n_prompts == 3 and t.params["source"] == "hf:mib-bench/ioi:train" and t.params["skipped_rows"] == 1
    assert tok.decode(t.correct[:1]) == " Mary" and tok.decode(t.incorrect[:1]) == " John"
    assert tok.decode(t.corrupt[0, 1:]).endswith("Mary gave a drink to")
    assert build_task(check_task("ioi"), tok, data="hf:mib-bench/ioi:test").n_prompts == 1

    _fake_hub_dataset(tmp_path / "a", monkeypatch, "mib-bench/arithmetic_addition",
                      {"train.jsonl": lambda p: p.write_text("\n".join(json.dumps(r) for r in arith))})
    t = build_task(check_task("addition"), tok, data="hf:mib-bench/arithmetic_addition")
    assert t.n_prompts == 1 and t.params["skipped_rows"] == 1  # the subtraction row
    assert tok.decode(t.correct[:1]) == "4" and tok.decode(t.incorrect[:1]) == "8"
    _fake_hub_dataset(tmp_path / "array", monkeypatch, "mib-bench/arithmetic_addition",  # one JSON array
                      {"train.json": lambda p: p.write_text(json.dumps(arith))})
    assert build_task(check_task("addition"), tok, data="hf:mib-bench/arithmetic_addition").n_prompts == 1
    _fake_hub_dataset(tmp_path / "broken", monkeypatch, "mib-bench/arithmetic_addition",
                      {"train.json": lambda p: p.write_text("[{")})
    with pytest.raises(TaskError, match="train.json is not JSON Lines or a JSON array"):
        build_task(check_task("addition"), tok, data="hf:mib-bench/arithmetic_addition")

    _fake_hub_dataset(tmp_path / "m", monkeypatch, "mib-bench/mcqa",
                      {"4_answer_choices/train-0.parquet": _parquet(mcqa),
                       "2_answer_choices/train-0.parquet": _parquet(mcqa * 2)})
    t = build_task(check_task("mcqa"), tok, data="hf:mib-bench/mcqa")
    assert t.n_prompts == 1 and tok.decode(t.correct[:1]) == "B" and tok.decode(t.incorrect[:1]) == "A"
    with pytest.raises(TaskError, match="cannot load Hugging Face dataset 'mib-bench/absent'"):
        build_task(check_task("mcqa"), tok, data="hf:mib-bench/absent")
    with pytest.raises(TaskError, match="no 'validation' split"):
        build_task(check_task("mcqa"), tok, data="hf:mib-bench/mcqa:validation")

    years = [{"clean": "The war lasted from the year 1739 to the year 17",
              "corrupted": "The war lasted from the year 1701 to the year 17", "year": "1739"}]
    _fake_hub_dataset(tmp_path / "g", monkeypatch, "mib-bench/greater-than", {"train.jsonl": lambda p: p.write_text(
        json.dumps(years[0]))})
    t = build_task(check_task("greater-than"), tok, data="hf:mib-bench/greater-than")
    assert _texts(tok, t.correct_set[0]) == [str(k) for k in range(4, 10)]
    assert sorted(_texts(tok, t.incorrect_set[0])) == [str(k) for k in range(4)]
    _fake_hub_dataset(tmp_path / "bad", monkeypatch, "mib-bench/ioi", {"train.jsonl": lambda p: p.write_text(
        json.dumps({"prompt": "x", "metadata": {"indirect_object": "Mary", "subject": "John"}}))})
    with pytest.raises(TaskError, match="MIB row has no column 's2_io_flip_counterfactual.prompt'"):
        build_task(check_task("ioi"), tok, data="hf:mib-bench/ioi")


def test_text_hub_documents_without_the_datasets_library(tok, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    docs = [{"text": "one two three four five six seven eight nine ten " * 3}, {"text": "alpha beta gamma " * 10}]
    _fake_hub_dataset(tmp_path, monkeypatch, "stas/openwebtext-10k", {"plain_text/train-0.parquet": _parquet(docs)})
    t = build_task(TaskSpec("text"), tok, n_prompts=1, seq_len=8, data="hf:stas/openwebtext-10k")
    assert t.clean.shape == (1, 8) and t.params["source"] == "hf:stas/openwebtext-10k:train"
