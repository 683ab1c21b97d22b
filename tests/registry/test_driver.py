"""The whole sweep: executors agree, resume recomputes only what is missing, files are safe."""

import json

import numpy as np
import pandas as pd
import pytest

from sweeps import backup
from sweeps.jobs.backup import BackupJob
from sweeps.registry import BackupSweep
from sweeps.runtime.store import ResultStore

ORIGINAL_RUN_SHARD = BackupJob.run_shard
PROVENANCE = ["model", "weight_hash", "task", "task_hash", "seed", "ablation", "code_version", "spec_id"]


def sweep(out, *extra, model="tiny-llama", executor="local"):
    args = ["--model", model, "--executor", executor, "--n-prompts", "10", "--batch-size", "4",
            "--no-report", "--out", str(out), *extra]
    return backup.main(args)


def tables(out) -> dict[str, pd.DataFrame]:
    keys = {"slopes": ["layer", "head"], "responses": ["up_layer", "up_head", "down_kind", "down_layer", "down_head"],
            "points": ["layer", "head", "prompt", "pos"]}
    return {
        name: pd.read_parquet(out / name).sort_values(k).reset_index(drop=True).drop(columns=["shard"])
        for name, k in keys.items()
    }


def assert_same_tables(a, b, atol=1e-5):
    for name in a:
        assert list(a[name].columns) == list(b[name].columns)
        assert len(a[name]) == len(b[name]) > 0
        for column in a[name].columns:
            x, y = a[name][column], b[name][column]
            if pd.api.types.is_float_dtype(x):
                np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=f"{name}.{column}")
            else:
                assert x.equals(y), f"{name}.{column}"


def test_ray_pool_equals_local_and_pins_one_gpu_per_actor(tmp_path, ray_session):
    assert sweep(tmp_path / "local") == 0
    assert sweep(tmp_path / "ray", executor="ray") == 0  # session Ray has 2 fake GPUs -> 2 actors
    local, ray_ = tables(tmp_path / "local"), tables(tmp_path / "ray")
    assert_same_tables(local, ray_)
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    gpu_ids = [w["gpu_ids"] for w in manifest["workers"]]
    assert len(gpu_ids) == 2 and all(len(g) == 1 for g in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    shard_gpus = {tuple(s["gpu_ids"]) for s in manifest["shards"].values()}
    assert shard_gpus <= {tuple(g) for g in gpu_ids}


def test_results_carry_provenance_and_shapes(tmp_path):
    out = tmp_path / "o"
    assert sweep(out, "--heads", "L0,L1H2") == 0
    t = tables(out)
    assert len(t["slopes"]) == 5  # 4 heads of layer 0 + L1H2
    assert set(PROVENANCE) <= set(t["slopes"].columns)
    assert t["slopes"].weight_hash.nunique() == 1 and t["slopes"].model.iloc[0] == "tiny-llama"
    L, H = 3, 4
    assert len(t["responses"]) == 5 * (L * H + L)
    assert len(t["points"]) == 5 * 10  # one point per prompt (IOI answer position)
    import pyarrow.parquet as pq

    metadata = pq.read_schema(next((out / "slopes").glob("*.parquet"))).metadata
    assert json.loads(metadata[b"sweep_spec"])["task_params"]["n_prompts"] == 10


def count_shards(monkeypatch, fail_after=None):
    calls = []
    original = ORIGINAL_RUN_SHARD

    def counting(self, shard):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt
        calls.append(shard.id)
        return original(self, shard)

    monkeypatch.setattr(BackupJob, "run_shard", counting)
    return calls


def test_interrupted_sweep_resumes_only_missing_shards(tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert sweep(reference) == 0
    out = tmp_path / "interrupted"
    calls = count_shards(monkeypatch, fail_after=1)
    assert sweep(out) == 130  # Ctrl-C after the first shard
    assert "Resume with" in capsys.readouterr().err
    assert calls == ["L00H0-3"]
    with monkeypatch.context() as m:
        again = count_shards(m)
        assert sweep(out) == 0
    assert again == ["L01H0-3", "L02H0-3"]  # only the missing shards
    assert_same_tables(tables(reference), tables(out), atol=0)


def test_corrupt_or_uncommitted_files_are_set_aside_and_recomputed(tmp_path, monkeypatch):
    from analysis.backup import ResultsError, load_results

    out = tmp_path / "o"
    assert sweep(out) == 0
    before = tables(out)
    # a shard renamed into place whose commit never reached the manifest (crash in between)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"]["L00H0-3"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert set(load_results(out).slopes.layer) == {1, 2}  # analysis never reads uncommitted rows
    victim = out / "points" / "L01H0-3.parquet"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated: no Parquet footer
    with pytest.raises(ResultsError, match="L01H0-3.parquet is altered since it was written; re-run"):
        load_results(out)
    # one flipped byte in a data page: the footer and row count still look right, the checksum does not
    flipped = out / "responses" / "L02H0-3.parquet"
    data = bytearray(flipped.read_bytes())
    data[64] ^= 0xFF  # inside the first column chunk, far from the footer
    flipped.write_bytes(bytes(data))
    import pyarrow.parquet as pq

    assert pq.read_metadata(flipped).num_rows == manifest["shards"]["L02H0-3"]["rows"]["responses"]
    (out / "slopes" / ".L02H0-3.parquet.tmp").write_bytes(b"half-written")
    calls = count_shards(monkeypatch)
    assert sweep(out) == 0
    assert sorted(calls) == ["L00H0-3", "L01H0-3", "L02H0-3"]
    assert not (out / "slopes" / ".L02H0-3.parquet.tmp").exists()
    assert len(list((out / ".trash").rglob("*"))) >= 4  # set aside, not deleted
    assert_same_tables(before, tables(out), atol=0)


def silently_corrupted(data: bytes) -> bytes:
    """``data`` with one byte flipped where Parquet still reads it, but as other values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    original = pq.read_table(pa.BufferReader(data))
    for offset in range(4, len(data) - 8):
        changed = bytearray(data)
        changed[offset] ^= 0x01
        try:
            if not pq.read_table(pa.BufferReader(bytes(changed))).equals(original):
                return bytes(changed)
        except (OSError, ValueError):
            continue
    raise AssertionError("no silent corruption found")


@pytest.mark.parametrize(
    "damage", ["truncated", *(pytest.param(d, marks=pytest.mark.slow) for d in ("garbage", "empty object", "no shards"))]
)
def test_a_damaged_manifest_is_rebuilt_from_the_shard_files_that_verify(damage, tmp_path, monkeypatch, capsys):
    """The manifest is the commit record; when it is damaged the shard files vouch for themselves
    (their own record and spec in the Parquet metadata, page checksums): intact shards are kept,
    a shard with a flipped byte or a missing file is recomputed, and the results equal the first run."""
    from analysis.backup import ResultsError, load_results

    out = tmp_path / "o"
    assert sweep(out) == 0
    before = tables(out)
    manifest_file = out / "manifest.json"
    text = manifest_file.read_text()
    manifest_file.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00\xffnot json",
                              "empty object": "{}", "no shards": '{"shards": [1, 2]}'}[damage])
    with pytest.raises(ResultsError, match="manifest.json is damaged; run the sweep command again"):
        load_results(out)
    flipped = out / "responses" / "L01H0-3.parquet"
    flipped.write_bytes(silently_corrupted(flipped.read_bytes()))
    (out / "points" / "L02H0-3.parquet").unlink()  # a shard missing one of its files
    capsys.readouterr()
    calls = count_shards(monkeypatch)
    assert sweep(out) == 0
    err = capsys.readouterr().err
    assert "manifest.json" in err and "rebuilt from the shard files; 1 shard(s) verified and kept" in err, err
    assert sorted(calls) == ["L01H0-3", "L02H0-3"]
    assert_same_tables(before, tables(out), atol=0)
    assert (out / ".trash").is_dir() and any(p.name.startswith("manifest.json.") for p in (out / ".trash").iterdir())
    manifest = json.loads(manifest_file.read_text())
    assert manifest["shards"]["L00H0-3"]["recovered"] is True and manifest["weight_hash"]


def test_a_damaged_spec_file_is_set_aside_and_a_changed_spec_still_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert sweep(out) == 0
    (out / "sweep.json").write_text('{"sweep": "back')
    calls = count_shards(monkeypatch)
    assert sweep(out, "--seed", "1") == 2  # the manifest's record of the spec still guards the directory
    assert "holds results of a different sweep (seed: 0 here vs 1 now" in capsys.readouterr().err
    assert sweep(out) == 0 and calls == []  # nothing lost, nothing recomputed
    assert json.loads((out / "sweep.json").read_text())["sweep"] == "backup"


def test_second_sweep_into_a_busy_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    store = ResultStore(out, BackupSweep.datasets)
    with store.lock():
        assert sweep(out) == 2
    assert "another sweep" in capsys.readouterr().err


def test_no_resume_starts_over(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert sweep(out) == 0
    calls = count_shards(monkeypatch)
    assert sweep(out, "--no-resume") == 0
    assert len(calls) == 3


def test_growing_the_head_list_adds_only_the_new_heads(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert sweep(out, "--heads", "L0H1,L0H2") == 0
    calls = count_shards(monkeypatch)
    assert sweep(out, "--heads-per-shard", "2") == 0  # now every head, other shard sizes
    assert [c for c in calls if c.startswith("L00")] == ["L00H0.3"]  # only the heads not done yet
    slopes = tables(out)["slopes"]
    assert len(slopes) == 12 and not slopes.duplicated(["layer", "head"]).any()


def test_self_repair_dataset_is_the_points_summarised(tmp_path, capsys):
    """self_repair/ rows are the means (and clipped shares) of the per-point terms in points/,
    over every point and over the top --top-fraction by the head's clean direct effect,
    recomputed here with pandas; the summary is printed in words and the figures written."""
    import math

    import pyarrow.parquet as pq

    from sweeps import backup

    out = tmp_path / "o"
    assert backup.main(["--model", "tiny-llama3", "--executor", "local", "--n-prompts", "8", "--heads", "L1H0,L2",
                        "--top-fraction", "0.25", "--wandb", "disabled", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "on the top 25% of points" in printed and "the final norm repairs" in printed
    points = pq.read_table(out / "points").to_pandas()
    repair = pq.read_table(out / "self_repair").to_pandas()
    assert len(repair) == 2 * 5 and set(repair.selection) == {"all", "top"}
    for (layer, head), pts in points.groupby(["layer", "head"]):
        for selection in ("all", "top"):
            row = repair[(repair.layer == layer) & (repair["head"] == head) & (repair.selection == selection)].iloc[0]
            chosen = pts if selection == "all" else pts.nlargest(math.ceil(0.25 * len(pts)), "de_clean")
            assert row.n_points == len(chosen)
            for term in ("total_effect", "own_change", "self_repair", "heads", "same_layer", "mlps", "final_norm"):
                assert row[term] == pytest.approx(chosen[term].mean(), abs=1e-9), term
            for term in ("heads", "mlps", "final_norm"):
                share = (chosen[term] / chosen.de_clean).clip(0, 1).mean()
                assert row[f"frac_{term}"] == pytest.approx(share, abs=1e-9), term
    assert (out / "plots" / "self_repair.png").is_file() and (out / "plots" / "self_repair_layers.png").is_file()


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_top_fraction_outside_zero_one_is_one_line(tmp_path, capsys, value):
    from sweeps import backup

    assert backup.main(["--model", "tiny-gpt2", "--top-fraction", value, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --top-fraction must be in (0, 1], got {float(value)}"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_top_neurons_below_one_is_one_line(tmp_path, capsys, value):
    from sweeps import backup

    assert backup.main(["--model", "tiny-gpt2", "--top-neurons", value, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --top-neurons must be >= 1, got {value}"
    assert not (tmp_path / "o").exists()


def test_neurons_dataset_ranks_the_last_mlps_neurons_of_each_head(tmp_path, capsys):
    """neurons/: --top-neurons rows per (head, selection), ranked by |delta_de|, each share the
    neuron's change over the mean of points/' last_mlp on the same points; with every neuron
    kept the changes add up to that mean. Loaded, tabled and printed by the analysis."""
    import math

    import pyarrow.parquet as pq

    from analysis.backup import load_results
    from analysis.self_repair import neuron_table
    from sweeps import backup

    def run(out, k):
        assert backup.main(["--model", "tiny-llama3", "--executor", "local", "--n-prompts", "8", "--heads",
                            "L0H1,L2H0,L2H1", "--top-fraction", "0.25", "--top-neurons", str(k), "--wandb", "disabled",
                            "--no-report", "--out", str(out)]) == 0
        return pq.read_table(out / "points").to_pandas(), pq.read_table(out / "neurons").to_pandas()

    points, neurons = run(tmp_path / "k3", 3)
    assert "neurons of layer 2's MLP carry" in capsys.readouterr().out
    assert len(neurons) == 3 * 2 * 3 and set(neurons.mlp_layer) == {2}
    for (layer, head, selection), rows in neurons.groupby(["layer", "head", "selection"]):
        rows = rows.sort_values("rank")
        assert list(rows["rank"]) == [1, 2, 3] and rows.neuron.is_unique
        assert (np.diff(rows.delta_de.abs()) <= 0).all()
        pts = points[(points.layer == layer) & (points["head"] == head)]
        chosen = pts if selection == "all" else pts.nlargest(math.ceil(0.25 * len(pts)), "de_clean")
        assert (rows.n_points == len(chosen)).all()
        assert rows.mlp_term.iloc[0] == pytest.approx(chosen.last_mlp.mean(), abs=1e-12)
        np.testing.assert_allclose(rows.share, rows.delta_de / rows.mlp_term, rtol=1e-12)
        np.testing.assert_allclose(rows.cum_share, np.cumsum(rows.share), rtol=1e-12)
        assert (rows.top_share == rows.cum_share.iloc[-1]).all()
    assert (points.mlps - points.last_mlp).abs().max() > 1e-6  # the earlier MLPs' share too

    d_mlp = 128  # tiny-llama3's
    _, every = run(tmp_path / "all", 10_000)
    assert len(every) == 3 * 2 * d_mlp
    for _, rows in every.groupby(["layer", "head", "selection"]):
        assert sorted(rows.neuron) == list(range(d_mlp))
        total = rows.delta_de.sum() + rows.mlp_bias.iloc[0]
        assert total == pytest.approx(rows.mlp_term.iloc[0], abs=1e-6 * max(1.0, abs(rows.mlp_term.iloc[0])))
        assert rows.top_share.iloc[0] == pytest.approx(1.0, abs=1e-4)

    results = load_results(tmp_path / "k3")
    table = neuron_table(results.neurons, "top")
    assert len(table) == 3 * 3 and list(table["rank"][:3]) == [1, 2, 3]


def test_the_backup_numbers_do_not_depend_on_the_self_repair_decomposition(loaded_model):
    """Switching the decomposition off (what the benchmark compares against) changes no backup."""
    from sweeps.jobs.backup import BackupJob
    from tasks import TaskSpec, build_task

    m = loaded_model("tiny-gemma2")
    task = build_task(TaskSpec("ioi"), m.tokenizer, 6, 0)
    with_ = BackupJob(task, "resample", 3).bind(m.weights).run_heads(1, [0, 3])
    without = BackupJob(task, "resample", 3, self_repair=False).bind(m.weights).run_heads(1, [0, 3])
    for a, b in zip(with_, without):
        np.testing.assert_array_equal(a.backup, b.backup)
        np.testing.assert_array_equal(a.mean_delta_heads, b.mean_delta_heads)
        assert np.isfinite(a.repair["final_norm"]).all() and np.isnan(b.repair["final_norm"]).all()
