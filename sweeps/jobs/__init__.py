"""What one worker computes for each sweep: a job holds a task and the sweep's settings, binds to
one model replica, and turns each shard into Arrow tables. Jobs use the math (``sweeps.core``) and
size their passes to the device (``sweeps.runtime.chunking``); no Ray here."""
