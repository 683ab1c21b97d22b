"""A small, explicit transformer forward on TransformerLens-processed weights.

Why not just call the TransformerBridge?  The backup sweep re-runs the model
hundreds of times from the *middle*: ablate head (l*, h*), recompute layers
l*..L-1 only, starting from the clean residual stream that entered block l*.
TransformerLens 4.3's ``start_at_layer`` still executes blocks 0..l*-1 (its
docstring says so), so the restart has to be ours.  Owning the forward also
lets us batch several ablations of one layer into one pass and read exactly
the activations we need (head outputs ``z``) without a full activation cache.

The weights come from a bridge in compatibility mode (``models.py``): LayerNorm
and RMSNorm scales are folded into the following matrices and writing weights
are centred, so every normalisation below is weight-free ("LNPre"/"RMSPre").
``tests/test_transformer.py`` checks this forward against the bridge's own.

Shapes: B batch, T positions, H query heads, K key/value heads, D d_model,
E d_head, M d_mlp, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True)
class ModelConfig:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    norm: str  # "layernorm" | "rmsnorm" | "none" (TL-native models without normalisation)
    eps: float
    positional: str  # "learned" | "rotary"
    act_fn: str
    gated_mlp: bool
    attn_only: bool = False
    parallel_attn_mlp: bool = False  # GPT-NeoX/Pythia: the MLP reads the block's input too
    rotary_dim: int = 0  # rotated dimensions of each head (GPT-NeoX rotates only a part)

    @property
    def group_size(self) -> int:
        """How many query heads share one key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads


@dataclass
class ModelWeights:
    """Processed weights, stacked over layers (TransformerLens naming)."""

    cfg: ModelConfig
    W_E: Float[Tensor, "V D"]
    W_pos: Optional[Float[Tensor, "n_ctx D"]]
    W_Q: Float[Tensor, "L H D E"]
    b_Q: Float[Tensor, "L H E"]
    W_K: Float[Tensor, "L K D E"]
    b_K: Float[Tensor, "L K E"]
    W_V: Float[Tensor, "L K D E"]
    b_V: Float[Tensor, "L K E"]
    W_O: Float[Tensor, "L H E D"]
    b_O: Float[Tensor, "L D"]
    W_in: Optional[Float[Tensor, "L D M"]]
    W_gate: Optional[Float[Tensor, "L D M"]]
    b_in: Optional[Float[Tensor, "L M"]]
    W_out: Optional[Float[Tensor, "L M D"]]
    b_out: Optional[Float[Tensor, "L D"]]
    W_U: Float[Tensor, "D V"]
    b_U: Float[Tensor, "V"]
    rotary_inv_freq: Optional[Float[Tensor, "E_half"]]

    def to(self, device: torch.device | str) -> "ModelWeights":
        moved = {
            name: (value.to(device) if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return ModelWeights(**moved)

    @property
    def device(self) -> torch.device:
        return self.W_E.device


# --------------------------------------------------------------------------- #
# Normalisation (weight-free: the weights were folded into the next matrices)
# --------------------------------------------------------------------------- #


def norm_scale(cfg: ModelConfig, x: Float[Tensor, "... D"]) -> Float[Tensor, "... 1"]:
    """The scale a (folded) LayerNorm/RMSNorm divides by: TL's ``hook_scale``."""
    if cfg.norm == "none":
        return torch.ones_like(x[..., :1])
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()


def normalize(cfg: ModelConfig, x: Float[Tensor, "... D"]) -> Float[Tensor, "... D"]:
    if cfg.norm == "none":
        return x
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()


# --------------------------------------------------------------------------- #
# Embedding and rotary position
# --------------------------------------------------------------------------- #


def embed(w: ModelWeights, tokens: Int[Tensor, "B T"]) -> Float[Tensor, "B T D"]:
    """Token embedding plus learned position embedding (if the model has one)."""
    resid = w.W_E[tokens]
    if w.cfg.positional == "learned":
        resid = resid + w.W_pos[: tokens.shape[1]]
    return resid


def rotary_tables(w: ModelWeights, n_pos: int) -> tuple[Tensor, Tensor] | None:
    """cos/sin tables [T, rotary_dim] in Hugging Face's "rotate half" layout."""
    if w.cfg.positional != "rotary":
        return None
    pos = torch.arange(n_pos, device=w.device, dtype=w.rotary_inv_freq.dtype)
    freqs = torch.outer(pos, w.rotary_inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def _apply_rotary(x: Float[Tensor, "B T N E"], rope: tuple[Tensor, Tensor]) -> Float[Tensor, "B T N E"]:
    """Rotate the first ``rotary_dim`` dimensions of each head; pass the rest through."""
    cos, sin = (t[: x.shape[1], None, :] for t in rope)
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


# --------------------------------------------------------------------------- #
# One transformer block, in pieces
# --------------------------------------------------------------------------- #

ZEdit = Callable[[Float[Tensor, "B T H E"]], Float[Tensor, "B T H E"]]


def attention_z(
    w: ModelWeights, layer: int, resid: Float[Tensor, "B T D"], rope: tuple[Tensor, Tensor] | None
) -> Float[Tensor, "B T H E"]:
    """Every head's mixed values ``z`` (TL's ``hook_z``), before ``W_O``.

    Padding is on the right and attention is causal, so a real token never
    attends to padding: no padding mask is needed for real positions.
    """
    cfg = w.cfg
    x = normalize(cfg, resid)
    q = torch.einsum("btd,hde->bthe", x, w.W_Q[layer]) + w.b_Q[layer]
    k = torch.einsum("btd,kde->btke", x, w.W_K[layer]) + w.b_K[layer]
    v = torch.einsum("btd,kde->btke", x, w.W_V[layer]) + w.b_V[layer]
    if rope is not None:
        q, k = _apply_rotary(q, rope), _apply_rotary(k, rope)
    # Grouped-query attention: query head h reads key/value head h // group_size.
    k = k.repeat_interleave(cfg.group_size, dim=2)
    v = v.repeat_interleave(cfg.group_size, dim=2)
    # [B, H, T, T] scores; F.sdpa picks a fused kernel where one exists.
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return z.transpose(1, 2)


def attention_out(w: ModelWeights, layer: int, z: Float[Tensor, "B T H E"]) -> Float[Tensor, "B T D"]:
    """Sum of the heads' writes ``z @ W_O`` plus the layer's output bias."""
    return torch.einsum("bthe,hed->btd", z, w.W_O[layer]) + w.b_O[layer]


def _activation(name: str, x: Tensor) -> Tensor:
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise NotImplementedError(f"activation function {name!r} is not supported")


def mlp_out(w: ModelWeights, layer: int, resid_mid: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
    return mlp_from_normalized(w, layer, normalize(w.cfg, resid_mid))


def mlp_from_normalized(w: ModelWeights, layer: int, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
    """The MLP on its already normalised input (attribution differentiates at that input)."""
    cfg = w.cfg
    pre = x @ w.W_in[layer] + w.b_in[layer]
    if cfg.gated_mlp:
        post = _activation(cfg.act_fn, x @ w.W_gate[layer]) * pre
    else:
        post = _activation(cfg.act_fn, pre)
    return post @ w.W_out[layer] + w.b_out[layer]


@dataclass
class BlockOutput:
    resid_post: Float[Tensor, "B T D"]
    z: Float[Tensor, "B T H E"]
    mlp_out: Optional[Float[Tensor, "B T D"]]


def block(
    w: ModelWeights,
    layer: int,
    resid_pre: Float[Tensor, "B T D"],
    rope: tuple[Tensor, Tensor] | None,
    edit_z: ZEdit | None = None,
) -> BlockOutput:
    """One pre-norm block: ``resid += attn(norm(resid)); resid += mlp(norm(resid))``.

    With parallel attention and MLP (GPT-NeoX) both read the block's input.
    ``edit_z`` may replace head outputs (an ablation) before they are written.
    """
    z = attention_z(w, layer, resid_pre, rope)
    if edit_z is not None:
        z = edit_z(z)
    resid_mid = resid_pre + attention_out(w, layer, z)
    if w.cfg.attn_only:
        return BlockOutput(resid_mid, z, None)
    out = mlp_out(w, layer, resid_pre if w.cfg.parallel_attn_mlp else resid_mid)
    return BlockOutput(resid_mid + out, z, out)


def finish_block(
    w: ModelWeights,
    layer: int,
    resid_mid: Float[Tensor, "B T D"],
    rope: tuple[Tensor, Tensor] | None,
) -> Float[Tensor, "B T D"]:
    """From block ``layer``'s residual after attention (``resid_mid``) to the final residual.

    Runs the rest of block ``layer`` (its MLP) and every later block. Not for
    parallel attention/MLP models, whose MLP reads the block's input instead.
    """
    if w.cfg.parallel_attn_mlp:
        raise ValueError("finish_block: in a parallel attention/MLP block the MLP reads resid_pre")
    resid = resid_mid if w.cfg.attn_only else resid_mid + mlp_out(w, layer, resid_mid)
    return run_blocks(w, layer + 1, resid, rope)


def run_blocks(
    w: ModelWeights, start: int, resid: Float[Tensor, "B T D"], rope: tuple[Tensor, Tensor] | None
) -> Float[Tensor, "B T D"]:
    """Blocks ``start..L-1`` from the residual stream entering block ``start``."""
    for layer in range(start, w.cfg.n_layers):
        resid = block(w, layer, resid, rope).resid_post
    return resid


def unembed(w: ModelWeights, resid_final: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
    """Logits, the bias added inside the product: a separate ``+ b_U`` is one more pass over
    a tensor of B·T·V numbers (400 MB for 32 × 64 tokens of a 49k vocabulary)."""
    x = normalize(w.cfg, resid_final)
    return torch.addmm(w.b_U, x.reshape(-1, x.shape[-1]), w.W_U).view(*x.shape[:-1], -1)


@dataclass
class CleanRun:
    """What a full forward records for later restarts and direct effects."""

    resid_pre: Float[Tensor, "L B T D"]  # input of every block
    z: Float[Tensor, "L B T H E"]
    mlp_out: Optional[Float[Tensor, "L B T D"]]
    resid_final: Float[Tensor, "B T D"]


def run(w: ModelWeights, tokens: Int[Tensor, "B T"]) -> CleanRun:
    """Full forward, keeping each block's input (for restarts) and head ``z``."""
    rope = rotary_tables(w, tokens.shape[1])
    resid = embed(w, tokens)
    resid_pre, zs, mlps = [], [], []
    for layer in range(w.cfg.n_layers):
        resid_pre.append(resid)
        out = block(w, layer, resid, rope)
        zs.append(out.z)
        mlps.append(out.mlp_out)
        resid = out.resid_post
    return CleanRun(
        resid_pre=torch.stack(resid_pre),
        z=torch.stack(zs),
        mlp_out=None if w.cfg.attn_only else torch.stack(mlps),
        resid_final=resid,
    )
