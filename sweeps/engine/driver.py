"""The driver loop every sweep shares: start workers, run shards, write, report progress."""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm.auto import tqdm

from sweeps.engine.plan import Shard
from sweeps.engine.run import Failure
from sweeps.engine.store import ResultStore, StoreError, with_provenance


def run_shards(
    executor,
    store: ResultStore,
    shards: list[Shard],
    spec: dict,
    provenance: dict,
    units: Callable[[Shard], int],
    unit_name: str,
    resume_hint: str,
    cost: Callable[[Shard], float] | None = None,
) -> list[Failure]:
    """Run ``shards`` on ``executor``; each finished shard is committed to ``store``.

    ``provenance`` becomes constant columns of every row; the worker's weight
    hash is added (and checked against earlier shards of the same directory).
    The progress bar counts ``units`` (e.g. heads) but advances by ``cost`` (the
    relative compute of a shard), so its time left stays right when shards
    differ in cost. On Ctrl-C the finished shards stay and ``resume_hint`` says
    how to go on.
    """
    cost = cost or units
    started = time.perf_counter()
    try:
        workers = executor.start()
        startup = time.perf_counter() - started
        hashes = {w["weight_hash"] for w in workers}
        recorded = store.manifest().get("weight_hash")
        if len(hashes) != 1 or (recorded and recorded not in hashes):
            raise StoreError(
                f"model weights differ from those of the results already in {store.out} "
                f"({recorded} vs {', '.join(sorted(hashes))}); use another --out or --no-resume"
            )
        weight_hash = hashes.pop()
        store.update_manifest(weight_hash=weight_hash, workers=workers, startup_seconds=round(startup, 2))
        columns = {**provenance, "weight_hash": weight_hash}
        total_units = sum(units(s) for s in shards)
        bar_format = "{percentage:3.0f}%|{bar}| {desc} [{elapsed}<{remaining}]"
        label = f"{executor.name}×{len(workers)}"
        done_units, loop_start = 0, time.perf_counter()
        with tqdm(total=sum(cost(s) for s in shards), file=sys.stderr, dynamic_ncols=True, bar_format=bar_format,
                  desc=f"{label}: 0/{total_units} {unit_name}s, 0/{len(shards)} shards") as bar:
            for done, (shard, tables, record) in enumerate(executor.run(shards), start=1):
                tables = {
                    dataset: with_provenance(table, {**columns, "shard": shard.id}, spec)
                    for dataset, table in tables.items()
                }
                store.write_shard(shard.id, tables, record)
                done_units += units(shard)
                rate = done_units / max(time.perf_counter() - loop_start, 1e-9)
                bar.set_description_str(
                    f"{label}: {done_units}/{total_units} {unit_name}s, {rate:.2f} {unit_name}s/s, "
                    f"{done}/{len(shards)} shards, last {shard.id} on {record.get('device')}",
                    refresh=False,
                )
                bar.update(cost(shard))
        return executor.failures
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished shards are kept in {store.out}. Resume with:\n  {resume_hint}",
              file=sys.stderr)
        raise
    finally:
        executor.shutdown()
