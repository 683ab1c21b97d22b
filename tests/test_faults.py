"""Real faults on a real local Ray: a worker killed with SIGKILL mid-shard, a poison shard."""

import os
import signal
from dataclasses import dataclass

import numpy as np
import pytest

from sweeps.engine.backup_sweep import BackupJob
from sweeps.engine.plan import plan_backup
from sweeps.engine.run import LocalExecutor, RayExecutor
from tasks import TaskSpec, build_task


@dataclass
class FaultyJob(BackupJob):
    """Kills its own worker process the first time it meets ``crash_shard``;
    always raises on ``poison_shard``."""

    crash_shard: str = ""
    crash_marker: str = ""
    poison_shard: str = ""
    poison_log: str = ""

    def run_shard(self, shard):
        if shard.id == self.poison_shard:
            with open(self.poison_log, "a") as log:
                log.write(f"{os.getpid()}\n")
            raise ValueError("this shard is poisoned")
        if shard.id == self.crash_shard and not os.path.exists(self.crash_marker):
            open(self.crash_marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # the actor process dies mid-shard
        return super().run_shard(shard)


@pytest.fixture(scope="module")
def ioi_task(tiny_gpt2):
    return build_task(TaskSpec("ioi"), tiny_gpt2.tokenizer, n_prompts=6)


def collect(executor, shards):
    executor.start()
    try:
        return {shard.id: tables for shard, tables, _ in executor.run(shards)}
    finally:
        executor.shutdown()


def test_killed_worker_loses_nothing_and_poison_shard_is_reported(ray_session, ioi_task, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # workers need not import tests/
    shards = plan_backup([(l, h) for l in range(3) for h in range(4)])
    expected = collect(LocalExecutor("tiny-gpt2", BackupJob(ioi_task)), shards)
    job = FaultyJob(ioi_task, crash_shard="L01H0-3", crash_marker=str(tmp_path / "crashed"),
                    poison_shard="L02H0-3", poison_log=str(tmp_path / "poison.log"))
    executor = RayExecutor("tiny-gpt2", job, num_workers=2, max_attempts=3)
    got = collect(executor, shards)
    assert (tmp_path / "crashed").exists()  # the worker really was killed
    assert sorted(got) == ["L00H0-3", "L01H0-3"]  # the killed shard was retried and finished
    for shard_id, tables in got.items():
        for name, table in tables.items():
            a, b = table.to_pandas(), expected[shard_id][name].to_pandas()
            for column in a.columns:
                if a[column].dtype.kind == "f":
                    np.testing.assert_allclose(a[column], b[column], atol=1e-5, err_msg=f"{name}.{column}")
    [failure] = executor.failures
    assert failure.shard.id == "L02H0-3" and failure.attempts == 3 and "poisoned" in failure.error
    assert len((tmp_path / "poison.log").read_text().split()) == 3  # Ray retried it, then gave up
