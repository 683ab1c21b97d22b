"""Every model family the sweeps' own forward runs, in one place.

A family is a list of the pieces its blocks have (``Family.pieces``). The
forward (``transformer.py``) implements each piece once:

- ``pre_norm``: each sublayer reads ``norm(resid)`` (all but OLMo 2, whose
  sublayers read the raw stream);
- ``post_norm``: each sublayer writes ``norm(out)`` (Gemma 2/3, OLMo 2). A head's
  write is then its share ``(z_h W_O[h]) / rms(y) ⊙ w`` of the layer's output ``y``,
  with that run's own ``rms(y)``: ablating one head changes the writes of the other
  heads of its layer;
- ``qk_norm``: an RMSNorm of q and k before rotary, per head (Qwen 3, Gemma 3) or
  over all heads at once (OLMo 2);
- ``softcap``: attention scores and final logits ``c·tanh(x/c)`` (Gemma 2); direct
  effects are defined on the logits before the cap;
- ``windows``: per-layer sliding windows (Mistral, Gemma 2/3, Qwen 2 where enabled);
  a prompt longer than a window is computed exactly, with the window's mask;
- ``rotary_tables``: a rotary table per layer type (Gemma 3: local and global bases);
- ``embed_scale``: the embedding times ``sqrt(d_model)`` (Gemma);
- ``parallel``: attention and MLP read the same input (GPT-NeoX/Pythia, GPT-J);
- ``interleaved_rotary``: GPT-J rotates adjacent pairs, not halves.

What a loaded model has is read from the model itself (``read_spec``): norms are
found as modules of the bridge's blocks and their effective weights measured by
running them on a vector of ones (so ``1 + w`` norms need no special case),
windows and rotary tables come from each attention module and the rotary module.
The family's list is then checked against it: a piece the family has and the
model lacks is an error (never a silent zero), and so is a piece the model has
that its family does not list (the forward would ignore it).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

PIECES = (
    "pre_norm",
    "post_norm",
    "qk_norm",
    "softcap",
    "windows",
    "rotary_tables",
    "embed_scale",
    "parallel",
    "interleaved_rotary",
    "rotary",
)


@dataclass(frozen=True)
class Family:
    name: str  # as users say it
    model_types: tuple[str, ...]  # Hugging Face ``config.model_type`` values
    examples: tuple[str, ...]  # hub names
    pieces: frozenset[str]  # see the module docstring
    optional: frozenset[str] = frozenset()  # pieces some checkpoints of the family have (Qwen 2's windows)
    prepend_bos: bool = True  # the family's BOS rule: Qwen prepends none, Gemma needs one
    tiny_name: str = ""  # the name of its tiny random test model (``--model tiny-gemma2``)
    tiny: dict[str, Any] = field(default_factory=dict)  # that model's config class and kwargs


def _f(name, model_types, examples, pieces, optional=(), tiny_name="", prepend_bos=True, **tiny) -> Family:
    tiny_name = tiny_name or f"tiny-{model_types[0].replace('_text', '')}"
    return Family(
        name, tuple(model_types), tuple(examples), frozenset(pieces), frozenset(optional), prepend_bos, tiny_name, tiny
    )


# Tiny random models switch each family's distinctive pieces on: windows shorter than
# the test prompts, caps, QK-norm, post-norms (their weights are randomised by the tests).
_SMALL = dict(
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=512,
    initializer_range=0.1,
)

FAMILIES: tuple[Family, ...] = (
    _f(
        "GPT-2",
        ["gpt2"],
        ["gpt2", "gpt2-medium"],
        {"pre_norm"},
        config="GPT2Config",
        n_layer=3,
        n_head=4,
        n_embd=64,
        n_positions=512,
        initializer_range=0.1,
    ),
    _f(
        "GPT-NeoX / Pythia",
        ["gpt_neox"],
        ["EleutherAI/pythia-160m", "EleutherAI/pythia-410m"],
        {"pre_norm", "rotary", "parallel"},
        tiny_name="tiny-pythia",
        config="GPTNeoXConfig",
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_size=64,
        intermediate_size=256,
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=512,
        initializer_range=0.1,
    ),
    _f(
        "GPT-J",
        ["gptj"],
        ["EleutherAI/gpt-j-6b"],
        {"pre_norm", "rotary", "parallel", "interleaved_rotary"},
        config="GPTJConfig",
        n_layer=3,
        n_head=4,
        n_embd=64,
        rotary_dim=8,
        n_positions=512,
        initializer_range=0.1,
    ),
    _f(
        "Llama 1-3",
        ["llama"],
        ["meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M"],
        {"pre_norm", "rotary"},
        tiny_name="tiny-llama3",
        config="LlamaConfig",
        **_SMALL,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    _f(
        "Mistral",
        ["mistral"],
        ["mistralai/Mistral-7B-v0.1"],
        {"pre_norm", "rotary"},
        {"windows"},  # v0.3: no window
        config="MistralConfig",
        **_SMALL,
        sliding_window=4,
    ),
    _f(
        "Qwen 2 / 2.5",
        ["qwen2"],
        ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2-1.5B"],
        {"pre_norm", "rotary"},
        {"windows"},
        prepend_bos=False,
        config="Qwen2Config",
        **_SMALL,
    ),
    _f(
        "Qwen 3",
        ["qwen3"],
        ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B"],
        {"pre_norm", "rotary", "qk_norm"},
        {"windows"},
        prepend_bos=False,
        config="Qwen3Config",
        **_SMALL,
        head_dim=16,
    ),
    _f(
        "Gemma",
        ["gemma"],
        ["google/gemma-2b"],
        {"pre_norm", "rotary", "embed_scale"},
        config="GemmaConfig",
        **_SMALL,
        head_dim=16,
    ),
    _f(
        "Gemma 2",
        ["gemma2"],
        ["google/gemma-2-2b", "google/gemma-2-9b"],
        {"pre_norm", "post_norm", "rotary", "softcap", "windows", "embed_scale"},
        config="Gemma2Config",
        **_SMALL,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    _f(
        "Gemma 3",
        ["gemma3_text"],
        ["google/gemma-3-270m", "google/gemma-3-1b-pt"],
        {"pre_norm", "post_norm", "rotary", "qk_norm", "windows", "rotary_tables", "embed_scale"},
        config="Gemma3TextConfig",
        **_SMALL,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    _f(
        "OLMo 2",
        ["olmo2"],
        ["allenai/OLMo-2-0425-1B", "allenai/OLMo-2-1124-7B"],
        {"post_norm", "rotary", "qk_norm"},
        config="Olmo2Config",
        **_SMALL,
    ),
    _f(
        "Phi-3",
        ["phi3"],
        ["microsoft/Phi-3-mini-4k-instruct"],
        {"pre_norm", "rotary"},
        {"windows"},
        config="Phi3Config",
        **_SMALL,
    ),
)

BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


class ArchitectureError(ValueError):
    """A model the fast path cannot run, or one that lacks what its family needs."""


def family_of(model_type: str | None, where: str) -> Family:
    """The family of a Hugging Face ``model_type``, or a one-line error with what is supported."""
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    close = difflib.get_close_matches(str(model_type), list(BY_MODEL_TYPE), n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ArchitectureError(
        f"{where}: architecture {model_type!r} is not supported by the fast path yet{hint}; supported: "
        + ", ".join(f.name for f in FAMILIES)
    )


# --------------------------------------------------------------------------- #
# Reading the spec off a loaded model
# --------------------------------------------------------------------------- #


@dataclass
class Unfoldable:
    """What compatibility mode's folding cannot absorb, read before it processes the weights."""

    spec: dict[str, Any]  # ModelConfig fields beyond the bridge config's
    tensors: dict[str, torch.Tensor]  # ln_attn_post, ln_mlp_post, q_norm, k_norm, rotary_inv_freq
    rotary_keys: tuple[str, ...] = ()  # the layer type of each rotary table ("" when one serves all)


