"""The statistics `ddk compare` reports: spread over seeds, test-split metrics, paired bootstrap.

Pure functions of plain numbers (floats, dicts, numpy arrays); nothing here reads files.
All losses are mean next-token cross-entropies in nats; PPL = exp(CE).

* `seed_spread`: mean, sample standard deviation and min..max of one metric over seeds.
* `metrics_vs_teacher`: a student's per-domain PPL, mean CE over domains (the mean log-PPL,
  which the hardest domain does not dominate as it dominates mean PPL), and the mean and
  worst student/teacher PPL ratio.
* `paired_bootstrap`: the difference of two modes in mean CE and mean PPL ratio, with a
  percentile confidence interval from resampling seeds and test rows, paired between
  the modes (docs/DESIGN.md section 8: a ~1 % difference is within run-to-run noise unless
  the interval says otherwise).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

# Replicates are drawn in blocks so that memory stays bounded by block x rows, and the
# draws (hence the interval) depend only on rng_seed, never on the input size.
_BLOCK = 250


def seed_spread(values: Sequence[float]) -> dict:
    """Mean and spread of one metric over seeds.

    Returns {"n", "mean", "std", "min", "max"}: `std` is the SAMPLE standard deviation
    (denominator n - 1), None when n = 1 (one seed has no spread); min and max are the
    extreme seeds.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed_spread: no values (a metric needs at least one seed)")
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def metrics_vs_teacher(student_loss: Mapping[str, float], teacher_loss: Mapping[str, float]) -> dict:
    """A student's test-split metrics from per-domain mean CE (nats), its own and the teacher's.

    Returns {"ppl": {domain: exp(CE)}, "mean_ce": mean over domains of CE (= mean log-PPL),
    "ratio": {domain: student PPL / teacher PPL}, "mean_ratio": mean over domains of the
    ratio, "worst_ratio": the largest ratio, "worst_domain": the domain that has it}.
    Domains are the teacher's, in its order; a domain the student lacks is an error.
    """
    missing = [d for d in teacher_loss if d not in student_loss]
    if missing:
        raise ValueError(f"metrics_vs_teacher: no student loss for domains {missing}")
    domains = list(teacher_loss)
    ratio = {d: math.exp(student_loss[d] - teacher_loss[d]) for d in domains}
    worst = max(domains, key=ratio.__getitem__)
    return {
        "ppl": {d: math.exp(student_loss[d]) for d in domains},
        "mean_ce": statistics.fmean(student_loss[d] for d in domains),
        "ratio": ratio,
        "mean_ratio": statistics.fmean(ratio.values()),
        "worst_ratio": ratio[worst],
        "worst_domain": worst,
    }


