"""A safetensors checkpoint processed a layer at a time gives exactly the weights TransformerLens's
processing of the whole model gives, on every family; a checkpoint that does not fit its
config is one line naming the tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sweeps.core.architectures import ArchitectureError
from sweeps.runtime import layerwise, loading, models, tiny_models

FAMILIES = list(tiny_models.FAMILY_TINY_MODELS)


def _save(name: str, directory, dtype=torch.float32, shard="100KB") -> models.ModelInfo:
    """Tiny model ``name`` saved as a sharded safetensors checkpoint (an index and several files)."""
    hf, tokenizer, _ = loading.load_hf_model(models.describe_model(name))
    hf.to(dtype).save_pretrained(directory, max_shard_size=shard)
    tokenizer.save_pretrained(directory)
    return models.describe_model(str(directory))


def _assert_same(a, b) -> None:
    assert a.cfg == b.cfg
    for name, value in vars(a).items():
        if name == "cfg":
            continue
        other = getattr(b, name)
        assert (value is None) == (other is None), name
        if value is not None:
            assert value.dtype == other.dtype and torch.equal(value, other), name


@pytest.fixture
def no_whole_load(monkeypatch):
    """The load under test must go layer by layer: the whole-model load is refused."""
    whole = loading.whole_weights

    def refuse(info):
        pytest.fail("the layer-by-layer load fell back to the whole model")

    monkeypatch.setattr(loading, "whole_weights", refuse)
    return whole


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_by_layer_equals_the_whole_model_on_every_family(name, tmp_path, no_whole_load):
    info = _save(name, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()  # sharded: the index is read
    expected = no_whole_load(info)
    got = loading.source_of(info).weights(info)
    _assert_same(got, expected)
    assert got.cfg.n_layers == 3 and not torch.equal(got.W_Q[1], got.W_Q[2])  # each layer its own


@pytest.mark.slow
def test_a_bfloat16_checkpoint_is_processed_in_float32_as_the_whole_model_is(tmp_path, no_whole_load):
    info = _save("tiny-gemma2", tmp_path / "model", dtype=torch.bfloat16, shard="10GB")
    assert not (tmp_path / "model" / "model.safetensors.index.json").exists()  # one file, no index
    got = loading.source_of(info).weights(info)
    assert got.W_Q.dtype == torch.float32
    _assert_same(got, no_whole_load(info))


def test_the_tensor_names_are_split_by_block():
    layers, ends = layerwise.split_by_layer(
        ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.11.self_attn.q_proj.bias",
         "transformer.h.2.attn.c_attn.weight", "gpt_neox.layers.3.attention.dense.weight", "lm_head.weight",
         "model.norm.weight"]
    )
    assert ends == ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    assert layers == {
        0: {"model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight"},
        11: {"model.layers.0.self_attn.q_proj.bias": "model.layers.11.self_attn.q_proj.bias"},
        2: {"transformer.h.0.attn.c_attn.weight": "transformer.h.2.attn.c_attn.weight"},
        3: {"gpt_neox.layers.0.attention.dense.weight": "gpt_neox.layers.3.attention.dense.weight"},
    }


def test_a_checkpoint_missing_a_tensor_is_one_line_naming_it(tmp_path):
    info = _save("tiny-llama3", tmp_path / "model", shard="10GB")
    path = tmp_path / "model" / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ArchitectureError, match=r"\(layer 1\): the checkpoint has no tensor for .*mlp\.up_proj"):
        loading.source_of(info).weights(info)


@pytest.mark.slow
def test_a_checkpoint_whose_blocks_do_not_match_its_config_is_refused(tmp_path):
    info = _save("tiny-llama3", tmp_path / "model", shard="10GB")
    path = tmp_path / "model" / "model.safetensors"
    state = load_file(str(path))
    state = {k: v for k, v in state.items() if ".layers.2." not in k}
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ArchitectureError, match="do not match its config's 3 layers"):
        loading.source_of(info).weights(info)
