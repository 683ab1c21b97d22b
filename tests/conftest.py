"""Shared fixtures: models loaded once per session, one real local Ray per session."""

from __future__ import annotations

import os

import pytest
import torch

from sweeps.engine import models

torch.set_grad_enabled(False)


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
        self.bridge = models.load_bridge(self.info)
        self.bridge.set_use_attn_result(True)
        self.weights = models.weights_from_bridge(self.bridge)
        self.tokenizer = self.bridge.tokenizer


@pytest.fixture(scope="session")
def model_cache():
    cache: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in cache:
            cache[name] = Loaded(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_gpt2(model_cache):
    return model_cache("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama(model_cache):
    return model_cache("tiny-llama")


@pytest.fixture(scope="session")
def smollm(model_cache):
    return model_cache("smollm2-135m")


@pytest.fixture(scope="session")
def ray_session():
    """One real single-node Ray for the whole session, with two fake GPUs."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
