"""Model names resolve without loading weights; a local Hugging Face directory loads."""

import pytest
import torch

from sweeps.core import transformer as tf
from sweeps.runtime import models


def test_describe_reads_shapes_without_weights(monkeypatch):
    monkeypatch.setattr(models, "load_hf_model", lambda *a, **k: pytest.fail("weights loaded"))
    info = models.describe_model("smollm2-135m")
    assert (info.n_layers, info.n_heads) == (30, 9)
    assert models.describe_model("tiny-llama").n_heads == 4
    with pytest.raises(models.ModelNameError, match="Did you mean"):
        models.describe_model("smolm2-135m")


def test_local_hugging_face_directory(tmp_path, tiny_gpt2):
    hf_model, tokenizer, _ = models.load_hf_model(tiny_gpt2.info)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    info = models.describe_model(str(tmp_path))
    assert info.kind == "local" and (info.n_layers, info.n_heads) == (3, 4)
    loaded = models.load_model(info)
    tokens = tiny_gpt2.bridge.to_tokens(["The cat sat on the mat"])
    ours = tf.unembed(loaded.weights, tf.run(loaded.weights, tokens).resid_final)
    torch.testing.assert_close(ours, tiny_gpt2.bridge(tokens), atol=1e-4, rtol=1e-4)
    assert loaded.weight_hash == models.weight_hash(tiny_gpt2.weights)
