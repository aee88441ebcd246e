"""DDK domain weighting: the discrepancy factor (Eq. 1), its smooth update (Eq. 2) and the
domain-knowledge-guided interval sampler (Algorithm 1) of arXiv 2407.16154.

Everything here is numpy and pure bookkeeping: the caller measures perplexities, this
module turns them into sampling weights and the weights into rows. State is kept in
plain JSON-serializable dicts so that a checkpoint can be read (and diffed) by eye.

Conventions: `lS[i]`, `lT[i]` are the student's and teacher's PERPLEXITIES on domain i's
validation split (not losses), and every weight vector is ordered like the domain list
it was built with.
"""

import logging
import zlib
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

MODES = ("ddk", "ddk-no-smoothing", "uniform", "proportional", "prior-tilt", "progress", "gap-progress", "fixed")
# The rules beyond the paper that weigh what a domain's data buys (distill.ddk_rule).
RULES = ("paper", "prior-tilt", "progress", "gap-progress")

# -----------------------------------------------------------------------------
# input checks: the equations are only meaningful for positive, finite perplexities


def _check_ppl(student_ppl, teacher_ppl):
    lS = np.asarray(student_ppl, dtype=np.float64)
    lT = np.asarray(teacher_ppl, dtype=np.float64)
    if lS.ndim != 1 or lT.ndim != 1:
        raise ValueError(
            f"perplexities must be 1-D (one value per domain), got shapes {lS.shape} and {lT.shape}"
        )
    if lS.shape != lT.shape:
        raise ValueError(
            f"student_ppl has {lS.size} domains but teacher_ppl has {lT.size}: "
            "pass one perplexity per domain, in the same domain order, for both"
        )
    if lS.size == 0:
        raise ValueError("no domains: pass at least one perplexity")
    for name, x in (("student_ppl", lS), ("teacher_ppl", lT)):
        bad = ~(np.isfinite(x) & (x > 0))
        if bad.any():
            raise ValueError(
                f"{name} must be positive and finite, got {x[bad].tolist()} at domain indices "
                f"{np.flatnonzero(bad).tolist()}: pass perplexities exp(mean CE), not losses or "
                "log-probs, and check the evaluation for NaN/overflow (empty validation split?)"
            )
    return lS, lT


def _check_distribution(r, n, name="r_t", atol=1e-6):
    r = np.asarray(r, dtype=np.float64)
    if r.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one weight per domain), got {r.shape}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"{name} must be finite and non-negative, got {r.tolist()}")
    if abs(r.sum() - 1.0) > atol:
        raise ValueError(
            f"{name} must sum to 1 (a distribution over domains), sums to {r.sum():.8f}: "
            "normalize it, or pass the weights the previous update returned"
        )
    return r / r.sum()  # remove the last float error so sums stay exact downstream


def _softmax(logits):
    z = logits - np.max(logits)  # subtracting the max keeps exp() from overflowing
    e = np.exp(z)
    return e / e.sum()


# -----------------------------------------------------------------------------
# Eq. 1 and Eq. 2, and the options beyond the paper (all off by default)

# "ppl-ratio": the paper's lS / lT. "log-ratio": the CE gap in nats over a temperature.
DISCREPANCIES = ("ppl-ratio", "log-ratio")


