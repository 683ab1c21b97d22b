"""The store through ``pyarrow.fs``: a ``file://`` URI takes the same path as a remote one."""

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from sweeps.engine.location import Location
from sweeps.engine.store import ResultStore, StoreError
from tests.test_sweep import assert_same_tables, count_shards, sweep, tables


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
        assert store.completed() == {"s1", "s2"}
        disk = tmp_path / "bucket" / "sweep" / "a"
        (disk / "s2.parquet").write_bytes((disk / "s2.parquet").read_bytes()[:-20])
        (disk / ".s3.parquet.tmp").write_bytes(b"half")
        assert store.completed() == {"s1"}  # the damaged file is set aside, not trusted
        assert sorted(p.name for p in disk.iterdir()) == ["s1.parquet"]
    assert not (tmp_path / "bucket" / "sweep" / ".lock").exists()  # released
    with store.lock():  # and can be taken again
        pass
