"""An on-disk cache of what is slow to rebuild: processed weights and the GGUF tokenizer.

De-quantising SmolLM2's GGUF, booting the bridge and folding its norms is most of
a model's load, and parsing the tokenizer out of the same file adds more. Every Ray
actor, every CLI run and every test process paid that; from this cache the same
load only reads the processed tensors back. A model from a directory (a Hugging Face model, a
TransformerLens checkpoint, a hub model's downloaded snapshot) is cached the
same way: booting and folding its bridge is most of its load too.

- Where: ``$SWEEPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/sweeps``, else
  ``~/.cache/sweeps``. ``SWEEPS_CACHE_DIR=off`` turns the cache off.
- Key: everything the content depends on: the source (absolute path; size, times
  and inode of the file, or of every file under the directory), the versions of
  the packages that convert it, and the source of our own conversion code
  (``loading.py``, ``transformer.py``, ...). A change to any of them is a miss; stale
  entries are never read.
- Writes go to a temp name in the same directory and are renamed into place, so
  a reader never sees half an entry, and processes that miss at the same time
  (two actors on a fresh node) each write a complete one. An entry that fails
  to read is a miss: it is rebuilt and written again.
- Size: after each write the least recently used entries are removed until the
  cache holds at most ``$SWEEPS_CACHE_MAX_GB`` (default 8) GB; the entry just
  written always stays. A hit marks its entry used (its modification time). An
  entry removed while another process reads it is a miss there, never an error.
- The weight hash recorded with each result is still computed from the loaded
  weights, never read from the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from sweeps.core.transformer import ModelConfig, ModelWeights
from sweeps.runtime.provenance import package_versions

# Packages whose code turns the source file into weights or a tokenizer.
CONVERTERS = ("torch", "transformers", "transformer-lens", "tokenizers", "gguf")
# Our own conversion code: a change to it changes what a load returns.
CONVERSION_SOURCES = (
    "runtime/loading.py",
    "runtime/layerwise.py",
    "core/transformer.py",
    "core/architectures.py",
)  # under sweeps/


DEFAULT_MAX_GB = 8.0
# Names eviction may remove: entries (``entry_key``, weights with ``.pt``; earlier versions
# kept dots in the label) and staging files. Nothing else in the directory is touched,
# should it be shared with other files.
ENTRY_NAME = re.compile(r"^[\w.-]+\.(weights|tokenizer)\.[0-9a-f]{20}(\.pt)?$")
STAGING_PREFIX = "tmp-sweeps-"
# A staging file this old belongs to a writer that died: removed with the old entries.
STALE_STAGING_S = 24 * 3600


def cache_dir() -> Path | None:
    """The cache's directory, or None when ``SWEEPS_CACHE_DIR=off``."""
    value = os.environ.get("SWEEPS_CACHE_DIR", "")
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sweeps"


def max_bytes() -> int:
    """The cache's size limit: ``$SWEEPS_CACHE_MAX_GB`` gigabytes (10⁹ bytes), default 8.
    A value that is not a number is warned about and the default used: a cache setting
    is not worth failing a sweep over."""
    value = os.environ.get("SWEEPS_CACHE_MAX_GB", "")
    try:
        gb = float(value) if value else DEFAULT_MAX_GB
    except ValueError:
        warnings.warn(
            f"SWEEPS_CACHE_MAX_GB={value!r} is not a number of gigabytes; using {DEFAULT_MAX_GB:g}", stacklevel=2
        )
        gb = DEFAULT_MAX_GB
    return int(max(gb, 0.0) * 1e9)