def discrepancy_scores(student_ppl, teacher_ppl, kind: str = "ppl-ratio", temperature: float = 1.0) -> np.ndarray:
    """The per-domain scores s[i] that Eq. 1 softmaxes and Eq. 2 exponentiates.

        ppl-ratio (the paper):  s[i] = lS[i] / lT[i]
        log-ratio:              s[i] = log(lS[i] / lT[i]) / tau = (CE_S[i] - CE_T[i]) / tau

    softmax(s) is unchanged by adding a constant to every s, not by scaling them. With
    the paper's ratio that makes the weights depend on the ratios' scale: ratios (18, 1, 1)
    put e^17 times more weight on the first domain (one domain trains alone), ratios
    (1.3, 1.1, 1.1) give (0.38, 0.31, 0.31) (near-uniform). The log-ratio is the student's
    excess loss over the teacher in nats; softmax(s) is then proportional to
    ratio^(1/tau), the same for (18, 1, 1) as for (1.8, 0.1, 0.1) x 10, and tau sets how
    sharply the mix follows the gaps. Eq. 2 with it is DoReMi's multiplicative update
    (Xie et al. 2023, arXiv 2305.10429: w <- w * exp(eta * excess loss), mixed with the
    uniform), with the teacher as the reference model and eta = 1/tau.
    """
    lS, lT = _check_ppl(student_ppl, teacher_ppl)
    if kind == "ppl-ratio":
        return lS / lT
    if kind == "log-ratio":
        if not (temperature > 0 and np.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        return (np.log(lS) - np.log(lT)) / temperature
    raise ValueError(f"unknown discrepancy {kind!r}: choose one of {DISCREPANCIES}")


def discrepancy_factor(student_ppl, teacher_ppl, kind: str = "ppl-ratio", temperature: float = 1.0) -> np.ndarray:
    """Eq. 1, the domain discrepancy factor: r[i] = softmax_i(lS[i] / lT[i]).

    lS, lT are per-domain perplexities of student and teacher on the validation splits.
    The domain where the student lags the teacher most (relative to the teacher's own
    difficulty there) gets the largest share. `kind`, `temperature`: see
    discrepancy_scores (the paper's is the default).
    """
    return _softmax(discrepancy_scores(student_ppl, teacher_ppl, kind, temperature))


def smooth_update(r_t, student_ppl, teacher_ppl, alpha: float = 0.5, kind: str = "ppl-ratio",
                  temperature: float = 1.0) -> np.ndarray:
    """Eq. 2, factor smooth updating, applied at the start of interval t+1:

        psi[i]       = r_t[i] * exp(lS[i] / lT[i])
        r_{t+1}[i]   = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N

    r_t carries history (so one noisy evaluation cannot swing the mix) and the
    (1 - alpha)/N term guarantees every domain a floor. Pure function of its inputs.
    `kind`, `temperature`: the exponent is discrepancy_scores (the paper's by default).
    """
    scores = discrepancy_scores(student_ppl, teacher_ppl, kind, temperature)
    n = scores.size
    r_t = _check_distribution(r_t, n)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1] (paper: 0.5), got {alpha}")
    # psi normalized == softmax(log r_t + ratio): computed in log space so a large ratio
    # cannot overflow exp(); a zero weight (log 0 = -inf) simply stays out of the softmax.
    with np.errstate(divide="ignore"):
        log_psi = np.log(r_t) + scores
    return alpha * _softmax(log_psi) + (1.0 - alpha) / n


def smoothed_initial(student_ppl, teacher_ppl, alpha: float = 0.5, kind: str = "ppl-ratio",
                     temperature: float = 1.0) -> np.ndarray:
    """r_0 with Eq. 2's smoothing against the uniform prior (the paper uses Eq. 1 alone):

        r_0[i] = alpha * softmax_i(s) + (1 - alpha) / N

    i.e. smooth_update from r_{-1} = 1/N. Every domain keeps at least (1 - alpha)/N of
    the first interval, so a fresh student with one domain far behind does not train on
    that domain alone while the others regress.
    """
    scores = discrepancy_scores(student_ppl, teacher_ppl, kind, temperature)
    return smooth_update(np.full(scores.size, 1.0 / scores.size), student_ppl, teacher_ppl, alpha, kind, temperature)


