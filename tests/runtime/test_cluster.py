"""Clusters: ``python -m sweeps validate`` (cluster.yaml passes Ray's own validation; broken ones fail in
one line), and ``ray up`` / ``ray submit`` / ``ray down`` for real on a two-node on-premise cluster."""

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from sweeps import backup
from sweeps.__main__ import main as sweeps_main
from sweeps.runtime.cluster_config import check_cluster_config, security_warnings
from sweeps.runtime.provenance import source_hash
from tests.conftest import needs
from tests.local_cluster import LocalCluster, unavailable
from tests.registry.test_driver import assert_same_tables, tables

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_and_gives_each_worker_a_gpu(capsys):
    assert sweeps_main(["validate", str(ROOT / "cluster.yaml")]) == 0
    assert "valid (provider aws; head head, workers gpu_worker ×1-4 (1 GPU each))" in capsys.readouterr().out
    prepared = check_cluster_config(ROOT / "cluster.yaml")
    workers = [t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert "~/interp-sweeps" in prepared["file_mounts"]


def test_shipped_cluster_is_private_and_authenticated(capsys):
    """No open dashboard, token authentication on every node, untracked files stay home, no secret
    in the file; the validator says so for each of those it is shown broken."""
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    starts = CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert CLUSTER["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in CLUSTER["rsync_filter"]
    assert not [w for w in security_warnings(CLUSTER) if "does not exist yet" not in w]
    assert not [w for w in security_warnings(LocalCluster(Path("/nonexistent")).config())
                if "does not exist yet" not in w]  # the two-node test runs the same way
    opened = broken(lambda c: c.update(head_start_ray_commands=["ray stop", "ray start --head --dashboard-host=0.0.0.0"],
                                       setup_commands=[*c["setup_commands"], "echo export WANDB_API_KEY=0123abcd >> ~/.bashrc"],
                                       rsync_filter=[]))
    warnings = [w for w in security_warnings(opened) if "does not exist yet" not in w]
    assert len(warnings) == 4 and "0123abcd" not in " ".join(warnings)
    for part in ("every interface", "token authentication is off", "untracked files", "WANDB_API_KEY is written"):
        assert any(part in w for w in warnings), (part, warnings)


def broken(change):
    config = copy.deepcopy(CLUSTER)
    change(config)
    return config


BROKEN = {
    # Ray itself: a bare KeyError('provider')
    "no provider": (broken(lambda c: c.pop("provider")), "no `provider` section; add e.g. `provider:"),
    # Ray itself: a bare KeyError('type')
    "no provider type": (broken(lambda c: c["provider"].pop("type")), "`provider.type` is missing; set it to aws"),
    # Ray itself: TypeError: can only concatenate str (not "list") to str
    "setup_commands as a string": (broken(lambda c: c.update(setup_commands="pip install -e .")),
                                   "`setup_commands` must be a list of commands"),
    "resources not a mapping": (broken(lambda c: c["available_node_types"]["gpu_worker"].update(resources="GPU: 1")),
                                "available_node_types.gpu_worker.resources: 'GPU: 1' is not of type 'object'"),
    "misspelt key": (broken(lambda c: c.update(setup_comands=["x"])), "('setup_comands' was unexpected)"),
    "unknown head type": (broken(lambda c: c.update(head_node_type="cpu_head")),
                          "Ray rejects it: `head_node_type` must be one of `available_node_types`"),
    "project never mounted": (broken(lambda c: c.update(file_mounts={})), "never reaches the nodes"),
    "project never installed": (broken(lambda c: c.update(setup_commands=["echo hi"])),
                                "no setup command installs the mounted project"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_cluster_configs_fail_in_one_line(case, tmp_path, capsys):
    config, message = BROKEN[case]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    assert sweeps_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}"), err
    assert message in err


def test_unreadable_or_unparsable_config(tmp_path, capsys):
    assert sweeps_main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    path = tmp_path / "cluster.yaml"
    path.write_text("provider:\n  type: aws\n setup_commands: [\n")
    assert sweeps_main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 3: not valid YAML" in err, err


# --- The real cluster launcher: ray up / submit / down on a two-node on-premise cluster -----------

@pytest.fixture
def local_cluster(tmp_path):
    """Makes on-premise clusters on this machine (tests/local_cluster.py); skips, saying why, where
    sshd cannot run; stops their sshds (and so every process of the cluster) afterwards."""
    needs("local SSH cluster (root, sshd, rsync)", unavailable())
    made = []

    def make(**options) -> LocalCluster:
        # Not tmp_path: Ray's socket paths under the nodes' homes must stay within 107 bytes.
        cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="sweeps-cluster-")), **options)
        made.append(cluster)
        cluster.start_sshd()
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        if cluster.log.exists():  # kept with the test's files, for reading after a failure
            shutil.copy(cluster.log, tmp_path / f"launcher-{cluster.name}.log")
        shutil.rmtree(cluster.dir, ignore_errors=True)


SWEEP = ["--model", "tiny-gpt2", "--n-prompts", "6", "--heads", "L0,L1", "--heads-per-shard", "1",
         "--batch-size", "4", "--no-report"]


