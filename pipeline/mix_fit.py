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

A bound on the worst domain (`ddk fit-mix --worst-ratio`, compare's kd-fitted-worst):
the fitted mix is the mean's best, and it may starve a domain the student already lags
on. Asking every domain's fitted validation CE to stay within g nats of the teacher's
(student/teacher PPL ratio at most e^g) is, under the fit, a floor on its share:

    a_i - b_i log s_i <= T_i + g   <=>   s_i >= exp((a_i - T_i - g) / b_i)   (b_i > 0)

so the bounded optimum is the same clipped solution with those floors as the low ends
(`gap_floors`); sweeping g traces what each nat of worst-domain gap costs on the mean
(`frontier`).
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

    def predicted_ce(self, mix) -> np.ndarray:
        """The fitted CE per domain of a mix (nats), [N]."""
        return self.a - self.b * np.log(np.asarray(mix, np.float64))

    def predicted_mean_ce(self, mix) -> float:
        """The fitted domain-mean CE of a mix (nats)."""
        return float(np.mean(self.predicted_ce(mix)))


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


def gap_floors(fit: LogShareFit, teacher_ce, max_gap: float) -> np.ndarray:
    """The smallest share per domain whose fitted CE is within max_gap nats of the teacher's
    (teacher_ce [N], nats): exp((a_i - T_i - max_gap) / b_i) where b_i > 0; 0 where the
    domain's loss did not answer its share (b_i <= 0: no share helps it; `bounded_mix`
    checks its bound at the mix it picks)."""
    t = np.asarray(teacher_ce, np.float64)
    with np.errstate(over="ignore", divide="ignore"):
        return np.where(fit.b > 0, np.exp((fit.a - t - max_gap) / np.where(fit.b > 0, fit.b, 1.0)), 0.0)


def optimal_mix(fit: LogShareFit, extrapolate: float = 1.0, iters: int = 200, floors=None) -> np.ndarray:
    """argmin of fit.predicted_mean_ce over mixes with lo <= s <= hi: s_i = clip(b_i / lambda,
    lo_i, hi_i), lambda by bisection so that the shares sum to 1. extrapolate >= 1 widens
    every domain's range by that factor (lo / extrapolate .. hi * extrapolate). floors [N]
    (`gap_floors`) raise the low ends; a floor above a domain's high end, or floors that
    sum past 1, are a bound no mix in the range meets (ValueError naming the domain)."""
    if not extrapolate >= 1.0:
        raise ValueError(f"extrapolate must be >= 1 (1: only the shares the runs saw), got {extrapolate}")
    lo, hi, b = fit.lo / extrapolate, np.minimum(fit.hi * extrapolate, 1.0), np.maximum(fit.b, 0.0)
    if floors is not None:
        lo = np.maximum(lo, np.asarray(floors, np.float64))
        over = np.flatnonzero(lo > hi + 1e-12)
        if len(over):
            i = over[0]
            raise ValueError(f"domain {fit.domains[i]!r} needs a share of {lo[i]:.3f} to meet the bound, above the "
                             f"{hi[i]:.3f} the fit may go to (x{extrapolate:g} the shares seen): loosen the bound")
    if lo.sum() > 1.0 + 1e-9 or hi.sum() < 1.0 - 1e-9:
        what = "the bound's floors" if floors is not None else "the shares seen"
        raise ValueError(f"no mix within {what}: lows sum to {lo.sum():.4f}, highs to {hi.sum():.4f}")
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


def bounded_mix(fit: LogShareFit, teacher_ce, max_gap: float, extrapolate: float = 1.0) -> np.ndarray:
    """The fitted mean's best mix with every domain's fitted CE within max_gap nats of the
    teacher's. ValueError when no mix in the range meets the bound, including a domain
    whose loss does not fall with its share and sits above it."""
    mix = optimal_mix(fit, extrapolate, floors=gap_floors(fit, teacher_ce, max_gap))
    gaps = fit.predicted_ce(mix) - np.asarray(teacher_ce, np.float64)
    worst = int(np.argmax(gaps))
    if gaps[worst] > max_gap + 1e-6:
        raise ValueError(f"domain {fit.domains[worst]!r}: its fitted gap to the teacher at the bounded mix is {gaps[worst]:.4f} nats, "
                         f"above the bound {max_gap:.4f} (b = {fit.b[worst]:.3f}: its loss does not fall with its share); loosen the bound")
    return mix


def frontier(fit: LogShareFit, teacher_ce, extrapolate: float = 1.0, points: int = 40) -> list[tuple[float, float]]:
    """What the worst domain costs the mean, under the fit: (worst fitted gap g, fitted mean CE
    of the bounded optimum) for bounds from the unbounded optimum's worst gap down to the
    tightest one a mix in the range meets."""
    t = np.asarray(teacher_ce, np.float64)
    free = optimal_mix(fit, extrapolate)
    top = float(np.max(fit.predicted_ce(free) - t))
    out = [(top, fit.predicted_mean_ce(free))]
    low, high = top - 5.0, top  # bisection for the tightest bound any mix in the range meets
    for _ in range(60):
        mid = 0.5 * (low + high)
        try:
            bounded_mix(fit, t, mid, extrapolate)
            high = mid
        except ValueError:
            low = mid
    for g in np.linspace(top, high, points)[1:]:
        try:
            mix = bounded_mix(fit, t, float(g), extrapolate)
        except ValueError:
            continue
        out.append((float(np.max(fit.predicted_ce(mix) - t)), fit.predicted_mean_ce(mix)))
    return out


def bootstrap_mixes(domains: list, shares: np.ndarray, ce: np.ndarray, extrapolate: float = 1.0,
                    replicates: int = 500, seed: int = 0, teacher_ce=None, max_gap: float | None = None) -> np.ndarray:
    """The fitted mix of `replicates` resamplings of the runs (with replacement), [R, N]:
    how firmly the runs pin the mix down (the bounded mix when max_gap is given, the bound
    held fixed). Resamples in which some domain's share does not vary (no slope to fit), or
    no mix meets the bound, are skipped."""
    shares, ce = np.asarray(shares, np.float64), np.asarray(ce, np.float64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(replicates):
        pick = rng.integers(0, len(shares), len(shares))
        try:
            fit = fit_log_share(domains, shares[pick], ce[pick])
            out.append(optimal_mix(fit, extrapolate) if max_gap is None else bounded_mix(fit, teacher_ce, max_gap, extrapolate))
        except ValueError:
            continue
    return np.array(out).reshape(-1, len(domains))
