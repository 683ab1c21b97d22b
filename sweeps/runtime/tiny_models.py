"""Random models built in code, for tests and measurements: no download, the same weights in
every process (seeded), the embedded model's tokenizer (its vocabulary).

- One tiny model of every family the fast path runs, from the family list itself
  (``architectures.FAMILIES``: each family's ``tiny`` config switches its distinctive pieces
  on): ``tiny-gpt2``, ``tiny-pythia``, ``tiny-llama3``, ``tiny-gemma2``, ... Their norm
  weights are moved away from their defaults (a weight of exactly 1, or 0 in Gemma's
  ``1 + w``, would hide a norm that was never folded).
- ``tiny-llama``: SmolLM2's shape in small (grouped-query attention, rotary positions).
- Real shapes with random weights (``random-gpt2-small``, ...), for speed and memory.
- Tiny models of families with no fast path (``tiny-stablelm``, ...), for the bridge path.
"""

from __future__ import annotations

from typing import Any

import torch

from sweeps.core import architectures

EMBEDDED_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_VOCAB = 49152

# Every entry: the Hugging Face config class and its arguments, the hub name the bridge boots
# it as (its adapter and defaults), and whether its norm weights are perturbed.
TINY_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama",
        config="LlamaConfig",
        hub_name=EMBEDDED_HUB_NAME,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        initializer_range=0.1,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "random-gpt2-small": dict(
        model_type="gpt2",
        config="GPT2Config",
        hub_name="gpt2",
        n_layer=12,
        n_head=12,
        n_embd=768,
        n_positions=1024,
        initializer_range=0.02,
    ),
    # Real shapes with random weights, for the benchmarks of the newer families.
    "random-gemma3-270m": dict(
        model_type="gemma3_text",
        config="Gemma3TextConfig",
        hub_name="google/gemma-3-270m",
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_size=640,
        intermediate_size=2048,
        vocab_size=262144,
        sliding_window=512,
        query_pre_attn_scalar=256,
        max_position_embeddings=32768,
        initializer_range=0.02,
    ),
    "random-qwen2.5-0.5b": dict(
        model_type="qwen2",
        config="Qwen2Config",
        hub_name="Qwen/Qwen2.5-0.5B",
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_size=896,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
        initializer_range=0.02,
        tie_word_embeddings=True,
    ),
    "random-llama3.2-1b": dict(
        model_type="llama",
        config="LlamaConfig",
        hub_name="meta-llama/Llama-3.2-1B",
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_size=2048,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        initializer_range=0.02,
        tie_word_embeddings=True,
    ),
    # Families with no fast path, run through the bridge path (tests).
    "tiny-stablelm": dict(
        model_type="stablelm",
        config="StableLmConfig",
        hub_name="stabilityai/stablelm-2-1_6b",
        perturb_norms=True,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        initializer_range=0.1,
    ),
    "tiny-falcon": dict(
        model_type="falcon",
        config="FalconConfig",
        hub_name="tiiuae/falcon-7b",
        perturb_norms=True,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_size=64,
        new_decoder_architecture=False,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
        initializer_range=0.1,
    ),
    "tiny-cohere": dict(
        model_type="cohere",
        config="CohereConfig",
        hub_name="CohereForAI/c4ai-command-r-v01",
        perturb_norms=True,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        initializer_range=0.1,
    ),
    "tiny-mixtral": dict(
        model_type="mixtral",
        config="MixtralConfig",
        hub_name="mistralai/Mixtral-8x7B-v0.1",
        perturb_norms=True,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=64,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        initializer_range=0.1,
    ),
}
# One tiny random model of every family the fast path runs, from the family list.
FAMILY_TINY_MODELS = tuple(f.tiny_name for f in architectures.FAMILIES)
TINY_MODELS = {
    **{
        f.tiny_name: dict(model_type=f.model_types[0], hub_name=f.examples[0], perturb_norms=True, **f.tiny)
        for f in architectures.FAMILIES
    },
    **TINY_MODELS,
}


def hf_config(name: str):
    """The Hugging Face config of tiny model ``name`` (the embedded vocabulary unless it sets one)."""
    import transformers

    spec = dict(TINY_MODELS[name])
    for key in ("model_type", "hub_name", "perturb_norms"):
        spec.pop(key, None)
    config_class = getattr(transformers, spec.pop("config"))
    common = dict(vocab_size=EMBEDDED_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = config_class(**{**common, **spec})
    # The bridge picks its adapter from ``architectures``; a config built in code has none.
    cfg.architectures = [transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]
    return cfg


def build(name: str):
    """Tiny model ``name`` as a Hugging Face model in eval mode: the same weights in every process
    (seed 0, the caller's random state left as it was)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
        if TINY_MODELS[name].get("perturb_norms"):
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if ("norm" in param_name or ".ln" in param_name) and param_name.endswith("weight"):
                        param.add_(0.3 * torch.randn_like(param))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