def bound_weights(weights, floor: float = 0.0, cap: float = 1.0) -> np.ndarray:
    """The weights with every domain kept in [floor, cap], summing to 1:

        w'[i] = clip(lam * w[i], floor, cap),  lam > 0 such that sum_i w'[i] = 1

    Domains inside the bounds keep their proportions, the order of the weights is kept,
    and weights already inside are returned unchanged (lam = 1). The sum grows with lam
    from N * floor to N * cap, so lam is found by bisection. A guardrail against collapse
    onto one domain (cap) and starvation of another (floor). Needs floor * N <= 1 <= cap * N.
    """
    w = _check_distribution(weights, np.asarray(weights).size, "weights")
    n = w.size
    if not (0.0 <= floor <= 1.0 / n + 1e-12 and 1.0 / n - 1e-12 <= cap <= 1.0):
        raise ValueError(f"need 0 <= floor <= 1/N <= cap <= 1 for N = {n} domains, got floor {floor}, cap {cap}")
    if floor <= w.min() and w.max() <= cap:
        return w
    w = np.maximum(w, 1e-300)  # a zero weight can still be raised to the floor or beyond
    total = lambda lam: np.clip(lam * w, floor, cap).sum()  # noqa: E731
    lo, hi = 0.0, 1.0
    while total(hi) < 1.0 and hi < 1e300:
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # to the last bit of lam
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if total(mid) < 1.0 else (lo, mid)
    out = np.clip(hi * w, floor, cap)
    return out / out.sum()


# -----------------------------------------------------------------------------
# rules beyond the paper: weigh what a domain's data buys, not only how far it lags


def prior_tilt_update(r_t, student_ppl, teacher_ppl, prior, alpha: float = 0.5, kind: str = "ppl-ratio",
                      temperature: float = 1.0) -> np.ndarray:
    """DDK as a tilt of the baseline mix: Eq. 2 with its floor moved from uniform to the
    prior pi (KD's corpus-proportional weights),

        psi[i] = r_t[i] * exp(s[i]),   r_{t+1}[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) * pi[i]

    with s the discrepancy scores of Eq. 1 (or the log-ratio). Where Eq. 2 pulls every
    domain toward 1/N, whatever its size, this keeps (1 - alpha) of the mix where KD has
    it and moves only alpha by the gaps: a large domain keeps the data it needs."""
    prior = _check_distribution(prior, np.asarray(prior).size, "prior")
    r_t = _check_distribution(r_t, prior.size)
    scores = discrepancy_scores(student_ppl, teacher_ppl, kind, temperature)
    psi = r_t * _softmax(scores)  # r_t * exp(s), rescaled by a constant that cancels
    return alpha * psi / psi.sum() + (1.0 - alpha) * prior


def prior_tilt_initial(student_ppl, teacher_ppl, prior, alpha: float = 0.5, kind: str = "ppl-ratio",
                       temperature: float = 1.0) -> np.ndarray:
    """r_0 of the tilt: alpha * Eq. 1 + (1 - alpha) * pi (prior_tilt_update from r = pi would
    weigh the scores by the prior twice)."""
    prior = _check_distribution(prior, np.asarray(prior).size, "prior")
    return alpha * discrepancy_factor(student_ppl, teacher_ppl, kind, temperature) + (1.0 - alpha) * prior


def learning_progress(previous_ce, ce, shares) -> np.ndarray:
    """Per domain, the drop of its validation CE (nats) over the last interval per unit of
    the data share it got there:

        g[i] = max(CE_{t-1}[i] - CE_t[i], 0) / share[i]

    The reward of an online-data-mixing bandit (Albalak et al. 2023, "Efficient Online
    Data Mixing For Language Model Pre-Training", arXiv 2312.02406, rewards a domain by its
    loss; ADO, Jiang et al. 2024, arXiv 2410.11820, by the fitted rate its loss falls):
    what the domain's data bought, not how far the domain lags. A rise (forgetting) is no
    reward, and a share is never 0 here (the weights keep an exploration floor)."""
    prev, now = np.asarray(previous_ce, np.float64), np.asarray(ce, np.float64)
    shares = np.asarray(shares, np.float64)
    if prev.shape != now.shape or shares.shape != now.shape:
        raise ValueError(f"previous_ce, ce and shares must have one entry per domain, got shapes "
                         f"{prev.shape}, {now.shape}, {shares.shape}")
    if not (np.all(np.isfinite(prev)) and np.all(np.isfinite(now)) and np.all(shares > 0)):
        raise ValueError("learning_progress needs finite CEs and positive shares")
    return np.maximum(prev - now, 0.0) / shares


