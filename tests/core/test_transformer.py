"""Our forward (sweeps.core.transformer) against the TransformerLens bridge's."""

import pytest
import torch

from sweeps.core import transformer as tf

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
    torch.testing.assert_close(tf.forward(w, run.resid_pre[1], 1).resid_final, run.resid_final)
    torch.testing.assert_close(tf.run_blocks(w, 2, run.resid_pre[2], None), run.resid_final)


def test_forward_records_only_what_it_is_asked_for(tiny_llama):
    w = tiny_llama.weights
    tokens = tiny_llama.bridge.to_tokens(PROMPTS)
    trace = tf.forward(w, tf.embed(w, tokens), 1, record=("z", "mlp_out"))
    assert len(trace.z) == len(trace.mlp_out) == w.cfg.n_layers - 1
    assert trace.q == trace.resid_pre == []
    with pytest.raises(ValueError, match="cannot record"):
        tf.forward(w, tf.embed(w, tokens), record=("attn_pattern",))


def test_edits_reject_unknown_sites_and_ambiguous_changes():
    delta = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="unknown intervention site"):
        tf.Edit("hook_z", 0, delta)
    with pytest.raises(ValueError, match="exactly one"):
        tf.Edit("z", 0, delta, replace=lambda z: z)
    with pytest.raises(ValueError, match="additive"):
        tf.Edit("q", 0, head=1, replace=lambda q: q)


@pytest.mark.parametrize("site", ["q", "k", "v"])
def test_a_change_per_head_input_equals_one_edit_per_head(tiny_llama, site):
    """The ``[B T n D]`` form of a q/k/v edit (every head its own change, as edge-level
    circuits need) equals one single-head edit for each head (those are checked against
    hooked path patching in test_attribution), and changes only the heads it is given."""
    torch.manual_seed(0)
    w = tiny_llama.weights
    tokens = tiny_llama.bridge.to_tokens(PROMPTS)
    clean = tf.forward(w, tf.embed(w, tokens), record=("resid_pre", "z"))
    layer = 1
    n = w.cfg.n_heads if site == "q" else w.cfg.n_kv_heads
    delta = torch.randn(*tokens.shape, n, w.cfg.d_model)
    delta[:, :, 0] = 0  # head 0 reads the clean stream
    x = clean.resid_pre[layer]
    every = tf.forward(w, x, layer, [tf.Edit(site, layer, delta)], record=("z",))
    one_by_one = tf.forward(w, x, layer, [tf.Edit(site, layer, delta[:, :, h], head=h) for h in range(n)], record=("z",))
    torch.testing.assert_close(every.resid_final, one_by_one.resid_final)
    torch.testing.assert_close(every.z[0], one_by_one.z[0])
    assert not torch.allclose(every.resid_final, clean.resid_final)
    if site == "q":  # a query head's z depends on its own query only
        torch.testing.assert_close(every.z[0][:, :, 0], clean.z[layer][:, :, 0])


def test_bos_and_right_padding_match_bridge_tokens(smollm):
    from tasks.base import encode, pad_id, pad_right

    ours = pad_right([encode(smollm.tokenizer, p) for p in PROMPTS], pad_id(smollm.tokenizer))
    assert torch.equal(ours, smollm.bridge.to_tokens(PROMPTS))
