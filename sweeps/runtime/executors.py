"""Executors: run shards on an in-process worker or on a pool of Ray actors.

Ray lives here and nowhere else. A ``ShardWorker`` holds one model replica and
one job (the task's tensors plus the sweep's settings); the same class runs
in-process (``LocalExecutor``) or as a Ray actor pinned to one GPU
(``RayExecutor``). Executors yield finished shards as they arrive; the driver
writes them.

Faults are Ray's to handle where Ray can: an actor whose process dies is
restarted by Ray (``max_restarts``, reloading the model) and the shard it was
running is retried there (``max_task_retries``); a shard that raises is
retried the same way (``retry_exceptions``), so a poison shard fails after
``max_attempts`` tries with its error, while the others go on. What Ray does
not do we do ourselves, instead of ``ray.util.ActorPool`` (which silently drops
the work of a dead actor): an actor that is gone for good (restarts used up,
its node lost) is replaced and its shard goes back in the queue.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import pyarrow as pa
import torch

from sweeps.core import stages
from sweeps.runtime import console, loading
from sweeps.runtime.allocator import keep_freed_memory
from sweeps.runtime.chunking import out_of_memory
from sweeps.runtime.models import IN_MEMORY, describe_model


class Shard(Protocol):
    """A unit of work (``plan.Shard``, ``plan.ScaleShard``): hashable, named by ``id``."""

    @property
    def id(self) -> str: ...


class Job(Protocol):
    """What a sweep asks of a worker: bind to a model (``loading.LoadedModel``), then compute
    shards. The jobs of ``sweeps/jobs/`` return themselves from ``bind``; the executors do not
    need it."""

    def bind(self, model) -> Any: ...

    def run_shard(self, shard: Shard) -> dict[str, pa.Table]: ...


def _ray_placement() -> dict[str, Any]:
    """The Ray node (id and IP) and the GPU ids Ray gave this process; Nones outside Ray."""
    ray = sys.modules.get("ray")  # never import Ray just to ask (the local executor has none)
    if ray is None or not ray.is_initialized():
        return {"node_id": None, "node_ip": None, "gpu_ids": []}
    node_id = ray.get_runtime_context().get_node_id()
    # The address the node registered with (its --node-ip-address), not this process's guess.
    node_ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), None)
    return {"node_id": node_id, "node_ip": node_ip, "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


@dataclass(frozen=True)
class JobRef:
    """A job in Ray's object store, handed to an actor inside this wrapper so that Ray
    passes the reference itself (a small inline argument) rather than resolving it."""

    ref: Any

    def get(self) -> Job:
        import ray

        return ray.get(self.ref)


@dataclass(frozen=True)
class ModelRef:
    """A model in the driver's memory (``loading.register_model``), loaded there once and put
    in Ray's object store; every actor reads it from there, as ``JobRef`` wraps a job."""

    ref: Any

    def get(self) -> loading.LoadedModel:
        import ray

        return ray.get(self.ref)


