"""A small, explicit transformer forward on TransformerLens-processed weights.

Why not just call the TransformerBridge?  The backup sweep re-runs the model
hundreds of times from the *middle*: ablate head (l*, h*), recompute layers
l*..L-1 only, starting from the clean residual stream that entered block l*.
TransformerLens 4.3's ``start_at_layer`` still executes blocks 0..l*-1 (its
docstring says so), so the restart has to be ours.  Owning the forward also
lets us batch several ablations of one layer into one pass and read exactly
the activations we need (head outputs ``z``) without a full activation cache.

The weights come from a bridge in compatibility mode (``models.py``): pre-norm
scales are folded into the following matrices and writing weights are centred,
so every pre-norm below is weight-free ("LNPre"/"RMSPre"). What cannot be folded
(post-norms, QK-norms, soft-caps, sliding windows, per-layer rotary tables,
scaled embeddings) is described by ``ModelConfig``, the architecture spec that
``architectures.py`` reads off the loaded model. Attention, the MLP and the
unembedding are each computed once, here; the sweeps, attribution and the lens
all call these functions. ``tests/core/test_architectures.py`` checks this forward against
the Hugging Face model of every supported family.

Shapes: B batch, T positions, H query heads, K key/value heads, D d_model,
E d_head, M d_mlp, V vocabulary.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class ModelConfig:
    """The architecture spec: everything the forward needs besides the weights.

    ``architectures.py`` builds it from what a loaded model contains (and says, family
    by family, which of these pieces each family has). Per-layer fields are tuples with
    one entry a layer.
    """

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
    parallel_attn_mlp: bool = False  # GPT-NeoX/Pythia/GPT-J: the MLP reads the block's input too
    rotary_dim: int = 0  # rotated dimensions of each head (GPT-NeoX and GPT-J rotate only a part)
    family: str = ""  # the Hugging Face model_type the spec was built for
    rotary_style: str = "half"  # "half" (rotate_half, Llama/NeoX) | "interleaved" (GPT-J: adjacent pairs)
    pre_norm: bool = True  # sublayers read norm(resid); False for OLMo 2 (they read the raw stream)
    post_norm: bool = False  # sublayers write norm(out) (Gemma 2/3, OLMo 2): ``ln_attn_post``/``ln_mlp_post``
    qk_norm: str = "none"  # "none" | "head" (one RMSNorm per head: Qwen 3, Gemma 3) | "all" (over all heads: OLMo 2)
    attn_scale: float = 0.0  # multiplies q·k; 0 means 1/sqrt(d_head)
    attn_softcap: float = 0.0  # scores -> c·tanh(scores/c) (Gemma 2); 0: none
    final_softcap: float = 0.0  # logits -> c·tanh(logits/c) (Gemma 2); 0: none
    windows: tuple[
        int, ...
    ] = ()  # per layer: sliding window (a query sees this many keys, itself included); 0 = global
    rotary_layer: tuple[int, ...] = ()  # per layer: which rotary table (Gemma 3: local and global bases)
    embed_scale: float = 1.0  # the embedding is multiplied by this (Gemma: sqrt(d_model))
    prepend_bos: bool = True  # the model's own rule: tasks start every prompt with BOS

    def __post_init__(self) -> None:
        # Tuples even when read back from a saved dict (lists): the spec stays hashable.
        object.__setattr__(self, "windows", tuple(self.windows))
        object.__setattr__(self, "rotary_layer", tuple(self.rotary_layer))

    @property
    def group_size(self) -> int:
        """How many query heads share one key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def scale(self) -> float:
        return self.attn_scale or self.d_head**-0.5

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0

    def table(self, layer: int) -> int:
        return self.rotary_layer[layer] if self.rotary_layer else 0


# ModelWeights fields with one entry a layer (stacked over layers on one device; a
# ``LayerStack`` when the model is staged over several devices: ``core/stages.py``).
LAYER_FIELDS = (
    "W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O",
    "W_in", "W_gate", "b_in", "W_out", "b_out",
    "ln_attn_post", "ln_mlp_post", "q_norm", "k_norm",
)  # fmt: skip


# ModelWeights fields outside the layers: the embedding and positions, the unembedding and the
# means centring removed, the rotary tables.
END_FIELDS = ("W_E", "W_pos", "W_U", "b_U", "W_U_mean", "b_U_mean", "rotary_inv_freq")


class LayerStack:
    """One per-layer weight of a model staged over several devices: stage ``s`` holds the
    layers from ``starts[s]`` on, on its own device (``core/stages.py`` builds these).

    Indexed like the stacked tensor it replaces (``W[layer]``, ``W[layer, head]``). Read from
    outside the blocks, a layer's weight comes to the model's home device (the last stage's,
    where the stream ends and the unembedding is), so code that mixes it with activations
    kept there stays correct; the blocks read it where it lives (``local``)."""

    def __init__(self, parts: list[Tensor], starts: list[int], home: torch.device, local: bool = False):
        self.parts, self.starts, self.home, self.local = parts, starts, home, local
        self.n_layers = starts[-1] + parts[-1].shape[0]

    def stage_of(self, layer: int) -> int:
        return max(s for s, start in enumerate(self.starts) if start <= layer)

    def device_of(self, layer: int) -> torch.device:
        return self.parts[self.stage_of(layer)].device

    def __getitem__(self, index) -> Tensor:
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        try:
            layer = operator.index(first)  # an int, a numpy integer or a one-number tensor
        except TypeError:
            raise TypeError("a staged weight is indexed by one layer at a time") from None
        layer = layer + self.n_layers if layer < 0 else layer
        s = self.stage_of(layer)
        value = self.parts[s][(layer - self.starts[s], *rest)]
        return value if self.local or value.device == self.home else value.to(self.home)

    def as_local(self) -> "LayerStack":
        return LayerStack(self.parts, self.starts, self.home, local=True)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_layers, *self.parts[0].shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype


