"""Read an offline W&B run file (``run-*.wandb``) back, for tests.

The file is a LevelDB-style log of ``wandb.proto`` ``Record`` messages:
a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of
chunks, each ``<crc32:4><length:2><type:1><data>``, type 1 = a full record,
2/3/4 = first/middle/last piece of one.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:  # block tail padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            offset += BLOCK - offset % BLOCK if offset % BLOCK else 0
            continue
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path: str | Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of a run once its ``exit`` record is on disk.

    ``run.finish()`` returns before the W&B service has closed (and so flushed) the
    run file: a reader that does not wait can see a file without its last records.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path) if Path(path).stat().st_size >= HEADER else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history_and_summary(path: str | Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(history key -> JSON value, summary key -> JSON value, artifact names) of a finished run."""
    history, summary, artifacts = {}, {}, []
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history[item.key or "/".join(item.nested_key)] = item.value_json
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = item.value_json
        elif kind == "artifact":
            artifacts.append(record.artifact.name)
    return history, summary, artifacts
