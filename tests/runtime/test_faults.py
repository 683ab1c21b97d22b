"""Real faults on a real local Ray: workers, drivers and nodes killed, Ctrl-C, W&B down,
memory running out. What each proves is listed in docs/guarantees.md."""

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sweeps.jobs.backup import BackupJob
from sweeps.jobs.plan import plan_backup
from sweeps.runtime.executors import LocalExecutor, RayExecutor
from tasks import TaskSpec, build_task
from tests.registry.test_driver import assert_same_tables, sweep, tables


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
    for shard_id, shard_tables in got.items():
        for name, table in shard_tables.items():
            a, b = table.to_pandas(), expected[shard_id][name].to_pandas()
            for column in a.columns:
                if a[column].dtype.kind == "f":
                    np.testing.assert_allclose(a[column], b[column], atol=1e-5, err_msg=f"{name}.{column}")
    [failure] = executor.failures
    assert failure.shard.id == "L02H0-3" and failure.attempts == 3 and "poisoned" in failure.error
    assert len((tmp_path / "poison.log").read_text().split()) == 3  # Ray retried it, then gave up


# --------------------------------------------------------------------------- #
# The driver process itself: killed, interrupted, raced
# --------------------------------------------------------------------------- #

REPO = Path(__file__).resolve().parents[2]
SWEEP_ARGS = ["--model", "tiny-llama", "--n-prompts", "10", "--batch-size", "4", "--no-report",
              "--heads-per-shard", "1"]


def committed(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text()).get("shards", {})
    except (OSError, ValueError):
        return {}


def wait_for_commits(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shards = committed(out)
        if len(shards) >= n:
            return shards
        assert proc.poll() is None, f"the sweep exited early: {proc.communicate()}"
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"fewer than {n} shards committed in {timeout} s")