@dataclass
class ModelWeights:
    """Processed weights, stacked over layers (TransformerLens naming).

    Pre-norm weights are folded into the matrices that read them (so ``normalize`` is
    weight-free); what cannot be folded is kept: the post-norms' and QK-norms' effective
    weights (``1 + w`` already added for Gemma), and, for soft-capped models, the
    unembedding's mean over the vocabulary that centring removed (``W_U_mean``, ``b_U_mean``),
    so the real capped logits can be rebuilt.
    """

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
    b_U: Float[Tensor, " V"]
    rotary_inv_freq: Optional[Float[Tensor, "n_tables E_half"]]
    ln_attn_post: Optional[Float[Tensor, "L D"]] = None
    ln_mlp_post: Optional[Float[Tensor, "L D"]] = None
    q_norm: Optional[Float[Tensor, "L Nq"]] = None  # Nq = E ("head") or H·E ("all")
    k_norm: Optional[Float[Tensor, "L Nk"]] = None  # Nk = E ("head") or K·E ("all")
    W_U_mean: Optional[Float[Tensor, " D"]] = None
    b_U_mean: Optional[Float[Tensor, ""]] = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModelWeights":
        """On ``device``, and (``dtype``) every weight in that dtype but the rotary
        frequencies, which stay float32 (the tables are made in float32 and cast where applied)."""
        if self.staged:
            raise ValueError("a staged model stays where its stages are (stage the moved model instead)")
        moved = copy.copy(self)
        for name, value in self.__dict__.items():
            if isinstance(value, Tensor):
                cast = dtype is not None and value.is_floating_point() and name != "rotary_inv_freq"
                setattr(moved, name, value.to(device, dtype) if cast else value.to(device))
        return moved

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model runs in (its weights' and activations')."""
        return self.W_E.dtype

    @property
    def device(self) -> torch.device:
        """Where the model's activations live outside its blocks: with the unembedding (the last
        stage's device when staged)."""
        return self.W_U.device

    @property
    def staged(self) -> bool:
        """Whether the layers are spread over stages (``core/stages.py``)."""
        return isinstance(self.W_Q, LayerStack)

    def local(self) -> "ModelWeights":
        """The same weights read where each layer lives (what the blocks compute with)."""
        if not self.staged:
            return self
        view = copy.copy(self)
        for name in LAYER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, LayerStack):
                setattr(view, name, value.as_local())
        return view

    def device_of(self, layer: int) -> torch.device:
        """The device block ``layer`` computes on."""
        return self.W_Q.device_of(layer) if isinstance(self.W_Q, LayerStack) else self.W_Q.device


# --------------------------------------------------------------------------- #
# Normalisation (weight-free: the weights were folded into the next matrices)
# --------------------------------------------------------------------------- #


class NormSpec(Protocol):
    """What the norm functions read of a model's spec: a ``ModelConfig``, or the bridge's
    ``bridge_path.ReadoutConfig`` (its norms folded the same way)."""

    @property
    def norm(self) -> str: ...

    @property
    def eps(self) -> float: ...

    @property
    def pre_norm(self) -> bool: ...


class WithNormSpec(Protocol):
    """Weights whose final stream can be normalised (``ModelWeights``, ``bridge_path.BridgeView``)."""

    @property
    def cfg(self) -> NormSpec: ...


def norm_scale(cfg: NormSpec, x: Float[Tensor, "... D"]) -> Float[Tensor, "... 1"]:
    """The scale a (folded) LayerNorm/RMSNorm divides by: TL's ``hook_scale``, in float32
    whatever ``x``'s dtype (``precision.py``)."""
    if cfg.norm == "none":
        return torch.ones_like(x[..., :1], dtype=torch.float32)
    x = x.float()
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()


