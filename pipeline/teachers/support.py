"""Which tokens a cached position keeps: its support (cache.support, cache.top_p).

topk      The teacher's k most likely tokens with their exact log-probs, plus the exact
          tail bucket log(1 - sum_k p). Every position stores k entries.
top-p     cache.top_p = p in (0, 1): of those k, the smallest set, most likely first,
          whose mass reaches p (at most k, at least one). The dropped tokens' mass moves
          into the tail bucket, so the stored distribution still sums to 1 and the loss
          still knows the student's mass outside the kept set. A teacher that puts
          99.99 % of its mass on three tokens stores three, not k.
sampled   cache.support = "sampled" (the default): Sparse Logit Sampling (Anshumann et al. 2025,
          arXiv 2503.16870), proposal = the teacher itself. k tokens are drawn with
          replacement from the teacher's FULL distribution; a position stores the
          distinct ones with their counts c, and the student is trained toward
          q = c / k, with no tail bucket (q sums to 1). E[c / k] = p for every token, and
          the KL gradient softmax(z) - q is linear in q, so the gradient is an unbiased
          estimate of the gradient toward the full teacher distribution, whereas top-k
          (with or without a tail bucket) is a biased one. The price is variance: the
          target's expected squared error is (1 - sum_v p_v^2) / k per position. Needs
          the full distribution at capture time (the hf backend); vLLM returns top-k
          log-probs only. The loss value KL(q || p_student) differs from KL(p || p_s) by
          a constant of the teacher (H(p) - E H(q)), so it is comparable across steps of
          one run, not with a top-k run's.

Padding (both ragged supports): id -1 and log-prob -inf mark unused slots; the codec
stores no padding and both kernels treat such slots as absent.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .base import TopK

SUPPORTS = ("topk", "sampled")


def truncate_top_p(ids: np.ndarray, logprobs: np.ndarray, tail_logmass: np.ndarray, top_p: float):
    """Keep, per position, the smallest most-likely-first prefix of the top-k whose mass
    reaches top_p; fold the rest into the tail. ids/logprobs [..., k] (any order),
    tail_logmass [...] -> (ids with -1 padding, logprobs with -inf padding, new tail),
    each position's entries ordered most likely first."""
    if not 0.0 < top_p < 1.0:
        raise ValueError(f"top_p must be in (0, 1), got {top_p}")
    ids = np.asarray(ids)
    lp = np.asarray(logprobs, dtype=np.float64)
    order = np.argsort(-lp, axis=-1, kind="stable")
    lp = np.take_along_axis(lp, order, -1)
    ids = np.take_along_axis(ids, order, -1)
    mass_before = np.cumsum(np.exp(lp), axis=-1) - np.exp(lp)  # mass of the entries ranked above
    keep = mass_before < top_p  # the first entry always; then until the mass reaches p
    dropped = np.where(keep, -np.inf, lp)
    tail = np.asarray(tail_logmass, dtype=np.float64)
    with np.errstate(divide="ignore"):
        both = np.concatenate([tail[..., None], dropped], axis=-1)
        m = np.max(both, axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        new_tail = (m + np.log(np.exp(both - m).sum(axis=-1, keepdims=True)))[..., 0]
    return (np.where(keep, ids, -1).astype(np.int32), np.where(keep, lp, -np.inf).astype(np.float32),
            new_tail.astype(np.float32))


def top_p_support(topk: TopK, top_p: float) -> TopK:
    """A teacher's top-k batch truncated to its top-p support (same shapes, -1 padded)."""
    ids, lp, tail = truncate_top_p(topk.ids, topk.logprobs, topk.tail_logmass, top_p)
    return TopK(ids=ids, logprobs=lp, target_logprob=topk.target_logprob, tail_logmass=tail)


# Counts of a teacher's padded ids folded away (the manifest's vocab_fold): positions seen,
# positions with folded mass, positions where a padded id was in the top-k, the folded
# mass summed and at its largest.
NO_FOLDS = {"positions": 0, "folded_positions": 0, "in_support": 0, "mass_sum": 0.0, "mass_max": 0.0}


def add_folds(total: dict, more: dict) -> dict:
    """Two parts' fold counts together: every count summed, the largest mass kept."""
    return {key: max(value, more[key]) if key == "mass_max" else value + more[key] for key, value in total.items()}


def fold_padded_ids(topk: TopK, bound: int, targets: np.ndarray) -> tuple[TopK, dict]:
    """A top-k batch with every id >= bound (a padded embedding row no text maps to) moved
    into the tail bucket: its slot becomes padding (id -1, log-prob -inf; the batch is then
    a ragged support, most likely first) and its mass joins tail_logmass, so the stored
    distribution still sums to 1. Returns the batch and the counts the manifest reports
    (vLLM's path; the hf backend folds inside its chunked head).

    A position whose every entry is padded would keep none, which no support allows (1..k
    entries): it keeps its actual next token (targets [B, L], always a tokenizer id) with
    its log-prob instead, the rest of its mass in the tail."""
    pad = topk.ids >= bound
    lp = topk.logprobs.astype(np.float64)
    with np.errstate(divide="ignore"):
        folded = np.log(np.where(pad, np.exp(lp), 0.0).sum(-1))  # -inf where nothing folds
    mass = np.exp(folded)
    stats = {"positions": int(pad.shape[0] * pad.shape[1]), "folded_positions": int(pad.any(-1).sum()),
             "in_support": int(pad.any(-1).sum()), "mass_sum": float(mass.sum()), "mass_max": float(mass.max(initial=0.0))}
    if not pad.any():
        return topk, stats
    kept_lp = np.where(pad, -np.inf, lp)
    kept_ids = np.where(pad, -1, topk.ids)
    tail = np.logaddexp(topk.tail_logmass.astype(np.float64), folded)
    empty = pad.all(-1)
    if empty.any():
        target_lp = topk.target_logprob.astype(np.float64)
        kept_lp[..., 0] = np.where(empty, target_lp, kept_lp[..., 0])
        kept_ids[..., 0] = np.where(empty, np.asarray(targets), kept_ids[..., 0])
        # the target's mass leaves the tail: log(exp(tail) - exp(target)), >= the floor
        with np.errstate(divide="ignore", invalid="ignore"):
            rest = tail + np.log1p(-np.exp(np.minimum(target_lp - tail, 0.0)))
        tail = np.where(empty, rest, tail)
    order = np.argsort(-kept_lp, axis=-1, kind="stable")
    ids = np.take_along_axis(kept_ids, order, -1).astype(np.int32)
    return TopK(ids=ids, logprobs=np.take_along_axis(kept_lp, order, -1).astype(np.float32),
                target_logprob=topk.target_logprob, tail_logmass=tail.astype(np.float32)), stats


def draws_to_support(draws: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """draws [..., k] sampled token ids -> (distinct ids [..., k] ascending, -1 padded;
    log(count / k) [..., k], -inf padded). Counts are the run lengths of the sorted draws:
    every row starts a run, so over the flattened array a run ends where the next begins."""
    draws = np.sort(np.asarray(draws, dtype=np.int64), axis=-1)
    if draws.shape[-1] != k:
        raise ValueError(f"expected {k} draws per position, got {draws.shape[-1]}")
    shape = draws.shape
    flat = draws.reshape(-1, k)
    new = np.ones(flat.shape, bool)
    new[:, 1:] = flat[:, 1:] != flat[:, :-1]  # the first draw of each distinct id
    slot = np.cumsum(new, axis=1) - 1  # its slot in the output
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, new.size))
    rows, cols = np.divmod(starts, k)
    out_slots = slot[rows, cols]
    ids = np.full(flat.shape, -1, np.int32)
    lp = np.full(flat.shape, -np.inf, np.float32)
    ids[rows, out_slots] = flat[rows, cols]
    lp[rows, out_slots] = np.log(counts / k)
    return ids.reshape(shape), lp.reshape(shape)


