"""What each sweep's shards write: the names of its Parquet datasets.

Below both the registry (which runs the sweep and commits the shards) and
``analysis`` (which reads them back), so neither imports the other for them.
Kept apart from the job modules so that reading the names imports no torch.

``SHARDS`` are written one file per shard; ``DERIVED`` once from all shards at
the end of a sweep (``Sweep.finish``).
"""

from __future__ import annotations

SHARDS: dict[str, tuple[str, ...]] = {
    "backup": ("slopes", "responses", "points", "self_repair", "neurons"),
    "scale": ("effects",),
    "attribution": ("node_sums", "edge_sums", "batches", "verify_sums", "kv_head_sums"),
    "circuit": ("circuit_sums",),
}

DERIVED: dict[str, tuple[str, ...]] = {
    "attribution": ("nodes", "edges", "verify"),
    "circuit": ("faithfulness",),
}
