"""Reading any sweep's results directory: only shards the manifest committed, one spec.

The manifest is the commit record of a results directory (``sweeps/engine/store.py``):
a Parquet file it does not list is never read, and a listed file that cannot
be read is an error that says how to recompute it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


class ResultsError(ValueError):
    """A results directory that cannot be read as asked."""


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # missing or truncated (pyarrow's errors are both)
        raise ResultsError(
            f"{path} is unreadable ({type(err).__name__}); re-run the sweep command to recompute it"
        ) from None


def read_committed(
    out: Path, datasets: tuple[str, ...], sweep: str, allow_mixed: bool = False
) -> tuple[dict, dict, dict[str, pd.DataFrame]]:
    """(spec, manifest, one DataFrame per dataset) of the committed shards of ``out``."""
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise ResultsError(f"{out} holds no sweep results (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    spec = manifest.get("spec", {})
    if spec.get("sweep", sweep) != sweep:
        raise ResultsError(f"{out} holds a {spec['sweep']} sweep, not a {sweep} sweep")
    shards = manifest.get("shards", {})
    frames = {}
    for name in datasets:  # a shard lists the datasets it wrote under "rows"
        files = [out / name / f"{sid}.parquet" for sid in sorted(shards) if name in shards[sid].get("rows", {})]
        frames[name] = pd.concat([read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()
    spec_ids = {i for f in frames.values() if not f.empty for i in f["spec_id"].unique()}
    if len(spec_ids) > 1 and not allow_mixed:
        raise ResultsError(f"{out} mixes results of {len(spec_ids)} different sweep specs")
    return spec, manifest, frames