def progress_weights(scores, prior, floor: float = 0.2) -> np.ndarray:
    """Weights from non-negative scores with an exploration floor mixed in from the prior:

        r[i] = floor * pi[i] + (1 - floor) * g[i] / sum_j g[j]      (r = pi when sum g = 0)

    The floor is the bandit's exploration: every domain keeps data in proportion to KD's
    mix, so its progress stays measured and a domain that stalled can return."""
    prior = _check_distribution(prior, np.asarray(prior).size, "prior")
    g = np.asarray(scores, np.float64)
    if g.shape != prior.shape or np.any(g < 0) or not np.all(np.isfinite(g)):
        raise ValueError(f"scores must be finite, >= 0 and one per domain, got {g.tolist()}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")
    if g.sum() <= 0:
        return prior.copy()
    return floor * prior + (1.0 - floor) * g / g.sum()


def gap_times_progress(student_ppl, teacher_ppl, progress) -> np.ndarray:
    """DDK's discrepancy times what data buys: g[i] = max(log lS[i] - log lT[i], 0) * progress[i]
    (the log-ratio gap in nats, 0 where the student already matches the teacher). A lagging
    domain gets data while its loss falls per token spent, and loses it when it stops."""
    lS, lT = _check_ppl(student_ppl, teacher_ppl)
    progress = np.asarray(progress, np.float64)
    return np.maximum(np.log(lS) - np.log(lT), 0.0) * progress


# -----------------------------------------------------------------------------
# the scheduler: which rule applies when, and the record of what it decided


class HistoryEntry(NamedTuple):
    """One update: the weights chosen at `step` and the measurements behind them."""

    step: int
    weights: list  # r_t after the update, the sampling weights of the interval starting here
    student_ppl: list  # lS
    ratio: list  # lS / lT, the paper's Fig. 3 quantity


