"""A domain mix fitted to finished runs: how each domain's loss answers the share of data
it got, and the fixed mix that minimizes the domain-mean loss under that answer.

Each finished run (a mode and seed of `ddk compare`) gives, per domain i, the mean share
s_i of the rows it drew over training and its final VALIDATION CE_i (the scheduler's
split: the test split stays held out for judging the fitted mix). Per domain, over the
runs, a least-squares line in the log of the share:

    CE_i = a_i - b_i * log s_i            (b_i: nats gained per e-fold of domain i's data)

The mix that minimizes the predicted domain mean (1/N) sum_i CE_i subject to sum_i s_i = 1
is, by a Lagrange multiplier, s_i = b_i / sum_j b_j: every domain's marginal gain b_i / s_i
equal. The fit is only trusted near where the runs went: s_i is kept inside the range of
domain i's shares that the runs saw, widened by a factor (`extrapolate`; `ddk fit-mix`
uses 1.5: docs/evidence.md has both 1 and 1.5 on three corpora), the exact constrained
optimum s_i = clip(b_i / lambda, lo_i, hi_i) with lambda found by bisection; a domain whose
loss did not answer its share (b_i <= 0) gets the low end of its range.

This is the simplest of the regression-on-mixture methods (Data Mixing Laws, Ye et al.
2024, arXiv 2403.16952; RegMix, Liu et al. 2024, arXiv 2407.01492), fitted on the runs a
comparison has already made: each domain's loss is taken to depend on its own share only
(transfer between domains is in a_i, as the runs' average), and on the share averaged over
training (not on when the data came: docs/evidence.md measures what timing costs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RunMix:
    """One finished run: its mean share of rows per domain and final validation CE per domain."""

    mode: str
    seed: int
    shares: np.ndarray  # [N], sums to 1
    ce: np.ndarray  # [N], nats


@dataclass
class LogShareFit:
    domains: list
    a: np.ndarray  # [N]
    b: np.ndarray  # [N] nats per e-fold of share
    r2: np.ndarray  # [N] coefficient of determination per domain
    lo: np.ndarray  # [N] smallest mean share a run gave the domain
    hi: np.ndarray  # [N] largest

    def predicted_mean_ce(self, mix) -> float:
        """The fitted domain-mean CE of a mix (nats)."""
        return float(np.mean(self.a - self.b * np.log(np.asarray(mix, np.float64))))


def mean_shares(eval_steps: list[int], weights: np.ndarray, total_steps: int) -> np.ndarray:
    """The share of rows each domain drew over a run: the interval weights [T, N] chosen at
    eval_steps, each weighted by the steps it was in force (the last interval may be short)."""
    steps = np.asarray(list(eval_steps) + [total_steps], np.float64)
    lengths = np.clip(np.minimum(steps[1:], total_steps) - steps[:-1], 0, None)
    if lengths.sum() <= 0:
        raise ValueError(f"no training steps between the evaluations {list(eval_steps)} and step {total_steps}")
    return (np.asarray(weights, np.float64) * lengths[:, None]).sum(0) / lengths.sum()


def fit_log_share(domains: list, shares: np.ndarray, ce: np.ndarray) -> LogShareFit:
    """Per domain, least squares of CE on -log share over the runs (rows of shares and ce)."""
    shares, ce = np.asarray(shares, np.float64), np.asarray(ce, np.float64)
    if shares.shape != ce.shape or shares.ndim != 2 or shares.shape[1] != len(domains):
        raise ValueError(f"shares {shares.shape} and ce {ce.shape} must both be [runs, {len(domains)} domains]")
    if shares.shape[0] < 3:
        raise ValueError(f"{shares.shape[0]} runs: a line per domain needs at least 3 runs with different mixes")
    bad = [domains[i] for i in range(len(domains)) if np.any(shares[:, i] <= 0) or not np.all(np.isfinite(ce[:, i]))]
    if bad:
        raise ValueError(f"domains {bad}: some run gave them no data (share 0) or a non-finite CE; leave such runs out")
    n = len(domains)
    a, b, r2 = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, name in enumerate(domains):
        x = -np.log(shares[:, i])
        if np.ptp(x) < 1e-6:
            raise ValueError(f"domain {name!r} got the same share ({shares[0, i]:.3f}) in every run: its answer to its share "
                             f"cannot be fitted; add runs whose mix moves it (ddk, ddk-guarded, ddk-equal-sampling)")
        b[i], a[i] = np.polyfit(x, ce[:, i], 1)
        resid = ce[:, i] - (a[i] + b[i] * x)
        spread = ((ce[:, i] - ce[:, i].mean()) ** 2).sum()
        r2[i] = 1.0 - (resid**2).sum() / spread if spread > 0 else 0.0
    return LogShareFit(list(domains), a, b, r2, shares.min(0), shares.max(0))


def optimal_mix(fit: LogShareFit, extrapolate: float = 1.0, iters: int = 200) -> np.ndarray:
    """argmin of fit.predicted_mean_ce over mixes with lo <= s <= hi: s_i = clip(b_i / lambda,
    lo_i, hi_i), lambda by bisection so that the shares sum to 1. extrapolate >= 1 widens
    every domain's range by that factor (lo / extrapolate .. hi * extrapolate)."""
    if not extrapolate >= 1.0:
        raise ValueError(f"extrapolate must be >= 1 (1: only the shares the runs saw), got {extrapolate}")
    lo, hi, b = fit.lo / extrapolate, np.minimum(fit.hi * extrapolate, 1.0), np.maximum(fit.b, 0.0)
    if lo.sum() > 1.0 + 1e-9 or hi.sum() < 1.0 - 1e-9:
        raise ValueError(f"no mix within the shares seen: lows sum to {lo.sum():.4f}, highs to {hi.sum():.4f}")
    total = lambda lam: np.clip(b / lam, lo, hi).sum()  # noqa: E731  (falls as lambda grows)
    small, big = 1e-12, max(b.max(), 1e-12) / max(lo.min(), 1e-12) * 1e3
    for _ in range(iters):
        mid = np.sqrt(small * big)
        small, big = (mid, big) if total(mid) > 1.0 else (small, mid)
    mix = np.clip(b / big, lo, hi)
    # Every domain with b > 0 at its high end and still short of 1: the rest goes to the
    # domains whose loss did not answer their share, those closest to b = 0 first (they
    # cost the least), each up to its high end; never by rescaling past the bounds.
    short = 1.0 - mix.sum()
    for i in sorted(np.flatnonzero(fit.b <= 0), key=lambda i: -fit.b[i]):
        if short <= 1e-15:
            break
        add = min(short, hi[i] - mix[i])
        mix[i] += add
        short -= add
    return mix / mix.sum()  # a float-rounding correction only


def bootstrap_mixes(domains: list, shares: np.ndarray, ce: np.ndarray, extrapolate: float = 1.0,
                    replicates: int = 500, seed: int = 0) -> np.ndarray:
    """The fitted mix of `replicates` resamplings of the runs (with replacement), [R, N]:
    how firmly the runs pin the mix down. Resamples in which some domain's share does not
    vary (no slope to fit) are skipped."""
    shares, ce = np.asarray(shares, np.float64), np.asarray(ce, np.float64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(replicates):
        pick = rng.integers(0, len(shares), len(shares))
        try:
            out.append(optimal_mix(fit_log_share(domains, shares[pick], ce[pick]), extrapolate))
        except ValueError:
            continue
    return np.array(out).reshape(-1, len(domains))
