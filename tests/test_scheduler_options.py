"""DDK beyond the paper (pipeline/scheduler.py): the log-ratio discrepancy, r_0's smoothing
and weight bounds, each a pure function checked against its equation; the defaults stay
the paper's rule."""

from __future__ import annotations

import numpy as np
import pytest

from ddk.pipeline.config import ConfigError, load_config
from ddk.pipeline.scheduler import (
    DomainScheduler,
    bound_weights,
    discrepancy_factor,
    discrepancy_scores,
    smooth_update,
    smoothed_initial,
)

LS = np.array([40.0, 12.0, 9.0, 30.0])
LT = np.array([10.0, 10.0, 8.0, 12.0])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_the_default_is_the_papers_equation_1_and_2():
    np.testing.assert_allclose(discrepancy_factor(LS, LT), _softmax(LS / LT), rtol=1e-12)
    r = np.array([0.1, 0.2, 0.3, 0.4])
    psi = r * np.exp(LS / LT)
    np.testing.assert_allclose(smooth_update(r, LS, LT, 0.5), 0.5 * psi / psi.sum() + 0.5 / 4, rtol=1e-12)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 3.0])
def test_log_ratio_weights_are_the_ratio_to_the_power_one_over_tau(tau):
    ratio = LS / LT
    np.testing.assert_allclose(discrepancy_scores(LS, LT, "log-ratio", tau), np.log(ratio) / tau, rtol=1e-12)
    np.testing.assert_allclose(discrepancy_factor(LS, LT, "log-ratio", tau), ratio ** (1 / tau) / (ratio ** (1 / tau)).sum(), rtol=1e-10)
    r = np.array([0.1, 0.2, 0.3, 0.4])
    psi = r * ratio ** (1 / tau)  # Eq. 2 with the log-ratio: DoReMi's multiplicative update
    np.testing.assert_allclose(smooth_update(r, LS, LT, 0.3, "log-ratio", tau), 0.3 * psi / psi.sum() + 0.7 / 4, rtol=1e-10)


def test_log_ratio_is_scale_free_and_the_paper_is_not():
    """The same relative gaps at two scales: ratios (18, 1, 1) and (1.8, 0.1, 0.1) x 10 are
    one thing to the log-ratio; to Eq. 1 the first puts e^17 on one domain."""
    lT = np.array([10.0, 10.0, 10.0])
    big, small = np.array([180.0, 10.0, 10.0]), np.array([18.0, 1.0, 1.0])
    np.testing.assert_allclose(discrepancy_factor(big, lT, "log-ratio", 1.0), discrepancy_factor(small, lT, "log-ratio", 1.0), rtol=1e-12)
    assert discrepancy_factor(big, lT)[0] > 0.9999999  # the paper: one domain alone
    np.testing.assert_allclose(discrepancy_factor(big, lT, "log-ratio", 1.0), [0.9, 0.05, 0.05], rtol=1e-12)
    late = np.array([13.0, 11.0, 11.0])  # ratios 1.3 / 1.1: the paper is near-uniform
    assert discrepancy_factor(late, lT).max() < 0.41
    assert discrepancy_factor(late, lT, "log-ratio", 0.1)[0] > 0.7


def test_smoothed_initial_is_equation_2_from_the_uniform():
    for kind, tau in (("ppl-ratio", 1.0), ("log-ratio", 0.2)):
        r0 = smoothed_initial(LS, LT, 0.5, kind, tau)
        np.testing.assert_allclose(r0, 0.5 * discrepancy_factor(LS, LT, kind, tau) + 0.5 / 4, rtol=1e-12)
        assert r0.min() >= 0.5 / 4 - 1e-12 and abs(r0.sum() - 1) < 1e-12


def test_bound_weights_examples():
    np.testing.assert_allclose(bound_weights([0.97, 0.01, 0.01, 0.01], floor=0.1), [0.7, 0.1, 0.1, 0.1], atol=1e-12)
    np.testing.assert_allclose(bound_weights([0.9, 0.06, 0.04], cap=0.5), [0.5, 0.3, 0.2], atol=1e-12)
    # raising one domain to the floor takes mass from the others in proportion, which can
    # push another below it (0.1 -> 0.09): a second round fixes that one too
    np.testing.assert_allclose(bound_weights([0.6, 0.3, 0.1, 0.0], floor=0.1), [0.8 * 2 / 3, 0.8 / 3, 0.1, 0.1], atol=1e-12)
    np.testing.assert_allclose(bound_weights([0.4, 0.3, 0.2, 0.1], 0.05, 0.5), [0.4, 0.3, 0.2, 0.1], atol=1e-12)  # inside: unchanged
    with pytest.raises(ValueError, match="need 0 <= floor <= 1/N <= cap <= 1"):
        bound_weights([0.5, 0.5], floor=0.6)
    with pytest.raises(ValueError, match="need 0 <= floor <= 1/N <= cap <= 1"):
        bound_weights([0.2, 0.3, 0.5], cap=0.3)


