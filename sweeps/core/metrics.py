"""The metrics a sweep can read, chosen by name (``--metric``): pure functions of logits.

Plain functions on tensors; no Ray, no I/O. Every metric is "higher = more like the clean
run", so that an attribution score ``m(clean) − m(patched)`` > 0 always means the component
carries the clean behaviour, and faithfulness ``(m(C) − m(corrupt)) / (m(clean) − m(corrupt))``
reads the same for all:

- ``logit_diff``: ``logit[correct] − logit[incorrect]`` (the task's pair; the default).
- ``prob_diff``: ``p[correct] − p[incorrect]`` (softmax over the whole vocabulary).
- ``kl``: ``−KL(p_clean ‖ p_run) = −Σ_v p_clean(v) (log p_clean(v) − log p_run(v))``, the
  clean run's own next-token distribution at the same point as the reference: 0 at the clean
  run, negative elsewhere. (Its gradient at the clean run is exactly 0, so plain ``eap``
  scores would all be 0: the attribution sweep refuses that pair.)
- ``greater_than``: ``Σ_{c ∈ correct set} p[c] − Σ_{i ∈ incorrect set} p[i]`` (Hanna et al.
  2023's probability difference; the sets are the task's candidates, ``TaskData.answer_sets``).
- ``accuracy``: 1 where the best correct answer's logit exceeds every incorrect one's, else
  0. Not differentiable: gradient methods refuse it; exact patching and circuit evaluation
  read it.

Next-token tasks (``text``) have their own metric, ``log_prob`` (the next token's
log-probability), and also take ``kl``; the answer metrics need answers.
"""

from __future__ import annotations

import difflib

import torch
from jaxtyping import Float, Int
from torch import Tensor

METRICS = {
    "logit_diff": "logit of the correct answer minus the incorrect one's (the default)",
    "prob_diff": "probability of the correct answer minus the incorrect one's",
    "kl": "minus the KL divergence from the clean run's next-token distribution (0 at the clean run)",
    "greater_than": "summed probability of the correct set minus that of the incorrect set",
    "accuracy": "1 where a correct answer outranks every incorrect one, else 0 (not differentiable)",
}
NEEDS_REFERENCE = ("kl",)  # read the clean run's distribution
NOT_DIFFERENTIABLE = ("accuracy",)
NEXT_TOKEN_METRICS = ("log_prob", "kl")  # what text (next-token) tasks take
LABELS = {
    "logit_diff": "logit difference",
    "log_prob": "log-probability",
    "prob_diff": "probability difference",
    "kl": "-KL(clean || run)",
    "greater_than": "probability of the correct set minus the incorrect set",
    "accuracy": "accuracy",
}


def label_of(recorded: str | None) -> str:
    """The words for a sweep's recorded ``metric`` (a metric's name, or a task kind, as older
    results record it)."""
    if recorded in (None, "logit_diff"):
        return LABELS["logit_diff"]
    return LABELS.get("log_prob" if recorded == "next_token" else recorded, recorded)


class MetricError(ValueError):
    """An unknown metric, or one the task or method cannot take (one line, exit code 2)."""


def check_metric(name: str | None, kind: str, method: str | None = None) -> None:
    """Check ``--metric`` against the task's kind (``logit_diff``/``next_token``) and, for the
    attribution sweep, its ``method``; a one-line ``MetricError`` if they cannot go together."""
    if name is None:
        return
    if name not in METRICS and name != "log_prob":
        close = difflib.get_close_matches(name, list(METRICS), n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise MetricError(f"unknown metric {name!r}.{hint} Metrics: {', '.join(METRICS)}")
    if kind == "next_token" and name not in NEXT_TOKEN_METRICS:
        raise MetricError(
            f"--metric {name} needs answers; a next-token task (text) takes {' or '.join(NEXT_TOKEN_METRICS)}"
        )
    if kind != "next_token" and name == "log_prob":
        raise MetricError("--metric log_prob is the text task's own; answer tasks take " + ", ".join(METRICS))
    if method is not None and method != "exact" and name in NOT_DIFFERENTIABLE:
        raise MetricError(
            f"--metric {name} is not differentiable: --method {method} needs a gradient; use --method exact"
        )
    if method == "eap" and name == "kl":
        raise MetricError(
            "--metric kl has a zero gradient at the clean run, so --method eap scores every edge 0; "
            "use --method eap-ig-inputs, eap-ig-activations or exact"
        )


def gather_sets(values: Float[Tensor, "P V"], sets: Int[Tensor, "P K"]) -> Float[Tensor, "P K"]:
    """``values[p, sets[p, k]]``, with padding (-1) entries read as token 0 (mask them)."""
    return values.gather(-1, sets.clamp(min=0))


def metric_from_logits(
    name: str,
    logits: Float[Tensor, "P V"],
    correct: Int[Tensor, "P Kc"] | None = None,
    incorrect: Int[Tensor, "P Ki"] | None = None,
    reference: Float[Tensor, "P V"] | None = None,
) -> Float[Tensor, " P"]:
    """The metric at each point from the model's real logits there (float32).

    ``correct``/``incorrect``: the answer sets at each point, padded with -1 (column 0 is the
    task's pair); ``reference``: the clean run's log-probabilities at the same points (``kl``).
    """
    logits = logits.float()
    if name == "kl":
        assert reference is not None, "kl needs the clean run's log-probabilities"
        logp = torch.log_softmax(logits, -1)
        return -(reference.exp() * (reference - logp)).sum(-1)
    if name == "log_prob":  # the next token's log-probability: ``correct[:, 0]`` is that token
        assert correct is not None, "log_prob needs each point's next token"
        return torch.log_softmax(logits, -1).gather(-1, correct[:, :1])[:, 0]
    assert correct is not None and incorrect is not None, f"{name} needs answers"
    if name == "logit_diff":
        return logits.gather(-1, correct[:, :1])[:, 0] - logits.gather(-1, incorrect[:, :1])[:, 0]
    if name == "accuracy":
        neg = torch.tensor(-torch.inf, device=logits.device)
        best_right = torch.where(correct >= 0, gather_sets(logits, correct), neg).amax(-1)
        best_wrong = torch.where(incorrect >= 0, gather_sets(logits, incorrect), neg).amax(-1)
        return (best_right > best_wrong).float()
    probs = torch.softmax(logits, -1)
    if name == "prob_diff":
        return probs.gather(-1, correct[:, :1])[:, 0] - probs.gather(-1, incorrect[:, :1])[:, 0]
    if name == "greater_than":
        right = (gather_sets(probs, correct) * (correct >= 0)).sum(-1)
        wrong = (gather_sets(probs, incorrect) * (incorrect >= 0)).sum(-1)
        return right - wrong
    raise MetricError(f"unknown metric {name!r}")