def _hf(component) -> torch.nn.Module:
    module = getattr(component, "original_component", None)
    return module if module is not None else component


def _eps(module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ArchitectureError(f"cannot find the epsilon of norm module {type(module).__name__}")


@torch.no_grad()
def norm_weight(module: torch.nn.Module, width: int) -> torch.Tensor:
    """The effective elementwise weight of an RMSNorm module (``1 + w`` for Gemma's):
    its output on a vector of ones, whose rms is 1, times ``sqrt(1 + eps)``."""
    param = next(module.parameters(), None)
    ones = torch.ones(
        1,
        width,
        dtype=param.dtype if param is not None else torch.float32,
        device=param.device if param is not None else "cpu",
    )
    out = module(ones)[0].float()
    return (out * math.sqrt(1.0 + _eps(module))).cpu()


def _rotary(hf_model, family: Family, layer_types: list[str] | None, n_layers: int):
    """(inv_freq [n_tables, E/2], table index per layer, each table's layer type): one table
    per layer type where the rotary module keeps one per type (Gemma 3), sorted by type, else
    one for every layer (type "")."""
    if "interleaved_rotary" in family.pieces:  # GPT-J keeps sin/cos tables, no inv_freq
        tables = [
            m.embed_positions
            for m in hf_model.modules()
            if isinstance(getattr(m, "embed_positions", None), torch.Tensor)
        ]
        if not tables:
            raise ArchitectureError(f"{family.name}: no rotary sin/cos table (embed_positions) in the model")
        sincos = tables[0][1].float()  # position 1: [sin(inv_freq), cos(inv_freq)]
        half = sincos.shape[-1] // 2
        return torch.atan2(sincos[:half], sincos[half:])[None].cpu(), [0] * n_layers, ("",)
    modules = [m for m in hf_model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(modules) != 1:
        raise ArchitectureError(f"{family.name}: expected one rotary module, found {len(modules)}")
    rot = modules[0]
    typed = sorted({t for t in (layer_types or []) if isinstance(getattr(rot, f"{t}_inv_freq", None), torch.Tensor)})
    if typed:
        names = [f"{t}_inv_freq" for t in typed]
        scaling = [getattr(rot, f"{t}_attention_scaling", 1.0) for t in typed]
        index = [typed.index(t) for t in layer_types or []]
    else:
        if not isinstance(getattr(rot, "inv_freq", None), torch.Tensor):
            raise ArchitectureError(f"{family.name}: the rotary module has no inv_freq")
        typed, names, scaling, index = [""], ["inv_freq"], [getattr(rot, "attention_scaling", 1.0)], [0] * n_layers
    if any(s not in (None, 1.0) for s in scaling):
        raise ArchitectureError(
            f"{family.name}: rotary embeddings with attention scaling (YaRN, long-rope) are not supported yet"
        )
    return torch.stack([getattr(rot, n).detach().float().cpu() for n in names]), index, tuple(typed)


# Pieces a model may have in some layers only: a one-layer model of one of its blocks
# (``layerwise``) is checked for them once its layers are put together (``check_layer_pieces``).
LAYER_PIECES = frozenset({"windows", "rotary_tables"})


def check_pieces(family: Family, found: set[str], ignore: frozenset[str] = frozenset()) -> None:
    """The family's list against what the model has: a piece the family needs and the model
    lacks, or one the model has and the family does not list, is an error."""
    missing = family.pieces - found - ignore
    if missing:
        raise ArchitectureError(f"{family.name}: the model lacks what the family needs: {', '.join(sorted(missing))}")
    extra = found - family.pieces - family.optional - ignore
    if extra:
        raise ArchitectureError(
            f"{family.name}: the model has pieces its family does not list ({', '.join(sorted(extra))}); "
            "the fast path would ignore them"
        )


def check_layer_pieces(model_type: str, windows: tuple[int, ...], n_tables: int) -> None:
    """``check_pieces`` for the pieces of ``LAYER_PIECES``, once every layer's are known."""
    family = family_of(model_type, "model")
    found = {piece for piece, has in (("windows", any(windows)), ("rotary_tables", n_tables > 1)) if has}
    check_pieces(family, found | (family.pieces - LAYER_PIECES))


def read_spec(bridge, one_layer: bool = False) -> Unfoldable:
    """Read the architecture's pieces off a booted bridge, **before** compatibility mode
    processes its weights (the pieces read here are exactly those it cannot fold).
    ``one_layer``: the bridge is of one block of a larger model (``layerwise``), whose
    per-layer pieces (``LAYER_PIECES``) are checked when its layers are put together."""
    hf = bridge.original_model
    hf_cfg = hf.config
    family = family_of(getattr(hf_cfg, "model_type", None), "model")
    c = bridge.cfg
    L, D = c.n_layers, c.d_model
    blocks = list(bridge.blocks)
    found: set[str] = set()
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, Any] = {"family": family.model_types[0]}
    rotary_keys: tuple[str, ...] = ()

    # Norms around the sublayers, found as modules of the bridge's blocks.
    has = lambda name: [hasattr(b, name) for b in blocks]  # noqa: E731
    if all(has("ln1")):
        found.add("pre_norm")
    elif any(has("ln1")):
        raise ArchitectureError(f"{family.name}: some blocks have a pre-attention norm and some do not")
    if all(has("ln1_post")) and all(has("ln2_post")):
        found.add("post_norm")
        tensors["ln_attn_post"] = torch.stack([norm_weight(_hf(b.ln1_post), D) for b in blocks])
        tensors["ln_mlp_post"] = torch.stack([norm_weight(_hf(b.ln2_post), D) for b in blocks])
    elif any(has("ln1_post")) or any(has("ln2_post")):
        raise ArchitectureError(f"{family.name}: post-norms on only some sublayers are not supported")
    attns = [b.attn for b in blocks]
    if all(hasattr(a, "q_norm") for a in attns):
        found.add("qk_norm")
        widths = [p.numel() for p in _hf(attns[0].q_norm).parameters()]
        if not widths:
            raise ArchitectureError(f"{family.name}: the QK-norm has no weight")
        n_kv = getattr(c, "n_key_value_heads", None) or c.n_heads
        per_head = widths[0] == c.d_head
        spec["qk_norm"] = "head" if per_head else "all"
        q_w, k_w = (c.d_head, c.d_head) if per_head else (c.n_heads * c.d_head, n_kv * c.d_head)
        tensors["q_norm"] = torch.stack([norm_weight(_hf(a.q_norm), q_w) for a in attns])
        tensors["k_norm"] = torch.stack([norm_weight(_hf(a.k_norm), k_w) for a in attns])

    # Attention: scale, soft-cap and window of each layer, from the Hugging Face modules.
    hf_attns = [_hf(a) for a in attns]
    scales = {float(getattr(a, "scaling", c.d_head**-0.5)) for a in hf_attns}
    if len(scales) > 1:
        raise ArchitectureError(f"{family.name}: a different attention scale in each layer is not supported")
    spec["attn_scale"] = scales.pop()
    attn_cap = getattr(hf_cfg, "attn_logit_softcapping", None) or 0.0
    final_cap = getattr(hf_cfg, "final_logit_softcapping", None) or 0.0
    if attn_cap or final_cap:
        found.add("softcap")
    spec["attn_softcap"], spec["final_softcap"] = float(attn_cap), float(final_cap)
    layer_types = getattr(hf_cfg, "layer_types", None)
    sliding = getattr(hf_cfg, "sliding_window", None) or 0
    if layer_types is not None:
        windows = [int(sliding) if t == "sliding_attention" else 0 for t in layer_types]
    else:  # Mistral and Phi-3 configs: one window for every layer, or none
        windows = [int(sliding)] * L
    if any(windows):
        found.add("windows")
    spec["windows"] = tuple(windows)

    # Positions and embedding.
    if c.positional_embedding_type == "rotary":
        found.add("rotary")
        inv_freq, index, rotary_keys = _rotary(hf, family, layer_types, L)
        tensors["rotary_inv_freq"] = inv_freq
        spec["rotary_layer"] = tuple(index)
        if inv_freq.shape[0] > 1:
            found.add("rotary_tables")
    elif c.positional_embedding_type != "standard":
        raise ArchitectureError(f"{family.name}: positional embedding {c.positional_embedding_type!r} is not supported")
    if "interleaved_rotary" in family.pieces:
        found.add("interleaved_rotary")
        spec["rotary_style"] = "interleaved"
    embed_scale = float(getattr(_hf(bridge.embed), "scalar_embed_scale", 1.0) or 1.0)
    if embed_scale != 1.0:
        found.add("embed_scale")
    spec["embed_scale"] = embed_scale
    if getattr(c, "parallel_attn_mlp", False):
        found.add("parallel")
    spec["prepend_bos"] = family.prepend_bos

    spec["pre_norm"] = "pre_norm" in found
    spec["post_norm"] = "post_norm" in found
    check_pieces(family, found, LAYER_PIECES if one_layer else frozenset())
    return Unfoldable(spec, tensors, rotary_keys)


@torch.no_grad()
def finish_unembedding(bridge, W_U: torch.Tensor, b_U: torch.Tensor):
    """(W_U, b_U, W_U_mean, b_U_mean): the processed unembedding with the final norm folded
    in and centred over the vocabulary, and the means centring removed.

    Compatibility mode folds the final RMSNorm into ``W_U`` for most families but not all
    (OLMo 2 keeps it live), and centres ``W_U`` only for models without a final soft-cap
    (Gemma 2's stays uncentred). What it left is measured, not assumed: the final norm's
    remaining weight is read off its module after processing, and the vocabulary mean is
    removed here whether or not it was before (removing a zero mean changes nothing)."""
    if bridge.cfg.normalization_type in ("RMS", "RMSPre"):
        module = _hf(bridge.ln_final)
        if next(module.parameters(), None) is not None:
            W_U = W_U * norm_weight(module, W_U.shape[0]).to(W_U)[:, None]
    W_U_mean, b_U_mean = W_U.mean(1), b_U.mean()
    return W_U - W_U_mean[:, None], b_U - b_U_mean, W_U_mean, b_U_mean


@torch.no_grad()
def check_folded(bridge) -> None:
    """Every RMS pre-norm must have been folded into the matrices after it (our forward's
    norms are weight-free): a module left with a weight is an error, not a silent change."""
    if bridge.cfg.normalization_type not in ("RMS", "RMSPre"):
        return
    for i, block in enumerate(bridge.blocks):
        for name in ("ln1", "ln2"):
            if hasattr(block, name):
                module = _hf(getattr(block, name))
                if next(module.parameters(), None) is None:
                    continue
                weight = norm_weight(module, bridge.cfg.d_model)
                if not torch.allclose(weight, torch.ones_like(weight), atol=1e-5):
                    raise ArchitectureError(f"block {i}: the {name} norm was not folded by compatibility mode")
