"""What every sweep command shares: input checks, the store, and the loop that runs shards.

``prepare_inputs`` checks the output directory, task and model name (no weights
load); ``run_sweep`` locks ``--out``, adopts the spec, plans what is left and
runs it with ``run_shards``: start workers, run shards, write, report progress.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sweeps.runtime import console
from sweeps.runtime.executors import Failure
from sweeps.runtime.location import Location
from sweeps.runtime.store import ResultStore, StoreError, check_out_dir, with_provenance

REPO = Path(__file__).resolve().parents[2]  # the entry scripts (sweeps/backup.py, ...) are relative to it


def run_shards(
    executor,
    store: ResultStore,
    waves: Iterable[list],
    spec: dict,
    provenance: dict,
    units: Callable[[Any], int],
    unit_name: str,
    resume_hint: str,
    cost: Callable[[Any], float] | None = None,
) -> list[Failure]:
    """Run each wave of shards on ``executor``; each finished shard is committed to ``store``.

    ``waves`` yields lists of shards; a later wave is planned only after the
    previous one finished (the attribution sweep's verification needs the
    summed scores). The workers stay up between waves.

    ``provenance`` becomes constant columns of every row; the worker's weight
    hash is added (and checked against earlier shards of the same directory).
    The progress bar counts ``units`` (e.g. heads) but advances by ``cost`` (the
    relative compute of a shard), so its time left stays right when shards
    differ in cost. On Ctrl-C the finished shards stay and ``resume_hint`` says
    how to go on (``run_sweep`` prints it).
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
        for shards in waves:
            _run_wave(executor, store, shards, columns, spec, units, unit_name, cost, len(workers))
            if executor.failures:
                break
        return executor.failures
    finally:
        executor.shutdown()


def _run_wave(
    executor,
    store: ResultStore,
    shards: list,
    columns: dict,
    spec: dict,
    units: Callable,
    unit_name: str,
    cost: Callable,
    n_workers: int,
) -> None:
    import warnings

    with warnings.catch_warnings():  # in a notebook without ipywidgets: a text bar, and no warning about it
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    total_units = sum(units(s) for s in shards)
    bar_format = "{percentage:3.0f}%|{bar}| {desc} [{elapsed}<{remaining}]"
    label = f"{executor.name}×{n_workers}"
    done_units, loop_start = 0, time.perf_counter()
    with tqdm(
        total=sum(cost(s) for s in shards),
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format=bar_format,
        desc=f"{label}: 0/{total_units} {unit_name}s, 0/{len(shards)} shards",
    ) as bar:
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


# --------------------------------------------------------------------------- #
# What every sweep command does around run_shards
# --------------------------------------------------------------------------- #


@dataclass
class SweepInputs:
    """A sweep's checked inputs: nothing here has loaded model weights."""

    out: Location  # the results directory or URI
    info: Any  # models.ModelInfo
    task: Any  # tasks.TaskData


