"""A 2-layer model with a known circuit, weights set by hand, saved as the usual scale-ablation loop loads one.

The task: ``BOS x y`` -> ``g(x)``, six colours ``x`` mapped to six numbers
``g(x)``, ``y`` a noun the model ignores. The circuit:

- ``L0H0`` attends from every position to the colour token and copies its
  one-hot identity into the residual stream;
- ``mlp1`` maps that copy to the answer's unembedding direction (a lookup).

Every other node writes a *constant* (the same on every input) that the
model relies on: ``L0H1``, ``L1H0``, ``L1H1`` attend to BOS and write 1 on a
dimension of their own, ``mlp0`` writes 1 from its bias alone. Each
constant dimension c feeds two "guard" tokens with logits ``30(1 − c)`` and
``30(c − 1)``: both 0 at the clean value c = 1, so the answer (logit 10)
wins; at c ≤ 0.5 or c ≥ 1.5 a guard token wins. So out-of-circuit nodes have
no effect at scale 1 but break the model at scale 0 and scales ≥ 5, while
patching a circuit node from another input changes the answer at any scale:
the scale-ablation picture, by construction.

The checkpoint is InterpBench's layout: ``ll_model_cfg.pkl`` (a
TransformerLens config dict), ``ll_model.pth`` (a HookedTransformer-format
state dict) and the tokenizer's files.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

COLOURS = [" red", " blue", " green", " black", " white", " pink"]
NUMBERS = [" one", " two", " three", " four", " five", " six"]
NOUNS = [" cat", " dog"]
GUARDS = [(" up", " down"), (" left", " right"), (" yes", " no"), (" hot", " cold")]
CIRCUIT = ["L0H0", "mlp1"]

BOS, IS_X, X, COPY, ANSWER = 0, 1, 2, 8, 18  # residual dimensions (X, COPY, ANSWER: 6 each)
CONSTANT = {"L0H1": 14, "mlp0": 15, "L1H0": 16, "L1H1": 17}
D_MODEL, D_HEAD, D_MLP, N_HEADS = 32, 8, 8, 2
ATTEND = 40.0  # query-key score for the attended token: softmax weight ~1


def _token(tokenizer, word: str) -> int:
    [token] = tokenizer(word, add_special_tokens=False)["input_ids"]
    return token


def state_dict(tokenizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """(TransformerLens config dict, HookedTransformer-format state dict)."""
    V = len(tokenizer)
    cfg = dict(
        n_layers=2, d_model=D_MODEL, n_ctx=16, d_head=D_HEAD, n_heads=N_HEADS, d_mlp=D_MLP, act_fn="relu",
        d_vocab=V, normalization_type=None, positional_embedding_type="standard", model_name="known-circuit",
        device="cpu",
    )
    D, E, H, M = D_MODEL, D_HEAD, N_HEADS, D_MLP
    z = torch.zeros
    sd = {"embed.W_E": z(V, D), "pos_embed.W_pos": z(16, D), "unembed.W_U": z(D, V), "unembed.b_U": z(V)}
    for layer in range(2):
        p = f"blocks.{layer}."
        sd.update({p + "attn.W_Q": z(H, D, E), p + "attn.b_Q": z(H, E), p + "attn.W_K": z(H, D, E),
                   p + "attn.b_K": z(H, E), p + "attn.W_V": z(H, D, E), p + "attn.b_V": z(H, E),
                   p + "attn.W_O": z(H, E, D), p + "attn.b_O": z(D), p + "mlp.W_in": z(D, M),
                   p + "mlp.b_in": z(M), p + "mlp.W_out": z(M, D), p + "mlp.b_out": z(D)})
    bos = tokenizer.bos_token_id
    sd["embed.W_E"][bos, BOS] = 1.0
    for i, word in enumerate(COLOURS):
        sd["embed.W_E"][_token(tokenizer, word), IS_X] = 1.0
        sd["embed.W_E"][_token(tokenizer, word), X + i] = 1.0

    def attend(layer: int, head: int, key_dim: int) -> None:
        """Every query attends to the tokens with ``key_dim`` set."""
        p = f"blocks.{layer}.attn."
        sd[p + "b_Q"][head, 0] = 1.0
        sd[p + "W_K"][head, key_dim, 0] = ATTEND * D_HEAD**0.5

    # L0H0: copy the colour's one-hot into COPY..COPY+5 (the circuit's first node).
    attend(0, 0, IS_X)
    for i in range(6):
        sd["blocks.0.attn.W_V"][0, X + i, i] = 1.0
        sd["blocks.0.attn.W_O"][0, i, COPY + i] = 1.0
    # Constant writers: heads attend to BOS and write 1 on their dimension; mlp0 from its bias.
    for name, dim in CONSTANT.items():
        if name.startswith("mlp"):
            sd["blocks.0.mlp.b_in"][0] = 1.0
            sd["blocks.0.mlp.W_out"][0, dim] = 1.0
            continue
        layer, head = int(name[1]), int(name[3])
        attend(layer, head, BOS)
        sd[f"blocks.{layer}.attn.W_V"][head, BOS, 0] = 1.0
        sd[f"blocks.{layer}.attn.W_O"][head, 0, dim] = 1.0
    # mlp1: the lookup from the copied colour to its number (the circuit's second node).
    for i in range(6):
        sd["blocks.1.mlp.W_in"][COPY + i, i] = 1.0
        sd["blocks.1.mlp.W_out"][i, ANSWER + i] = 1.0
        sd["unembed.W_U"][ANSWER + i, _token(tokenizer, NUMBERS[i])] = 10.0
    for dim, (low, high) in zip(CONSTANT.values(), GUARDS):
        lo, hi = _token(tokenizer, low), _token(tokenizer, high)
        sd["unembed.W_U"][dim, lo], sd["unembed.b_U"][lo] = -30.0, 30.0
        sd["unembed.W_U"][dim, hi], sd["unembed.b_U"][hi] = 30.0, -30.0
    return cfg, sd


def write_checkpoint(directory: Path, tokenizer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg, sd = state_dict(tokenizer)
    with open(directory / "ll_model_cfg.pkl", "wb") as handle:
        pickle.dump(cfg, handle)
    torch.save(sd, directory / "ll_model.pth")
    tokenizer.save_pretrained(directory)
    return directory


def write_task(path: Path) -> Path:
    """Every (colour, noun) prompt; corrupt = the next colour, whose number is the wrong answer."""
    rows = []
    for i, colour in enumerate(COLOURS):
        j = (i + 1) % len(COLOURS)
        for noun in NOUNS:
            rows.append({"clean": colour + noun, "corrupt": COLOURS[j] + noun,
                         "correct": NUMBERS[i], "incorrect": NUMBERS[j]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_circuit(path: Path) -> Path:
    path.write_text(json.dumps({"nodes": CIRCUIT}))
    return path
