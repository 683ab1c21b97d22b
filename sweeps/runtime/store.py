"""Results of a sweep: one directory (or ``pyarrow.fs`` URI), atomic Parquet shard files, a manifest.

Layout of ``--out``::

    sweep.json           the spec (what determines the results)
    manifest.json        committed shards: rows and checksum per file, where they ran
    <dataset>/<shard>.parquet   e.g. slopes/L05H0-8.parquet
    .lock                held while a sweep writes here

A shard is written as hidden temporary files (pyarrow and pandas skip names
starting with ``.``), moved into place, and only then recorded in the
manifest: the manifest is the commit record. On resume, files of shards the
manifest does not list, files whose checksum or row count disagree with it,
and temporary leftovers are set aside in ``.trash``, so a half-written file is
never a result. Analysis reads only what the manifest lists, checked the same way.

Each shard file also carries its own record in its Parquet metadata: the spec
it was computed under and the shard's row count per dataset. A manifest that is
damaged (truncated, garbled, emptied) is therefore set aside and rebuilt from
the shard files that verify on their own (``reconcile``): a shard is kept only
if every file it wrote is there, readable, of this spec and of the recorded
size; the rest is recomputed, nothing else is lost.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from sweeps.runtime.location import Location, LocationError, storage_error

SPEC_FILE = "sweep.json"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"


class StoreError(ValueError):
    """The output directory cannot be used as asked; the message says why."""


class DamagedFile(ValueError):
    """``sweep.json`` or ``manifest.json`` is not the JSON object the store wrote; the message says which."""


SHARD_RECORD = b"shard_record"  # Parquet metadata key: {"shard": id, "rows": {dataset: rows}}


def _read_json_object(file: Location) -> dict | None:
    """The JSON object in ``file``, None when there is no file, ``DamagedFile`` for anything else."""
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_bytes().decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{file} is not valid JSON ({str(err).splitlines()[0][:60]})") from None
    if not isinstance(data, dict):
        raise DamagedFile(f"{file} holds a JSON {type(data).__name__}, not an object")
    return data


def checksum(data: bytes) -> str:
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)  # lets a file be verified without the manifest
    return sink.getvalue().to_pybytes()


class CorruptFile(ValueError):
    """A committed file whose bytes are not the ones the manifest recorded."""


def read_committed_table(file: Location, rows: int, file_checksum: str | None) -> pa.Table:
    """A committed Parquet file, checked against its manifest record (row count, checksum)."""
    data = file.read_bytes()
    if file_checksum is not None and checksum(data) != file_checksum:
        raise CorruptFile(f"{file} does not match the checksum recorded in the manifest")
    table = pq.read_table(pa.BufferReader(data))
    if table.num_rows != rows:
        raise CorruptFile(f"{file} holds {table.num_rows} rows, the manifest recorded {rows}")
    return table


def _write_json_atomic(file: Location, data: Any) -> None:
    file.write_atomic(json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def check_out_dir(out: str | Path | Location) -> Location:
    """Cheap checks before anything loads; the parsed location.

    A local ``--out`` must be a directory this process can write, or one it can create:
    its nearest existing ancestor is a writable directory. Remote locations are checked
    only for what can be asked without writing (that they are not a file).
    """
    try:
        location = Location.parse(out)
        if location.is_file():
            raise StoreError(f"--out {out} is a file; give a directory")
    except (LocationError, OSError) as err:
        raise StoreError(f"--out {out}: {str(err).splitlines()[0]}") from None
    if location.local is not None:
        problem = _local_dir_problem(location.local)
        if problem:
            raise StoreError(f"--out {out}: {problem}")
    return location


def _local_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used or created as a results directory, or None."""
    if path.is_dir():
        return None if os.access(path, os.W_OK | os.X_OK) else "the directory is not writable"
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create it: {parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it: {parent} is not writable"
    return None


def spec_differences(old: dict, new: dict, labels: tuple[str, str] = ("here", "now")) -> list[str]:
    """``"seed: 0 here vs 1 now"`` for each setting that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} {labels[0]} vs {new.get(k)!r} {labels[1]}" for k in keys if old.get(k) != new.get(k)]


class ResultStore:
    def __init__(self, out: str | Path | Location, datasets: tuple[str, ...], derived: tuple[str, ...] = ()):
        """``datasets`` hold one file per shard; ``derived`` ones one file (``all.parquet``)
        computed from the committed shards, e.g. the attribution sweep's summed scores.
        ``out`` is a directory or a ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``)."""
        self.out = Location.parse(out)
        self.datasets = datasets
        self.derived = derived
        self.spec: dict | None = None  # set by ``prepare``: what rebuilt shard files must match
        self.rebuild: str | None = None  # why ``reconcile`` must rebuild the manifest from the files

    # -- locking and spec ---------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the directory for one sweep at a time.

        Locally (plain paths and ``file://``) an ``flock``, which the kernel
        drops when the process dies, so a killed sweep never leaves a stale
        lock. Object stores have no locks: there a ``.lock`` file names its
        owner, and a second sweep refuses to start while it exists.
        """
        try:
            self.out.mkdir()
        except OSError as err:  # e.g. a read-only filesystem that access() did not report
            raise StoreError(f"--out {self.out}: cannot create it ({str(err).splitlines()[0]})") from None
        if self.out.local is None:
            with self._lease():
                yield
            return
        handle = open(self.out.local / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(
                f"another sweep ({owner}) is writing to {self.out}; wait for it or use another --out"
            ) from None
        try:
            try:  # who holds it, what a refused second sweep prints; unbuffered, so nothing is left to flush
                os.ftruncate(handle.fileno(), 0)
                os.pwrite(handle.fileno(), _owner().encode(), 0)
            except OSError as err:  # a full disk: one line naming the file, as for every other write
                raise storage_error(err, self.out / LOCK_FILE) from None
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @contextmanager
    def _lease(self) -> Iterator[None]:
        lock = self.out / LOCK_FILE
        if lock.exists():
            raise StoreError(
                f"another sweep ({lock.read_text().strip()}) is writing to {self.out}; wait for it, "
                f"or delete {lock} if it is no longer running"
            )
        lock.write_atomic(_owner().encode())
        try:
            yield
        finally:
            lock.delete()

    def read_spec(self) -> dict | None:
        """The directory's spec, None if it has none (``DamagedFile`` if ``sweep.json`` is damaged)."""
        return _read_json_object(self.out / SPEC_FILE)

    def prepare(self, spec: dict, resume: bool) -> None:
        """Adopt ``spec`` for this directory (refusing another sweep's results).

        A damaged ``sweep.json`` is set aside; the spec the manifest recorded stands in for it,
        and ``reconcile`` then checks every shard file against ``spec`` on its own."""
        self.spec = spec
        damaged = None
        try:
            old = self.read_spec()
        except DamagedFile as err:
            damaged = err
            try:
                recorded = self.manifest().get("spec")
            except DamagedFile:
                recorded = None  # reconcile rebuilds the manifest, checking each file's own spec
            if recorded is None:
                self.rebuild = f"{err}, and the manifest records no spec"
            old = recorded or spec
        if old is not None and resume and old != spec:
            diff = "; ".join(spec_differences(old, spec))
            raise StoreError(
                f"{self.out} holds results of a different sweep ({diff}); "
                "use another --out, or --no-resume to discard them"
            )
        if old is None:
            foreign = [name for name in self.out.list() if not name.startswith(".")]
            if foreign:
                raise StoreError(
                    f"{self.out} is not empty and holds no sweep ({', '.join(foreign[:3])}...); "
                    "give a new or empty --out"
                )
        if damaged is not None:
            self._set_aside(SPEC_FILE)
            print(f"{damaged}: set aside in {self.out / '.trash'} and written again", file=sys.stderr)
        if not resume:
            self.clear()
        _write_json_atomic(self.out / SPEC_FILE, spec)

    def clear(self) -> None:
        for name in (*self.datasets, *self.derived, MANIFEST_FILE, SPEC_FILE):
            (self.out / name).delete()

    # -- manifest -------------------------------------------------------------

    def manifest(self) -> dict:
        """The commit record (``DamagedFile`` if it is not one: ``reconcile`` rebuilds it)."""
        manifest = _read_json_object(self.out / MANIFEST_FILE)
        if manifest is None:
            return {"shards": {}}
        shards = manifest.get("shards")
        if not isinstance(shards, dict) or not all(isinstance(r, dict) for r in shards.values()):
            raise DamagedFile(f"{self.out / MANIFEST_FILE} has no valid `shards` record")
        return manifest

    def _set_aside(self, name: str) -> None:
        trash = self.out / ".trash"
        trash.mkdir()
        (self.out / name).move(trash / f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")

    def _rebuild_manifest(self, why: str) -> dict:
        """Set the manifest aside and write a new one from the shard files that verify on their own.

        A shard is kept when every file it wrote (its ``shard_record`` lists them) is present,
        reads as Parquet, belongs to this directory's spec and holds the rows it recorded, and
        all kept shards share one model weight hash. Its record says ``recovered``: where it ran
        was in the lost manifest."""
        if (self.out / MANIFEST_FILE).exists():
            self._set_aside(MANIFEST_FILE)
        spec_bytes = json.dumps(self.spec, sort_keys=True).encode() if self.spec is not None else None
        found: dict[str, dict[str, tuple[int, str, dict]]] = {}  # shard -> dataset -> (rows, checksum, record)
        hashes: dict[str, set] = {}
        for name in self.datasets:
            for file_name in (self.out / name).list():
                if file_name.startswith(".") or not file_name.endswith(".parquet"):
                    continue
                sid = file_name[: -len(".parquet")]
                try:
                    data = (self.out / name / file_name).read_bytes()
                    table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
                    meta = table.schema.metadata or {}
                    record = json.loads(meta[SHARD_RECORD])
                except (OSError, KeyError, ValueError, pa.ArrowInvalid):
                    continue
                if (
                    record.get("shard") != sid
                    or record.get("rows", {}).get(name) != table.num_rows
                    or (spec_bytes is not None and meta.get(b"sweep_spec") != spec_bytes)
                ):
                    continue
                found.setdefault(sid, {})[name] = (table.num_rows, checksum(data), record)
                if "weight_hash" in table.column_names:
                    hashes.setdefault(sid, set()).update(table.column("weight_hash").unique().to_pylist())
        shards = {}
        for sid, files in found.items():
            expected = next(iter(files.values()))[2]["rows"]
            if set(files) == set(expected) and all(f[2]["rows"] == expected for f in files.values()):
                shards[sid] = {
                    "rows": {n: f[0] for n, f in files.items()},
                    "checksums": {n: f[1] for n, f in files.items()},
                    "recovered": True,
                }
        weights = set().union(*(hashes.get(sid, set()) for sid in shards)) if shards else set()
        manifest: dict[str, Any] = {"shards": shards if len(weights) <= 1 else {}}
        if len(weights) == 1:
            manifest["weight_hash"] = weights.pop()
        _write_json_atomic(self.out / MANIFEST_FILE, manifest)
        print(
            f"{why}: set aside in {self.out / '.trash'} and rebuilt from the shard files; "
            f"{len(manifest['shards'])} shard(s) verified and kept, the rest will be recomputed",
            file=sys.stderr,
        )
        return manifest

    def _valid(self, shard_id: str, record: dict) -> bool:
        """Every file of the shard is there, with the recorded checksum and row count."""
        if not record.get("rows"):
            return False
        for name, rows in record["rows"].items():
            file = self.out / name / f"{shard_id}.parquet"
            try:
                read_committed_table(file, rows, record.get("checksums", {}).get(name))
            except (OSError, pa.ArrowInvalid, CorruptFile):
                return False
        return True

    def reconcile(self) -> set[str]:
        """Check every committed shard against the manifest and return the intact ones.

        Not a plain query: a shard whose files are damaged or missing is dropped from the
        manifest, and every file no intact shard owns is moved to ``.trash`` (so a later
        run recomputes it). Call it under ``lock()``."""
        try:
            manifest = self.manifest() if self.rebuild is None else self._rebuild_manifest(self.rebuild)
        except DamagedFile as err:
            manifest = self._rebuild_manifest(str(err))
        self.rebuild = None
        good = {sid for sid, rec in manifest["shards"].items() if self._valid(sid, rec)}
        bad = set(manifest["shards"]) - good
        if bad:
            for sid in bad:
                del manifest["shards"][sid]
            _write_json_atomic(self.out / MANIFEST_FILE, manifest)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for name in self.datasets:
            for file_name in (self.out / name).list():
                if file_name.endswith(".parquet") and file_name[: -len(".parquet")] in good:
                    continue
                trash = self.out / ".trash" / name
                trash.mkdir()
                (self.out / name / file_name).move(trash / f"{file_name}.{stamp}")
        return good

    # -- writing ----------------------------------------------------------------

    def write_shard(self, shard_id: str, tables: dict[str, pa.Table], record: dict) -> None:
        """Write the shard's file of each dataset it returned, then commit it in the manifest.

        The manifest records each file's rows and checksum: a file that was
        truncated or altered afterwards is never taken for a result.
        """
        unknown = set(tables) - set(self.datasets)
        if unknown:
            raise StoreError(f"shard {shard_id} returned datasets {sorted(unknown)} this sweep does not keep")
        checksums = {}
        rows = {n: t.num_rows for n, t in tables.items()}
        record_tag = json.dumps({"shard": shard_id, "rows": rows}, sort_keys=True).encode()
        for name, table in tables.items():
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), SHARD_RECORD: record_tag})
            data = parquet_bytes(table)
            (self.out / name / f"{shard_id}.parquet").write_atomic(data)
            checksums[name] = checksum(data)
        manifest = self.manifest()
        manifest["shards"][shard_id] = {**record, "rows": rows, "checksums": checksums}
        _write_json_atomic(self.out / MANIFEST_FILE, manifest)

    def write_derived(self, name: str, table: pa.Table, **record: Any) -> Location:
        """Write ``<name>/all.parquet`` atomically and record it (rows, checksum, ``record``)."""
        if name not in self.derived:
            raise StoreError(f"{name!r} is not a derived dataset of this sweep")
        data = parquet_bytes(table)
        file = self.out / name / "all.parquet"
        file.write_atomic(data)
        manifest = self.manifest()
        manifest.setdefault("derived", {})[name] = {"rows": table.num_rows, "checksum": checksum(data), **record}
        _write_json_atomic(self.out / MANIFEST_FILE, manifest)
        return file

    def update_manifest(self, **fields: Any) -> None:
        manifest = self.manifest()
        manifest.update(fields)
        _write_json_atomic(self.out / MANIFEST_FILE, manifest)


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"


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
