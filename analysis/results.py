"""Reading any sweep's results directory: only shards the manifest committed, one spec.

The manifest is the commit record of a results directory (``sweeps/runtime/store.py``):
a Parquet file it does not list is never read, and a listed file that cannot
be read is an error that says how to recompute it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa

from sweeps.runtime.location import Location, LocationError
from sweeps.runtime.store import CorruptFile, read_committed_table, spec_differences


class ResultsError(ValueError):
    """A results directory that cannot be read as asked."""


def open_results(out: str | Path | Location) -> Location:
    try:
        return Location.parse(out)
    except LocationError as err:
        raise ResultsError(str(err)) from None


def report_dir(out: Location) -> Path:
    """Where plots and tables of ``out`` go: beside the results when they are local,
    else ``reports/<name>`` in the working directory."""
    return out.local if out.local is not None else Path("reports") / out.name


def _read(file: Location, rows: int, file_checksum: str | None) -> tuple[pd.DataFrame, dict | None]:
    """A committed file's rows and the sweep spec it was written under."""
    try:
        table = read_committed_table(file, rows, file_checksum)
    except (OSError, pa.ArrowInvalid, CorruptFile) as err:  # missing, truncated or altered
        reason = (
            "altered since it was written" if isinstance(err, CorruptFile) else f"unreadable ({type(err).__name__})"
        )
        raise ResultsError(f"{file} is {reason}; re-run the sweep command to recompute it") from None
    spec = (table.schema.metadata or {}).get(b"sweep_spec")
    return table.to_pandas(), json.loads(spec) if spec else None


def read_committed(
    out: Location, datasets: tuple[str, ...], sweep: str, allow_mixed: bool = False
) -> tuple[dict, dict, dict[str, pd.DataFrame]]:
    """(spec, manifest, one DataFrame per dataset) of the committed shards of ``out``.

    Each file is checked against the manifest (rows and checksum), and against
    the directory's spec: a file written under another spec (e.g. copied in
    from another run) is refused, naming what differs, unless ``allow_mixed``.
    """
    manifest_file = out / "manifest.json"
    if not manifest_file.is_file():
        raise ResultsError(f"{out} holds no sweep results (no manifest.json)")
    try:
        manifest = json.loads(manifest_file.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
            raise ValueError("not a manifest")
    except (ValueError, UnicodeDecodeError):
        raise ResultsError(
            f"{manifest_file} is damaged; run the sweep command again: it rebuilds the "
            "manifest from the shard files that verify and recomputes only the rest"
        ) from None
    spec = manifest.get("spec", {})
    if spec.get("sweep", sweep) != sweep:
        raise ResultsError(f"{out} holds a {spec['sweep']} sweep, not a {sweep} sweep")
    shards = manifest.get("shards", {})
    frames = {}
    for name in datasets:  # a shard lists the datasets it wrote under "rows"
        parts = []
        for sid in sorted(shards):
            if name not in shards[sid].get("rows", {}):
                continue
            file = out / name / f"{sid}.parquet"
            frame, file_spec = _read(file, shards[sid]["rows"][name], shards[sid].get("checksums", {}).get(name))
            if file_spec is not None and file_spec != spec and not allow_mixed:
                differences = "; ".join(spec_differences(spec, file_spec, ("there", "in this file")))
                raise ResultsError(
                    f"{file} belongs to a different sweep than {out} ({differences}); "
                    "pass --allow-mixed-specs to read them together anyway"
                )
            parts.append(frame)
        frames[name] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return spec, manifest, frames


def sampled(spec: dict) -> str:
    """What a sweep ran on, for titles: ``smollm2-135m on ioi, 64 prompts, resample ablation``."""
    params = spec.get("task_params") or {}
    parts = [f"{spec.get('model', '?')} on {spec.get('task', '?')}"]
    if params.get("n_prompts"):
        parts.append(
            f"{params['n_prompts']} prompts" + (f" x {params['seq_len']} tokens" if params.get("seq_len") else "")
        )
    if spec.get("ablation"):
        parts.append(f"{spec['ablation']} ablation")
    return ", ".join(parts)