def paired_bootstrap(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    teacher: Mapping[str, np.ndarray],
    replicates: int = 2000,
    confidence: float = 0.95,
    rng_seed: int = 0,
    row_weights: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Mode a minus mode b in mean test CE and mean PPL ratio, with a paired bootstrap interval.

    `a[domain]` and `b[domain]` are [seeds, rows] arrays of per-row mean CE on the test
    split (row i of seed s in a and in b: the same test row, the same seed); `teacher[domain]`
    holds the teacher's per-row CE on the same rows. Every row has the same token count,
    so a domain's CE is the mean of its rows; or, with `row_weights[domain]` (the trained
    positions of each row of a masked cache), the weighted mean: the token-weighted CE.

    Statistics, each computed per seed and then averaged over seeds:
      mean CE    = mean over domains of the domain's CE;
      mean ratio = mean over domains of exp(student CE - teacher CE).

    Each replicate resamples the seeds with replacement (the same seed indices for a and
    b: seed s of a is paired with seed s of b) and, within each domain, the test rows
    with replacement (the same row indices for a, b and the teacher). The interval is
    the `confidence` percentile interval of the replicates' differences; a difference
    is significant when the interval excludes 0. With one seed only the rows are
    resampled: the interval then covers test-set sampling, not run-to-run noise.

    Returns {"n_seeds", "replicates", "confidence", "rng_seed", "mean_ce": {"diff",
    "low", "high", "significant"}, "mean_ratio": {same}}; diff is a - b on the data.
    """
    domains = list(teacher)
    a = {d: np.asarray(a[d], dtype=np.float64) for d in domains}
    b = {d: np.asarray(b[d], dtype=np.float64) for d in domains}
    t = {d: np.asarray(teacher[d], dtype=np.float64) for d in domains}
    n_seeds = _check_shapes(a, b, t)
    rw = {d: np.ones(t[d].size) if row_weights is None else np.asarray(row_weights[d], dtype=np.float64) for d in domains}
    if any(rw[d].shape != t[d].shape for d in domains):
        raise ValueError("paired_bootstrap: row_weights must hold one weight per test row of every domain")
    if replicates < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: replicates = {replicates} must be >= 1 and confidence = {confidence} in (0, 1)")

    # The data itself: every seed once, every row once.
    point = _differences(*_seed_domain_means(a, b, t, np.arange(n_seeds)[None, :],
                                             {d: rw[d][None, :] for d in domains}))
    rng = np.random.default_rng(rng_seed)
    ce_reps, ratio_reps = [], []
    for start in range(0, replicates, _BLOCK):
        m = min(_BLOCK, replicates - start)
        seeds = rng.integers(0, n_seeds, size=(m, n_seeds))
        # Resampling rows with replacement = multinomial counts of each row.
        counts = {d: rng.multinomial(t[d].size, np.full(t[d].size, 1.0 / t[d].size), size=m) * rw[d] for d in domains}
        ce, ratio = _differences(*_seed_domain_means(a, b, t, seeds, counts))
        ce_reps.append(ce)
        ratio_reps.append(ratio)
    tail = (1.0 - confidence) / 2.0
    return {
        "n_seeds": n_seeds,
        "replicates": replicates,
        "confidence": confidence,
        "rng_seed": rng_seed,
        "mean_ce": _interval(float(point[0][0]), np.concatenate(ce_reps), tail),
        "mean_ratio": _interval(float(point[1][0]), np.concatenate(ratio_reps), tail),
    }


def _check_shapes(a: dict, b: dict, t: dict) -> int:
    n_seeds = None
    for d in t:
        if t[d].ndim != 1 or t[d].size == 0:
            raise ValueError(f"paired_bootstrap: teacher rows of domain {d!r} must be a non-empty 1-D array, got shape {t[d].shape}")
        for name, x in (("a", a[d]), ("b", b[d])):
            if x.ndim != 2 or x.shape[1] != t[d].size:
                raise ValueError(f"paired_bootstrap: {name}[{d!r}] has shape {x.shape}, expected [seeds, {t[d].size} rows] like the teacher's")
        if a[d].shape != b[d].shape:
            raise ValueError(f"paired_bootstrap: domain {d!r}: a has shape {a[d].shape}, b {b[d].shape}; pairing needs the same seeds and rows")
        if n_seeds not in (None, a[d].shape[0]):
            raise ValueError(f"paired_bootstrap: domain {d!r} has {a[d].shape[0]} seeds, other domains {n_seeds}")
        n_seeds = a[d].shape[0]
    if not n_seeds:
        raise ValueError("paired_bootstrap: no domains or no seeds")
    return n_seeds


def _seed_domain_means(a: dict, b: dict, t: dict, seeds: np.ndarray, counts: dict):
    """Per replicate, seed slot and domain, the resampled CE: ([m, n, D] for a and b, [m, D] for t).

    `seeds[j]` are replicate j's seed indices, `counts[d][j]` how often each row of domain d
    is drawn in replicate j (times its weight)."""
    m = seeds.shape[0]
    ce_a, ce_b, ce_t = [], [], []
    for d in t:
        w = counts[d].T / counts[d].sum(axis=1)  # [rows, m]: row weights per replicate
        per_seed_a = (a[d] @ w).T  # [m, all seeds]
        per_seed_b = (b[d] @ w).T
        pick = (np.arange(m)[:, None], seeds)
        ce_a.append(per_seed_a[pick])  # [m, n] at the replicate's seed indices
        ce_b.append(per_seed_b[pick])
        ce_t.append(t[d] @ w)  # [m]
    return np.stack(ce_a, axis=-1), np.stack(ce_b, axis=-1), np.stack(ce_t, axis=-1)


def _differences(ce_a: np.ndarray, ce_b: np.ndarray, ce_t: np.ndarray):
    """(mean CE of a - b, mean ratio of a - b), one value per replicate."""
    mean_ce = ce_a.mean(axis=(1, 2)) - ce_b.mean(axis=(1, 2))
    ratio_a = np.exp(ce_a - ce_t[:, None, :]).mean(axis=(1, 2))
    ratio_b = np.exp(ce_b - ce_t[:, None, :]).mean(axis=(1, 2))
    return mean_ce, ratio_a - ratio_b


def _interval(diff: float, reps: np.ndarray, tail: float) -> dict:
    low, high = (float(q) for q in np.quantile(reps, [tail, 1.0 - tail]))
    return {"diff": diff, "low": low, "high": high, "significant": bool(low > 0.0 or high < 0.0)}
