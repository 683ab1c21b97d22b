"""``python tests/slow_sweep.py SECONDS SWEEP_ARGS...``: sweeps/backup.py with every shard
taking SECONDS longer, so a test can kill or interrupt a real sweep process mid-way.

The slower job class is defined here, in ``__main__``, so Ray pickles it by value
and the actors run it too.
"""

import sys
import time

from sweeps import backup
from sweeps.jobs import backup as backup_sweep


class SlowJob(backup_sweep.BackupJob):
    delay = 0.0

    def run_shard(self, shard):
        time.sleep(self.delay)
        return super().run_shard(shard)


if __name__ == "__main__":
    SlowJob.delay = float(sys.argv[1])
    backup_sweep.BackupJob = SlowJob  # what sweeps/backup.py builds its job from
    sys.exit(backup.main(sys.argv[2:]))
