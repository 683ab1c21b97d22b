"""Figures a researcher can trust at a glance: colour only where a value means something, a
colour scale that says what it leaves out, node names on line plots, and interactive pages
that need no network."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from analysis import plots
from tests.conftest import needs


def _cell_colour(fig, ax, row: int, col: int) -> np.ndarray:
    """The rendered RGB colour at the centre of one cell."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
    x, y = ax.transData.transform((col, row))
    return image[image.shape[0] - int(round(y)), int(round(x))]


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """A slope grid like SmolLM2's: one noisy head with a huge slope (L0H3), the finding at ±0.6."""
    values = np.zeros((4, 5))
    values[0, 3] = 33.2  # tiny direct effect, slope mostly noise
    values[3, 0], values[3, 1], values[2, 4] = 0.6, 0.5, -0.6
    values[1, 1] = np.nan  # not swept
    mask = np.zeros_like(values, dtype=bool)
    mask[0, 3] = True
    return values, mask


def test_masked_cells_are_grey_and_take_no_part_in_the_colour_scale():
    values, mask = _grid()
    fig, ax, scale = plots.heatmap_figure(values, "slopes", mask=mask, caption="grey: not meaningful")
    try:
        assert (scale.vmin, scale.vmax) == (-0.6, 0.6)  # the real range of what is coloured
        assert np.allclose(_cell_colour(fig, ax, 0, 3), to_rgb(plots.MASKED_GREY), atol=0.02)
        assert np.allclose(_cell_colour(fig, ax, 1, 1), 1.0, atol=0.02)  # not swept: white
        top, finding = _cell_colour(fig, ax, 3, 0), _cell_colour(fig, ax, 3, 1)
        assert np.allclose(top, plt.get_cmap("RdBu")(1.0)[:3], atol=0.03)  # the finding takes the darkest blue
        assert finding[2] > finding[0] + 0.3  # 0.5 is clearly blue too, not washed out by 33.2
        assert np.allclose(_cell_colour(fig, ax, 2, 4), plt.get_cmap("RdBu")(0.0)[:3], atol=0.03)
    finally:
        plt.close(fig)
    fig, ax, scale = plots.heatmap_figure(values, "slopes")  # unmasked, the noise would take the scale
    plt.close(fig)
    assert scale.vmax == pytest.approx(33.2)


def test_a_clipped_colour_scale_says_so_and_marks_the_cells_beyond():
    values = np.linspace(-1, 1, 40).reshape(5, 8)
    values[0, 0] = 9.0
    fig, ax, scale = plots.heatmap_figure(values, "t", colorbar="effect", clip_quantile=0.9)
    try:
        assert scale.clip is not None and scale.vmax == pytest.approx(scale.clip) and scale.vmax < 9
        label = fig.axes[1].get_ylabel()
        assert "clipped at ±" in label and "largest 9" in label and "▲▼ cells beyond" in label
        marks = [(t.get_text(), t.get_position()) for t in ax.texts if t.get_text() in "▲▼"]
        beyond = np.argwhere((values > scale.vmax) | (values < scale.vmin))
        assert sorted((int(x), int(y)) for _, (x, y) in marks) == sorted((int(c), int(r)) for r, c in beyond)
        assert ("▲", (0, 0)) in [(m, tuple(map(int, p))) for m, p in marks]
    finally:
        plt.close(fig)
    fig, _, scale = plots.heatmap_figure(values, "t")  # no clip asked for: the whole range, nothing marked
    plt.close(fig)
    assert scale.clip is None and scale.vmax == 9.0 and not scale.note


def test_tick_labels_stay_readable_on_a_large_matrix():
    labels = [f"L{l}H{h}" for l in range(30) for h in range(9)]
    fig, ax, _ = plots.heatmap_figure(np.random.default_rng(0).normal(size=(270, 270)), "big", xticks=labels,
                                      yticks=labels)
    try:
        shown = [t for t in ax.get_yticklabels() if t.get_text()]
        assert 20 <= len(shown) < 270 and min(t.get_fontsize() for t in shown) >= 6
    finally:
        plt.close(fig)


def test_line_plots_name_their_top_nodes_in_the_legend(tmp_path):
    scales = [0, 0.5, 1, 2, 10]
    lines = {"in_circuit": [("L9H6", np.array([0.9, 0.5, 0.4, 0.6, 1.0]))],
             "not_in_circuit": [(f"L{i}H0", np.full(5, 0.01 * i)) for i in range(20)]}
    captured = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        captured["legend"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", spy)
        png, html = plots.effect_lines(scales, lines, "effect", tmp_path / "lines", named=3)
    assert captured["legend"][-3:] == ["L9H6 (in circuit)", "L19H0 (not in circuit)", "L18H0 (not in circuit)"]
    assert "other not in circuit nodes (18)" in captured["legend"]
    assert png.stat().st_size > 1000 and "L9H6" in html.read_text()


def _scripts(html: str) -> list[str]:
    return re.findall(r"<script[^>]*\bsrc=\"([^\"]*)\"", html)


def test_pages_load_plotly_from_one_local_copy_and_their_standalone_copies_from_none(tmp_path):
    values, mask = _grid()
    _, first = plots.heatmap(values, "a", tmp_path / "a", mask=mask)
    _, second = plots.bars(["x", "y"], np.array([1.0, -1.0]), "b", tmp_path / "b")
    for page in (first, second):
        assert _scripts(page.read_text()) == [plots.PLOTLY_JS]  # no CDN, no http at all
        assert "cdn.plot.ly" not in page.read_text()
    assert [p.name for p in tmp_path.glob("*.js")] == [plots.PLOTLY_JS]  # one copy for every page
    standalone = plots.standalone_html(first)
    assert _scripts(standalone) == [] and len(standalone) > len(first.read_text()) + 1_000_000


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


OFFLINE = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]  # every request fails