def normalize(cfg: NormSpec, x: Float[Tensor, "... D"]) -> Float[Tensor, "... D"]:
    """``x`` over its norm's scale (weight-free), computed in float32, in ``x``'s dtype."""
    if cfg.norm == "none":
        return x
    y = x.float()
    if cfg.norm == "layernorm":
        y = y - y.mean(-1, keepdim=True)
    return (y / (y.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()).to(x.dtype)


def sublayer_input(cfg: NormSpec, resid: Float[Tensor, "... D"]) -> Float[Tensor, "... D"]:
    """What a sublayer reads: the normalised stream, or the raw stream without pre-norms (OLMo 2)."""
    return normalize(cfg, resid) if cfg.pre_norm else resid


def rms_norm(x: Float[Tensor, "... N"], weight: Float[Tensor, " N"], eps: float) -> Float[Tensor, "... N"]:
    """``x / rms(x) ⊙ weight``: a post-norm or a QK-norm (weights are never folded here); the
    rms in float32, the result in ``x``'s dtype."""
    y = x.float()
    return (y * (y.pow(2).mean(-1, keepdim=True) + eps).rsqrt()).to(x.dtype) * weight


def post_norm_inv_rms(cfg: NormSpec, y: Float[Tensor, "... D"]) -> Float[Tensor, "... 1"]:
    """``1 / rms(y)`` of a sublayer's output under its post-norm (its heads' shares divide by
    it), in float32."""
    y = y.float()
    return (y.pow(2).mean(-1, keepdim=True) + cfg.eps).rsqrt()


# --------------------------------------------------------------------------- #
# Embedding and rotary position
# --------------------------------------------------------------------------- #


def embed(w: ModelWeights, tokens: Int[Tensor, "B T"]) -> Float[Tensor, "B T D"]:
    """Token embedding (scaled, for Gemma) plus learned position embedding (if any), on the
    model's device (the embedding may sit on another stage's)."""
    resid = w.W_E[tokens.to(w.W_E.device)]
    if w.cfg.embed_scale != 1.0:
        resid = resid * w.cfg.embed_scale
    if w.cfg.positional == "learned":
        assert w.W_pos is not None
        resid = resid + w.W_pos[: tokens.shape[1]]
    return resid.to(w.device)


Rope = Optional[list]  # one (cos, sin) pair of [T, rotary_dim] tables per rotary table; None without rotary


def rotary_tables(w: ModelWeights, n_pos: int) -> Rope:
    """cos/sin tables [T, rotary_dim] of each rotary table, in the model's own layout:
    "rotate half" (Llama, NeoX) pairs dimension i with i + rotary_dim/2; "interleaved"
    (GPT-J) pairs 2i with 2i + 1."""
    if w.cfg.positional != "rotary":
        return None
    assert w.rotary_inv_freq is not None
    inv = w.rotary_inv_freq if w.rotary_inv_freq.ndim == 2 else w.rotary_inv_freq[None]
    pos = torch.arange(n_pos, device=w.device, dtype=inv.dtype)
    tables = []
    for row in inv:
        freqs = torch.outer(pos, row)
        if w.cfg.rotary_style == "interleaved":
            angles = freqs.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([freqs, freqs], dim=-1)
        tables.append((angles.cos(), angles.sin()))
    return tables


def apply_rotary(
    cfg: ModelConfig, x: Float[Tensor, "B T N E"], rope: Rope, layer: int, positions: Int[Tensor, "B T"] | None = None
) -> Float[Tensor, "B T N E"]:
    """Rotate the first ``rotary_dim`` dimensions of each head with ``layer``'s table, at
    positions ``0..T-1`` or (a restart's window, ``Window``) each row's own ``positions``."""
    if rope is None:
        return x
    if positions is None:
        cos, sin = (t[: x.shape[1], None, :].to(x.dtype) for t in rope[cfg.table(layer)])
    else:
        cos, sin = (t[positions][:, :, None, :].to(x.dtype) for t in rope[cfg.table(layer)])
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    if cfg.rotary_style == "interleaved":
        rotated = torch.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], dim=-1).flatten(-2)
    else:
        half = dim // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


# --------------------------------------------------------------------------- #
# Attention: the one place it is computed (the sweeps, attribution and the lens use it)
# --------------------------------------------------------------------------- #


def kv(
    w: ModelWeights, layer: int, x: Float[Tensor, "B T D"]
) -> tuple[Float[Tensor, "B T K E"], Float[Tensor, "B T K E"]]:
    """The raw key and value projections of a sublayer input ``x``."""
    k = torch.einsum("btd,kde->btke", x, w.W_K[layer]) + w.b_K[layer]
    v = torch.einsum("btd,kde->btke", x, w.W_V[layer]) + w.b_V[layer]
    return k, v


def qkv(
    w: ModelWeights, layer: int, x: Float[Tensor, "B T D"]
) -> tuple[Float[Tensor, "B T H E"], Float[Tensor, "B T K E"], Float[Tensor, "B T K E"]]:
    """The raw projections ``x W + b`` of a sublayer input ``x`` (``sublayer_input``):
    before QK-norm and rotary (attribution differentiates here)."""
    q = torch.einsum("btd,hde->bthe", x, w.W_Q[layer]) + w.b_Q[layer]
    return (q, *kv(w, layer, x))


def _qk_norm(w: ModelWeights, layer: int, x: Float[Tensor, "B T N E"], which: str) -> Float[Tensor, "B T N E"]:
    """QK-norm of queries (``which="q"``) or keys: per head, or over all heads at once (OLMo 2)."""
    cfg = w.cfg
    if cfg.qk_norm not in ("head", "all"):
        return x
    weight = w.q_norm if which == "q" else w.k_norm
    assert weight is not None  # a model with a QK-norm has both weights
    if cfg.qk_norm == "head":
        return rms_norm(x, weight[layer], cfg.eps)
    return rms_norm(x.flatten(-2), weight[layer], cfg.eps).view(x.shape)


def positioned_qk(
    w: ModelWeights,
    layer: int,
    q: Float[Tensor, "B T H E"],
    k: Float[Tensor, "B T K E"],
    rope: Rope,
    positions: Int[Tensor, "B T"] | None = None,
) -> tuple[Float[Tensor, "B T H E"], Float[Tensor, "B T K E"]]:
    """QK-norm (per head, or over all heads at once as in OLMo 2), then rotary (at
    ``positions``: see ``apply_rotary``)."""
    cfg = w.cfg
    q, k = _qk_norm(w, layer, q, "q"), _qk_norm(w, layer, k, "k")
    return apply_rotary(cfg, q, rope, layer, positions), apply_rotary(cfg, k, rope, layer, positions)