class DomainScheduler:
    """Domain weights r_t over training, one update per distillation interval of K steps.

    Modes:
      "ddk"              r_0 = Eq. 1 on the student before its first step, then Eq. 2.
      "ddk-no-smoothing" the paper's "w/o FS": every update r_t = Eq. 1 directly.
      "uniform"          1/N forever (cpt, kd-uniform, the paper's "equal sampling").
      "proportional"     train row counts / total, fixed (corpus-proportional kd).
      "prior-tilt"       Eq. 1-2 tilting the proportional mix (prior_tilt_initial, _update).
      "progress"         the proportional mix at step 0, then progress_weights of the
                         learning progress (EMA over intervals, progress_ema).
      "gap-progress"     the same with gap_times_progress as the score.
      "fixed"            the given fixed_weights forever (kd with a chosen mix, e.g. `ddk fit-mix`'s).

    The fixed modes still accept `update` so that every mode records the same history
    (ratios over training are plotted for all of them), but their weights never move.
    """

    def __init__(self, domains, mode: str = "ddk", interval: int = 1000, alpha: float = 0.5,
                 rows_per_domain: dict | None = None, discrepancy: str = "ppl-ratio", temperature: float = 1.0,
                 smooth_initial: bool = False, weight_floor: float = 0.0, weight_cap: float = 1.0,
                 progress_floor: float = 0.2, progress_ema: float = 0.5,
                 fixed_weights: dict | None = None):
        self.domains = list(domains)
        if not self.domains:
            raise ValueError("DomainScheduler needs at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"duplicate domain names in {self.domains}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {MODES}")
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval K must be an integer >= 1 optimizer steps, got {interval}")
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1] (paper: 0.5), got {alpha}")
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"unknown discrepancy {discrepancy!r}: choose one of {DISCREPANCIES}")
        self.mode = mode
        self.interval = int(interval)
        self.alpha = float(alpha)
        # Beyond the paper (defaults = the paper): the scores, r_0's smoothing, bounds.
        self.discrepancy, self.temperature = discrepancy, float(temperature)
        self.smooth_initial = bool(smooth_initial)
        self.weight_floor, self.weight_cap = float(weight_floor), float(weight_cap)
        bound_weights(np.full(len(self.domains), 1.0 / len(self.domains)), self.weight_floor, self.weight_cap)  # checks the bounds
        self.num_updates = 0
        self.history: list[HistoryEntry] = []
        self.progress_floor, self.progress_ema = float(progress_floor), float(progress_ema)
        self.progress: list | None = None  # EMA of learning_progress (progress modes)
        self.prior: np.ndarray | None = None  # KD's proportional mix (prior-based modes)
        n = len(self.domains)
        if mode in ("proportional", "prior-tilt", "progress", "gap-progress"):
            if rows_per_domain is None:
                raise ValueError("mode 'proportional' needs rows_per_domain={domain: train row count}")
            missing = [d for d in self.domains if d not in rows_per_domain]
            if missing:
                raise ValueError(f"rows_per_domain lacks domains {missing}: give a count for every domain")
            counts = np.array([rows_per_domain[d] for d in self.domains], dtype=np.float64)
            if np.any(counts < 0) or counts.sum() <= 0:
                raise ValueError(f"rows_per_domain must be non-negative with a positive total, got {counts.tolist()}")
            self.weights = counts / counts.sum()
            self.prior = self.weights.copy()
        elif mode == "fixed":
            if set(fixed_weights or {}) != set(self.domains):
                raise ValueError(f"mode 'fixed' needs fixed_weights with exactly the domains {self.domains}, "
                                 f"got {sorted(fixed_weights or {})}")
            w = np.array([fixed_weights[d] for d in self.domains], dtype=np.float64)
            if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"fixed_weights must be finite, >= 0, with a positive sum, got {fixed_weights}")
            self.weights = w / w.sum()
        else:
            # for ddk modes this is only a placeholder until the step-0 update (Eq. 1)
            self.weights = np.full(n, 1.0 / n)

    @staticmethod
    def interval_steps(total_steps: int, interval: int | None = None,
                       interval_fraction: float | None = None) -> int:
        """K in optimizer steps, given either directly or as a fraction of total_steps
        (tiny runs need K ~ total/30; the paper used 1000 of ~30,000). Always >= 1."""
        if (interval is None) == (interval_fraction is None):
            raise ValueError(
                "give exactly one of interval (steps) or interval_fraction (of total steps), "
                f"got interval={interval}, interval_fraction={interval_fraction}"
            )
        if interval is not None:
            if int(interval) != interval or interval < 1:
                raise ValueError(f"interval must be an integer >= 1, got {interval}")
            return int(interval)
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps}")
        if not (0.0 < interval_fraction <= 1.0):
            raise ValueError(f"interval_fraction must be in (0, 1], got {interval_fraction}")
        return max(1, int(round(total_steps * interval_fraction)))

    def needs_update(self, step: int) -> bool:
        """True at step 0 (r_0 before the first optimizer step) and every K steps after."""
        return step % self.interval == 0

    def update(self, step: int, student_ppl, teacher_ppl) -> np.ndarray:
        """Apply the mode's rule to the perplexities measured at `step`, record, return r_t."""
        lS, lT = _check_ppl(student_ppl, teacher_ppl)
        if lS.size != len(self.domains):
            raise ValueError(
                f"got {lS.size} perplexities for {len(self.domains)} domains {self.domains}: "
                "pass one per domain in this order"
            )
        how = {"kind": self.discrepancy, "temperature": self.temperature}
        if self.mode == "ddk" and self.num_updates == 0 and self.smooth_initial:
            self.weights = smoothed_initial(lS, lT, self.alpha, **how)
        elif self.mode == "ddk-no-smoothing" or (self.mode == "ddk" and self.num_updates == 0):
            self.weights = discrepancy_factor(lS, lT, **how)
        elif self.mode == "ddk":
            self.weights = smooth_update(self.weights, lS, lT, self.alpha, **how)
        elif self.mode == "prior-tilt":
            self.weights = (prior_tilt_initial(lS, lT, self.prior, self.alpha, **how) if self.num_updates == 0
                            else prior_tilt_update(self.weights, lS, lT, self.prior, self.alpha, **how))
        elif self.mode in ("progress", "gap-progress") and self.num_updates > 0:
            # the shares of the interval that just ended are the weights chosen at its start
            step_progress = learning_progress(np.log(self.history[-1].student_ppl), np.log(lS), self.weights)
            ema = step_progress if self.progress is None else (
                self.progress_ema * np.asarray(self.progress) + (1 - self.progress_ema) * step_progress)
            self.progress = ema.tolist()
            scores = ema if self.mode == "progress" else gap_times_progress(lS, lT, ema)
            self.weights = progress_weights(scores, self.prior, self.progress_floor)
        if self.mode in ("ddk", "ddk-no-smoothing", "prior-tilt", "progress", "gap-progress"):
            self.weights = bound_weights(self.weights, self.weight_floor, self.weight_cap)
        # uniform / proportional / fixed: weights fixed at construction
        self.num_updates += 1
        self.history.append(HistoryEntry(int(step), self.weights.tolist(), lS.tolist(), (lS / lT).tolist()))
        return self.weights.copy()

    def state_dict(self) -> dict:
        return {
            "domains": list(self.domains),
            "mode": self.mode,
            "interval": self.interval,
            "alpha": self.alpha,
            "discrepancy": self.discrepancy,
            "temperature": self.temperature,
            "smooth_initial": self.smooth_initial,
            "weight_floor": self.weight_floor,
            "weight_cap": self.weight_cap,
            "progress_floor": self.progress_floor,
            "progress_ema": self.progress_ema,
            "progress": self.progress,
            "num_updates": self.num_updates,
            "weights": self.weights.tolist(),
            "history": [h._asdict() for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint of another run's domains or mode would silently resample the wrong mix
        for key, mine in (("domains", self.domains), ("mode", self.mode)):
            theirs = list(state[key]) if key == "domains" else state[key]
            if theirs != mine:
                raise ValueError(
                    f"checkpoint {key} {theirs!r} != this scheduler's {mine!r}: "
                    "resume with the same config the checkpoint was written with"
                )
        self.interval = int(state["interval"])
        self.alpha = float(state["alpha"])
        # checkpoints from before these options ran the paper's rule
        self.discrepancy = state.get("discrepancy", "ppl-ratio")
        self.temperature = float(state.get("temperature", 1.0))
        self.smooth_initial = bool(state.get("smooth_initial", False))
        self.weight_floor, self.weight_cap = float(state.get("weight_floor", 0.0)), float(state.get("weight_cap", 1.0))
        self.progress_floor = float(state.get("progress_floor", 0.2))
        self.progress_ema = float(state.get("progress_ema", 0.5))
        self.progress = state.get("progress")
        self.num_updates = int(state["num_updates"])
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.history = [HistoryEntry(**h) for h in state["history"]]


# -----------------------------------------------------------------------------
# Algorithm 1: domain-knowledge-guided sampling


def largest_remainder_counts(weights, n_rows: int) -> np.ndarray:
    """Integer counts summing to n_rows, as close to weights * n_rows as integers allow
    (Hamilton's method: floors first, the leftover rows to the largest fractional parts,
    ties to the lower domain index)."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = w * n_rows
    counts = np.floor(quotas).astype(np.int64)
    leftover = int(n_rows - counts.sum())
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts


def _domain_seed(seed: int, domain: str, epoch: int) -> list:
    # crc32, not hash(): Python salts str hashes per process, which would break resume
    return [int(seed), zlib.crc32(domain.encode("utf-8")), int(epoch)]


_SHUFFLE_TAG = 0x5348554C  # separates the interval-shuffle streams from the domain streams


class IntervalSampler:
    """Draws each interval's dataset D_t (Algorithm 1): per-domain counts follow r_t,
    rows within a domain come without replacement from a per-domain permutation that
    continues across intervals and starts a new epoch when the domain runs out.

    Weights passed to `draw` are ordered like `self.domains` (the order of
    rows_per_domain). The only state is each domain's (epoch, cursor): permutations are
    re-derived from (seed, domain, epoch), so a checkpoint stays tiny and readable.
    """

    def __init__(self, rows_per_domain: dict, seed: int = 0):
        self.rows_per_domain = {str(d): int(n) for d, n in rows_per_domain.items()}
        if not self.rows_per_domain:
            raise ValueError("IntervalSampler needs at least one domain")
        bad = {d: n for d, n in self.rows_per_domain.items() if n < 0}
        if bad:
            raise ValueError(f"row counts must be >= 0, got {bad}")
        self.domains = list(self.rows_per_domain)
        self.seed = int(seed)
        self.epoch = {d: 0 for d in self.domains}
        self.cursor = {d: 0 for d in self.domains}
        self._perm = {}  # domain -> (epoch, permutation) cache, derived state only

    def _permutation(self, domain: str) -> np.ndarray:
        epoch = self.epoch[domain]
        cached = self._perm.get(domain)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng(_domain_seed(self.seed, domain, epoch))
            cached = (epoch, rng.permutation(self.rows_per_domain[domain]))
            self._perm[domain] = cached
        return cached[1]

    def _take(self, domain: str, count: int) -> list:
        rows = []
        while count > 0:
            perm = self._permutation(domain)
            if self.cursor[domain] == len(perm):
                # exhausted: the next epoch is a fresh permutation, so repeats only begin here
                self.epoch[domain] += 1
                self.cursor[domain] = 0
                logger.info("domain %r exhausted its %d train rows; starting epoch %d",
                            domain, len(perm), self.epoch[domain])
                continue
            c = self.cursor[domain]
            chunk = perm[c:c + count]
            rows.extend(int(i) for i in chunk)
            self.cursor[domain] = c + len(chunk)
            count -= len(chunk)
        return rows

    def draw(self, interval_index: int, weights, n_rows: int, rank: int = 0,
             world_size: int = 1) -> list[tuple[str, int]]:
        """The interval's dataset: n_rows (domain, row_index) pairs, counts per domain by
        largest-remainder rounding of weights * n_rows, shuffled, then this rank's slice
        [rank::world_size]. Every rank must make the same calls (same global list)."""
        w = _check_distribution(weights, len(self.domains), name="weights")
        if int(n_rows) != n_rows or n_rows < 0:
            raise ValueError(f"n_rows must be an integer >= 0, got {n_rows}")
        if not (0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        counts = largest_remainder_counts(w, int(n_rows))
        empty = [d for d, c in zip(self.domains, counts) if c > 0 and self.rows_per_domain[d] == 0]
        if empty:
            raise ValueError(f"domains {empty} have weight > 0 but no train rows: drop them from the run")
        pairs = []
        for d, c in zip(self.domains, counts):
            pairs.extend((d, i) for i in self._take(d, int(c)))
        # the shuffle is seeded by the interval index, so every rank agrees on the order
        rng = np.random.default_rng([self.seed, _SHUFFLE_TAG, int(interval_index)])
        order = rng.permutation(len(pairs))
        shuffled = [pairs[i] for i in order]
        return shuffled[rank::world_size]

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "rows_per_domain": dict(self.rows_per_domain),
            "epoch": dict(self.epoch),
            "cursor": dict(self.cursor),
        }

    def load_state_dict(self, state: dict) -> None:
        # a different seed or corpus would make the saved cursors point into other permutations
        if int(state["seed"]) != self.seed or dict(state["rows_per_domain"]) != self.rows_per_domain:
            raise ValueError(
                f"checkpoint sampler (seed={state['seed']}, rows={state['rows_per_domain']}) does not "
                f"match this one (seed={self.seed}, rows={self.rows_per_domain}): resume with the "
                "same seed and the same cache"
            )
        self.epoch = {d: int(state["epoch"][d]) for d in self.domains}
        self.cursor = {d: int(state["cursor"][d]) for d in self.domains}
        self._perm = {}
