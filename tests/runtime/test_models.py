"""Model names resolve without loading weights; a local Hugging Face directory loads."""

import pytest
import torch

from sweeps.core import transformer as tf
from sweeps.runtime import loading, models


def test_describe_reads_shapes_without_weights(monkeypatch):
    monkeypatch.setattr(loading, "load_hf_model", lambda *a, **k: pytest.fail("weights loaded"))
    info = models.describe_model("smollm2-135m")
    assert (info.n_layers, info.n_heads) == (30, 9)
    assert models.describe_model("tiny-llama").n_heads == 4
    with pytest.raises(models.ModelNameError, match="Did you mean"):
        models.describe_model("smolm2-135m")


def test_local_hugging_face_directory(tmp_path, tiny_gpt2):
    hf_model, tokenizer, _ = loading.load_hf_model(tiny_gpt2.info)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    info = models.describe_model(str(tmp_path))
    assert info.kind == "local" and (info.n_layers, info.n_heads) == (3, 4)
    loaded = loading.load_model(info)
    tokens = tiny_gpt2.bridge.to_tokens(["The cat sat on the mat"])
    ours = tf.unembed(loaded.weights, tf.run(loaded.weights, tokens).resid_final)
    torch.testing.assert_close(ours, tiny_gpt2.bridge(tokens), atol=1e-4, rtol=1e-4)
    assert loaded.weight_hash == loading.weight_hash(tiny_gpt2.weights)


def test_a_config_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    """A TransformerLens checkpoint directory whose config pickle would call os.system: every
    command's input checks read that config, so it must be refused there, naming the file."""
    import os
    import pickle

    from sweeps.runtime.models import ModelNameError, describe_model
    from sweeps.runtime.safe_pickle import UnsafePickle, load_plain

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = tmp_path / "evil"
    model.mkdir()
    (model / "ll_model_cfg.pkl").write_bytes(pickle.dumps({"n_layers": 2, "act_fn": Payload()}))
    torch.save({}, model / "ll_model.pth")
    with pytest.raises(ModelNameError, match=r"ll_model_cfg.pkl refers to (posix|os)\.system, which is not plain data"):
        describe_model(str(model))
    assert not marker.exists()
    # the plain data a TransformerLens config holds still loads, torch dtypes and devices included
    plain = {"n_layers": 2, "dtype": torch.bfloat16, "device": torch.device("cpu"), "d_vocab": None,
             "shape": (1, 2), "names": ["a"], "nested": {"x": 1.5}, "flags": {True}}
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(plain))
    assert load_plain(tmp_path / "cfg.pkl") == plain
    (tmp_path / "eval.pkl").write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")  # protocol 0, by hand
    with pytest.raises(UnsafePickle, match="builtins.eval"):
        load_plain(tmp_path / "eval.pkl")


def test_every_familys_tiny_model_comes_from_the_family_list_with_norms_away_from_defaults():
    """GPT-2 and Pythia included: a norm weight left at exactly 1 (0 in Gemma's 1 + w) would hide
    a norm that was never folded, so every tiny family model moves them."""
    from sweeps.core.architectures import FAMILIES
    from sweeps.runtime import tiny_models

    assert {"tiny-gpt2", "tiny-pythia"} <= set(tiny_models.FAMILY_TINY_MODELS)
    for family in FAMILIES:
        spec = tiny_models.TINY_MODELS[family.tiny_name]
        assert spec["model_type"] == family.model_types[0] and spec["perturb_norms"], family.name
        model = tiny_models.build(family.tiny_name)
        norms = {n: p for n, p in model.named_parameters()
                 if ("norm" in n or ".ln" in n) and n.endswith("weight")}
        assert norms, family.name
        for name, weight in norms.items():
            assert not torch.all(weight == 1) and not torch.all(weight == 0), (family.name, name)