def attention_mask(cfg: ModelConfig, layer: int, n_q: int, n_k: int, device) -> Tensor | None:
    """[T, T] True where a query may attend: causal, and within the layer's sliding window.
    None for plain causal attention (the fused kernel's own mask).

    Padding is on the right and attention is causal, so a real token never attends to
    padding: no padding mask is needed for real positions."""
    window = cfg.window(layer)
    if window == 0 or window >= n_k:
        return None
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return (j <= i) & (j > i - window)


def attention_scores(
    w: ModelWeights, layer: int, q: Float[Tensor, "B T H E"], k: Float[Tensor, "B T K E"]
) -> Float[Tensor, "B H T T"]:
    """Masked (pre-softmax) scores ``q·k · scale``, soft-capped where the model caps them."""
    cfg = w.cfg
    k = k.repeat_interleave(cfg.group_size, dim=2)
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * cfg.scale
    if cfg.attn_softcap:
        scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
    T = q.shape[1]
    mask = attention_mask(cfg, layer, T, T, q.device)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf"))


def attend(
    w: ModelWeights,
    layer: int,
    q: Float[Tensor, "B T H E"],
    k: Float[Tensor, "B T K E"],
    v: Float[Tensor, "B T K E"],
    rope: Rope,
) -> Float[Tensor, "B T H E"]:
    """Every head's mixed values ``z`` (TL's ``hook_z``) from the raw projections."""
    cfg = w.cfg
    q, k = positioned_qk(w, layer, q, k, rope)
    if cfg.attn_softcap:  # the cap sits between the product and the softmax: no fused kernel
        pattern = attention_scores(w, layer, q, k).float().softmax(-1).to(v.dtype)
        return torch.einsum("bhqk,bkhe->bqhe", pattern, v.repeat_interleave(cfg.group_size, dim=2))
    # Grouped-query attention: query head h reads key/value head h // group_size.
    k = k.repeat_interleave(cfg.group_size, dim=2)
    v = v.repeat_interleave(cfg.group_size, dim=2)
    T = q.shape[1]
    mask = attention_mask(cfg, layer, T, T, q.device)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=mask is None,
        scale=cfg.scale,
    )
    return z.transpose(1, 2)


# The clean run's stream entering each block: stacked [L B T D], or one tensor a layer.
Streams = Union[Float[Tensor, "L B T D"], Sequence[Float[Tensor, "B T D"]]]


@dataclass(frozen=True)
class Window:
    """A restart that computes only a window of each prompt's positions (prefix-shared
    restarts): ``width`` positions from ``starts[b]`` on, for every copy of prompt ``b``.

    A patch by a minimal pair's corrupt value changes nothing before the first position where
    the pair differs (attention is causal), so there every block's stream is the clean run's:
    attention reads those positions' keys and values from the clean stream entering each
    block (``clean[layer]``), and only the window's positions are computed. The batch is
    ``copies`` copies of the B prompts, copy-major (G ablations of a group). Exact: the same
    numbers as a restart of every position, at the window's positions (tested)."""

    starts: Int[Tensor, " B"]
    width: int
    clean: Streams  # the clean run's stream entering each block
    copies: int = 1
    # each layer's clean keys (positioned) and values, made on first use: every run in the
    # window (a target, a circuit) reads the same ones
    clean_kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, compare=False, repr=False)
    masks: dict[tuple[int, torch.device], Tensor] = field(default_factory=dict, compare=False, repr=False)

    def mask(self, sliding: int, device) -> Bool[Tensor, "GB W T"]:
        """Where each window position's query may attend: causal at its absolute position, and
        within a sliding window of ``sliding`` positions (0: none)."""
        key = (sliding, torch.device(device))
        if key not in self.masks:
            pos = self.positions(device)[..., None]
            j = torch.arange(self.n_positions, device=device)
            self.masks[key] = (j <= pos) & (j > pos - sliding) if sliding else j <= pos
        return self.masks[key]

    @property
    def n_positions(self) -> int:
        if isinstance(self.clean, RowStreams):
            return int(self.clean.streams.shape[2])
        return int(self.clean[0].shape[1])

    def positions(self, device=None) -> Int[Tensor, "GB W"]:
        """Each row's absolute positions (rows copy-major, as the batch)."""
        pos = self.starts[:, None] + torch.arange(self.width, device=self.starts.device)
        return pos.repeat(self.copies, 1).to(device or pos.device)

    def take(self, x: Float[Tensor, "*G B T ..."], batch_dim: int = 0) -> Float[Tensor, "*G B W ..."]:
        """The window's positions of a ``[..., B, T, ...]`` tensor of the prompts."""
        x = x.movedim((batch_dim, batch_dim + 1), (0, 1))
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        pos = (self.starts[:, None] + torch.arange(self.width, device=self.starts.device)).to(x.device)
        return x[rows, pos].movedim((0, 1), (batch_dim, batch_dim + 1))

    def put(self, full: Float[Tensor, "B T ..."], part: Float[Tensor, "B W ..."]) -> Float[Tensor, "B T ..."]:
        """``full`` (a clean run's activation) with the window's positions replaced by ``part``
        (one copy's): the whole run, since the positions outside the window are the clean ones
        or feed no point."""
        out = full.clone()
        rows = torch.arange(full.shape[0], device=full.device)[:, None]
        out[rows, self.starts[:, None].to(full.device) + torch.arange(self.width, device=full.device)] = part.to(
            out.dtype
        )
        return out


