"""Shared fixtures: models loaded once per session, one real local Ray per session."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from sweeps.runtime import loading, model_cache, models

torch.set_grad_enabled(False)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores, each computes on one thread (no oversubscription),
    # and so does every process a test starts (CLI runs, Ray workers, the notebook's kernel).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    """The suite's own on-disk model cache (sweeps.runtime.model_cache), empty at the start,
    shared by every process the tests start (CLI runs, Ray workers) and removed at the end:
    the tests neither read nor fill the user's ~/.cache."""
    config.sweeps_cache = tempfile.mkdtemp(prefix="sweeps-test-cache-")
    os.environ["SWEEPS_CACHE_DIR"] = config.sweeps_cache


# The slow tier (``pytest -m "not slow"`` leaves it out for everyday work; ``make test`` and CI
# run everything): the real embedded model, Ray clusters and subprocess faults, benchmarks,
# and every family's commands from the hub.
SLOW_MODULES = {"test_cluster.py", "test_faults.py", "test_benchmarks.py"}
SLOW_FIXTURES = {"smollm", "ray_session", "local_cluster"}
# Modules that run model after model once more (in reduced precision, against the golden
# record): two families stay in the fast tier, the others are slow.
PER_FAMILY_MODULES = {"test_precision.py", "test_golden.py", "test_footprint.py", "test_layerwise.py", "test_prefix.py"}
FAST_FAMILIES = {"tiny-llama3", "tiny-gemma2"}


def _slow_family(item) -> bool:
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("name") if callspec is not None else None
    return item.path.name in PER_FAMILY_MODULES and name is not None and name.split("@")[0] not in FAST_FAMILIES


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.path.name in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
                or "smollm2-135m" in item.nodeid or _slow_family(item)):
            item.add_marker(pytest.mark.slow)


def needs(what: str, missing: str | None) -> None:
    """Skip, saying why, where ``what`` is missing; under ``CI=true`` (``.ci/run``, which
    installs it) a missing piece of infrastructure is a failure, never a silent skip."""
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {what} is missing ({missing}); .ci/run installs it")
    pytest.skip(f"no {what} here: {missing}")


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "sweeps_cache", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    """Every test's W&B writes go to its own temp dir, offline."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()


class Loaded:
    """A model as the tests need it: the reference bridge and our weights."""

    def __init__(self, name: str):
        self.info = models.describe_model(name)
        self.bridge, unfoldable = loading.load_bridge(self.info, with_spec=True)
        try:
            self.bridge.set_use_attn_result(True)  # hook_result, for the bridge-based references
        except NotImplementedError:  # GPT-J's bridge has none; its tests use the Hugging Face model
            pass
        self.weights = loading.weights_from_bridge(self.bridge, unfoldable)
        self.tokenizer = self.bridge.tokenizer


def _share_processed_weights(m: Loaded) -> None:
    """The embedded model's processed weights, the bridge's own conversion, go into the suite's
    disk cache (``SWEEPS_CACHE_DIR``) as ``loading.load_model`` would have put them: the same
    tensors, bit for bit (``tests/runtime/test_model_cache.py`` reads such an entry back). Every
    later load of SmolLM2, in this process or in any the tests start (CLI runs, Ray workers, the
    notebook's kernel), then reads the entry instead of de-quantising its GGUF file and booting
    a bridge once more. (Tiny models are not cached.)"""
    if m.info.kind == "embedded":
        model_cache.cached_weights(loading.cache_source(m.info), lambda: m.weights)


@pytest.fixture(scope="session")
def loaded_model():
    cache: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in cache:
            cache[name] = Loaded(name)
            _share_processed_weights(cache[name])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_gpt2(loaded_model):
    return loaded_model("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama(loaded_model):
    return loaded_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm(loaded_model):
    return loaded_model("smollm2-135m")


@pytest.fixture(scope="session")
def ray_session():
    """One real single-node Ray for the whole session, with two fake GPUs."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