def input_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad user input in every sweep (reported as one line, exit code 2); a
    sweep adds its own (``Sweep.input_errors``)."""
    from sweeps.core.circuits import CircuitError
    from sweeps.core.metrics import MetricError
    from sweeps.core.nodes import NodeError
    from sweeps.jobs.plan import PlanError
    from sweeps.runtime.models import ModelNameError
    from tasks import TaskError

    return (ModelNameError, TaskError, StoreError, NodeError, PlanError, CircuitError, MetricError)


def prepare_inputs(args, sweep: str) -> SweepInputs:
    """The checks every sweep makes first: output directory, task, model name, prompts.

    Raises one of ``input_errors()``; only the tokenizer is loaded.
    """
    from sweeps.core.metrics import check_metric
    from sweeps.registry.cli import default_out
    from sweeps.runtime.loading import load_tokenizer
    from sweeps.runtime.models import describe_model
    from tasks import TaskError, build_task, check_task

    metric = getattr(args, "metric", None)
    if metric is not None:
        check_metric(metric, "logit_diff" if metric != "log_prob" else "next_token")  # the name, before anything
    # A chosen metric gets its own default directory: its results never resume another metric's.
    default = default_out(sweep, args.model, args.task, args.dtype)
    out = check_out_dir(args.out or (default.with_name(f"{default.name}__{metric}") if metric else default))
    task_spec = check_task(args.task)
    info = describe_model(args.model)
    task = build_task(
        task_spec,
        load_tokenizer(info),
        args.n_prompts,
        args.seed,
        args.seq_len,
        args.data,
        prepend_bos=info.prepend_bos,
    )
    if metric is not None:
        check_metric(metric, task.kind)
        task.metric = metric
    if task.clean.shape[1] > info.n_ctx:
        raise TaskError(
            f"prompts of {task.clean.shape[1]} tokens are longer than {args.model}'s "
            f"context of {info.n_ctx}; lower --seq-len or shorten the prompts"
        )
    return SweepInputs(out, info, task)


def run_sweep(sweep, argv: list[str]) -> int | list[Failure]:
    """Lock ``--out``, adopt the spec, plan what is left, run it; the failures, or an exit code.

    ``sweep`` is a prepared ``base.Sweep``. Its ``plan(done_shard_ids)`` returns the shards to
    run and a one-line header. It is asked again after each wave finishes, with the workers
    still up, and may return more shards that depend on the finished ones (an empty list ends
    the sweep). Its ``columns()`` are sweep-specific provenance columns for every row; its
    ``derived`` datasets are cleared with ``--no-resume`` and written by ``finish(store)``,
    still under the lock, once no shard failed.
    """
    from sweeps.runtime import provenance
    from sweeps.runtime.executors import LocalExecutor, RayExecutor

    args, inputs, spec = sweep.args, sweep.inputs, sweep.spec()
    store = ResultStore(inputs.out, sweep.datasets, sweep.derived)
    resume_hint = sweep.resume_command(argv)
    spec_id = provenance.spec_id(spec)
    try:
        with store.lock():
            store.prepare(spec, resume=args.resume)
            shards, header = sweep.plan(store.reconcile())
            code = provenance.code_version()
            store.update_manifest(
                spec=spec,
                spec_id=spec_id,
                code_version=code,
                packages=provenance.package_versions(),
                model=inputs.info.__dict__,
            )
            print(inputs.info.describe, file=sys.stderr)
            print(f"{header} -> {inputs.out}", file=sys.stderr)
            if not shards:
                if sweep.derived:
                    sweep.finish(store)
                return []
            job = sweep.job()
            if getattr(args, "memory_budget", None) is not None:  # each worker sizes its passes to it
                job.memory_budget = args.memory_budget * 1e9
            k = getattr(args, "devices_per_replica", 1)
            executor = (
                LocalExecutor(args.model, job, dtype=args.dtype, devices_per_replica=k)
                if args.executor == "local"
                else RayExecutor(args.model, job, num_workers=args.num_workers, dtype=args.dtype, devices_per_replica=k)
            )
            columns = {
                "model": args.model,
                "dtype": args.dtype,
                "engine_path": inputs.info.path,
                "task": inputs.task.name,
                "task_hash": spec["task_hash"],
                "seed": args.seed,
                **sweep.columns(),
                "code_version": code,
                "spec_id": spec_id,
            }

            def waves() -> Iterator[list]:
                more = shards
                ran: set[str] = set()
                while more:
                    ids = {s.id for s in more}
                    if ids <= ran:  # planned again after running: never loop on it
                        raise RuntimeError(f"shards {sorted(ids)[:3]} did not commit; see {store.out}/manifest.json")
                    ran |= ids
                    yield more
                    more, header = sweep.plan(store.reconcile())
                    if more:
                        print(header, file=sys.stderr)

            failures = run_shards(
                executor, store, waves(), spec, columns, sweep.units, sweep.unit_name, resume_hint, sweep.cost
            )
            if sweep.derived and not failures:
                sweep.finish(store)
            return failures
    except StoreError as err:
        from sweeps.registry.cli import UserError

        raise UserError(str(err)) from None
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (console.Terminated); workers already stopped
        what = "stopped (SIGTERM)" if console.terminated(err) else "interrupted"
        print(f"\n{what}: finished shards are kept in {store.out}. Resume with:\n  {resume_hint}", file=sys.stderr)
        return console.interrupt_exit_code(err)
    except RuntimeError as err:  # e.g. a worker that cannot load the model
        print(f"error: {err}", file=sys.stderr)
        return 1


def print_failures(failures: list[Failure]) -> None:
    """Each shard that failed for good, with its error, and how to retry."""
    for failure in failures:
        tries = (
            f"after {failure.attempts} tries" if failure.attempts > 1 else "(not retried: it would fail the same way)"
        )
        print(f"shard {failure.shard.id} failed {tries}: {failure.error}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} shard(s) failed; re-run the same command to retry them", file=sys.stderr)
