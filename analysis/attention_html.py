"""A self-contained HTML page of attention patterns (the usual DLA walkthrough's circuitsvis view, offline).

``circuitsvis`` installs, but its pages load their JavaScript from a CDN at
view time, so they are blank on a machine without internet (and in W&B's
offline files). This page needs nothing: each head is an inline SVG heatmap
(query rows × key columns, drawn here in Python, readable without scripts)
and a small inline script adds the circuitsvis-style token view: hover a
token to colour the tokens it attends to.

The row that matters is the answer position (the prompt's own last token), so it
is drawn first, on top. A long prompt is windowed, so
that the page stays small and that row stays in view: a full heatmap grows with
the square of the prompt (a 300-token prompt made a 43 MB page, its answer row
4,000 px down). Each heatmap draws the last ``window`` positions as query rows
and key columns, plus the ``FAR_KEYS`` earlier keys its answer row attends to
most; the token view keeps the whole prompt but only the drawn rows' largest
attentions. The page says what it left out and how much of the answer row's
attention that is.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from analysis.plots import atomic_output

WINDOW = 32  # query rows (and nearby key columns) drawn per head: the last positions, answer first
FAR_KEYS = 8  # earlier key columns per head: those the answer row attends to most
VIEW_KEYS = 256  # the token view's attentions kept per drawn row (the largest; the rest are < 1/256)
MORE = "the report's --attention-window N draws the last N positions (0: the whole prompt)"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.head { display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }
.head h3 { font-size: 0.95em; margin: 0.3em 0; }
.left-out { font-size: 0.85em; color: #555; margin: 0.2em 0; max-width: 46em; }
.tokens { max-width: 46em; max-height: 16em; overflow-y: auto; line-height: 1.9; margin-top: 0.4em; }
.tok { display: inline-block; padding: 1px 2px; margin: 0 1px; border-radius: 3px; white-space: pre; cursor: default;
       border: 1px solid #ddd; font-family: ui-monospace, monospace; font-size: 0.85em; }
.tok.out { border-style: dotted; }  /* not a drawn query row: hovering it shows nothing new */
.tok.dest { outline: 2px solid #111; }
"""

# The token view: every token of the prompt; hovering a drawn query row's token colours the
# keys it attends to. A head's rows are sparse: [key, attention in thousandths, ...].
_SCRIPT = """
var tokens = JSON.parse(document.getElementById('tokens').textContent);
document.querySelectorAll('.head').forEach(function (box) {
  var data = JSON.parse(box.querySelector('script[type="application/json"]').textContent);
  var view = box.querySelector('.tokens');
  var spans = tokens.map(function (text, i) {
    var span = document.createElement('span');
    span.className = 'tok'; span.textContent = text; span.dataset.pos = i;
    view.appendChild(span); return span;
  });
  function show(q) {
    var a = new Array(tokens.length).fill(0), row = data.rows[q];
    for (var i = 0; i < row.length; i += 2) { a[row[i]] = row[i + 1] / 1000; }
    spans.forEach(function (s, k) {
      s.style.background = 'rgba(214, 39, 40,' + a[k].toFixed(3) + ')';
      s.classList.toggle('dest', k === q);
      s.title = 'attention from ' + q + ' to ' + k + ': ' + a[k].toFixed(3);
    });
  }
  spans.forEach(function (s, q) {
    if (q in data.rows) { s.addEventListener('mouseenter', function () { show(q); }); }
    else { s.classList.add('out'); }
  });
  show(data.answer);
  view.scrollTop = view.scrollHeight;  // a long prompt's view scrolls: its end (the answer) in sight
  box.dataset.rendered = 'true';
});
"""


def window_start(T: int, window: int = WINDOW) -> int:
    """The first of the last ``window`` positions of a ``T``-token prompt (0: ``window`` 0 or at least ``T``)."""
    return 0 if window <= 0 else max(0, T - window)


def drawn_positions(pattern: np.ndarray, window: int = WINDOW, far: int = FAR_KEYS) -> tuple[list[int], list[int]]:
    """The query rows and key columns one head's heatmap draws, of a [T, T] pattern.

    Rows: the answer position ``T - 1`` first, then the rest of the last ``window`` positions
    in order. Columns, in order: the ``far`` earlier keys (before the window) that the answer
    row attends to most, then the window's positions. ``window`` 0 (or at least ``T``): every
    position."""
    T = pattern.shape[0]
    start = window_start(T, window)
    earlier = np.asarray(pattern[T - 1, :start], dtype=float)
    top = np.argsort(-earlier, kind="stable")[: min(far, start)]
    return [T - 1, *range(start, T - 1)], [*sorted(int(k) for k in top), *range(start, T)]


def _offsets(positions: list[int], cell: int) -> list[float]:
    """Each drawn row's (or column's) offset: ``cell`` apart, with half a cell's gap wherever the
    positions jump (the answer row before the window, the earlier keys before it)."""
    offsets, at = [], 0.0
    for i, pos in enumerate(positions):
        if i and pos != positions[i - 1] + 1:
            at += cell / 2
        offsets.append(at)
        at += cell
    return offsets