def _dom(page: Path, profile: Path) -> str:
    return subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *OFFLINE,
         "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout


@pytest.mark.slow
def test_pages_render_their_traces_in_chromium_with_the_network_off(tmp_path):
    needs("Chromium", None if _chromium() else "apt-get install chromium")
    values, mask = _grid()
    folder = tmp_path / "plots"
    folder.mkdir()
    _, heat = plots.heatmap(values, "slopes", folder / "slopes", mask=mask)
    _, line = plots.effect_lines([0, 1, 10], {"unlabelled": [("L9H6", np.array([0.1, 0.0, 0.9]))]}, "effect",
                                 folder / "effect")
    dom = _dom(heat, tmp_path / "profile-heat")
    assert 'class="main-svg"' in dom, dom[-2000:]  # plotly ran and drew its figure
    assert dom.count('<g class="hm"><image') == 2  # the coloured cells and the grey (masked) ones, drawn
    dom = _dom(line, tmp_path / "profile-line")
    assert dom.count('class="trace scatter') == 1 and 'class="scatterpts"' in dom
    away = tmp_path / "elsewhere.html"  # the W&B copy, away from plotly.min.js
    away.write_text(plots.standalone_html(heat))
    assert dom.count('<g class="hm"><image') == 0  # (the line page has none: the check can fail)
    assert _dom(away, tmp_path / "profile-away").count('<g class="hm"><image') == 2


def _self_repair_rows():
    """``self_repair/`` rows (selection top) whose heads fill Figure 1's axes: every swept layer
    (L20-L29, as on SmolLM2) has heads from the bottom to the top of the y-range, a few of them
    noise (grey), and the layer terms take both signs, so no corner of either figure is empty."""
    import pandas as pd

    rows = []
    for layer in range(20, 30):
        for head in range(9):
            de = 0.001 if (layer + head) % 11 == 0 else 0.5 + 0.05 * head
            fraction = -0.5 + 2.0 * ((head + 3 * layer) % 9) / 8  # -0.5 to 1.5, in every layer
            repaired = fraction * de
            rows.append(dict(layer=layer, head=head, selection="top", top_fraction=0.02, n_points=20, mean_de=de,
                             total_effect=-de + repaired, own_change=-de, self_repair=repaired,
                             heads=0.6 * repaired, same_layer=0.0, mlps=0.3 * repaired, final_norm=0.1 * repaired,
                             frac_heads=0.1, frac_mlps=0.1, frac_final_norm=0.1))
    return pd.DataFrame(rows)


def _covered(fig, ax) -> list[str]:
    """What the axes' legend covers, drawn by the figure's renderer: every scatter point (its
    marker's radius around its centre), line vertex and bar, in display coordinates; and
    whether the legend is cut off by the figure's edge."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = ax.get_legend().get_window_extent(renderer)
    covered = [] if fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1) else ["the edge"]
    for collection in ax.collections:  # scatter points
        radius = np.sqrt(np.max(collection.get_sizes())) / 2 * fig.dpi / 72  # points² area to pixels
        for x, y in ax.transData.transform(collection.get_offsets()):
            if box.x0 - radius <= x <= box.x1 + radius and box.y0 - radius <= y <= box.y1 + radius:
                covered.append(f"point at ({x:.0f}, {y:.0f})")
    for line in ax.lines:
        if line.get_label().startswith("_"):  # the zero line spans the axes: not data
            continue
        for x, y in ax.transData.transform(line.get_xydata()):
            if box.contains(x, y):
                covered.append(f"{line.get_label()} at ({x:.0f}, {y:.0f})")
    for bar in ax.patches:
        if box.overlaps(bar.get_window_extent(renderer)):
            covered.append(f"bar {bar.get_label() or ''} at x={bar.get_x():.1f}")
    return covered


def test_the_self_repair_figures_legends_cover_no_data():
    """The legends of Figure 1 and of the per-layer breakdown cover no point, line vertex or bar
    and lie whole in the figure, checked with the figure's renderer, on axes that data fills to
    every corner; with the legend inside the axes (matplotlib's "best"), the same check finds
    what it covers."""
    from analysis import self_repair

    repair = _self_repair_rows()
    for draw in (self_repair.fraction_figure, self_repair.layers_figure):
        fig, ax = draw(repair, "smollm2-135m on ioi")
        try:
            assert len(ax.collections) + len(ax.patches) > 0 and _covered(fig, ax) == [], draw.__name__
            ax.legend(loc="best", fontsize=7)  # the legend as it was: the check can fail
            assert _covered(fig, ax) and "the edge" not in _covered(fig, ax), draw.__name__
        finally:
            plt.close(fig)