@pytest.mark.parametrize("seed", range(20))
def test_bound_weights_properties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    w = rng.dirichlet(np.full(n, 0.3))
    floor, cap = rng.uniform(0, 1 / n), rng.uniform(1 / n, 1)
    b = bound_weights(w, floor, cap)
    assert abs(b.sum() - 1) < 1e-12
    assert b.min() >= floor - 1e-12 and b.max() <= cap + 1e-12
    assert np.all(np.diff(b[np.argsort(w)]) >= -1e-12)  # order kept
    inside = (b > floor + 1e-9) & (b < cap - 1e-9)
    if inside.sum() >= 2:  # unbounded domains keep their proportions
        ratio = b[inside] / w[inside]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def test_scheduler_with_the_options_and_its_state():
    s = DomainScheduler(["a", "b", "c", "d"], "ddk", interval=10, alpha=0.5, discrepancy="log-ratio", temperature=0.25,
                        smooth_initial=True, weight_floor=0.15, weight_cap=0.4)
    r0 = s.update(0, LS, LT)
    expected = bound_weights(smoothed_initial(LS, LT, 0.5, "log-ratio", 0.25), 0.15, 0.4)
    np.testing.assert_allclose(r0, expected, rtol=1e-12)
    r1 = s.update(10, LS * 0.9, LT)
    np.testing.assert_allclose(r1, bound_weights(smooth_update(r0, LS * 0.9, LT, 0.5, "log-ratio", 0.25), 0.15, 0.4), rtol=1e-12)
    t = DomainScheduler(["a", "b", "c", "d"], "ddk", interval=10)
    t.load_state_dict(s.state_dict())
    np.testing.assert_allclose(t.update(20, LS, LT), s.update(20, LS, LT), rtol=1e-12)
    # a checkpoint from before the options: the paper's rule
    old = {k: v for k, v in DomainScheduler(["a", "b"], "ddk", 5).state_dict().items()
           if k not in ("discrepancy", "temperature", "smooth_initial", "weight_floor", "weight_cap")}
    u = DomainScheduler(["a", "b"], "ddk", 5, discrepancy="log-ratio")
    u.load_state_dict(old)
    assert u.discrepancy == "ppl-ratio" and u.weight_cap == 1.0


def test_default_scheduler_equals_the_paper():
    s = DomainScheduler(["a", "b", "c", "d"], "ddk", interval=10)
    np.testing.assert_allclose(s.update(0, LS, LT), discrepancy_factor(LS, LT), rtol=1e-12)


@pytest.mark.parametrize("override, message", [
    (["distill.discrepancy=ratio"], "distill.discrepancy: 'ratio' is not one of"),
    (["distill.discrepancy_temperature=0.0"], "distill.discrepancy_temperature = 0.0: must be a finite number > 0"),
    (["distill.weight_floor=0.3"], "need 0 <= floor <= 1/N <= cap <= 1 for the N = 4 domains"),
    (["distill.weight_cap=0.2"], "need 0 <= floor <= 1/N <= cap <= 1"),
    (["distill.mode=kd", "distill.smooth_initial=true"], "shape DDK's domain weights; mode 'kd' has none"),
    (["distill.equal_sampling=true", "distill.weight_floor=0.1"], "with equal_sampling has none"),
])
def test_options_are_checked_in_the_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_runs_recorded_before_the_options_are_still_the_paper():
    """A results.json or checkpoint without the new fields reads as the paper's rule, so a
    finished comparison stays reusable and a run stays resumable."""
    import dataclasses

    from ddk.stages.distill import ADDED_LATER, saved_config

    now = dataclasses.asdict(load_config(None).distill)
    old = {k: v for k, v in now.items() if k not in ADDED_LATER}
    assert saved_config(old) == now
    assert saved_config({**old, "weight_floor": 0.1})["weight_floor"] == 0.1