def slow_sweep(out: Path, env: dict, *extra: str, delay: float = 1.0, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.slow_sweep", str(delay), *SWEEP_ARGS, "--out", str(out), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def resume_command(err: str) -> str:
    """The command an interrupted sweep printed after ``Resume with:``."""
    return err.split("Resume with:\n")[1].splitlines()[0].strip()


def finishes_only_the_rest(resume: str, env: dict, out: Path, kept: dict) -> None:
    """Run ``resume`` as printed: it skips the ``kept`` shards and commits the other ones."""
    done = subprocess.run(shlex.split(resume), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(kept)} already done" in done.stderr and len(committed(out)) == 12


def cli(out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sweeps/backup.py", *SWEEP_ARGS, "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_driver_killed_mid_sweep_resumes_and_a_second_sweep_meanwhile_is_refused(ray_session, tmp_path):
    """SIGKILL on the driver (on a real Ray cluster it joined): re-running the command
    recomputes only the unfinished shards, and the tables equal an undisturbed run's."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    assert sweep(tmp_path / "undisturbed", "--heads-per-shard", "1") == 0
    out = tmp_path / "o"
    # 3 s a shard: the second command's start-up (imports) must fit in the 30 s left, even on a busy machine
    driver = slow_sweep(out, env, "--executor", "ray", "--num-workers", "1", delay=3.0)
    wait_for_commits(out, 2, driver)
    second = cli(out, env, "--executor", "ray")
    assert second.returncode == 2
    assert f"another sweep (pid {driver.pid} on" in second.stderr and str(out) in second.stderr
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    before = committed(out)
    assert 2 <= len(before) < 12  # killed mid-sweep
    again = cli(out, env, "--executor", "ray", "--num-workers", "1")
    assert again.returncode == 0, again.stderr
    assert f"{len(before)} already done, {12 - len(before)} shards to run" in again.stderr
    after = committed(out)
    assert sorted(after) == sorted(committed(tmp_path / "undisturbed"))
    for shard_id, record in before.items():  # finished shards were kept, not recomputed
        assert after[shard_id]["checksums"] == record["checksums"]
        assert after[shard_id]["pid"] == record["pid"] != after[min(set(after) - set(before))]["pid"]
    result = tables(out)
    assert not result["slopes"].duplicated(["layer", "head"]).any()
    assert_same_tables(tables(tmp_path / "undisturbed"), result, atol=0)


def test_ctrl_c_keeps_finished_shards_stops_ray_and_prints_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) on a sweep that
    started its own local Ray."""
    import psutil

    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, even if the session's runs
    out = tmp_path / "o"
    # SIGINT at its default, as from a terminal: a shell that runs the suite in the background
    # without job control (`cmd &` in a script) starts it ignored, and children inherit that
    # (the driver would then never see Ctrl-C).
    driver = slow_sweep(out, env, "--executor", "ray", "--num-workers", "1", start_new_session=True,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_commits(out, 1, driver)
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    if not any("raylet" in " ".join(p.cmdline()) for p in ray_processes):
        driver.kill()
        raise AssertionError(driver.communicate()[1][-3000:])
    os.killpg(driver.pid, signal.SIGINT)
    out_text, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err
    kept = committed(out)
    assert 1 <= len(kept) < 12
    assert f"interrupted: finished shards are kept in {out}. Resume with:" in err
    resume = resume_command(err)
    _, still_alive = psutil.wait_procs(ray_processes, timeout=20)
    assert not still_alive, [p.cmdline()[:2] for p in still_alive]  # Ray was shut down
    # the interpreter that ran it (a bare `python` may be another one, without torch), then the script
    interpreter, script, *_ = shlex.split(resume)
    assert (REPO / interpreter).absolute() == Path(sys.executable).absolute() and script == "sweeps/backup.py"
    assert "(raylet)" not in out_text + err and "will be retried" not in out_text + err  # Ray's own notes
    finishes_only_the_rest(resume, env, out, kept)


@pytest.mark.parametrize("fault", ["server unreachable", "no API key"])
def test_wandb_failure_leaves_complete_results_and_logging_can_be_redone(fault, tmp_path):
    """The sweep runs as its own process: W&B reads its settings once per process."""
    from analysis.__main__ import main as analysis_main
    from tests.wandb_records import history_and_summary

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc login
    if fault == "server unreachable":
        env |= {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "k" * 40, "WANDB_INIT_TIMEOUT": "5"}
    out = tmp_path / "o"
    done = subprocess.run(
        [sys.executable, "sweeps/backup.py", "--model", "tiny-llama", "--executor", "local", "--n-prompts", "10",
         "--batch-size", "4", "--out", str(out), "--wandb", "online"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if "W&B" in line]
    assert warning.startswith("warning: W&B logging failed") and "the Parquet results are complete" in warning
    interpreter, *retry = shlex.split(warning.split("retry with: ")[1])  # the interpreter that ran it
    assert (REPO / interpreter).absolute() == Path(sys.executable).absolute()
    assert retry == ["-m", "analysis", "backup", str(out), "--wandb", "online"]
    assert len(tables(out)["slopes"]) == 12 and (out / "plots" / "slopes.png").is_file()
    failed_runs = set((tmp_path / "wandb").rglob("run-*.wandb"))
    # W&B works again: log from the results directory alone
    assert analysis_main(["backup", str(out), "--wandb", "offline"]) == 0
    [run] = set((tmp_path / "wandb").rglob("run-*.wandb")) - failed_runs
    _, summary, _ = history_and_summary(run)
    assert summary["n_heads_swept"] == "12"


def test_out_of_memory_under_a_real_memory_cap_fails_clearly_and_leaves_nothing_half_written(tmp_path):
    """A real address-space limit (``tests/capped_sweep.py``), 450 MiB above what the
    imported process uses: the clean state of 64 prompts x 512 tokens does not fit."""
    data = tmp_path / "long.txt"
    words = "the of and to in a is that for it as was with be by on not he this are or his from".split()
    rng = np.random.default_rng(0)
    data.write_text("\n\n".join(" ".join(rng.choice(words, 560)) for _ in range(140)))
    out = tmp_path / "o"
    args = ["--model", "tiny-gpt2", "--executor", "local", "--no-report", "--task", "text", "--data", str(data),
            "--seq-len", "512", "--n-prompts", "64", "--out", str(out)]
    capped = subprocess.run([sys.executable, "-m", "tests.capped_sweep", "450", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=180, env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    assert capped.returncode == 1, capped.stderr[-2000:]
    failures = [line for line in capped.stderr.splitlines() if line.startswith("shard ")]
    assert failures, capped.stderr[-2000:]
    for line in failures:  # from the shard's clean state, or from a pass already halved to one head
        assert "out of memory" in line
        assert "x 32 prompts x 512 tokens" in line or "keeps the clean state of 64 prompts x 512 tokens" in line
        assert "--batch-size (now 32" in line
    done_before = committed(out)
    assert len(done_before) == 3 - len(failures)  # shards are layers of 4 heads
    for file in out.rglob("*.parquet"):  # nothing half-written or uncommitted
        assert file.name.removesuffix(".parquet") in done_before
    uncapped = subprocess.run([sys.executable, "sweeps/backup.py", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=180)
    assert uncapped.returncode == 0, uncapped.stderr[-2000:]
    assert f"{4 * len(done_before)} already done" in uncapped.stderr
    assert len(tables(out)["slopes"]) == 12


def test_a_node_lost_mid_sweep_loses_nothing():
    """Two Ray nodes with one fake GPU each (one actor each); the second node is removed
    mid-shard. Its actor's restart cannot be placed anywhere (the only GPU left is
    busy), so its shard runs again on the surviving actor; nothing is lost or doubled."""
    done = subprocess.run([sys.executable, "-m", "tests.node_loss"], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    where, removed = result["where"], result["removed"]
    assert len(where) == 12 and result["equal"]  # every shard, each equal to the in-process run's
    assert len(set(where.values())) == 2 and removed in where.values()  # both nodes worked before the loss
    survivor = (set(where.values()) - {removed}).pop()
    assert sum(node == survivor for node in where.values()) >= 10  # the rest ran on the surviving node


# --------------------------------------------------------------------------- #
# SIGTERM, interrupts while the report is written, a full disk
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigterm_stops_like_ctrl_c_and_prints_how_to_resume(executor, tmp_path):
    """SIGTERM, as `kill`, a scheduler or `ray stop` sends it, to the driver: finished shards kept,
    the resume command printed (and it works), exit code 143, no traceback or Ray crash lines."""
    env = {**os.environ, "RAY_ADDRESS": "local"}
    out = tmp_path / "o"
    driver = slow_sweep(out, env, "--executor", executor, "--num-workers", "1", start_new_session=True)
    wait_for_commits(out, 1, driver)
    os.kill(driver.pid, signal.SIGTERM)
    out_text, err = driver.communicate(timeout=90)
    assert driver.returncode == 143, err
    kept = committed(out)
    assert 1 <= len(kept) < 12
    assert f"stopped (SIGTERM): finished shards are kept in {out}. Resume with:" in err
    assert "Traceback" not in err and "(raylet)" not in out_text + err, err[-3000:]
    if executor == "ray":  # the printed command is the same either way (the Ctrl-C test runs it on Ray)
        return
    finishes_only_the_rest(resume_command(err), env, out, kept)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_the_report_is_written_says_how_to_write_it(sig, tmp_path):
    """Ctrl-C (to the whole process group, W&B's own process included) or SIGTERM inside the
    W&B run: one message with the command that writes the report, no traceback."""
    out, marker = tmp_path / "o", tmp_path / "in-report"
    args = [a for a in SWEEP_ARGS if a != "--no-report"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.slow_sweep", "0", *args, "--heads", "L0", "--executor", "local",
         "--wandb", "offline", "--out", str(out)], cwd=REPO, env={**os.environ, "SLOW_REPORT": str(marker)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.2)
    os.killpg(driver.pid, sig) if sig == signal.SIGINT else os.kill(driver.pid, sig)
    _, err = driver.communicate(timeout=90)
    assert driver.returncode == 128 + sig, err
    assert f"stopped while writing the report; the results in {out} are complete. Write the report with:" in err
    assert "Traceback" not in err, err[-3000:]
    again = err.split("Write the report with:\n")[1].splitlines()[0].strip()
    assert "-m analysis backup" in again
    done = subprocess.run(shlex.split(again), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "plots" / "slopes.png").is_file()


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem is full; the file."""
    filler = directory / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a filesystem that really fills up (root only; else a stand-in that
    raises ENOSPC where the real one would)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    yield disk if mounted.returncode == 0 else None
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_the_rerun_resumes(small_disk, tmp_path, monkeypatch, capsys):
    """The disk fills up after three shards: one error line naming the file and what to do
    (exit code 1), nothing half-written; once there is space the same command finishes only
    the rest, its results equal an undisturbed run's, and a half-written plotly.min.js is
    replaced, not reused."""
    from plotly.offline import get_plotlyjs

    from sweeps import backup
    from sweeps.runtime.location import Location

    root = small_disk or tmp_path
    out = root / "o"
    args = [*SWEEP_ARGS, "--executor", "local", "--out", str(out)]
    original = BackupJob.run_shard
    calls, filler = [], []

    def filling(self, shard):
        calls.append(shard.id)
        if len(calls) == 4:
            if small_disk is not None:
                filler.append(fill(small_disk))
            else:  # no tmpfs here: every file's flush fails as on a full disk
                def full(location):
                    raise OSError(errno.ENOSPC, "No space left on device")
                monkeypatch.setattr(Location, "fsync", full)
        return original(self, shard)

    monkeypatch.setattr(BackupJob, "run_shard", filling)
    assert backup.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot write {out}/") and "No space left on device. Finished shards are kept" \
        in err[-1] and err[-1].endswith("then run the same command again to resume"), err[-3:]
    kept = committed(out)
    assert len(kept) == 3
    assert not [p for p in out.rglob(".*.tmp")]  # nothing half-written left behind
    if filler:
        filler[0].unlink()
    monkeypatch.undo()
    plots = out / "plots"
    plots.mkdir()
    (plots / "plotly.min.js").write_text(get_plotlyjs()[:1000])  # a half-written asset of an earlier report
    assert backup.main([a for a in args if a != "--no-report"] + ["--wandb", "disabled"]) == 0
    assert "3 already done" in capsys.readouterr().err
    assert len(committed(out)) == 12
    assert (plots / "plotly.min.js").read_text() == get_plotlyjs()
    assert backup.main([*SWEEP_ARGS, "--executor", "local", "--out", str(tmp_path / "reference")]) == 0
    assert_same_tables(tables(tmp_path / "reference"), tables(out), atol=0)


def test_a_disk_full_before_the_first_write_names_the_lock_file(small_disk, tmp_path, monkeypatch, capsys):
    """Even the lock file's first line can meet a full disk: still one line naming it, and the
    same command runs once there is space."""
    from sweeps import backup

    root = small_disk or tmp_path
    out = root / "o"
    args = [*SWEEP_ARGS, "--heads", "L0", "--executor", "local", "--out", str(out)]
    if small_disk is not None:
        filler = fill(small_disk)
    else:  # no tmpfs here: the write fails as on a full disk

        def full(*_):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
    assert backup.main(args) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {out}/.lock: No space left on device."), line
    if small_disk is not None:
        filler.unlink()
    monkeypatch.undo()
    assert backup.main(args) == 0 and len(committed(out)) == 4