def draws_to_support_torch(draws, k: int):
    """draws_to_support on the device the draws are on (torch tensors [N, k] -> ids [N, k]
    int32 ascending, -1 padded; log(count / k) [N, k] float32, -inf padded): the same
    arrays, with the counts scattered into each distinct id's slot, so that only the
    support crosses to the host. The log-probs come from a table of log(c / k) computed
    as draws_to_support computes them (numpy, float64, then float32)."""
    import torch

    if draws.shape[-1] != k:
        raise ValueError(f"expected {k} draws per position, got {draws.shape[-1]}")
    d = draws.sort(-1).values
    new = torch.ones_like(d, dtype=torch.bool)
    new[:, 1:] = d[:, 1:] != d[:, :-1]
    slot = new.cumsum(1) - 1
    counts = torch.zeros_like(d).scatter_add_(1, slot, torch.ones_like(d))
    ids = torch.full_like(d, -1).scatter_(1, slot, d)  # a run's draws all write its id
    with np.errstate(divide="ignore"):
        table = np.log(np.arange(k + 1) / k).astype(np.float32)  # table[0] = -inf: padding
    return ids.to(torch.int32), torch.as_tensor(table, device=d.device)[counts]


def row_seed(row: np.ndarray, seed: int) -> int:
    """A row's sampling seed: its tokens and cache.sample_seed, so a resumed or re-batched
    capture draws the same tokens for the same row."""
    h = hashlib.blake2b(np.ascontiguousarray(row, dtype=np.int64).tobytes(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def target_variance(probs: np.ndarray, k: int) -> np.ndarray:
    """E ||c / k - p||^2 per position for k draws from p ([..., V]): (1 - sum p^2) / k."""
    p = np.asarray(probs, dtype=np.float64)
    return (1.0 - (p * p).sum(axis=-1)) / k
