"""``python -m sweeps validate``: cluster.yaml passes Ray's own validation; broken ones fail in one line."""

import copy
from pathlib import Path

import pytest
import yaml

from sweeps.__main__ import main as sweeps_main
from sweeps.engine.cluster_config import check_cluster_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_and_gives_each_worker_a_gpu(capsys):
    assert sweeps_main(["validate", str(ROOT / "cluster.yaml")]) == 0
    assert "valid (provider aws; head head, workers gpu_worker ×1-4 (1 GPU each))" in capsys.readouterr().out
    prepared = check_cluster_config(ROOT / "cluster.yaml")
    workers = [t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert "~/interp-sweeps" in prepared["file_mounts"]


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
