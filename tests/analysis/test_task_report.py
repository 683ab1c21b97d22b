"""The task report: DLA adds up, the lens ends at the real logits, attention equals the bridge's,
and the HTML page renders in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sweeps import report as report_cli
from sweeps.core.lens import task_report
from tasks import build_task, check_task
from tests import reference
from tests.conftest import needs
from tests.wandb_records import history_and_summary


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "smollm2-135m"])
def test_components_add_up_to_the_logit_difference(loaded_model, name):
    m = loaded_model(name)
    task = build_task(check_task("ioi"), m.tokenizer, 6, 0)
    rep = task_report(m.weights, task, prompt=None)
    real = reference.logit_diffs(m.bridge, task)
    torch.testing.assert_close(rep.metric, real, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(rep.parts.total(), real, atol=1e-3, rtol=1e-4)  # the usual assert_close of a DLA walkthrough
    # per-head DLA against the bridge's full hook_result cache
    _, cache = m.bridge.run_with_cache(task.clean)
    b, pos = torch.arange(task.n_prompts), task.lengths - 1
    scale = cache["ln_final.hook_scale"][b, pos, 0]
    heads = reference.head_direct_effects(m.bridge, cache, scale, task)  # [L, B, H]
    torch.testing.assert_close(rep.parts.heads, heads, atol=1e-4, rtol=1e-4)
    # both lenses end at the real logit difference
    torch.testing.assert_close(rep.lens_final_scale[-1], real, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(rep.lens_own_scale[-1], real, atol=1e-3, rtol=1e-4)


def test_attention_patterns_equal_the_bridges(tiny_llama):
    task = build_task(check_task("ioi"), tiny_llama.tokenizer, 4, 0)
    rep = task_report(tiny_llama.weights, task, prompt=2)
    T = int(task.lengths[2])
    _, cache = tiny_llama.bridge.run_with_cache(task.clean[2:3, :T])
    expected = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(3)])
    torch.testing.assert_close(rep.patterns, expected, atol=1e-5, rtol=1e-4)


def test_next_token_report_reads_every_position(tiny_gpt2):
    task = build_task(check_task("text"), tiny_gpt2.tokenizer, 3, 0, seq_len=12)
    rep = task_report(tiny_gpt2.weights, task, prompt=0)
    logits = tiny_gpt2.bridge(task.clean)
    expected = torch.cat([logits[i, torch.arange(11), task.clean[i, 1:12]] for i in range(3)])
    torch.testing.assert_close(rep.metric, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rep.parts.total(), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "o"
    assert report_cli.main(["--model", "tiny-gpt2", "--task", "sentiment", "--n-prompts", "6",
                            "--prompt-index", "1", "--out", str(out), "--wandb", "disabled"]) == 0
    return out


def test_report_writes_figures_tables_and_the_attention_page(report_dir):
    for name in ("dla_heads", "dla_layers", "logit_lens"):
        assert (report_dir / "plots" / f"{name}.png").stat().st_size > 1000
    page = (report_dir / "attention.html").read_text()
    assert page.count('class="head"') == 6 and "Top 3 negative heads" in page and "cdn" not in page
    heads = (report_dir / "tables" / "heads.csv").read_text().splitlines()
    assert heads[0] == "layer,head,node,dla" and len(heads) == 1 + 3 * 4


def test_report_logs_a_wandb_run(tmp_path):
    out = tmp_path / "o"
    assert report_cli.main(["--model", "tiny-gpt2", "--n-prompts", "4", "--out", str(out), "--wandb", "offline"]) == 0
    [run] = list((tmp_path / "wandb").rglob("run-*.wandb"))
    history, summary, _ = history_and_summary(run)
    for key, kind in {"heads": "table-file", "logit_lens": "table-file", "plots/dla_heads": "image-file",
                      "html/attention": "html-file"}.items():
        assert history.get(f"{key}/_type") == f'"{kind}"', sorted(history)
    assert float(summary["sum_check_max_abs_error"]) < 1e-3


def test_bad_prompt_index_is_one_line(capsys, tmp_path):
    assert report_cli.main(["--model", "tiny-gpt2", "--n-prompts", "4", "--prompt-index", "9",
                            "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --prompt-index 9 is out of range: the task has 4 prompts"


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_attention_page_renders_in_headless_chromium(report_dir, tmp_path):
    """The page's script ran in a real browser: every head's token view was built."""
    needs("Chromium", None if _chromium() else "apt-get install chromium")
    page = Path(report_dir / "attention.html").resolve()
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert dom.count('data-rendered="true"') == 6
    n_tokens = dom.count('<span class="tok') // 6
    assert n_tokens > 5 and dom.count('class="tok dest"') == 6  # the last token of each view is selected
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'p2'}",
                    f"--screenshot={shot}", "--window-size=1000,800", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000  # a page with heatmaps, not a blank one


def test_a_long_prompts_attention_page_renders_with_the_answer_selected(tmp_path):
    """The windowed page of a 3,000-token prompt in a real browser: every head's token view is
    built over the whole prompt, with the answer position (its last token) selected."""
    needs("Chromium", None if _chromium() else "apt-get install chromium")
    _page(tmp_path / "attention.html", 3000)
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", (tmp_path / "attention.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert dom.count('data-rendered="true"') == 6 and dom.count('<span class="tok') == 6 * 3000
    assert re.findall(r'<span class="tok dest" data-pos="(\d+)"', dom) == ["2999"] * 6


def _patterns(T: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` causal [T, T] attention patterns (rows sum to 1), peaked as real heads are: each
    query attends mostly to a few keys; head 0's answer row puts half its attention on key 5."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        logits = rng.normal(size=(T, T)) * 2.5
        logits[np.triu_indices(T, 1)] = -np.inf
        pattern = np.exp(logits - logits.max(1, keepdims=True))
        pattern /= pattern.sum(1, keepdims=True)
        if i == 0:
            pattern[T - 1] *= 0.5 / (1 - pattern[T - 1, 5])
            pattern[T - 1, 5] = 0.5
        out.append(pattern)
    return out


def _page(path: Path, T: int, **kwargs) -> tuple[str, list[np.ndarray]]:
    from analysis.attention_html import attention_page

    patterns = _patterns(T, 6)
    tokens = [f" w{i}" for i in range(T)]
    heads = {"Top 3 positive heads": [(f"L{i}H0", 0.5, patterns[i]) for i in range(3)],
             "Top 3 negative heads": [(f"L{i}H1", -0.5, patterns[3 + i]) for i in range(3)]}
    return attention_page(path, "attention", tokens, heads, **kwargs).read_text(), patterns


def _drawn(svg: str) -> list[tuple[float, int, int]]:
    """(y, query, key) of every cell of one head's heatmap, as drawn."""
    return [(float(y), int(q), int(k)) for y, q, k in
            re.findall(r'<rect x="[^"]*" y="([^"]*)"[^>]*><title>\[(\d+)\][^<]*?\[(\d+)\]', svg)]