class ShardWorker:
    """One model replica serving many shards of one job.

    In process (``LocalExecutor``) the job comes with the constructor. A Ray actor gets it
    by ``bind`` once started, and with every shard (``run``), so that an actor Ray
    restarts after a crash (its constructor run again, without the job) takes it up with
    the shard it retries. The constructor never takes the job from Ray's object store:
    Ray logs an error line for every actor whose constructor does, while restarts are on.

    On a CPU it sets its process's ``malloc`` to keep freed memory (``allocator.py``);
    in process that is the caller's process.
    """

    def __init__(
        self,
        model_name: str | ModelRef,
        job: Job | None = None,
        device: str | None = None,
        dtype: str = "float32",
        devices_per_replica: int = 1,
    ):
        devices = replica_devices(devices_per_replica, device)
        self.where = {
            "host": socket.gethostname(),
            **_ray_placement(),
            "device": ",".join(devices),
            "pid": os.getpid(),
        }
        if devices[-1] == "cpu":
            keep_freed_memory()  # each pass's tensors reuse the last pass's memory (allocator.py)
        host = devices[0] if len(devices) == 1 else "cpu"  # a replica in stages is loaded on the host
        if isinstance(model_name, ModelRef):
            self.model = loading.place(model_name.get(), host, dtype)
        else:
            self.model = loading.load_model(describe_model(model_name), host, dtype)
        if len(devices) > 1:  # each stage moved to its device (core/stages.py)
            if self.model.weights is None:  # checked before any weights load (registry.base.check_devices)
                raise ValueError("--devices-per-replica: the bridge path runs a replica on one device")
            self.model.weights = stages.stage(self.model.weights, devices)
        self.job: Job | None = None
        if job is not None:
            self.bind(job)

    def bind(self, job: Job | JobRef) -> dict[str, Any]:
        """Take up ``job`` unless one is bound already; this worker's ``info()``."""
        if self.job is None:
            self.job = job.get() if isinstance(job, JobRef) else job
            self.job.bind(self.model)
        return self.info()

    def info(self) -> dict[str, Any]:
        return {**self.where, "weight_hash": self.model.weight_hash}

    def run(self, shard: Shard, job: Job | JobRef | None = None) -> tuple[dict[str, pa.Table], dict[str, Any]]:
        if self.job is None:
            assert job is not None  # a worker with no job bound is always handed one (RayExecutor)
            self.bind(job)
        assert self.job is not None  # bound above
        start = time.perf_counter()
        try:
            tables = self.job.run_shard(shard)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as err:
            if not out_of_memory(err):
                raise
            # Passes that can be split already were (chunking.map_chunks); this is one batch.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RuntimeError(
                f"out of memory on {self.where['device']} in shard {shard.id}: {_memory_advice(self.job)}"
            ) from None
        notes = self.job.notes() if hasattr(self.job, "notes") else {}
        return tables, {**self.info(), "seconds": round(time.perf_counter() - start, 3), **notes}


def _memory_advice(job: Job) -> str:
    """What to lower when a shard does not fit: the batch (one pass), or the prompts kept."""
    size, task = getattr(job, "batch_size", None), getattr(job, "task", None)
    kept = f"{task.n_prompts} prompts x {task.clean.shape[1]} tokens" if task is not None else "the task"
    batch = f"lower --batch-size (now {size}; try {max(1, size // 2)})" if size else "lower --batch-size"
    return f"{batch}, or --n-prompts / --seq-len (the worker keeps the clean state of {kept})"


def _actor_state(actor) -> str | None:
    """``ALIVE``, ``RESTARTING``, ``PENDING_CREATION``, ``DEAD``..., or None if Ray cannot say.

    Ray's public state API needs the dashboard, which a sweep's local Ray does not
    start; the GCS's actor table answers without it.
    """
    import ray

    try:
        return ray._private.state.actors(actor._actor_id.hex())["State"]
    except Exception:  # noqa: BLE001 - a private API: never let it break a sweep
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class Failure:
    shard: Shard
    error: str
    attempts: int


def replica_devices(k: int, device: str | None = None) -> list[str]:
    """The devices of one replica of ``k`` stages: ``device`` (default: the first GPU, else the
    CPU) when ``k`` is 1; else the first ``k`` GPUs this process sees (a Ray actor sees the ``k``
    it was given), or the CPU ``k`` times where there are none."""
    if k == 1:
        return [device or ("cuda" if torch.cuda.is_available() else "cpu")]
    if not torch.cuda.is_available():
        return ["cpu"] * k
    if torch.cuda.device_count() < k:
        raise ValueError(f"--devices-per-replica {k}: this worker sees only {torch.cuda.device_count()} GPU(s)")
    return [f"cuda:{i}" for i in range(k)]


class LocalExecutor:
    """In-process: one worker, shards one after another. No Ray at all.

    A shard that raises is a failure at once, not retried: in one process on one machine
    the same shard raises the same error again (a pass that runs out of memory is already
    halved and retried inside the shard, by ``chunking.map_chunks``). The other shards go on.
    """

    name = "local"

    def __init__(self, model_name: str, job: Job, dtype: str = "float32", devices_per_replica: int = 1):
        self.model_name, self.job, self.dtype, self.devices_per_replica = model_name, job, dtype, devices_per_replica
        self.failures: list[Failure] = []
        self.worker: ShardWorker | None = None

    def start(self) -> list[dict]:
        self.worker = ShardWorker(
            self.model_name, self.job, dtype=self.dtype, devices_per_replica=self.devices_per_replica
        )
        return [self.worker.info()]

    def run(self, shards: list[Shard]) -> Iterator[tuple[Shard, dict[str, pa.Table], dict]]:
        for shard in shards:
            assert self.worker is not None  # made by start()
            try:
                tables, record = self.worker.run(shard)
            except (RuntimeError, ValueError) as err:
                self.failures.append(Failure(shard, f"{type(err).__name__}: {err}", 1))
                continue
            yield shard, tables, record

    def shutdown(self) -> None:
        self.worker = None


