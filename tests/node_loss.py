"""``python -m tests.node_loss`` (from the repo root): a sweep on a two-node Ray (``ray.cluster_utils.Cluster``, one
fake GPU a node, so one actor a node), whose second node is removed mid-sweep.

Prints one JSON line: shard id -> the node that computed it, the removed node, and
whether every table equals the in-process executor's. Run by
``tests/runtime/test_faults.py``; a script so that its Ray is not the test session's.
"""

import json
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster

from sweeps.jobs.backup import BackupJob
from sweeps.jobs.plan import plan_backup
from sweeps.runtime.executors import LocalExecutor, RayExecutor
from sweeps.runtime.models import describe_model
from sweeps.runtime.loading import load_tokenizer
from tasks import TaskSpec, build_task


class SlowJob(BackupJob):
    """Each shard takes a second longer, so the node goes away mid-shard."""

    def run_shard(self, shard):
        time.sleep(1.0)
        return super().run_shard(shard)


def collect(executor, shards, on_result=lambda n: None):
    executor.start()
    try:
        out = {}
        for shard, tables, record in executor.run(shards):
            out[shard.id] = (tables, record)
            on_result(len(out))
        return out
    finally:
        executor.shutdown()


def same(a, b) -> bool:
    for name in a:
        x, y = a[name].to_pandas(), b[name].to_pandas()
        for column in x.columns:
            if x[column].dtype.kind == "f" and not np.allclose(x[column], y[column], atol=1e-5, equal_nan=True):
                return False
    return True


def main() -> None:
    task = build_task(TaskSpec("ioi"), load_tokenizer(describe_model("tiny-gpt2")), n_prompts=6)
    shards = plan_backup([(layer, head) for layer in range(3) for head in range(4)], heads_per_shard=1)
    expected = collect(LocalExecutor("tiny-gpt2", BackupJob(task)), shards)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    worker = cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    removed = {}

    def remove_worker_node(n_done: int) -> None:
        if n_done == 2 and not removed:
            removed["node_id"] = worker.node_id
            cluster.remove_node(worker)  # its raylet and the actor on it die now, mid-shard

    try:
        got = collect(RayExecutor("tiny-gpt2", SlowJob(task), num_workers=2), shards, remove_worker_node)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({
        "where": {sid: record["node_id"] for sid, (_, record) in got.items()},
        "removed": removed.get("node_id"),
        "equal": sorted(got) == sorted(expected) and all(same(got[s][0], expected[s][0]) for s in got),
    }))


if __name__ == "__main__":
    main()
