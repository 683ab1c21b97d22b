"""A model's sizes (``footprint.ModelShape``) from its configuration alone, for ``plan``.

Reads a ``config.json`` (a file, a model directory's, or a hub model's from Hugging Face's
cache or the hub), the embedded GGUF file's header, or a tiny model's configuration, and never
any weights. Field names differ between families (GPT-2's ``n_embd``, Llama's
``hidden_size``); transformers' own config classes map them, so the names read here are the
common ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sweeps.core import architectures
from sweeps.core.footprint import ModelShape
from sweeps.runtime import models, tiny_models

# Families whose MLP is one up-projection and an activation (no gate)
UNGATED = {"gpt2", "gpt_neox", "gptj"}


class ShapeError(ValueError):
    """A configuration that does not describe a decoder this project can plan for."""


def config_of(name: str) -> tuple[dict[str, Any], str]:
    """(the Hugging Face config dict, where it came from) of a model name, a model directory
    or a ``config.json`` file."""
    path = Path(name)
    if name.endswith(".json"):
        try:
            return json.loads(path.read_text()), name
        except FileNotFoundError:
            raise ShapeError(f"{name}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShapeError(f"cannot read {name}: {err}") from None
    if name == models.DEFAULT_MODEL:
        import gguf

        file = models.embedded_dir() / models.EMBEDDED_GGUF
        fields = gguf.GGUFReader(str(file)).fields
        value = lambda key: int(fields[f"llama.{key}"].contents())  # noqa: E731
        return {
            "model_type": "llama",
            "num_hidden_layers": value("block_count"),
            "hidden_size": value("embedding_length"),
            "intermediate_size": value("feed_forward_length"),
            "num_attention_heads": value("attention.head_count"),
            "num_key_value_heads": value("attention.head_count_kv"),
            "max_position_embeddings": value("context_length"),
            "vocab_size": len(fields["tokenizer.ggml.tokens"].data),
        }, str(file)
    if name in tiny_models.TINY_MODELS:
        return tiny_models.hf_config(name).to_dict(), name
    if path.is_dir():
        return config_of(str(path / "config.json"))
    info = models.describe_model(name)  # a hub name: its config from the cache or the hub, or one line
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(info.source).to_dict(), info.source


def shape_of(cfg: dict[str, Any], where: str) -> ModelShape:
    """The sizes a config describes; a ``ShapeError`` for one that is not a decoder's."""
    from transformers import AutoConfig

    model_type = cfg.get("model_type")
    if not model_type:
        raise ShapeError(f"{where}: not a Hugging Face model config (no model_type)")
    try:
        models.check_decoder_config(cfg, where)
    except models.ModelNameError as err:
        raise ShapeError(str(err)) from None
    try:
        c = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"})
    except ValueError as err:
        raise ShapeError(f"{where}: {str(err).splitlines()[0]}") from None
    text = getattr(c, "text_config", None)  # multimodal wrappers (Gemma 3) hold the decoder's here
    if text is not None and getattr(c, "num_hidden_layers", None) is None:
        c = text
    try:
        L, D, H = int(c.num_hidden_layers), int(c.hidden_size), int(c.num_attention_heads)
    except (AttributeError, TypeError, ValueError):
        raise ShapeError(
            f"{where}: {model_type!r} is not a decoder this can plan for (no layers, width, heads)"
        ) from None
    if getattr(c, "is_encoder_decoder", False):
        raise ShapeError(f"{where}: {model_type!r} is an encoder-decoder, not a causal language model")
    family = architectures.BY_MODEL_TYPE.get(model_type)
    pieces = family.pieces if family is not None else frozenset()
    K = int(getattr(c, "num_key_value_heads", None) or H)
    E = int(getattr(c, "head_dim", None) or D // H)
    M = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * D)
    n_ctx = int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048)
    return ModelShape(
        n_layers=L,
        d_model=D,
        n_heads=H,
        n_kv_heads=K,
        d_head=E,
        d_mlp=M,
        d_vocab=int(c.vocab_size),
        n_ctx=n_ctx,
        gated_mlp=model_type not in UNGATED,
        learned_positions=model_type == "gpt2",
        parallel="parallel" in pieces,
        post_norm="post_norm" in pieces,
        qk_norm=("all" if model_type == "olmo2" else "head") if "qk_norm" in pieces else "none",
        final_softcap=bool(getattr(c, "final_logit_softcapping", None)),
        family=family.name if family is not None else f"{model_type} (bridge path; a dense MLP assumed)",
    )


def model_shape(name: str) -> ModelShape:
    return shape_of(*config_of(name))
