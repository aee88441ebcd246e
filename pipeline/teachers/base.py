"""What every teacher backend returns: one `TopK` batch type, whatever engine made it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class TeacherOutputError(ValueError):
    """The teacher's output cannot be cached as it is (NaN log-probs: non-finite logits);
    the capture worker adds the shard to the message."""


@dataclass
class TopK:
    """Teacher distributions for B rows of L + 1 tokens: one entry per predicted position.

    Position p (0 <= p < L) is the teacher's distribution over token p + 1 given tokens
    0..p, so the L positions cover every token the student predicts.
    """

    ids: np.ndarray  # [B, L, k] int32, top-k token ids, highest probability first
    logprobs: np.ndarray  # [B, L, k] float32, log p over the full vocabulary (temperature 1)
    target_logprob: np.ndarray  # [B, L] float32, log p of the actual next token
    tail_logmass: np.ndarray  # [B, L] float32, log(1 - sum_k p): mass outside the top-k

    def __post_init__(self):
        b, l, k = self.ids.shape
        assert self.logprobs.shape == (b, l, k) and self.target_logprob.shape == (b, l) == self.tail_logmass.shape


def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012).

    log1p(-exp(x)) loses everything when exp(x) is close to 1 (kept mass > 0.9999);
    log(-expm1(x)) is the accurate branch there.
    """
    x = np.minimum(np.asarray(x, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


# Config fields of transforms some models apply to the LM head's output (Gemma 2's
# soft-capping, Cohere's and Granite's logit scales, ...): with one set, logits are not
# h W^T, and neither the teacher's chunked head nor the student's fused one may be used.
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def named_head_transforms(config) -> list[str]:
    """The HEAD_TRANSFORMS a model config sets (to anything but None or 1)."""
    return [a for a in HEAD_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)]


class TeacherBackend:
    """Interface: `topk(rows)` on [B, L + 1] int token rows; `close()` frees the engine.

    `dtype` is the dtype the engine actually computes in, as the engine itself reports it
    (not as requested): the capture checks it against the plan before writing a shard.
    """

    name = "base"
    dtype = "unknown"

    def topk(self, rows: np.ndarray) -> TopK:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass
