"""The store through ``pyarrow.fs``: a ``file://`` URI takes the same path as a remote one."""

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from sweeps.runtime.location import Location
from sweeps.runtime.store import ResultStore, StoreError
from tests.registry.test_driver import assert_same_tables, count_shards, sweep, tables


@pytest.mark.slow
def test_a_file_uri_sweep_equals_a_plain_path_sweep_and_resumes(tmp_path, monkeypatch):
    from analysis.backup import load_results

    assert sweep(tmp_path / "plain") == 0
    uri = (tmp_path / "uri").as_uri()  # file:///...
    assert uri.startswith("file://")
    assert sweep(uri, "--heads", "L0,L1") == 0
    calls = count_shards(monkeypatch)
    assert sweep(uri) == 0  # resume through the URI: only layer 2 is left
    assert calls == ["L02H0-3"]
    assert_same_tables(tables(tmp_path / "plain"), tables(tmp_path / "uri"), atol=0)
    manifest = json.loads((tmp_path / "uri" / "manifest.json").read_text())
    assert all(set(r["checksums"]) == set(r["rows"]) for r in manifest["shards"].values())
    assert len(load_results(uri).slopes) == 12


def remote_like(tmp_path) -> Location:
    """A filesystem with no local path (as s3:// or gs://), backed by a temp dir."""
    (tmp_path / "bucket").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    return Location(fs, "sweep", "remote://bucket/sweep")


def test_store_on_a_filesystem_without_local_paths(tmp_path):
    out = remote_like(tmp_path)
    assert out.local is None
    store = ResultStore(out, ("a",))
    table = pa.table({"x": [1.0, 2.0, 3.0]})
    with store.lock():
        with pytest.raises(StoreError, match=r"another sweep \(pid .*delete remote://bucket/sweep/.lock"):
            with ResultStore(out, ("a",)).lock():
                pass
        store.prepare({"sweep": "t"}, resume=True)
        store.write_shard("s1", {"a": table}, {})
        store.write_shard("s2", {"a": table}, {})
        assert store.reconcile() == {"s1", "s2"}
        disk = tmp_path / "bucket" / "sweep" / "a"
        (disk / "s2.parquet").write_bytes((disk / "s2.parquet").read_bytes()[:-20])
        (disk / ".s3.parquet.tmp").write_bytes(b"half")
        assert store.reconcile() == {"s1"}  # the damaged file is set aside, not trusted
        assert sorted(p.name for p in disk.iterdir()) == ["s1.parquet"]
    assert not (tmp_path / "bucket" / "sweep" / ".lock").exists()  # released
    with store.lock():  # and can be taken again
        pass


def test_manifest_records_provenance_and_analysis_refuses_files_of_another_spec(tmp_path, capsys):
    import importlib.metadata
    import re
    import shutil

    from analysis.__main__ import main as analysis_main

    a, b = tmp_path / "a", tmp_path / "b"
    assert sweep(a) == 0 and sweep(b, "--seed", "1") == 0
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["packages"]["torch"] == importlib.metadata.version("torch")
    assert manifest["packages"]["ray"] == importlib.metadata.version("ray")
    assert re.fullmatch(r"\S+\+g[0-9a-f]{10}(-dirty\.[0-9a-f]{8})?", manifest["code_version"])
    assert re.fullmatch(r"[0-9a-f]{16,}", manifest["weight_hash"])
    # someone copies one shard of sweep b (another seed) into a, manifest entry and all
    from sweeps.registry import BackupSweep

    for name in BackupSweep.datasets:
        shutil.copy(b / name / "L01H0-3.parquet", a / name / "L01H0-3.parquet")
    manifest["shards"]["L01H0-3"] = json.loads((b / "manifest.json").read_text())["shards"]["L01H0-3"]
    (a / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert analysis_main(["backup", str(a), "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert "L01H0-3.parquet belongs to a different sweep" in err and "seed: 0 there vs 1 in this file" in err
    assert "--allow-mixed-specs" in err and len(err.strip().splitlines()) == 1
    assert analysis_main(["backup", str(a), "--wandb", "disabled", "--allow-mixed-specs"]) == 0


def test_the_in_process_executor_runs_a_failing_shard_once_and_goes_on():
    """A shard that raises is reported with its error and not retried (in one process it
    would raise again); the shards after it still run."""
    from dataclasses import dataclass

    import pyarrow as pa

    from sweeps.runtime.executors import LocalExecutor

    @dataclass(frozen=True)
    class Shard:
        id: str

    class Job:
        calls: list[str] = []

        def bind(self, model) -> None:
            pass

        def run_shard(self, shard):
            self.calls.append(shard.id)
            if shard.id == "bad":
                raise ValueError("this shard cannot be computed")
            return {"rows": pa.table({"x": [1]})}

    job = Job()
    executor = LocalExecutor("tiny-gpt2", job)
    executor.start()
    done = [shard.id for shard, _, _ in executor.run([Shard("a"), Shard("bad"), Shard("b")])]
    assert done == ["a", "b"] and job.calls == ["a", "bad", "b"]
    (failure,) = executor.failures
    assert failure.shard.id == "bad" and failure.attempts == 1 and "cannot be computed" in failure.error