def _source_parts(source: Path) -> list[str]:
    """What identifies ``source``'s content: size, modification and change times and inode of
    the file, or of every file under the directory (hidden ones, such as a download tool's
    metadata, aside). A file rewritten in place or replaced gets a new change time or inode."""
    if source.is_dir():
        files = sorted(
            p
            for p in source.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
    else:
        files = [source]
    parts = [str(source.resolve())]
    for file in files:
        stat = file.stat()  # through symlinks: a hub snapshot's files link to its blobs
        parts += [
            file.relative_to(source).as_posix() if file != source else "",
            str(stat.st_size),
            str(stat.st_mtime_ns),
            str(stat.st_ino),
            str(stat.st_ctime_ns),
        ]
    return parts


def entry_key(source: Path, what: str, label: str | None = None) -> str:
    """A name for ``what`` (e.g. ``weights``) built from ``source`` (a file or a directory),
    unique to its content's inputs; it starts with ``label`` (default: the source's stem)."""
    parts = [what, *_source_parts(source)]
    parts += [f"{name}=={version}" for name, version in package_versions(CONVERTERS).items()]
    here = Path(__file__).parents[1]  # sweeps/
    digest = hashlib.blake2b(digest_size=10)
    for part in parts:
        digest.update(part.encode() + b"\0")
    for name in CONVERSION_SOURCES:
        digest.update((here / name).read_bytes())
    readable = "".join(c if c.isalnum() or c in "-_" else "-" for c in (label or source.stem))
    return f"{readable}.{what}.{digest.hexdigest()}"


# --------------------------------------------------------------------------- #
# Weights: one torch file of plain tensors and the config's fields
# --------------------------------------------------------------------------- #


def _weights_to_dict(weights: ModelWeights) -> dict:
    tensors = {k: v for k, v in weights.__dict__.items() if k != "cfg"}
    return {"cfg": dataclasses.asdict(weights.cfg), "tensors": tensors}


def _weights_from_dict(saved: dict) -> ModelWeights:
    return ModelWeights(cfg=ModelConfig(**saved["cfg"]), **saved["tensors"])


def cached_weights(source: Path, build: Callable[[], ModelWeights], label: str | None = None) -> ModelWeights:
    """The processed weights converted from ``source``: from the cache, else ``build()`` and store.

    The entry is stored under the key of the source as it is after ``build``: building
    a hub model may download its weights into the snapshot directory first."""
    root = cache_dir()
    if root is None:
        return build()
    path = root / f"{entry_key(source, 'weights', label)}.pt"
    if path.is_file():
        try:
            # mmap: the tensors are the file's pages, read as they are touched, with no second copy
            weights = _weights_from_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            _touch(path)
            return weights
        except Exception:  # a damaged, foreign or just-evicted file is a miss, rewritten below
            pass
    weights = build()
    path = root / f"{entry_key(source, 'weights', label)}.pt"
    _store(root, path, lambda staging: torch.save(_weights_to_dict(weights), staging))
    return weights


# --------------------------------------------------------------------------- #
# Tokenizers: a save_pretrained directory
# --------------------------------------------------------------------------- #


def cached_tokenizer(source: Path, build: Callable[[], Any]):
    """The tokenizer read from ``source``: from the cache, else ``build()`` and store."""
    from transformers import AutoTokenizer

    root = cache_dir()
    if root is None:
        return build()
    path = root / entry_key(source, "tokenizer")
    if path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            _touch(path)
            return tokenizer
        except Exception:  # a damaged (or just-evicted) entry is a miss, replaced below
            shutil.rmtree(path, ignore_errors=True)
    tokenizer = build()
    _store(root, path, lambda staging: tokenizer.save_pretrained(str(staging)), directory=True)
    return tokenizer


def _store(root: Path, path: Path, write: Callable[[Path], object], directory: bool = False) -> None:
    """Write an entry under a temp name, then rename it into place. Best effort: on a
    read-only or full disk, or when another process stored the same entry first, the
    caller just goes on with what it built."""
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        # "tmp-", not ".tmp-": torch.save refuses a file name that starts with a dot.
        if directory:
            staging = Path(tempfile.mkdtemp(dir=root, prefix=STAGING_PREFIX))
        else:
            fd, name = tempfile.mkstemp(dir=root, prefix=STAGING_PREFIX, suffix=".partial")
            os.close(fd)
            staging = Path(name)
        write(staging)
        os.replace(staging, path)
        staging = None
    except (OSError, RuntimeError):  # torch.save reports a full disk as a RuntimeError
        pass
    finally:
        _remove(staging)
    evict(root, keep=path)


# --------------------------------------------------------------------------- #
# Size: least recently used entries go first
# --------------------------------------------------------------------------- #


def _touch(path: Path) -> None:
    """Mark an entry used now (its modification time is its last use)."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache is still a cache
        pass


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def evict(root: Path, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove the least recently used entries of ``root`` until they hold at most ``limit``
    bytes (default ``max_bytes()``), never ``keep``; also remove staging files left by
    writers that died a day ago or more. Files of other names are left alone. Returns
    what was removed."""
    limit = max_bytes() if limit is None else limit
    entries: list[tuple[float, int, Path]] = []
    removed: list[Path] = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for child in children:
        try:
            if child.name.startswith(STAGING_PREFIX):  # another writer's, still being written unless stale
                if time.time() - child.stat().st_mtime > STALE_STAGING_S:
                    _remove(child)
                    removed.append(child)
            elif ENTRY_NAME.match(child.name):
                entries.append((child.stat().st_mtime, _size(child), child))
        except OSError:  # removed meanwhile by another process
            continue
    total = sum(size for _, size, _ in entries)
    for _, size, child in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and child == keep:
            continue
        _remove(child)
        removed.append(child)
        total -= size
    return removed


def _remove(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
