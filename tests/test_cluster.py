"""cluster.yaml passes Ray's own cluster-config validation."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_and_gives_each_worker_a_gpu():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = validate(config)
    workers = [t for name, t in prepared["available_node_types"].items() if name != prepared["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert "~/interp-sweeps" in prepared["file_mounts"]
    assert any("pip install" in c and "-e ." in c for c in prepared["setup_commands"])


def test_broken_cluster_yaml_is_rejected():
    from jsonschema.exceptions import ValidationError

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["resources"] = "GPU: 1"  # not a mapping
    with pytest.raises(ValidationError, match="resources"):
        validate(config)
