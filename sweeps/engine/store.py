"""Results on disk: one directory a sweep, atomic Parquet shard files, a manifest.

Layout of ``--out``::

    sweep.json           the spec (what determines the results)
    manifest.json        committed shards: rows per dataset, where they ran
    <dataset>/<shard>.parquet   e.g. slopes/L05H0-8.parquet
    .lock                held while a sweep writes here

A shard is written as hidden temporary files (pyarrow and pandas skip names
starting with ``.``), renamed into place, and only then recorded in the
manifest: the manifest is the commit record. On resume, files of shards the
manifest does not list, files whose row count or footer disagree with it, and
temporary leftovers are set aside, so a half-written file is never a result.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

SPEC_FILE = "sweep.json"
MANIFEST_FILE = "manifest.json"


class StoreError(ValueError):
    """The output directory cannot be used as asked; the message says why."""


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def check_out_dir(out: Path) -> None:
    """Cheap checks before anything loads."""
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out} is a file; give a directory")


def spec_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} here vs {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


class ResultStore:
    def __init__(self, out: str | Path, datasets: tuple[str, ...], derived: tuple[str, ...] = ()):
        """``datasets`` hold one file per shard; ``derived`` ones one file (``all.parquet``)
        computed from the committed shards, e.g. the attribution sweep's summed scores."""
        self.out = Path(out)
        self.datasets = datasets
        self.derived = derived

    # -- locking and spec ---------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the directory for one sweep at a time."""
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(f"another sweep ({owner}) is writing to {self.out}; wait for it or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def read_spec(self) -> dict | None:
        path = self.out / SPEC_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def prepare(self, spec: dict, resume: bool) -> None:
        """Adopt ``spec`` for this directory (refusing another sweep's results)."""
        old = self.read_spec()
        if old is not None and resume and old != spec:
            diff = "; ".join(spec_differences(old, spec))
            raise StoreError(
                f"{self.out} holds results of a different sweep ({diff}); "
                "use another --out, or --no-resume to discard them"
            )
        if old is None and self.out.is_dir():
            foreign = [p.name for p in self.out.iterdir() if not p.name.startswith(".")]
            if foreign:
                raise StoreError(
                    f"{self.out} is not empty and holds no sweep ({', '.join(sorted(foreign)[:3])}...); "
                    "give a new or empty --out"
                )
        if not resume:
            self.clear()
        _write_json_atomic(self.out / SPEC_FILE, spec)

    def clear(self) -> None:
        for name in (*self.datasets, *self.derived):
            shutil.rmtree(self.out / name, ignore_errors=True)
        for name in (MANIFEST_FILE, SPEC_FILE):
            (self.out / name).unlink(missing_ok=True)

    # -- manifest -------------------------------------------------------------

    def manifest(self) -> dict:
        path = self.out / MANIFEST_FILE
        if path.is_file():
            return json.loads(path.read_text())
        return {"shards": {}}

    def _valid(self, shard_id: str, record: dict) -> bool:
        if not record.get("rows"):
            return False
        for name in record["rows"]:
            path = self.out / name / f"{shard_id}.parquet"
            try:
                if pq.read_metadata(path).num_rows != record["rows"][name]:
                    return False
            except (OSError, pa.ArrowInvalid, KeyError):
                return False
        return True

    def completed(self) -> set[str]:
        """Committed, intact shards; everything else is moved to ``.trash``."""
        manifest = self.manifest()
        good = {sid for sid, rec in manifest["shards"].items() if self._valid(sid, rec)}
        bad = set(manifest["shards"]) - good
        if bad:
            for sid in bad:
                del manifest["shards"][sid]
            _write_json_atomic(self.out / MANIFEST_FILE, manifest)
        for name in self.datasets:
            folder = self.out / name
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.endswith(".parquet") and path.stem in good:
                    continue
                trash = self.out / ".trash" / name
                trash.mkdir(parents=True, exist_ok=True)
                os.replace(path, trash / f"{path.name}.{int(time.time())}")
        return good

    # -- writing ----------------------------------------------------------------

    def write_shard(self, shard_id: str, tables: dict[str, pa.Table], record: dict) -> None:
        """Write the shard's file of each dataset it returned, then commit it in the manifest."""
        unknown = set(tables) - set(self.datasets)
        if unknown:
            raise StoreError(f"shard {shard_id} returned datasets {sorted(unknown)} this sweep does not keep")
        staged = []
        for name in tables:
            folder = self.out / name
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{shard_id}.parquet.tmp"
            pq.write_table(tables[name], tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            staged.append((tmp, folder / f"{shard_id}.parquet"))
        for tmp, final in staged:
            os.replace(tmp, final)
        manifest = self.manifest()
        manifest["shards"][shard_id] = {**record, "rows": {n: tables[n].num_rows for n in tables}}
        _write_json_atomic(self.out / MANIFEST_FILE, manifest)

    def write_derived(self, name: str, table: pa.Table, **record: Any) -> Path:
        """Write ``<name>/all.parquet`` atomically and record it (rows, ``record``) in the manifest."""
        if name not in self.derived:
            raise StoreError(f"{name!r} is not a derived dataset of this sweep")
        folder = self.out / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp, final = folder / ".all.parquet.tmp", folder / "all.parquet"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        manifest = self.manifest()
        manifest.setdefault("derived", {})[name] = {"rows": table.num_rows, **record}
        _write_json_atomic(self.out / MANIFEST_FILE, manifest)
        return final

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        _write_json_atomic(self.out / MANIFEST_FILE, manifest)


def with_provenance(table: pa.Table, columns: dict[str, Any], spec: dict) -> pa.Table:
    """Constant provenance columns (cheap in Parquet) plus the full spec as metadata."""
    clash = set(columns) & set(table.column_names)
    if clash:
        raise ValueError(f"provenance columns {sorted(clash)} clash with the shard's own columns")
    for key, value in columns.items():
        table = table.append_column(key, pa.array([value] * table.num_rows))
    metadata = dict(table.schema.metadata or {})
    metadata[b"sweep_spec"] = json.dumps(spec, sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)