def without_code_version(out) -> dict:
    return {name: t.drop(columns=["code_version"]) for name, t in tables(out).items()}


def test_ray_submit_on_a_two_node_cluster_equals_the_local_run(local_cluster, tmp_path, ray_session):
    cluster = local_cluster(workers=1)
    assert backup.main([*SWEEP, "--executor", "local", "--out", str(tmp_path / "local")]) == 0

    # As a user would: check the config, bring the cluster up, submit, fetch the results, take it down.
    config = cluster.write_config()
    assert sweeps_main(["validate", str(config)]) == 0
    cluster.up()
    assert cluster.wait_for_nodes(2) == 2, f"the worker never joined; see {cluster.log}"
    # `ray submit` joins the arguments unquoted into a remote shell line: ~ is the head's home.
    cluster.submit("sweeps/backup.py", *SWEEP, "--out", "~/results")
    fetched = tmp_path / "fetched"
    assert cluster.ray("rsync-down", str(config), "~/results/", str(fetched) + "/").returncode == 0
    assert (fetched / "manifest.json").exists(), f"the submitted sweep wrote no results; see {cluster.log}"
    again = cluster.submit("sweeps/backup.py", *SWEEP, "--out", "~/results")  # resumes: nothing to redo
    assert "8 heads requested, 8 already done, 0 shards to run" in again.stdout, again.stdout[-2000:]
    down = cluster.down()
    assert down.returncode == 0, down.stderr[-2000:]

    # One model replica per node's GPU, each shard recorded with the node and GPU that computed it.
    manifest = json.loads((fetched / "manifest.json").read_text())
    workers = manifest["workers"]
    # (Ray registers the head, given 127.0.0.1, under this machine's own address.)
    node_ips = {w["node_ip"] for w in workers}
    assert len(workers) == len(node_ips) == len({w["node_id"] for w in workers}) == 2 and "127.0.0.2" in node_ips
    assert all(w["gpu_ids"] == ["0"] for w in workers)
    shards = manifest["shards"]
    assert len(shards) == 8 and {s["node_ip"] for s in shards.values()} == node_ips
    assert all(s["gpu_ids"] == ["0"] for s in shards.values())
    # The worker's shards came back through Ray: nothing of the results is on the worker node.
    assert not list(cluster.homes["127.0.0.2"].rglob("*.parquet"))
    # The node got the checkout without .git: its code version is the hash of the sources, the same
    # hash this checkout's sources have.
    assert manifest["code_version"] == f"0.1.0+src.{source_hash()}"
    assert_same_tables(without_code_version(tmp_path / "local"), without_code_version(fetched))
    # `ray stop` on the cluster's nodes left this session's own Ray alone.
    assert ray_session.get(ray_session.remote(lambda: 41).remote()) + 1 == 42


def test_ray_job_submit_with_the_checkout_as_working_dir(local_cluster, tmp_path):
    """The alternative for a cluster that is already up: the checkout travels as the job's
    working_dir. This cluster's node has the dependencies but not the project itself."""
    cluster = local_cluster(workers=0, dashboard=True, install_project=False)
    assert backup.main([*SWEEP, "--executor", "local", "--out", str(tmp_path / "local")]) == 0
    cluster.write_config()
    cluster.up()
    out = cluster.homes["127.0.0.1"] / "job-results"  # an absolute path: the working_dir is temporary
    # Without the token the job API refuses the job: nothing runs on the head.
    stranger = cluster.job_submit("python", "-c", "open('/tmp/should-not-exist', 'w')", "--out", str(out),
                                  token=False)
    assert stranger.returncode != 0, (stranger.stdout + stranger.stderr)[-3000:]
    assert "auth" in (stranger.stdout + stranger.stderr).lower(), (stranger.stdout + stranger.stderr)[-3000:]
    assert not out.exists()
    job = cluster.job_submit("python", "sweeps/backup.py", *SWEEP, "--out", str(out))
    assert job.returncode == 0 and "succeeded" in job.stderr + job.stdout, (job.stdout + job.stderr)[-3000:]
    assert cluster.down().returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["code_version"] == f"0.1.0+src.{source_hash()}"  # Ray leaves .git out of a working_dir
    assert_same_tables(without_code_version(tmp_path / "local"), without_code_version(out))


def test_readme_gcp_sections_make_a_valid_cluster_yaml(tmp_path, capsys):
    """docs/cluster.md's GCP variant of cluster.yaml (its provider, auth and node types) passes validation."""
    readme = (ROOT / "docs" / "cluster.md").read_text()
    section = readme[readme.index("## On GCP"):]
    block = section[section.index("```yaml") + len("```yaml"):section.index("```", section.index("```yaml") + 3)]
    gcp = yaml.safe_load(block)
    assert set(gcp) == {"provider", "auth", "available_node_types"}
    config = {**copy.deepcopy(CLUSTER), **gcp}
    path = tmp_path / "cluster-gcp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert sweeps_main(["validate", str(path)]) == 0
    assert "valid (provider gcp; head head, workers gpu_worker ×1-4 (1 GPU each))" in capsys.readouterr().out
