"""Processing a safetensors checkpoint one layer at a time, within host memory.

Loading a model whole holds the Hugging Face model, TransformerLens's bridge of it and the
processed copy at once: several times the processed weights, which for an 8B model is more
host memory than most nodes have. Every step of compatibility mode's processing is local to
a block (a block's pre-norms fold into that block's matrices, its writing weights are centred
on their own, its value biases fold into its own output bias) or to the ends of the model (the
embedding, the final norm and the unembedding). So the same processing can be done a layer at
a time, with the same code:

1. **The ends and layer 0**: a one-layer model of the checkpoint's config with the
   embedding, the unembedding, the final norm and layer 0's tensors, booted and processed
   exactly as a whole model is (``loading.process_bridge``). Its processed ends are kept.
2. **Every other layer** ``i``: a one-layer model with a vocabulary of 16 tokens and zeroed
   ends (they are never read, so they cost nothing), layer ``i``'s tensors renamed to layer 0, per-layer config entries
   (``layer_types``) sliced to layer ``i``; booted and processed the same way, and its layer
   copied into row ``i`` of the stacked output tensors, which are allocated once.

Tensors are read from the safetensors files one at a time (``safe_open``), so host memory
peaks near the processed weights plus one layer's model. The result equals processing the
whole model (``loading.whole_weights``), tensor for tensor, on every family (tested).

Sources without safetensors (the embedded GGUF file, TransformerLens checkpoints, ``.bin``
files, tiny models built in code) are processed whole.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from sweeps.core import architectures
from sweeps.core.transformer import END_FIELDS, LAYER_FIELDS, ModelWeights
from sweeps.runtime import allocator

# ModelConfig fields with one entry a layer: concatenated; every other field must agree.
PER_LAYER_SPEC = ("windows", "rotary_layer")
# The vocabulary of the one-layer models after the first: their ends are never read.
SMALL_VOCAB = 16
# ``model.layers.3.mlp...`` (Llama and most), ``transformer.h.3...`` (GPT-2, GPT-J),
# ``gpt_neox.layers.3...``: the block index of a tensor's name.
_LAYER_KEY = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|h))\.(?P<index>\d+)\.(?P<rest>.+)$")


def safetensors_index(directory: Path) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, or None when the directory has none."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    found: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            found.update((name, file) for name in f.keys())
    return found


def split_by_layer(names: Any) -> tuple[dict[int, dict[str, str]], list[str]]:
    """({layer: {name as layer 0: name in the checkpoint}}, the names outside every layer)."""
    layers: dict[int, dict[str, str]] = {}
    ends = []
    for name in names:
        m = _LAYER_KEY.match(name)
        if m is None:
            ends.append(name)
        else:
            layers.setdefault(int(m["index"]), {})[f"{m['pre']}.0.{m['rest']}"] = name
    return layers, ends


def _read(index: dict[str, Path], names: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the one-layer model, tensor) for each checkpoint tensor, one file open at a time."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, name in names.items():
        by_file.setdefault(index[name], []).append((target, name))
    for file, pairs in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for target, name in pairs:
                yield target, f.get_tensor(name)


def layer_config(config, layer: int, vocab: int | None):
    """The checkpoint's config for a one-layer model of block ``layer`` (its per-layer
    entries sliced), with a ``vocab``-token vocabulary (None: the checkpoint's own)."""
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1  # every config maps this name (GPT-2's n_layer included)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        one.layer_types = [layer_types[layer]]
    if vocab is not None:
        one.vocab_size = vocab
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(one, name, None)
            if isinstance(value, int) and value >= vocab:
                setattr(one, name, None)
    return one


def _one_layer_model(config, tensors: Iterator[tuple[str, torch.Tensor]], where: str, block_only: bool):
    """A float32 Hugging Face model of ``config`` holding ``tensors`` (cast to float32, as
    ``from_pretrained(dtype=float32)`` does). A parameter no tensor filled (tied ones are
    filled through their twin) is an error, except, with ``block_only``, those outside the
    block (the ends, never read from such a model): those are zeroed."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every parameter is then filled or zeroed below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # as from_pretrained does: a tied unembedding is the embedding
    params = dict(model.named_parameters(remove_duplicate=False))
    rename = _checkpoint_names(model)
    filled: set[int] = set()
    with torch.no_grad():
        for name, value in tensors:
            name = rename(name)
            param = params.get(name)
            if param is None:
                continue  # a buffer saved with the weights (old rotary tables): from_pretrained ignores it too
            if param.shape != value.shape:
                raise architectures.ArchitectureError(
                    f"{where}: {name} is {tuple(value.shape)} in the checkpoint, {tuple(param.shape)} in its config"
                )
            param.copy_(value)
            filled.add(id(param))
        missing = [n for n, p in params.items() if id(p) not in filled]
        for name in missing:
            if not (block_only and _LAYER_KEY.match(name) is None):
                raise architectures.ArchitectureError(f"{where}: the checkpoint has no tensor for {name}")
            params[name].zero_()
    return model.eval().requires_grad_(False)


class NotLayerwise(Exception):
    """The checkpoint needs more than renaming to load (Hugging Face converts some of its
    tensors: fuses, splits): it is processed whole instead."""


def _checkpoint_names(model):
    """A function from a checkpoint's tensor name to the model's: Hugging Face's own renaming
    rules for the model (legacy names such as GPT-NeoX's ``embed_out``, a checkpoint saved
    from the base model without its prefix). A name Hugging Face would convert with other
    tensors raises ``NotLayerwise``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(name: str) -> str:
        target, converted = rename_source_key(name, renamings, converters, prefix, names)
        if converted is not None:
            raise NotLayerwise(f"{name} is converted by Hugging Face's loader")
        return target

    return rename


def load_weights(directory: Path, index: dict[str, Path], process) -> ModelWeights:
    """The processed weights of the checkpoint in ``directory``, built a layer at a time.

    ``process(hf_model)`` boots and processes one Hugging Face model exactly as a whole
    model's load does and returns ``(ModelWeights, Unfoldable)`` (``loading``'s)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory))
    layers, ends = split_by_layer(index)
    n_layers = int(config.num_hidden_layers)
    if sorted(layers) != list(range(n_layers)):
        raise architectures.ArchitectureError(
            f"{directory}: the checkpoint's blocks {sorted(layers)[:3]}... do not match its config's {n_layers} layers"
        )
    end_names = {name: name for name in ends}

    first, first_spec = process(
        _one_layer_model(
            layer_config(config, 0, None), _read(index, {**end_names, **layers[0]}), f"{directory} (layer 0)", False
        )
    )
    rows = {f: getattr(first, f) for f in LAYER_FIELDS if getattr(first, f) is not None}
    stacked = {f: torch.empty((n_layers, *v.shape[1:]), dtype=v.dtype) for f, v in rows.items()}
    for f, v in rows.items():
        stacked[f][0] = v[0]
    specs = [first_spec]
    ends_kept: dict[str, Any] = {f: getattr(first, f) for f in END_FIELDS}
    cfg0 = first.cfg
    del first, rows
    gc.collect()
    allocator.give_back_freed_memory()

    for layer in range(1, n_layers):
        model = _one_layer_model(
            layer_config(config, layer, SMALL_VOCAB),
            _read(index, layers[layer]),
            f"{directory} (layer {layer})",
            True,
        )
        weights, spec = process(model)
        del model
        for f in stacked:
            value = getattr(weights, f)
            if value is None:
                raise architectures.ArchitectureError(f"{directory}: layer {layer} has no {f} (layer 0 has)")
            stacked[f][layer] = value[0]
        specs.append(spec)
        del weights
        gc.collect()
        allocator.give_back_freed_memory()  # so the next layer's model reuses no stale heap, and none is kept

    cfg, inv_freq = merge_specs(cfg0, specs, str(directory))
    ends_kept["rotary_inv_freq"] = inv_freq
    layer_kept: dict[str, Any] = {f: stacked.get(f) for f in LAYER_FIELDS}
    return ModelWeights(cfg=cfg, **ends_kept, **layer_kept)


def merge_specs(cfg0, specs: list[architectures.Unfoldable], where: str):
    """(the whole model's ModelConfig, its rotary tables) from each one-layer model's pieces.

    Per-layer entries are concatenated; every other field must be the same in every layer.
    Rotary tables are keyed by the layer type they belong to (``Unfoldable.rotary_keys``) and
    ordered as a whole model's read orders them (sorted by type)."""
    fields = {k: v for k, v in specs[0].spec.items() if k not in PER_LAYER_SPEC}
    for i, u in enumerate(specs[1:], 1):
        other = {k: v for k, v in u.spec.items() if k not in PER_LAYER_SPEC}
        if other != fields:
            raise architectures.ArchitectureError(f"{where}: layer {i}'s architecture differs from layer 0's: {other}")
    per_layer = {k: tuple(x for u in specs for x in u.spec.get(k, ())) for k in PER_LAYER_SPEC}
    inv_freq = None
    if "rotary_inv_freq" in specs[0].tensors:
        tables: dict[str, torch.Tensor] = {}
        for i, u in enumerate(specs):
            key = u.rotary_keys[u.spec["rotary_layer"][0]]
            table = u.tensors["rotary_inv_freq"][u.spec["rotary_layer"][0]]
            if key in tables and not torch.equal(tables[key], table):
                raise architectures.ArchitectureError(f"{where}: layer {i}'s rotary table differs from its type's")
            tables.setdefault(key, table)
        keys = sorted(tables)
        inv_freq = torch.stack([tables[k] for k in keys])
        per_layer["rotary_layer"] = tuple(keys.index(u.rotary_keys[u.spec["rotary_layer"][0]]) for u in specs)
    architectures.check_layer_pieces(cfg0.family, per_layer["windows"], 0 if inv_freq is None else len(inv_freq))
    cfg = dataclasses.replace(cfg0, n_layers=len(specs), **per_layer)
    return cfg, inv_freq