def test_a_long_prompts_attention_page_is_small_and_starts_with_the_answer_row(tmp_path):
    """A 3,000-token prompt: the page stays under 2 MB (whole heatmaps would take gigabytes);
    each head draws the answer position's row on top, then the window's rows, against the
    window's keys and the 8 earlier keys the answer row attends to most, and says how much of
    the answer row's attention it leaves out."""
    from analysis.attention_html import FAR_KEYS, VIEW_KEYS, WINDOW

    T = 3000
    page, patterns = _page(tmp_path / "attention.html", T)
    assert len(page.encode()) < 2_000_000
    start = T - WINDOW
    assert f"query rows {start}–{T - 1} of the {T} positions" in page and "--attention-window N" in page
    svgs = re.findall(r"<svg.*?</svg>", page)
    views = re.findall(r'<script type="application/json">(.*?)</script>', page)
    assert len(svgs) == len(views) == 6
    for svg, view, pattern in zip(svgs, views, patterns):
        cells = _drawn(svg)
        top = min(y for y, _, _ in cells)
        assert {q for y, q, _ in cells if y == top} == {T - 1}  # the answer row first, alone on top
        assert cells[0][1] == T - 1 and re.search(r'font-weight="bold">\s*w2999</text>', svg)
        assert {q for _, q, _ in cells} == {*range(start, T)}
        earlier = sorted(k for _, q, k in cells if q == T - 1 and k < start)
        assert earlier == sorted(np.argsort(pattern[T - 1, :start])[-FAR_KEYS:].tolist())
        left = 1 - pattern[T - 1, start:].sum() - pattern[T - 1, earlier].sum()
        assert f"not drawn: {left:.1%} of the answer row's attention (to {start - FAR_KEYS} earlier" in page
        rows = json.loads(view)["rows"]
        assert sorted(map(int, rows)) == [*range(start, T)] and max(len(r) for r in rows.values()) <= 2 * VIEW_KEYS
    assert (T - 1, 5) in {(q, k) for _, q, k in _drawn(svgs[0])} and "5: w5" in svgs[0]  # head 0's half of it


