"""Reading a configuration pickle without running the code it may name.

``pickle.load`` calls whatever callable the file names (``os.system`` among them),
so a model directory someone else made could run code on the first command that
reads its config. A TransformerLens checkpoint's config (``cfg.pkl``,
``ll_model_cfg.pkl``: ``cfg.to_dict()`` pickled) holds only plain data: numbers,
strings, lists, tuples, dicts, sets, ``None``, and a few torch values (a dtype,
a device). ``load_plain`` allows exactly those and refuses anything else, naming
what the file asked for, before a single foreign callable is looked up.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

# (module, name) pairs a plain-data pickle may refer to. Containers and scalars are
# pickle opcodes of their own; these are the few that need a global.
_ALLOWED = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("collections", "OrderedDict"),
    ("torch", "device"),
}


class UnsafePickle(ValueError):
    """The pickle names a callable outside plain data; one line naming the file and what it asked for."""


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):  # torch.float32 pickles as the global torch.float32
                return value
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickle(
            f"{self.source} refers to {module}.{name}, which is not plain data (numbers, strings, lists, "
            "dicts, torch dtypes and devices); refusing to unpickle it. Save the config as JSON "
            "(json.dump(cfg.to_dict(), ...) to tl_config.json) or re-pickle a plain dict"
        )


def load_plain(path: str | Path) -> Any:
    """The plain data pickled in ``path``; ``UnsafePickle`` for anything that would run code.

    Other unpickling errors (a truncated or garbled file) propagate as they are."""
    path = Path(path)
    data = path.read_bytes()
    return _PlainDataUnpickler(io.BytesIO(data), str(path)).load()
