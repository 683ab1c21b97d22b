"""Our forward (sweeps.engine.transformer) against the TransformerLens bridge's."""

import pytest
import torch

from sweeps.engine import transformer as tf

PROMPTS = [
    "When John and Mary went to the shops, John gave the bag to",
    "Hello world, this is",  # shorter: right padding
]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-pythia", "smollm2-135m"])
def test_forward_matches_bridge(loaded_model, name):
    m = loaded_model(name)
    tokens = m.bridge.to_tokens(PROMPTS)
    logits, cache = m.bridge.run_with_cache(tokens)
    run = tf.run(m.weights, tokens)
    scale = logits.abs().max()
    torch.testing.assert_close(tf.unembed(m.weights, run.resid_final), logits, atol=2e-5 * scale, rtol=0)
    for layer in (0, m.weights.cfg.n_layers - 1):
        torch.testing.assert_close(run.z[layer], cache[f"blocks.{layer}.attn.hook_z"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            run.resid_pre[layer], cache[f"blocks.{layer}.hook_resid_pre"], atol=1e-3, rtol=1e-4
        )
    torch.testing.assert_close(
        tf.norm_scale(m.weights.cfg, run.resid_final), cache["ln_final.hook_scale"], atol=1e-4, rtol=1e-4
    )


def test_restart_from_a_layer_equals_full_forward(tiny_llama):
    """Replaying blocks k..L-1 from the recorded input of block k gives the full forward."""
    w = tiny_llama.weights
    tokens = tiny_llama.bridge.to_tokens(PROMPTS)
    run = tf.run(w, tokens)
    rope = tf.rotary_tables(w, tokens.shape[1])
    resid = run.resid_pre[1]
    for layer in range(1, w.cfg.n_layers):
        resid = tf.block(w, layer, resid, rope).resid_post
    torch.testing.assert_close(resid, run.resid_final)


def test_bos_and_right_padding_match_bridge_tokens(smollm):
    from tasks.base import encode, pad_id, pad_right

    ours = pad_right([encode(smollm.tokenizer, p) for p in PROMPTS], pad_id(smollm.tokenizer))
    assert torch.equal(ours, smollm.bridge.to_tokens(PROMPTS))