class RowStreams(Sequence):
    """Rows ``rows`` of a clean run's streams (``[L, N, T, D]``), gathered a layer at a time
    when a window's attention first reads that layer: a restart of G patched rows of N prompts
    (the scale sweep's (scale, pair) rows) holds no ``[L, G, T, D]`` copy."""

    def __init__(self, streams: Float[Tensor, "L N T D"], rows: Int[Tensor, " G"]):
        self.streams, self.rows = streams, rows

    def __len__(self) -> int:
        return int(self.streams.shape[0])

    def __getitem__(self, layer):
        return self.streams[layer][self.rows.to(self.streams.device)]


def attend_window(
    w: ModelWeights,
    layer: int,
    q: Float[Tensor, "GB W H E"],
    k: Float[Tensor, "GB W K E"],
    v: Float[Tensor, "GB W K E"],
    rope: Rope,
    window: Window,
    clean: Float[Tensor, "B T D"],
) -> Float[Tensor, "GB W H E"]:
    """``attend`` for a window's queries: each reads the keys and values of its own prompt's
    every position, the clean stream's (``clean``, entering ``layer``) before the window and
    the window's own from there on; causal and sliding-window masks at the absolute positions."""
    cfg = w.cfg
    pos = window.positions(q.device)
    q, k = positioned_qk(w, layer, q, k, rope, pos)
    if layer not in window.clean_kv or window.clean_kv[layer][0].device != q.device:
        clean_k, clean_v = kv(w, layer, sublayer_input(cfg, clean))
        window.clean_kv[layer] = apply_rotary(cfg, _qk_norm(w, layer, clean_k, "k"), rope, layer), clean_v
    clean_k, clean_v = window.clean_kv[layer]
    rows = torch.arange(pos.shape[0], device=q.device)[:, None]
    keys, values = clean_k.repeat(window.copies, 1, 1, 1), clean_v.repeat(window.copies, 1, 1, 1)
    keys[rows, pos], values[rows, pos] = k.to(keys.dtype), v.to(values.dtype)
    keys = keys.repeat_interleave(cfg.group_size, dim=2)
    values = values.repeat_interleave(cfg.group_size, dim=2)
    mask = window.mask(cfg.window(layer), q.device)  # [GB, W, T]
    if cfg.attn_softcap:
        scores = torch.einsum("bqhe,bkhe->bhqk", q, keys) * cfg.scale
        scores = cfg.attn_softcap * torch.tanh(scores / cfg.attn_softcap)
        pattern = scores.masked_fill(~mask[:, None], float("-inf")).float().softmax(-1).to(values.dtype)
        return torch.einsum("bhqk,bkhe->bqhe", pattern, values)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask[:, None], scale=cfg.scale
    )
    return z.transpose(1, 2)


def attention_pattern(
    w: ModelWeights, layer: int, resid: Float[Tensor, "B T D"], rope: Rope
) -> Float[Tensor, "B H T T"]:
    """softmax of the (masked, capped) scores of every head: TL's ``hook_pattern``."""
    q, k, _ = qkv(w, layer, sublayer_input(w.cfg, resid))
    q, k = positioned_qk(w, layer, q, k, rope)
    return attention_scores(w, layer, q, k).softmax(-1)


def attention_sum(w: ModelWeights, layer: int, z: Float[Tensor, "... H E"]) -> Float[Tensor, "... D"]:
    """``y = Σ_h z_h W_O[h] + b_O``: the attention sublayer's output before any post-norm."""
    return torch.einsum("...he,hed->...d", z, w.W_O[layer]) + w.b_O[layer]


def head_writes(w: ModelWeights, layer: int, z: Float[Tensor, "... H E"]) -> Float[Tensor, "... H D"]:
    """Each head's write to the stream: ``z_h W_O[h]``, or under a post-norm its share
    ``(z_h W_O[h]) / rms(y) ⊙ w`` (the shares and ``b_O``'s sum to the sublayer's write)."""
    out = torch.einsum("...he,hed->...hd", z, w.W_O[layer])
    if w.cfg.post_norm:
        inv = post_norm_inv_rms(w.cfg, attention_sum(w, layer, z)).to(out.dtype)  # [..., 1]
        assert w.ln_attn_post is not None
        out = out * inv[..., None, :] * w.ln_attn_post[layer]
    return out


def attention_write(w: ModelWeights, layer: int, y: Float[Tensor, "... D"]) -> Float[Tensor, "... D"]:
    """What an attention sublayer with output ``y`` adds to the stream (its post-norm, if any)."""
    if not w.cfg.post_norm:
        return y
    assert w.ln_attn_post is not None
    return rms_norm(y, w.ln_attn_post[layer], w.cfg.eps)


def attention_out(w: ModelWeights, layer: int, z: Float[Tensor, "B T H E"]) -> Float[Tensor, "B T D"]:
    """The attention sublayer's write to the stream: the heads' ``z @ W_O`` and ``b_O``,
    through the post-norm where the model has one."""
    return attention_write(w, layer, attention_sum(w, layer, z))


# --------------------------------------------------------------------------- #
# MLP
# --------------------------------------------------------------------------- #


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


