"""A whole sweep in one module, as a new sweep's four files would hold it (the job, its math, its
registry class, its analysis): ``test_cli.py::test_a_new_sweep_is_its_own_files_and_nothing_else``
writes this source into a temporary module, imports it, and runs it through ``interp-sweeps``.
Nothing else in the project names it."""

TOY_SOURCE = '''
from dataclasses import dataclass

import pyarrow as pa

from analysis.results import read_committed
from sweeps.jobs.base import Job
from sweeps.registry.base import Sweep
from sweeps.runtime.location import Location

DATASETS = ("lengths",)


# -- the math (sweeps/core/): how far each prompt's answer position is from its start
def answer_offsets(lengths):
    return [int(n) - 1 for n in lengths]


# -- the job (sweeps/jobs/): one shard is a range of prompts
@dataclass(frozen=True)
class ToyShard:
    start: int
    stop: int

    @property
    def id(self):
        return f"P{self.start:03d}-{self.stop - 1:03d}"


@dataclass
class ToyJob(Job):
    task: object

    def run_shard(self, shard):
        lengths = self.task.lengths[shard.start:shard.stop].tolist()
        return {"lengths": pa.table({"prompt": list(range(shard.start, shard.stop)), "length": lengths,
                                     "answer_offset": answer_offsets(lengths)})}


# -- the analysis (analysis/)
def load_toy(out, allow_mixed=False):
    spec, manifest, frames = read_committed(Location.parse(out), DATASETS, "toy", allow_mixed)
    return frames["lengths"]


# -- the sweep (sweeps/registry/): defining it registers it
class ToySweep(Sweep):
    """Toy sweep: the length of every prompt, two prompts a shard.

Proves that a sweep is its own files: nothing else in the project names it."""

    name = "toy"
    summary_line = "a toy sweep (tests only)"
    help_sections = 1
    datasets = DATASETS
    unit_name = "prompt"

    def spec(self):
        return self.base_spec()

    def plan(self, done):
        n = self.inputs.task.n_prompts
        shards = [ToyShard(i, min(i + 2, n)) for i in range(0, n, 2)]
        todo = [s for s in shards if s.id not in done]
        return todo, f"toy sweep: {len(shards) - len(todo)} done, {len(todo)} to run"

    def job(self):
        return ToyJob(self.inputs.task)

    def units(self, shard):
        return shard.stop - shard.start

    @staticmethod
    def load(out, allow_mixed=False):
        return load_toy(out, allow_mixed)

    @classmethod
    def is_empty(cls, results):
        return results.empty

    @classmethod
    def summary(cls, results, options):
        return [f"toy: {len(results)} prompts, longest {int(results.length.max())} tokens"]

    @classmethod
    def report(cls, results, options):
        pass
'''
