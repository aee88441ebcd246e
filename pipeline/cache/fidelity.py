"""What a cache's compression costs the student, defined once: the KL distortion.

Per position, the teacher's distribution as the cache can describe it exactly is its
top-k probabilities plus the tail bucket (k + 1 outcomes, summing to 1):

    P = (p_1, ..., p_k, tail)          from the teacher's fp32 log-softmax
    Q = (q_1, ..., q_k, tail') / Z     what a codec stores and stage two trains toward,
                                       renormalized (Z = its sum; quantization moves it off 1)

    distortion = KL(P || Q) = sum_i P_i (log P_i - log Q_i)   nats, >= 0, 0 iff Q = P

The same function scores every method (today's fixed-step codec, any other quantizer,
a top-p support mapped onto the same k + 1 outcomes by support_kl_distortion), so their
numbers are comparable; the writer records its mean over every position in the manifest
(`fidelity.mean_kl_distortion`). An error on a likely token costs more than the same
error on an unlikely one: to second order the distortion is 1/2 sum_i P_i d_i^2 for
log-probability errors d_i, which is what a fidelity-aware quantizer exploits.

A sampled support (pipeline/teachers/support.py) is scored differently, because its target
is random: its expectation is the teacher's full distribution, so this distortion of the
expected target is 0 (unbiased), and its cost is the target's variance instead,
E ||q - p||^2 = (1 - sum p^2) / k per position (support.target_variance).
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


def support_kl_distortion(ref_ids, ref_logprobs, ref_tail_logmass, ids, logprobs, tail_logmass, vocab_size: int) -> np.ndarray:
    """KL(P || Q) per position when the stored support may differ from the exact top-k
    (cache.top_p keeps a prefix of it; the rest went into the stored tail).

    P is the exact top-k plus tail, as in kl_distortion. Q is what the cache stores,
    mapped onto P's k + 1 outcomes: a top-k token the cache kept gets its stored
    probability; one it dropped gets an equal share of the stored tail, which spreads
    uniformly over the V - n tokens outside the n stored ones (the loss constrains only
    the tail's total, not its shape, so no shape is assumed). P's tail bucket gets the
    stored tail's share of its V - k tokens (plus any stored entry outside the top-k).
    With the same support (fixed k) this is kl_distortion exactly.

    ref_ids/ref_logprobs [P, k]: the exact top-k (any order); ref_tail_logmass [P];
    ids/logprobs [P, k'] stored (-1 / -inf padding); tail_logmass [P] stored.
    """
    ref_ids = np.asarray(ref_ids, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    lq = np.asarray(logprobs, dtype=np.float64)
    positions, k = ref_ids.shape
    v = int(vocab_size)
    used = ids >= 0
    n = used.sum(axis=1)
    pos = np.arange(positions)[:, None]
    # Stored entries as sorted (position, id) keys, to look the top-k ids up in.
    keys = np.where(used, pos * v + ids, -1)
    order = np.argsort(keys, axis=None)
    skeys, slq = keys.reshape(-1)[order], lq.reshape(-1)[order]
    rkeys = pos * v + ref_ids
    at = np.clip(np.searchsorted(skeys, rkeys), 0, skeys.size - 1)
    found = skeys[at] == rkeys
    tail_q = np.asarray(tail_logmass, dtype=np.float64)
    outside = np.maximum(v - n, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(outside > 0, tail_q - np.log(np.maximum(outside, 1)), -np.inf)  # log of one tail token's share
        q_ref = np.where(found, slq[at], share[:, None])
        # Stored entries that are not among the exact top-k (not produced by top-p) join P's tail.
        in_ref = used & np.isin(keys, rkeys)
        extra = np.where(used & ~in_ref, lq, -np.inf)
        tail_tokens = np.maximum(v - k - (used & ~in_ref).sum(axis=1), 0)
        spread = np.where(tail_tokens > 0, share + np.log(np.maximum(tail_tokens, 1)), -np.inf)
        q_tail = _logsumexp(np.concatenate([extra, spread[:, None]], axis=1))[:, 0]
    return kl_distortion(ref_logprobs, ref_tail_logmass, q_ref, q_tail)
