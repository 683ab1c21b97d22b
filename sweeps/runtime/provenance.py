"""What reproduces a result: code version, package versions, spec id."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformer-lens", "transformers", "ray", "numpy", "pyarrow", "pandas", "wandb")
PROJECT_PACKAGES = ("sweeps", "tasks", "analysis")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, or site-packages for an installed copy


def code_version() -> str:
    """``<package version>+g<commit>`` in a clean git checkout, ``...-dirty.<hash of the diff>``
    with uncommitted changes (two runs with the same hash ran the same code); without git
    (an installed copy, a cluster node that got the checkout without ``.git``),
    ``...+src.<hash of the project's source files>``."""
    try:
        version = importlib.metadata.version("interp-sweeps")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=10", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "diff", "HEAD", "--", "."],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return f"{version}+src.{source_hash()}"
    if not diff:
        return f"{version}+g{commit}"
    return f"{version}+g{commit}-dirty.{hashlib.blake2b(diff, digest_size=4).hexdigest()}"


def source_hash(root: Path = REPO_ROOT) -> str:
    """A hash of the project's packages (their .py and data files, by relative path)."""
    digest = hashlib.blake2b(digest_size=4)
    for package in PROJECT_PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".jsonl"):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def spec_id(spec: dict) -> str:
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=6).hexdigest()