def mlp_from_normalized(w: ModelWeights, layer: int, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T D"]:
    """The MLP (before any post-norm) on its already normalised input (attribution
    differentiates at that input)."""
    assert w.W_out is not None and w.b_out is not None
    return mlp_hidden(w, layer, x) @ w.W_out[layer] + w.b_out[layer]


def mlp_hidden(w: ModelWeights, layer: int, x: Float[Tensor, "B T D"]) -> Float[Tensor, "B T M"]:
    """The MLP's neuron activations (TL's ``mlp.hook_post``, what ``W_out`` reads) on its
    normalised input: its output is ``Σ_n a_n W_out[n] + b_out``."""
    cfg = w.cfg
    assert w.W_in is not None and w.b_in is not None
    pre = x @ w.W_in[layer] + w.b_in[layer]
    if cfg.gated_mlp:
        assert w.W_gate is not None
        return _activation(cfg.act_fn, x @ w.W_gate[layer]) * pre
    return _activation(cfg.act_fn, pre)


def mlp_write(w: ModelWeights, layer: int, m: Float[Tensor, "... D"]) -> Float[Tensor, "... D"]:
    """What an MLP with output ``m`` adds to the stream (its post-norm, if any)."""
    if not w.cfg.post_norm:
        return m
    assert w.ln_mlp_post is not None
    return rms_norm(m, w.ln_mlp_post[layer], w.cfg.eps)


# --------------------------------------------------------------------------- #
# The forward: one block loop, with named intervention sites
# --------------------------------------------------------------------------- #
#
# Every sweep runs this loop: the clean run (``run``), the backup sweep's ablated
# restarts (a ``z`` edit), the scale sweep's patched restarts (from the node's block,
# ``from_mid`` after a head), attribution's clean run (``cut``) and its real patching (additive
# edits at one site). A block, with the sites an ``Edit`` can change, in order:
#
#     resid_pre ──► q, k, v ──► z ──► attn_out ──► resid_mid = resid_pre + attn_out
#     mlp_in (resid_mid; resid_pre when parallel) ──► mlp_out ──► resid_post = resid_mid + mlp_out
#
# and after the last block ``resid_final``. ``q``/``k``/``v`` edits change the input of one
# head's projection only (path patching of one edge), or of each head at once.

SITES = ("resid_pre", "q", "k", "v", "z", "attn_out", "mlp_in", "mlp_out", "resid_final")


@dataclass(frozen=True)
class Edit:
    """An intervention at one named site (``SITES``) of one layer: add ``delta``, or
    replace the value by ``replace(value)``.

    ``q``/``k``/``v`` edits act on what the projection *reads* (the stream before its
    norm): with ``head`` set, only that head (query head for ``q``, key/value head for
    ``k``/``v``) reads ``stream + delta``; without it ``delta`` is ``[B T n D]``, one change
    per head, and ``replace(stream)`` returns every head's own input ``[B T n D]``.
    ``resid_final`` takes ``layer = n_layers``.
    """

    site: str
    layer: int
    delta: Optional[Tensor] = None
    head: Optional[int] = None
    replace: Optional[Callable[[Tensor], Tensor]] = None

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"unknown intervention site {self.site!r}; sites: {', '.join(SITES)}")
        if (self.delta is None) == (self.replace is None):
            raise ValueError("an Edit takes exactly one of delta and replace")
        if self.replace is not None and self.site in ("q", "k", "v") and self.head is not None:
            raise ValueError("a one-head q/k/v edit is an additive change of that head's input")

    def apply(self, value: Tensor) -> Tensor:
        """The edited value, on ``value``'s device (an edit's tensors live on the model's)."""
        if self.replace is not None:
            return self.replace(value).to(value.device)
        assert self.delta is not None  # exactly one of the two (``__post_init__``)
        return value + self.delta.to(value.device)


@dataclass
class BlockState:
    """Every activation of one block as the forward computed it (after any edit).

    Blocks restarted after their attention (``from_mid``) have no ``resid_pre``, ``q``,
    ``k``, ``v`` or ``z``; attention-only blocks have no MLP fields; ``mlp_raw`` (the
    MLP's output before its post-norm) is the same tensor as ``mlp_out`` without one.
    """

    layer: int
    resid_pre: Optional[Float[Tensor, "B T D"]] = None
    q: Optional[Float[Tensor, "B T H E"]] = None  # raw projections: before QK-norm and rotary
    k: Optional[Float[Tensor, "B T K E"]] = None
    v: Optional[Float[Tensor, "B T K E"]] = None
    z: Optional[Float[Tensor, "B T H E"]] = None
    resid_mid: Optional[Float[Tensor, "B T D"]] = None
    mlp_in: Optional[Float[Tensor, "B T D"]] = None  # the stream the MLP reads, before its norm
    mlp_normed: Optional[Float[Tensor, "B T D"]] = None  # sublayer_input(mlp_in), a node of its own
    mlp_hidden: Optional[Float[Tensor, "B T M"]] = None  # the neuron activations W_out reads (TL's mlp.hook_post)
    mlp_raw: Optional[Float[Tensor, "B T D"]] = None
    mlp_out: Optional[Float[Tensor, "B T D"]] = None  # the MLP's write to the stream
    resid_post: Optional[Float[Tensor, "B T D"]] = None


Edits = dict[tuple[str, int], list[Edit]]  # the edits of a forward by (site, layer)


def _by_site(edits: Sequence[Edit]) -> Edits:
    index: Edits = {}
    for e in edits:
        index.setdefault((e.site, e.layer), []).append(e)
    return index


def _edited(index: Edits, site: str, layer: int, value: Tensor) -> Tensor:
    for e in index.get((site, layer), ()):
        value = e.apply(value)
    return value


