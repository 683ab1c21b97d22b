"""What reproduces a result: code version, package versions, spec id."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformer-lens", "transformers", "ray", "numpy", "pyarrow", "pandas", "wandb")
REPO_ROOT = Path(__file__).resolve().parents[2]


def code_version() -> str:
    """``<package version>+g<commit>`` in a clean git checkout, ``...-dirty.<hash of the diff>``
    with uncommitted changes (two runs with the same hash ran the same code), else the
    package version."""
    try:
        version = importlib.metadata.version("interp-sweeps")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=10", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "diff", "HEAD", "--", "."],
            capture_output=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return version
    if not diff:
        return f"{version}+g{commit}"
    return f"{version}+g{commit}-dirty.{hashlib.blake2b(diff, digest_size=4).hexdigest()}"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def spec_id(spec: dict) -> str:
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=6).hexdigest()
