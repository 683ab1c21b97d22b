"""Where results live: a local directory or a remote URI, both through ``pyarrow.fs``.

``Location.parse("results/x")``, ``Location.parse("file:///data/x")`` and
``Location.parse("s3://bucket/x")`` give the same interface, so the store's
write-then-commit discipline (``store.py``) is one code path for all of them:
a local directory is simply ``pyarrow.fs.LocalFileSystem``. Only two things
depend on the kind of filesystem, and say so: ``fsync`` (local only; object
stores have no page cache to flush) and ``local`` (a ``Path`` for tools that
need one, e.g. an exclusive ``flock``).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


class LocationError(ValueError):
    """An output location that cannot be opened; the message says why."""


def storage_error(err: OSError, where: object) -> OSError:
    """``err`` (pyarrow's, which names no file) as an ``OSError`` with its errno and ``where``
    as the filename, so the command's one error line can say what could not be written."""
    reason = os.strerror(err.errno) if err.errno else (str(err).strip().splitlines() or [type(err).__name__])[0]
    return OSError(err.errno, reason, str(where))


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # inside ``fs``: absolute for a local filesystem, ``bucket/key`` for object stores
    text: str  # as the user wrote it, for messages

    @classmethod
    def parse(cls, where: str | Path | Location) -> Location:
        """A plain path is local; anything with ``scheme://`` goes to ``pyarrow.fs``."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), Path(text).absolute().as_posix(), text)
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError) as err:
            raise LocationError(f"cannot open {text}: {str(err).splitlines()[0]}") from None
        return cls(fs, path.rstrip("/"), text.rstrip("/"))

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name), f"{self.text}/{name}")

    def __str__(self) -> str:
        return self.text

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def local(self) -> Path | None:
        """The local path, or None on a remote filesystem."""
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    # -- asking -----------------------------------------------------------------

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def list(self) -> list[str]:
        """Names directly inside this directory ([] if there is none)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(selector))

    # -- reading and writing ----------------------------------------------------

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_atomic(self, data: bytes) -> None:
        """Write to a hidden sibling, flush it to disk, then move it into place.

        A crash leaves either the old file or the new one (plus, at worst, a
        ``.NAME.tmp`` that readers skip and the store sets aside). On object
        stores the move is a copy: the manifest, written last, is the commit.
        """
        parent = Location(self.fs, posixpath.dirname(self.path), self.text.rsplit("/", 1)[0])
        tmp = parent / f".{self.name}.tmp"
        try:
            parent.mkdir()
            with self.fs.open_output_stream(tmp.path) as stream:
                stream.write(data)
            tmp.fsync()
            self.fs.move(tmp.path, self.path)
        except OSError as err:  # a full disk, a read-only or vanished directory: no half file stays
            try:
                tmp.delete()
            except OSError:
                pass
            raise storage_error(err, self) from None

    def fsync(self) -> None:
        """Flush a local file to disk (a no-op elsewhere)."""
        if self.local is not None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def move(self, dest: Location) -> None:
        self.fs.move(self.path, dest.path)

    def delete(self) -> None:
        """Remove a file or a directory tree; nothing if it is not there."""
        kind = self._type()
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)
