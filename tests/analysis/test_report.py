"""Analysis reads only the results; its offline W&B run holds the tables and images."""

import re
from pathlib import Path

import pytest

from analysis.__main__ import main as analysis_main
from analysis.backup import compensation_by_layer, compensation_matrix, grid, load_results, summary_table
from sweeps import backup
from tests.wandb_records import history_and_summary


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "o"
    args = ["--model", "tiny-gpt2", "--executor", "local", "--n-prompts", "8", "--no-report", "--out", str(out)]
    assert backup.main(args) == 0
    return out


def test_tables_and_grids(results_dir):
    r = load_results(results_dir)
    slopes = grid(r.slopes, "slope", r.n_layers, r.n_heads)
    assert slopes.shape == (3, 4) and not (slopes != slopes).any()
    assert (slopes[-1] == 0).all()  # the last layer has no downstream heads
    m = compensation_matrix(r.responses, r.n_layers, r.n_heads)
    assert m.shape == (12, 12)
    assert (m.loc["L1H0", ["L0H0", "L0H3"]] == 0).all()  # earlier heads cannot respond
    by_layer = compensation_by_layer(r.responses, r.n_layers, r.n_heads)
    assert by_layer.shape == (12, 6)  # 3 attention-layer columns, then 3 MLP-layer columns
    heads_only = r.responses[(r.responses.up_layer == 1) & (r.responses.up_head == 0)
                             & (r.responses.down_kind == "attn_head") & (r.responses.down_layer == 2)]
    assert by_layer.loc["L1H0", "L2H*"] == pytest.approx(heads_only.mean_delta.sum())
    table = summary_table(r)
    assert {"kind", "head", "slope", "ci95", "r2"} <= set(table.columns) and len(table) > 0


def test_report_writes_figures_and_an_offline_wandb_run(results_dir, tmp_path, monkeypatch):
    assert analysis_main(["backup", str(results_dir), "--wandb", "offline", "--scatter", "L1H2"]) == 0
    plots = results_dir / "plots"
    for name in ("slopes", "direct_effects", "compensation", "compensation_by_layer", "scatter_L1H2"):
        assert (plots / f"{name}.png").stat().st_size > 1000
        assert "plotly" in (plots / f"{name}.html").read_text()
    runs = list(Path(tmp_path / "wandb").rglob("run-*.wandb"))
    assert len(runs) == 1
    history, summary, artifacts = history_and_summary(runs[0])
    expected = {"slopes": "table-file", "top_heads": "table-file", "responses_top": "table-file",
                "plots/slopes": "image-file", "plots/compensation": "image-file",
                "plots/scatter_L1H2": "image-file", "html/slopes": "html-file", "self_repair_heads": "table-file",
                "self_repair_neurons": "table-file"}
    for key, kind in expected.items():  # media are logged as nested {_type, path, sha256, ...}
        assert history.get(f"{key}/_type") == f'"{kind}"', sorted(history)
    media = runs[0].parent / "files"
    table = media / history["slopes/path"].strip('"')
    assert table.is_file() and '"slope"' in table.read_text()  # the table's own rows, on disk
    neurons = (media / history["self_repair_neurons/path"].strip('"')).read_text()
    assert '"delta_de"' in neurons and '"cum_share"' in neurons
    page = (media / history["html/slopes/path"].strip('"')).read_text()  # the W&B copy of slopes.html
    assert "<script" in page and not re.search(r"<script[^>]*\bsrc=", page)  # plotly inlined: works offline
    assert len(page) > 1_000_000  # the library itself
    for name in ("slopes", "compensation", "compensation_by_layer"):  # beside the results: one local copy
        assert re.findall(r'<script[^>]*\bsrc="([^"]*)"', (plots / f"{name}.html").read_text()) == ["plotly.min.js"]
    assert (plots / "plotly.min.js").stat().st_size > 1_000_000
    assert summary["n_heads_swept"] == "12"
    assert any(name.startswith("backup-results-") for name in artifacts)
    run_id = runs[0].stem.removeprefix("run-")
    assert run_id.startswith("backup-")  # one run per results directory, named from its spec

    # The same report again (a re-run with nothing new): no second W&B run; new options: the same run id.
    assert analysis_main(["backup", str(results_dir), "--wandb", "offline", "--scatter", "L1H2"]) == 0
    assert len(list(Path(tmp_path / "wandb").rglob("run-*.wandb"))) == 1
    assert analysis_main(["backup", str(results_dir), "--wandb", "offline", "--scatter", "L1H1"]) == 0
    again = list(Path(tmp_path / "wandb").rglob("run-*.wandb"))
    assert len(again) == 2 and {r.stem for r in again} == {f"run-{run_id}"}