def connect_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Join a running Ray cluster if there is one, else start a local one.

    ``RAY_ADDRESS`` names the cluster to join; ``RAY_ADDRESS=local`` starts a
    private local Ray even when another one runs on this machine. Returns True
    if this call connected (and so should disconnect or shut down).

    Ray's own log lines (its token-authentication warning, its notes that a shard will be
    retried) and the workers' output reach the console only with ``--verbose``
    (``console.py``); a shard's error comes back as its exception either way, and one that
    fails for good is reported by the driver.
    """
    import ray

    if ray.is_initialized():
        return False
    with _keeping_sigterm_handler():
        return _connect(ray, num_cpus, num_gpus)


@contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit`` (Ray's crash lines, no resume
    command); the command's own (``console.sigterm_as_interrupt``) is put back afterwards."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _connect(ray, num_cpus: int | None, num_gpus: int | None) -> bool:
    if not console.verbose():  # "Task ... failed. There are 2 retries remaining, so the task will be retried"
        os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address == "local":  # Ray's own spelling for "start a new local cluster, join none"
        address = None
    else:
        try:
            ray.init(address=address or "auto", logging_level=console.library_level(), log_to_driver=console.verbose())
            print(f"Ray: joined the running cluster at {ray.get_runtime_context().gcs_address}", file=sys.stderr)
            return True
        except ConnectionError:
            if address:
                raise
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        logging_level=console.library_level(),
        log_to_driver=console.verbose(),
    )
    why = "RAY_ADDRESS=local" if os.environ.get("RAY_ADDRESS") == "local" else "no running cluster found"
    print(f"Ray: {why}; started a local single-node Ray", file=sys.stderr)
    return True


@dataclass
class RayExecutor:
    """A pool of actors, one model replica each (one GPU each where there are GPUs)."""

    model_name: str
    job: Job
    num_workers: int | None = None
    max_attempts: int = 3
    dtype: str = "float32"  # what every replica runs in (``precision.DTYPES``)
    devices_per_replica: int = 1  # GPUs an actor asks for: its replica's stages (``core/stages.py``)
    name: str = "ray"
    failures: list[Failure] = field(default_factory=list)
    started_ray: bool = False
    actors: list = field(default_factory=list)

    def _actor_options(self) -> dict:
        """One GPU per actor where the cluster has GPUs, else a share of a node's cores."""
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        gpus = sum(int(n.get("GPU", 0)) for n in nodes)
        k = self.devices_per_replica
        if gpus and k > max(int(n.get("GPU", 0)) for n in nodes):
            raise ValueError(
                f"--devices-per-replica {k}: no node of the cluster has {k} GPUs (a replica's stages share a node)"
            )
        if self.num_workers is None:
            self.num_workers = max(1, gpus // k)
        if gpus:
            options = {"num_gpus": k, "num_cpus": 1}
            placeable = sum(int(n.get("GPU", 0)) // k for n in nodes)
        else:
            # Ray sets an actor's OMP/torch threads to its num_cpus: give each a node's share.
            node_cpus = max(int(n.get("CPU", 1)) for n in nodes)
            per_actor = max(1, node_cpus // max(1, -(-self.num_workers // len(nodes))))
            options = {"num_gpus": 0, "num_cpus": per_actor}
            placeable = sum(int(n.get("CPU", 0)) // per_actor for n in nodes)
        if self.num_workers > placeable:
            print(
                f"Ray: {self.num_workers} workers asked for, {placeable} fit the cluster now; the rest wait "
                "for the autoscaler (or lower --num-workers)",
                file=sys.stderr,
            )
        return options

    def start(self) -> list[dict]:
        import ray

        self.started_ray = connect_ray()
        options = self._actor_options()
        assert self.num_workers is not None  # set by _actor_options
        retries = self.max_attempts - 1
        self._remote_cls = ray.remote(ShardWorker).options(**options, max_restarts=retries, max_task_retries=retries)
        self._job_ref = JobRef(ray.put(self.job))  # the task's tensors go to the object store once
        self._model: str | ModelRef = self.model_name
        if self.model_name in IN_MEMORY:  # the driver's model: processed here once, read by every actor
            self._model = ModelRef(ray.put(loading.load_model(describe_model(self.model_name), "cpu")))
        self.actors = [self._new_actor() for _ in range(self.num_workers)]
        try:
            return ray.get([a.bind.remote(self._job_ref) for a in self.actors])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            cause = str(err).strip().splitlines()
            raise RuntimeError(
                f"a Ray worker failed to start (loading {self.model_name}): {cause[-1] if cause else err}"
            ) from None

    def _new_actor(self):
        # its job comes with bind and each shard
        return self._remote_cls.remote(self._model, dtype=self.dtype, devices_per_replica=self.devices_per_replica)

    def run(self, shards: list[Shard]) -> Iterator[tuple[Shard, dict[str, pa.Table], dict]]:
        """Yield each shard once, as it finishes.

        When the queue is empty and an actor is idle, a shard whose actor is
        not running (restarting, or waiting to be placed) is started again on
        the idle one, once; the first result wins. That finishes a sweep whose node
        is gone while every GPU left is busy: Ray would hold the shard for a
        restart that cannot be placed until a new node came.
        """
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

        pending = deque(shards)
        losses: dict[Shard, int] = {}  # times a shard's actor was lost for good under it
        copies: dict[Shard, int] = {}  # copies of a shard in flight
        rescued: set[Shard] = set()  # shards started again because their actor was not running
        settled: set[Shard] = set()  # finished, or failed for good
        idle = list(self.actors)
        in_flight: dict[Any, tuple[Shard, Any]] = {}

        def submit(actor, shard) -> None:
            # Ray retries the shard itself: after a crash (on the restarted actor) or an exception
            in_flight[actor.run.options(retry_exceptions=True).remote(shard, self._job_ref)] = (shard, actor)
            copies[shard] = copies.get(shard, 0) + 1

        while pending or any(shard not in settled for shard, _ in in_flight.values()):
            while idle and pending:
                submit(idle.pop(), pending.popleft())
            tail = bool(idle) and not pending
            if tail:  # idle actors, nothing queued: rescue (once) shards whose actor is not running
                stranded = [
                    s
                    for s, a in in_flight.values()
                    if s not in settled and s not in rescued and _actor_state(a) not in ("ALIVE", None)
                ]
                while idle and stranded:
                    shard = stranded.pop(0)
                    rescued.add(shard)
                    submit(idle.pop(), shard)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0 if tail else None)
            if not ready:
                continue
            [ref] = ready
            shard, actor = in_flight.pop(ref)
            copies[shard] -= 1
            last_copy = copies[shard] == 0 and shard not in settled
            try:
                tables, record = ray.get(ref)
            except RayTaskError as err:  # it raised on every try Ray gave it: a poison shard, in any copy
                idle.append(actor)
                if shard not in settled:
                    settled.add(shard)
                    self.failures.append(
                        Failure(shard, _first_line(err.cause if err.cause else err), self.max_attempts)
                    )
                continue
            except ActorUnavailableError as err:  # unreachable for now (e.g. restarting): keep it
                idle.append(actor)
                if last_copy:
                    self._requeue(shard, losses, pending, f"worker unavailable: {_first_line(err)}")
                continue
            except RayActorError as err:  # restarts used up, or its node is gone: replace the actor
                ray.kill(actor, no_restart=True)
                self.actors.remove(actor)
                replacement = self._new_actor()
                self.actors.append(replacement)
                idle.append(replacement)
                if last_copy:
                    self._requeue(shard, losses, pending, f"worker lost: {_first_line(err)}")
                continue
            except RayError as err:  # e.g. the result object was lost with its node
                idle.append(actor)
                if last_copy:
                    self._requeue(shard, losses, pending, _first_line(err))
                continue
            idle.append(actor)
            if shard not in settled:
                settled.add(shard)
                yield shard, tables, record

    def _requeue(self, shard: Shard, losses: dict, pending: deque, error: str) -> None:
        losses[shard] = losses.get(shard, 0) + 1
        if losses[shard] < self.max_attempts:
            pending.append(shard)
        else:
            self.failures.append(Failure(shard, error, losses[shard] * self.max_attempts))

    def shutdown(self) -> None:
        """Stop the pool. When this executor connected to Ray, disconnecting ends its actors
        (they belong to this driver) without killing them one by one: a kill under a running
        shard makes Ray print that the shard "will be retried", after our own last line."""
        import ray

        if self.started_ray:
            self.actors = []
            ray.shutdown()
            return
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