def _svg(pattern: np.ndarray, tokens: list[str], rows: list[int], cols: list[int], cell: int = 14) -> str:
    """Query rows × key columns, white (0) to red (1), token labels on both axes (an earlier key's
    with its position); only the drawn ``rows`` and ``cols``, the first row (the answer's) in bold."""
    start = min(rows)  # the window's first position: keys before it are the earlier ones
    row_labels = [tokens[q][:14] for q in rows]
    col_labels = [tokens[k][:14] if k >= start else f"{k}:{tokens[k][:9]}" for k in cols]
    margin = 8 + 7 * min(14, max(map(len, row_labels + col_labels), default=1))
    ys, xs = _offsets(rows, cell), _offsets(cols, cell)
    width, height = margin + xs[-1] + cell, margin + ys[-1] + cell
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height:g}" role="img"><g stroke="#eee">'
    ]
    for q, y in zip(rows, ys):
        for k, x in zip(cols, xs):
            if k > q:
                continue
            a = float(pattern[q, k])
            shade = int(255 * (1 - a))
            parts.append(
                f'<rect x="{margin + x:g}" y="{margin + y:g}" width="{cell}" height="{cell}" '
                f'fill="rgb(255,{shade},{shade})"><title>[{q}] {html.escape(tokens[q])} → '
                f"[{k}] {html.escape(tokens[k])}: {a:.3f}</title></rect>"
            )
    parts.append("</g>")
    for i, (label, y) in enumerate(zip(row_labels, ys)):
        weight = ' font-weight="bold"' if i == 0 else ""
        parts.append(
            f'<text x="{margin - 3}" y="{margin + y + cell * 0.75:g}" font-size="9" text-anchor="end" '
            f'font-family="monospace"{weight}>{html.escape(label)}</text>'
        )
    for label, x in zip(col_labels, xs):
        parts.append(
            f'<text transform="translate({margin + x + cell * 0.7:g},{margin - 3}) rotate(-90)" '
            f'font-size="9" font-family="monospace">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _view_rows(pattern: np.ndarray, rows: list[int]) -> dict[int, list[int]]:
    """The token view's data: per drawn row, its ``VIEW_KEYS`` largest attentions that round to
    at least 0.001, as [key, thousandths, ...] (bounded whatever the prompt's length)."""
    out = {}
    for q in rows:
        row = np.asarray(pattern[q, : q + 1], dtype=float)
        keys = np.argsort(-row, kind="stable")[:VIEW_KEYS]
        keys = np.sort(keys[np.rint(row[keys] * 1000) >= 1])
        out[q] = [int(v) for k in keys for v in (k, np.rint(row[k] * 1000))]
    return out


def _note(T: int, window: int) -> str:
    """What every heatmap of the page draws, and what it leaves out."""
    start = window_start(T, window)
    if start == 0:
        return f"Each heatmap draws the whole prompt ({T} positions), the answer position ({T - 1}) as the first row."
    far = min(FAR_KEYS, start)
    return (
        f"Each heatmap draws query rows {start}–{T - 1} of the {T} positions, the answer position ({T - 1}, "
        f"the prompt's last token) as the first row, against the same key positions and the {far} earlier ones "
        f"the answer row attends to most. Left out: query rows 0–{start - 1} and the other {start - far} earlier "
        "key positions (each head says how much of the answer row's attention they take); the token view shows "
        f"every token but colours only from the drawn rows. More: {MORE}."
    )


def attention_page(
    path: Path,
    title: str,
    tokens: list[str],
    heads: dict[str, list[tuple[str, float, np.ndarray]]],
    window: int = WINDOW,
) -> Path:
    """Write the page: ``heads`` maps a section title (e.g. "Top 3 positive heads") to
    (head name, its score, its [T, T] pattern) tuples. ``window``: the last positions drawn
    per head (``drawn_positions``; 0: every one), so a long prompt makes a page of bounded size."""
    T = len(tokens)
    prompt = f"<code>{html.escape(''.join(tokens))}</code>"
    hover = (
        "Hover a token in a head's token view to see where it attends from there (the last token, the "
        "answer position, is shown first)."
    )
    if window_start(T, window) > 0:  # folded, so that a long prompt does not push the heatmaps down
        intro = f"<details><summary>Prompt ({T} tokens)</summary><p>{prompt}</p></details><p>{hover}</p>"
    else:
        intro = f"<p>Prompt: {prompt}. {hover}</p>"
    body = [f"<h1>{html.escape(title)}</h1>", intro, f'<p class="window">{html.escape(_note(T, window))}</p>']
    for section, entries in heads.items():
        body.append(f"<h2>{html.escape(section)}</h2>")
        for name, score, pattern in entries:
            pattern = np.asarray(pattern, dtype=float)
            rows, cols = drawn_positions(pattern, window)
            answer = pattern[T - 1]
            left = float(answer.sum() - answer[cols].sum())
            left_out = (
                f'<p class="left-out">not drawn: {left:.1%} of the answer row\'s attention '
                f"(to {T - len(cols)} earlier positions)</p>"
                if len(cols) < T
                else ""
            )
            data = json.dumps({"answer": T - 1, "rows": _view_rows(pattern, rows)}, separators=(",", ":"))
            body.append(
                f'<div class="head" data-head="{html.escape(name)}"><h3>{html.escape(name)} '
                f"(direct logit attribution {score:+.3f})</h3>{left_out}{_svg(pattern, tokens, rows, cols)}"
                f'<div class="tokens"></div><script type="application/json">{data}</script></div>'
            )
    shared = json.dumps(tokens).replace("</", "<\\/")  # never close the script element early
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}"
        f'<script type="application/json" id="tokens">{shared}</script><script>{_SCRIPT}</script></body></html>'
    )
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
