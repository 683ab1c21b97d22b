"""``python -m tests.slow_sweep SECONDS SWEEP_ARGS...`` (from the repo root): sweeps/backup.py with every shard
taking SECONDS longer, so a test can kill or interrupt a real sweep process mid-way.

With ``SLOW_REPORT=FILE`` in the environment the report waits too, inside its W&B run
(after ``wandb.init``), having first created FILE: a test interrupts it there.

The slower job class is defined here, in ``__main__``, so Ray pickles it by value
and the actors run it too.
"""

import os
import sys
import time
from pathlib import Path

from sweeps import backup
from sweeps.jobs import backup as backup_sweep


class SlowJob(backup_sweep.BackupJob):
    delay = 0.0

    def run_shard(self, shard):
        time.sleep(self.delay)
        return super().run_shard(shard)


def slow_report(marker: str) -> None:
    from analysis import plots

    standalone = plots.standalone_html

    def waiting(page):  # called inside the W&B run, once per figure
        Path(marker).touch()
        time.sleep(60)
        return standalone(page)

    plots.standalone_html = waiting


if __name__ == "__main__":
    if os.environ.get("SLOW_REPORT"):
        slow_report(os.environ["SLOW_REPORT"])
    SlowJob.delay = float(sys.argv[1])
    backup_sweep.BackupJob = SlowJob  # what sweeps/backup.py builds its job from
    sys.exit(backup.main(sys.argv[2:]))