def _projections(w: ModelWeights, layer: int, x: Float[Tensor, "B T D"], index: Edits):
    """q, k, v of the stream ``x``, with any head's input edited."""
    q, k, v = qkv(w, layer, sublayer_input(w.cfg, x))
    if not index:
        return q, k, v
    out = {"q": q, "k": k, "v": v}
    for site, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
        for e in index.get((site, layer), ()):
            if e.head is None:  # every head reads its own changed stream
                if e.replace is not None:
                    changed = e.replace(x).to(x.device)
                else:
                    assert e.delta is not None
                    changed = x[:, :, None] + e.delta.to(x.device)
                moved = sublayer_input(w.cfg, changed)
                out[site] = torch.einsum("bthd,hde->bthe", moved, W[layer]) + b[layer]
            else:
                assert e.delta is not None  # a one-head edit is additive (``Edit.__post_init__``)
                one = (
                    torch.einsum("btd,de->bte", sublayer_input(w.cfg, x + e.delta.to(x.device)), W[layer, e.head])
                    + b[layer, e.head]
                )
                t = out[site].clone()
                t[:, :, e.head] = one
                out[site] = t
    return out["q"], out["k"], out["v"]


def blocks(
    w: ModelWeights,
    resid: Float[Tensor, "B T D"],
    start: int = 0,
    edits: Sequence[Edit] = (),
    *,
    stop: Optional[int] = None,
    from_mid: bool = False,
    cut: bool = False,
    rope: Rope = None,
    window: Optional[Window] = None,
) -> Iterator[BlockState]:
    """Run blocks ``start..stop-1`` from the stream entering block ``start`` (with
    ``from_mid``: block ``start``'s stream after its attention), yielding each block's
    ``BlockState``. A caller that keeps nothing holds one block's activations at a time.

    ``window``: ``resid`` holds only a window of each prompt's positions (``Window``), and so
    does every activation yielded; edits see the window's positions. (With ``from_mid`` the
    first block runs only its MLP, position by position.)

    Each sublayer reads its pre-norm (or the raw stream without one) and writes through
    its post-norm where the model has them; with parallel attention and MLP (GPT-NeoX,
    GPT-J) the MLP reads the block's input.

    ``cut`` (attribution's clean run, autograd on): each block's graph is its own. The
    block's input and its q, k and v are leaves, so that attribution's backward can run
    one block at a time and never through the q/k/v projections.
    """
    cfg = w.cfg
    stop = cfg.n_layers if stop is None else stop
    if rope is None:
        rope = rotary_tables(w, resid.shape[1] if window is None else window.n_positions)
    index = _by_site(edits)
    if from_mid and cfg.parallel_attn_mlp:
        raise ValueError("from_mid: in a parallel attention/MLP block the MLP reads resid_pre")
    if window is not None and cut:
        raise ValueError("a window restarts without autograd's cut")
    # A staged model (``core/stages.py``): each block computes where its layer lives, and what
    # it yields comes back to the model's device, where every caller keeps its activations.
    staged, home, wl = w.staged, w.device, w.local()
    ropes: dict[torch.device, Rope] = {}
    for layer in range(start, stop):
        here = w.device_of(layer) if staged else resid.device
        if staged:
            resid = resid.to(here)
            if rope is not None and here not in ropes:
                ropes[here] = [(cos.to(here), sin.to(here)) for cos, sin in rope]
        rope_here = ropes.get(here, rope)
        s = BlockState(layer)
        if from_mid and layer == start:
            s.resid_mid = resid
        else:
            resid = _edited(index, "resid_pre", layer, resid)
            if cut:  # the block's input and q, k, v are leaves, kept on the model's device
                s.resid_pre = resid.to(home).detach().requires_grad_(True)
                x = s.resid_pre.to(here)
                with torch.no_grad():
                    s.q, s.k, s.v = (t.to(home).requires_grad_(True) for t in _projections(wl, layer, x, index))
                q, k, v = (t.to(here) for t in (s.q, s.k, s.v))
            else:
                x = s.resid_pre = resid
                q, k, v = s.q, s.k, s.v = _projections(wl, layer, x, index)
            if window is None:
                z = attend(wl, layer, q, k, v, rope_here)
            else:
                z = attend_window(wl, layer, q, k, v, rope_here, window, window.clean[layer].to(here))
            s.z = _edited(index, "z", layer, z)
            s.resid_mid = x + _edited(index, "attn_out", layer, attention_out(wl, layer, s.z))
        if cfg.attn_only:
            s.resid_post = s.resid_mid
        else:
            stream = x if cfg.parallel_attn_mlp else s.resid_mid
            assert stream is not None
            mlp_in = s.mlp_in = _edited(index, "mlp_in", layer, stream)
            normed = sublayer_input(cfg, mlp_in)
            if normed is mlp_in:  # no pre-norm (OLMo 2): a node of its own, so its gradient is the MLP's alone
                normed = mlp_in.view_as(mlp_in)
            s.mlp_normed = normed
            s.mlp_hidden = mlp_hidden(wl, layer, normed)
            assert wl.W_out is not None and wl.b_out is not None
            s.mlp_raw = s.mlp_hidden @ wl.W_out[layer] + wl.b_out[layer]
            s.mlp_out = _edited(index, "mlp_out", layer, mlp_write(wl, layer, s.mlp_raw))
            s.resid_post = s.resid_mid + s.mlp_out
        resid = s.resid_post
        if staged and here != home:
            for name in RECORDABLE:
                value = getattr(s, name)
                if value is not None and value.device != home:
                    setattr(s, name, value.to(home))
        yield s