def test_the_printed_self_repair_fraction_leaves_out_heads_whose_direct_effect_is_noise():
    """A head with almost no direct effect has a meaningless ratio (here 50): the layer means
    of the summary line take only heads at or above 10 % of the largest |direct effect|."""
    import pandas as pd

    from analysis.self_repair import summary_lines

    rows = []
    for layer, head, de, repaired in [(0, 0, 1.0, 0.1), (0, 1, 0.001, 0.05), (1, 0, 0.8, 0.4), (2, 0, 0.9, 0.45)]:
        rows.append(dict(layer=layer, head=head, selection="top", top_fraction=0.5, n_points=4, mean_de=de,
                         total_effect=-de + repaired, own_change=-de, self_repair=repaired, heads=repaired,
                         same_layer=0.0, mlps=0.0, final_norm=0.0, frac_heads=0.1, frac_mlps=0.0,
                         frac_final_norm=0.0))
    line = [l for l in summary_lines(pd.DataFrame(rows), 0.5, 3) if "self-repair fraction" in l][0]
    assert "over the 3 heads whose |direct effect| is at least 10% of the largest" in line
    assert "+0.10 in the earliest (L0), +0.50 in the latest (L2)" in line  # the noisy head's 50 is left out


def _repair_rows(fractions: dict[tuple[int, int], tuple[float, float]]):
    """``self_repair/`` rows (selection top) from {(layer, head): (mean direct effect, self-repair fraction)}."""
    import pandas as pd

    rows = []
    for (layer, head), (de, fraction) in fractions.items():
        repaired = fraction * de
        rows.append(dict(layer=layer, head=head, selection="top", top_fraction=0.02, n_points=20, mean_de=de,
                         total_effect=-de + repaired, own_change=-de, self_repair=repaired, heads=repaired,
                         same_layer=0.0, mlps=0.0, final_norm=0.0, frac_heads=0.1, frac_mlps=0.0,
                         frac_final_norm=0.0))
    return pd.DataFrame(rows)


def test_the_self_repair_fraction_line_names_the_swept_layers_it_compares():
    """A sweep of L20-L29 of a 30-layer model (SmolLM2's shape), where L21 has only a head with
    no direct effect to speak of: the line compares the first and last third of the 9 layers
    with a meaningful head and names them (L20, L22-L23 and L27-L29), not "the first layers"."""
    from analysis.self_repair import summary_lines

    fraction = {layer: (layer - 19) / 10 for layer in range(20, 30)}  # a different mean in every layer
    heads = {(layer, h): (1.0, fraction[layer] + 0.02 * h) for layer in range(20, 30) for h in range(2)}
    heads[(21, 0)], heads[(21, 1)] = (0.001, 9.0), (0.002, -9.0)  # noise: L21 has no layer mean
    line = [l for l in summary_lines(_repair_rows(heads), 0.02, 30) if "self-repair fraction" in l][0]
    early = sum(fraction[layer] + 0.01 for layer in (20, 22, 23)) / 3  # the mean of each layer's two heads
    late = sum(fraction[layer] + 0.01 for layer in (27, 28, 29)) / 3
    assert "in the first and the last 3 of the 9 swept layers that have such heads" in line, line
    assert f"{early:+.2f} in the earliest (L20, L22–L23), {late:+.2f} in the latest (L27–L29)" in line, line
    assert "first layers" not in line and "L0" not in line


def test_the_neuron_line_says_when_the_top_neurons_cancel():
    """Two heads' last-MLP terms split over three neurons: for L1H0 the neurons all push with the
    term (the line gives the net share); for L1H1 two of them push +110 % and −105 % and leave
    +10 %: the line gives both sides, not the small net share alone."""
    import pandas as pd

    from analysis.self_repair import neuron_lines

    rows = []
    for head, term, deltas in [(0, 0.2, [0.1, 0.06, 0.02]), (1, 0.1, [-0.105, 0.11, 0.005])]:
        order = sorted(range(3), key=lambda i: -abs(deltas[i]))
        shares = [deltas[i] / term for i in order]
        for rank, i in enumerate(order, start=1):
            rows.append(dict(layer=1, head=head, selection="top", rank=rank, neuron=100 + i, mlp_layer=2,
                             delta_de=deltas[i], clean_de=0.0, share=shares[rank - 1],
                             cum_share=sum(shares[:rank]), top_share=sum(shares), mlp_term=term, n_points=4))
    first, second = neuron_lines(pd.DataFrame(rows))
    assert "L1H0" in first and "carry 90% of its repair" in first and "neuron 100 alone 50%" in first
    assert "balance" not in first
    assert "L1H1" in second and "carry 10% of its repair" in second
    assert "only as a balance: 115% with the term, -105% against it (neuron 101 alone 110%)" in second
