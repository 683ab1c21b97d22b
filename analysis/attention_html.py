"""A self-contained HTML page of attention patterns (the usual DLA walkthrough's circuitsvis view, offline).

``circuitsvis`` installs, but its pages load their JavaScript from a CDN at
view time, so they are blank on a machine without internet (and in W&B's
offline files). This page needs nothing: each head is an inline SVG heatmap
(query rows × key columns, drawn here in Python, readable without scripts)
and a small inline script adds the circuitsvis-style token view: hover a
token to colour the tokens it attends to.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from analysis.plots import atomic_output

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.head { display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }
.head h3 { font-size: 0.95em; margin: 0.3em 0; }
.tokens { max-width: 46em; line-height: 1.9; margin-top: 0.4em; }
.tok { padding: 1px 2px; margin: 0 1px; border-radius: 3px; white-space: pre; cursor: default;
       border: 1px solid #ddd; font-family: ui-monospace, monospace; font-size: 0.85em; }
.tok.dest { outline: 2px solid #111; }
"""

_SCRIPT = """
document.querySelectorAll('.head').forEach(function (box) {
  var data = JSON.parse(box.querySelector('script[type="application/json"]').textContent);
  var view = box.querySelector('.tokens');
  var spans = data.tokens.map(function (text, i) {
    var span = document.createElement('span');
    span.className = 'tok'; span.textContent = text; span.dataset.pos = i;
    view.appendChild(span); return span;
  });
  function show(q) {
    spans.forEach(function (s, k) {
      var a = data.pattern[q][k];
      s.style.background = 'rgba(214, 39, 40,' + a.toFixed(3) + ')';
      s.classList.toggle('dest', k === q);
      s.title = 'attention from ' + q + ' to ' + k + ': ' + a.toFixed(3);
    });
  }
  spans.forEach(function (s, q) { s.addEventListener('mouseenter', function () { show(q); }); });
  show(spans.length - 1);
  box.dataset.rendered = 'true';
});
"""


def _svg(pattern: np.ndarray, tokens: list[str], cell: int = 14) -> str:
    """Query rows × key columns, white (0) to red (1), token labels on both axes."""
    T = len(tokens)
    margin = 8 + 7 * min(14, max((len(t) for t in tokens), default=1))
    size = margin + cell * T
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img">']
    for q in range(T):
        for k in range(q + 1):
            a = float(pattern[q, k])
            parts.append(
                f'<rect x="{margin + k * cell}" y="{margin + q * cell}" width="{cell}" height="{cell}" '
                f'fill="rgb(255,{int(255 * (1 - a))},{int(255 * (1 - a))})" stroke="#eee">'
                f"<title>{html.escape(tokens[q])} → {html.escape(tokens[k])}: {a:.3f}</title></rect>"
            )
    for i, t in enumerate(tokens):
        label = html.escape(t[:14])
        parts.append(
            f'<text x="{margin - 3}" y="{margin + i * cell + cell * 0.75}" font-size="9" '
            f'text-anchor="end" font-family="monospace">{label}</text>'
        )
        parts.append(
            f'<text transform="translate({margin + i * cell + cell * 0.7},{margin - 3}) rotate(-90)" '
            f'font-size="9" font-family="monospace">{label}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def attention_page(
    path: Path, title: str, tokens: list[str], heads: dict[str, list[tuple[str, float, np.ndarray]]]
) -> Path:
    """Write the page: ``heads`` maps a section title (e.g. "Top 3 positive heads") to
    (head name, its score, its [T, T] pattern) tuples."""
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Prompt: <code>{html.escape(''.join(tokens))}</code>. Hover a token in a head's token view "
        "to see where it attends from there (the last token is shown first).</p>",
    ]
    for section, entries in heads.items():
        body.append(f"<h2>{html.escape(section)}</h2>")
        for name, score, pattern in entries:
            data = json.dumps({"tokens": tokens, "pattern": np.round(np.asarray(pattern, dtype=float), 4).tolist()})
            data = data.replace("</", "<\\/")  # never close the script element early
            body.append(
                f'<div class="head" data-head="{html.escape(name)}"><h3>{html.escape(name)} '
                f"(direct logit attribution {score:+.3f})</h3>{_svg(np.asarray(pattern), tokens)}"
                f'<div class="tokens"></div><script type="application/json">{data}</script></div>'
            )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}<script>{_SCRIPT}</script></body></html>"
    )
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