@dataclass
class Trace:
    """What ``forward`` recorded: for each name asked for, one tensor per block run (empty
    lists for names not asked for), and the final residual stream."""

    resid_final: Float[Tensor, "B T D"]
    resid_pre: list[Tensor] = field(default_factory=list)
    q: list[Tensor] = field(default_factory=list)
    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    z: list[Tensor] = field(default_factory=list)
    resid_mid: list[Tensor] = field(default_factory=list)
    mlp_in: list[Tensor] = field(default_factory=list)
    mlp_normed: list[Tensor] = field(default_factory=list)
    mlp_hidden: list[Tensor] = field(default_factory=list)
    mlp_raw: list[Tensor] = field(default_factory=list)
    mlp_out: list[Tensor] = field(default_factory=list)
    resid_post: list[Tensor] = field(default_factory=list)


RECORDABLE = tuple(f.name for f in fields(Trace) if f.name != "resid_final")  # BlockState's activations


def forward(
    w: ModelWeights,
    resid: Float[Tensor, "B T D"],
    start: int = 0,
    edits: Sequence[Edit] = (),
    *,
    record: Sequence[str] = (),
    from_mid: bool = False,
    cut: bool = False,
    rope: Rope = None,
    window: Optional[Window] = None,
) -> Trace:
    """Blocks ``start..L-1`` (see ``blocks``), then any ``resid_final`` edit; records the
    activations named in ``record`` (``RECORDABLE``) and nothing else, so a restart keeps
    no more memory than it asks for."""
    unknown = set(record) - set(RECORDABLE)
    if unknown:
        raise ValueError(f"cannot record {sorted(unknown)}; recordable: {', '.join(RECORDABLE)}")
    kept: dict[str, list[Tensor]] = {name: [] for name in record}
    for s in blocks(w, resid, start, edits, from_mid=from_mid, cut=cut, rope=rope, window=window):
        for name, values in kept.items():
            values.append(getattr(s, name))
        assert s.resid_post is not None
        resid = s.resid_post
    resid = _edited(_by_site(edits), "resid_final", w.cfg.n_layers, resid)
    return Trace(resid_final=resid, **kept)


def run_blocks(w: ModelWeights, start: int, resid: Float[Tensor, "B T D"], rope: Rope) -> Float[Tensor, "B T D"]:
    """Blocks ``start..L-1`` from the residual stream entering block ``start``."""
    return forward(w, resid, start, rope=rope).resid_final


# --------------------------------------------------------------------------- #
# Unembedding
# --------------------------------------------------------------------------- #


def unembed(w: ModelWeights, resid_final: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
    """Logits before any soft-cap, centred over the vocabulary (HookedTransformer numerics):
    every direct effect sums to these. The bias is added inside the product: a separate
    ``+ b_U`` is one more pass over a tensor of B·T·V numbers."""
    x = normalize(w.cfg, resid_final)
    return torch.addmm(w.b_U, x.reshape(-1, x.shape[-1]), w.W_U).view(*x.shape[:-1], -1).float()


def cap_logits(w: ModelWeights, logits: Float[Tensor, "... V"], x: Float[Tensor, "... D"]) -> Float[Tensor, "... V"]:
    """The model's real logits from the centred pre-cap ``logits`` of normalised streams ``x``:
    for a soft-capped model, the vocabulary mean that centring removed is added back and
    the cap applied (``c·tanh(ℓ/c)``); otherwise ``logits`` unchanged (a per-row constant
    changes no softmax, no argmax and no logit difference)."""
    if not w.cfg.final_softcap:
        return logits
    assert w.W_U_mean is not None and w.b_U_mean is not None
    raw = logits + (x.float() @ w.W_U_mean.float())[..., None] + w.b_U_mean.float()  # float32 in any dtype
    return w.cfg.final_softcap * torch.tanh(raw / w.cfg.final_softcap)


def logits(w: ModelWeights, resid_final: Float[Tensor, "B T D"]) -> Float[Tensor, "B T V"]:
    """The model's real output logits (soft-capped where the model caps them)."""
    return cap_logits(w, unembed(w, resid_final), normalize(w.cfg, resid_final))


@dataclass
class CleanRun:
    """What a full forward records for later restarts and direct effects."""

    resid_pre: Float[Tensor, "L B T D"]  # input of every block
    z: Float[Tensor, "L B T H E"]
    mlp_out: Optional[Float[Tensor, "L B T D"]]  # each MLP's write to the stream
    resid_final: Float[Tensor, "B T D"]
    mlp_raw: Optional[Float[Tensor, "L B T D"]] = None  # each MLP's output before its post-norm (post-norm models)
    last_hidden: Optional[Float[Tensor, "B T M"]] = None  # the last MLP's neuron activations (``keep_last_hidden``)


def run(w: ModelWeights, tokens: Int[Tensor, "B T"], keep_last_hidden: bool = False) -> CleanRun:
    """Full forward, keeping each block's input (for restarts), head ``z`` and MLP writes
    (and, with ``keep_last_hidden``, the last MLP's neuron activations)."""
    post = w.cfg.post_norm and not w.cfg.attn_only
    names = ("resid_pre", "z") + (() if w.cfg.attn_only else ("mlp_out",)) + (("mlp_raw",) if post else ())
    if keep_last_hidden and not w.cfg.attn_only:
        names += ("mlp_hidden",)
    trace = forward(w, embed(w, tokens), record=names)
    return CleanRun(
        resid_pre=torch.stack(trace.resid_pre),
        z=torch.stack(trace.z),
        mlp_out=None if w.cfg.attn_only else torch.stack(trace.mlp_out),
        resid_final=trace.resid_final,
        mlp_raw=torch.stack(trace.mlp_raw) if post else None,
        last_hidden=trace.mlp_hidden[-1] if trace.mlp_hidden else None,
    )
