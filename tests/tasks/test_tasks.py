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
