"""What a cache's compression costs the student, defined once: the KL distortion.

Per position, the teacher's distribution as the cache can describe it exactly is its
top-k probabilities plus the tail bucket (k + 1 outcomes, summing to 1):

    P = (p_1, ..., p_k, tail)          from the teacher's fp32 log-softmax
    Q = (q_1, ..., q_k, tail') / Z     what a codec stores and stage two trains toward,
                                       renormalized (Z = its sum; quantization moves it off 1)

    distortion = KL(P || Q) = sum_i P_i (log P_i - log Q_i)   nats, >= 0, 0 iff Q = P

The same function scores every method (today's fixed-step codec, any other quantizer,
variable or sampled supports mapped onto the same k + 1 outcomes), so their numbers are
comparable; the writer records its mean over every position in the manifest
(`fidelity.mean_kl_distortion`). An error on a likely token costs more than the same
error on an unlikely one: to second order the distortion is 1/2 sum_i P_i d_i^2 for
log-probability errors d_i, which is what a fidelity-aware quantizer exploits.
"""

from __future__ import annotations

import numpy as np


def kl_distortion(logprobs, tail_logmass, decoded_logprobs, decoded_tail_logmass=None) -> np.ndarray:
    """KL(P || Q) per position, in nats (float64).

    logprobs, decoded_logprobs: [..., k] the teacher's exact and the stored top-k
    log-probabilities, in the same order; tail_logmass: [...] the exact log tail mass
    (-inf when the top-k holds all the mass); decoded_tail_logmass: the stored one
    (default: the exact one, as the cache stores the tail in fp32).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    lq = np.asarray(decoded_logprobs, dtype=np.float64)
    if lp.shape != lq.shape:
        raise ValueError(f"exact logprobs {lp.shape} and decoded {lq.shape} must have the same shape (same positions, same order)")
    tail = np.asarray(tail_logmass, dtype=np.float64)[..., None]
    tail_q = tail if decoded_tail_logmass is None else np.asarray(decoded_tail_logmass, dtype=np.float64)[..., None]
    log_p = np.concatenate([lp, tail], axis=-1)
    log_q = np.concatenate([lq, tail_q], axis=-1)
    log_p = log_p - _logsumexp(log_p)  # the exact outcomes sum to 1 up to fp32 rounding
    log_q = log_q - _logsumexp(log_q)
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)  # 0 log 0 = 0; a q of 0 under p > 0 is +inf
    return np.maximum(terms.sum(axis=-1), 0.0)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
