"""Checking a Ray cluster config (``cluster.yaml``) the way ``ray up`` will, but in one line.

Ray's own validation (``prepare_config`` then ``validate_config``) is the
authority; this module runs it, after the checks whose failures Ray reports
unclearly (a missing ``provider`` is a bare ``KeyError``; ``setup_commands``
given as a string a ``TypeError`` about concatenating lists), and adds the one
thing this project needs: the checkout must reach every node (``file_mounts``)
and be installed there (``setup_commands``), because ``ray submit`` uploads
only the script.

``security_warnings`` says where a config leaves the cluster open: a Ray that
anyone who reaches it can run code on (no token authentication, the dashboard
and job API on every interface), untracked files copied to the nodes, or a
secret written into the file itself.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
MAPPINGS = ("provider", "auth", "file_mounts", "available_node_types", "docker")


class ClusterConfigError(ValueError):
    """A cluster config ``ray up`` would reject or that cannot run the sweeps; one line."""


def check_cluster_config(path: str | Path) -> dict:
    """The config as Ray prepares it, or a ``ClusterConfigError`` naming the problem and the fix."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ClusterConfigError(f"cannot read {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ClusterConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{path}: expected a mapping of settings (cluster_name, provider, ...)")
    _check_shapes(path, config)
    prepared = _ray_validation(path, config)
    _check_project_reaches_nodes(path, prepared)
    return prepared


def _check_shapes(path: Path, config: dict) -> None:
    if "provider" not in config:
        raise ClusterConfigError(
            f"{path}: no `provider` section; add e.g. `provider: {{type: aws, region: us-west-2}}`"
        )
    for key in MAPPINGS:
        if key in config and not isinstance(config[key], dict):
            raise ClusterConfigError(
                f"{path}: `{key}` must be a mapping (key: value lines), not a {type(config[key]).__name__}"
            )
    if "type" not in config["provider"]:
        raise ClusterConfigError(f"{path}: `provider.type` is missing; set it to aws, gcp, azure or local")
    for key in COMMAND_LISTS:
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(c, str) for c in value)):
            raise ClusterConfigError(
                f"{path}: `{key}` must be a list of commands (one `- command` line each), not a {type(value).__name__}"
            )


def _ray_validation(path: Path, config: dict) -> dict:
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    logger = logging.getLogger("ray.autoscaler._private.util")
    level = logger.level
    logger.setLevel(logging.WARNING)  # prepare_config narrates its defaults at INFO
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "top level"
        raise ClusterConfigError(f"{path}: {where}: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - Ray raises many kinds; each becomes one line
        text = str(err).strip().splitlines()
        raise ClusterConfigError(f"{path}: Ray rejects it: {text[0] if text else type(err).__name__}") from None
    finally:
        logger.setLevel(level)
    return prepared


def _check_project_reaches_nodes(path: Path, config: dict) -> None:
    mounts = config.get("file_mounts") or {}
    commands = config.get("setup_commands") or []
    if not mounts:
        raise ClusterConfigError(
            f"{path}: `file_mounts` is empty, so this project never reaches the nodes "
            "(`ray submit` uploads only the script); add `~/interp-sweeps: .`"
        )
    if not any("pip install" in c and any(target in c for target in mounts) for c in commands):
        target = next(iter(mounts))
        raise ClusterConfigError(
            f"{path}: no setup command installs the mounted project; add "
            f"`cd {target} && python3 -m pip install -e .` to setup_commands"
        )


def describe(config: dict) -> str:
    """One line: provider, head and worker node types with their GPUs."""
    provider = config["provider"]["type"]
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    workers = [
        f"{name} ×{t.get('min_workers', 0)}-{t.get('max_workers', config.get('max_workers', '?'))} "
        f"({t.get('resources', {}).get('GPU', 0)} GPU each)"
        for name, t in types.items()
        if name != head
    ]
    nodes = f"head {head}, workers {', '.join(workers) or 'none'}" if types else "nodes from the provider's list"
    return f"provider {provider}; {nodes}"


SECRET = re.compile(
    r"(WANDB_API_KEY|AWS_SECRET_ACCESS_KEY|HF_TOKEN|RAY_AUTH_TOKEN)=(?!\$)\S+|wandb login [0-9a-f]{20,}"
)


def security_warnings(config: dict) -> list[str]:
    """One line for each way ``config`` leaves the cluster open (none for the shipped ``cluster.yaml``)."""
    start = [*(config.get("head_start_ray_commands") or []), *(config.get("worker_start_ray_commands") or [])]
    commands = [c for key in COMMAND_LISTS for c in (config.get(key) or [])]
    ray_starts = [c for c in start if "ray start" in c]
    warnings = []
    if any(re.search(r"--dashboard-host[= ]+0\.0\.0\.0", c) for c in start):
        warnings.append(
            "the dashboard and job API listen on every interface (--dashboard-host=0.0.0.0): anyone "
            "who reaches port 8265 can run code; drop the flag and use `ray dashboard CONFIG`"
        )
    if ray_starts and not all("RAY_AUTH_MODE=token" in c for c in ray_starts):
        warnings.append(
            "Ray's token authentication is off: start Ray with `RAY_AUTH_MODE=token ray start ...` on "
            "every node and mount the token (`~/.ray/auth_token: ~/.ray/auth_token` in file_mounts)"
        )
    if ".gitignore" not in (config.get("rsync_filter") or []):
        warnings.append(
            'file_mounts copy untracked files (.env, keys, results) to every node; add `rsync_filter: [".gitignore"]`'
        )
    for command in commands:
        found = SECRET.search(command)
        if found:
            what = found.group(1) or "a W&B key"  # the name only: the value stays out of logs
            warnings.append(
                f"{what} is written into the config: read it on the node from the environment or a "
                "secrets manager instead"
            )
    token = (config.get("file_mounts") or {}).get("~/.ray/auth_token")
    if token and not Path(token).expanduser().is_file():
        warnings.append(f"{token} does not exist yet: make the cluster's token with `ray get-auth-token --generate`")
    return warnings