def test_a_short_prompt_is_drawn_whole_with_the_answer_row_first(tmp_path):
    """A prompt within the window: every cell of the causal pattern is drawn, the answer row on
    top and the others in order below it, and nothing is said to be left out."""
    T = 12
    page, _ = _page(tmp_path / "attention.html", T)
    assert "not drawn" not in page and f"draws the whole prompt ({T} positions)" in page
    cells = _drawn(re.findall(r"<svg.*?</svg>", page)[0])
    assert len(cells) == T * (T + 1) // 2
    rows = [q for _, q, _ in sorted(cells)]  # by y
    assert rows[:T] == [T - 1] * T and rows[T:] == sorted(rows[T:])
    page, _ = _page(tmp_path / "window.html", T, window=4)  # the option draws fewer
    assert {q for _, q, _ in _drawn(re.findall(r"<svg.*?</svg>", page)[0])} == {8, 9, 10, 11}


def test_the_reports_attention_window_option_reaches_the_page(tmp_path):
    from analysis.attention_html import FAR_KEYS, WINDOW
    from sweeps.registry import SWEEPS

    parser = SWEEPS["report"].parser()
    assert parser.get_default("attention_window") == WINDOW
    assert f"plus the {FAR_KEYS} earlier keys" in " ".join(parser.format_help().split())
    out = tmp_path / "o"
    assert report_cli.main(["--model", "tiny-gpt2", "--task", "sentiment", "--n-prompts", "2",
                            "--attention-window", "3", "--out", str(out), "--wandb", "disabled"]) == 0
    page = (out / "attention.html").read_text()
    svg = re.findall(r"<svg.*?</svg>", page)[0]
    assert len({q for _, q, _ in _drawn(svg)}) == 3 and "not drawn:" in page


@pytest.mark.parametrize("name", ["tiny-gemma2", pytest.param("tiny-stablelm", marks=pytest.mark.slow)])
def test_the_report_in_bfloat16_passes_its_sum_check(tmp_path, name):
    """In bfloat16 (the fast path's post-norms and soft-caps; the bridge path) the report runs,
    records its dtype, and its components add up within what the dtype explains (exit 0: a
    failed sum check is exit 1)."""
    import json

    out = tmp_path / "r"
    assert report_cli.main(["--model", name, "--n-prompts", "4", "--dtype", "bfloat16", "--out", str(out),
                            "--wandb", "disabled"]) == 0
    assert json.loads((out / "manifest.json").read_text())["spec"]["dtype"] == "bfloat16"
