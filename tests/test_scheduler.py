"""DDK Eq. 1, Eq. 2, the domain scheduler and the Algorithm 1 interval sampler."""

import json
import logging
import math

import numpy as np
import pytest

from ddk.pipeline.scheduler import (
    DomainScheduler,
    IntervalSampler,
    discrepancy_factor,
    largest_remainder_counts,
    smooth_update,
)

# -----------------------------------------------------------------------------
# Eq. 1


def test_eq1_hand_computed():
    # ratios [2, 1] -> softmax = [e^2, e] / (e^2 + e) = [e, 1] / (e + 1)
    r = discrepancy_factor([20.0, 10.0], [10.0, 10.0])
    assert r == pytest.approx([0.7310585786300049, 0.2689414213699951], abs=1e-12)
    assert r == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], abs=1e-12)


def test_eq1_uses_ratio_only():
    lS, lT = np.array([30.0, 12.0, 5.0]), np.array([10.0, 6.0, 5.0])
    a = discrepancy_factor(lS, lT)
    b = discrepancy_factor(lS * 7.5, lT * 7.5)
    assert a == pytest.approx(b, abs=1e-12)
    assert a.sum() == pytest.approx(1.0)
    assert np.argmax(a) == 0  # the domain where the student lags most gets most weight


def test_eq1_large_ratio_no_overflow():
    r = discrepancy_factor([1e5, 2.0, 1.0], [1.0, 1.0, 1.0])  # exp(1e5) overflows float64
    assert np.all(np.isfinite(r))
    assert r == pytest.approx([1.0, 0.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("lS,lT,msg", [
    ([1.0, 2.0], [1.0], "same domain order"),
    ([1.0, -2.0], [1.0, 1.0], "positive and finite"),
    ([1.0, float("nan")], [1.0, 1.0], "positive and finite"),
    ([1.0, 2.0], [0.0, 1.0], "positive and finite"),
])
def test_eq1_validation(lS, lT, msg):
    with pytest.raises(ValueError, match=msg):
        discrepancy_factor(lS, lT)


# -----------------------------------------------------------------------------
# Eq. 2


def test_eq2_hand_computed():
    # psi = [0.25 e^2, 0.75 e] -> normalized [e, 3] / (e + 3); then 0.5 * that + 0.5 / 2
    r = smooth_update([0.25, 0.75], [20.0, 10.0], [10.0, 10.0], alpha=0.5)
    e = math.e
    assert r == pytest.approx([0.5 * e / (e + 3) + 0.25, 0.5 * 3 / (e + 3) + 0.25], abs=1e-12)
    assert r == pytest.approx([0.4876834432, 0.5123165568], abs=1e-9)
    assert r.sum() == pytest.approx(1.0, abs=1e-12)


def test_eq2_floor():
    alpha, n = 0.5, 4
    r = smooth_update([0.97, 0.01, 0.01, 0.01], [1e4, 1.0, 1.0, 1.0], [1.0] * 4, alpha=alpha)
    assert np.all(r >= (1 - alpha) / n - 1e-15)
    assert r[1:] == pytest.approx([(1 - alpha) / n] * 3, abs=1e-12)
    assert r.sum() == pytest.approx(1.0, abs=1e-12)


def test_eq2_alpha1_uniform_is_eq1():
    lS, lT = [30.0, 12.0, 5.0], [10.0, 6.0, 5.0]
    r = smooth_update(np.full(3, 1 / 3), lS, lT, alpha=1.0)
    assert r == pytest.approx(discrepancy_factor(lS, lT), abs=1e-12)


def test_eq2_equal_ratios_shrink_towards_uniform():
    # equal ratios cancel in psi's normalization: r_{t+1} = alpha * r_t + (1 - alpha) / N,
    # so r is a fixed point only when uniform
    r_t = np.array([0.6, 0.3, 0.1])
    r = smooth_update(r_t, [4.0, 8.0, 2.0], [2.0, 4.0, 1.0], alpha=0.5)
    assert r == pytest.approx(0.5 * r_t + 0.5 / 3, abs=1e-12)
    u = np.full(3, 1 / 3)
    assert smooth_update(u, [4.0, 8.0, 2.0], [2.0, 4.0, 1.0]) == pytest.approx(u, abs=1e-12)


def test_eq2_zero_weight_and_large_ratio():
    r = smooth_update([0.0, 1.0], [1e5, 1.0], [1.0, 1.0], alpha=0.5)
    assert np.all(np.isfinite(r))
    assert r == pytest.approx([0.25, 0.75], abs=1e-12)  # a zero weight stays at the floor


@pytest.mark.parametrize("r_t,alpha,msg", [
    ([0.5, 0.6], 0.5, "sum to 1"),
    ([1.2, -0.2], 0.5, "non-negative"),
    ([1.0], 0.5, "shape"),
    ([0.5, 0.5], 1.5, "alpha"),
])
def test_eq2_validation(r_t, alpha, msg):
    with pytest.raises(ValueError, match=msg):
        smooth_update(r_t, [2.0, 1.0], [1.0, 1.0], alpha=alpha)


# -----------------------------------------------------------------------------
# DomainScheduler

DOMAINS = ["code", "math", "web"]
LT = [5.0, 8.0, 10.0]
LS_SEQ = [[20.0, 16.0, 12.0], [15.0, 14.0, 11.0], [10.0, 12.0, 10.5], [6.0, 9.0, 10.1]]


def test_scheduler_ddk():
    s = DomainScheduler(DOMAINS, mode="ddk", interval=10)
    expected = discrepancy_factor(LS_SEQ[0], LT)
    assert s.update(0, LS_SEQ[0], LT) == pytest.approx(expected, abs=1e-12)
    for t, lS in enumerate(LS_SEQ[1:], start=1):
        expected = smooth_update(expected, lS, LT, 0.5)
        assert s.update(10 * t, lS, LT) == pytest.approx(expected, abs=1e-12)
    assert [h.step for h in s.history] == [0, 10, 20, 30]
    step, weights, student_ppl, ratio = s.history[-1]
    assert weights == pytest.approx(expected.tolist())
    assert student_ppl == LS_SEQ[-1]
    assert ratio == pytest.approx((np.array(LS_SEQ[-1]) / LT).tolist())


def test_scheduler_no_smoothing():
    s = DomainScheduler(DOMAINS, mode="ddk-no-smoothing", interval=10)
    for t, lS in enumerate(LS_SEQ):
        assert s.update(10 * t, lS, LT) == pytest.approx(discrepancy_factor(lS, LT), abs=1e-12)


def test_scheduler_fixed_modes():
    u = DomainScheduler(DOMAINS, mode="uniform", interval=10)
    p = DomainScheduler(DOMAINS, mode="proportional", interval=10,
                        rows_per_domain={"code": 100, "math": 300, "web": 600})
    for t, lS in enumerate(LS_SEQ):
        assert u.update(10 * t, lS, LT) == pytest.approx([1 / 3] * 3)
        assert p.update(10 * t, lS, LT) == pytest.approx([0.1, 0.3, 0.6])
    assert len(u.history) == len(p.history) == len(LS_SEQ)  # ratios recorded for plots anyway
    with pytest.raises(ValueError, match="rows_per_domain"):
        DomainScheduler(DOMAINS, mode="proportional")
    with pytest.raises(ValueError, match="unknown mode"):
        DomainScheduler(DOMAINS, mode="kd")


def test_scheduler_resume():
    full = DomainScheduler(DOMAINS, mode="ddk", interval=10)
    for t, lS in enumerate(LS_SEQ):
        full.update(10 * t, lS, LT)

    first = DomainScheduler(DOMAINS, mode="ddk", interval=10)
    for t, lS in enumerate(LS_SEQ[:2]):
        first.update(10 * t, lS, LT)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are plain JSON
    resumed = DomainScheduler(DOMAINS, mode="ddk", interval=10)
    resumed.load_state_dict(state)
    for t, lS in enumerate(LS_SEQ[2:], start=2):
        resumed.update(10 * t, lS, LT)
    assert resumed.weights.tolist() == full.weights.tolist()  # bit-identical
    assert resumed.history == full.history

    with pytest.raises(ValueError, match="mode"):
        DomainScheduler(DOMAINS, mode="ddk-no-smoothing", interval=10).load_state_dict(state)


def test_needs_update_cadence():
    s = DomainScheduler(DOMAINS, interval=4)
    assert [k for k in range(13) if s.needs_update(k)] == [0, 4, 8, 12]
    assert all(DomainScheduler(DOMAINS, interval=1).needs_update(k) for k in range(5))


def test_interval_steps():
    assert DomainScheduler.interval_steps(30000, interval=1000) == 1000
    assert DomainScheduler.interval_steps(300, interval_fraction=1 / 30) == 10
    assert DomainScheduler.interval_steps(10, interval_fraction=0.01) == 1  # K >= 1
    for kwargs in [{}, {"interval": 5, "interval_fraction": 0.1}, {"interval": 0},
                   {"interval_fraction": 0.0}, {"interval_fraction": 1.5}]:
        with pytest.raises(ValueError):
            DomainScheduler.interval_steps(100, **kwargs)


# -----------------------------------------------------------------------------
# IntervalSampler (Algorithm 1)

ROWS = {"code": 7, "math": 50, "web": 200}


def _counts(pairs):
    c = {d: 0 for d in ROWS}
    for d, _ in pairs:
        c[d] += 1
    return [c[d] for d in ROWS]


def test_largest_remainder():
    assert largest_remainder_counts([0.5, 0.3, 0.2], 10).tolist() == [5, 3, 2]
    # quotas 3.33.., 3.33.., 3.33.. -> one leftover row to the lowest index on ties
    assert largest_remainder_counts([1 / 3] * 3, 10).tolist() == [4, 3, 3]
    # quotas 0.49, 5.71, 3.8 -> floors [0, 5, 3], leftovers to .8 then .71
    assert largest_remainder_counts([0.049, 0.571, 0.38], 10).tolist() == [0, 6, 4]
    assert largest_remainder_counts([0.0, 1.0], 5).tolist() == [0, 5]


def test_sampler_counts_follow_weights():
    s = IntervalSampler(ROWS, seed=1)
    for k, w in enumerate([[0.2, 0.3, 0.5], [0.049, 0.571, 0.38], [0.0, 0.0, 1.0]]):
        pairs = s.draw(k, np.array(w), 10)
        assert len(pairs) == 10
        assert _counts(pairs) == largest_remainder_counts(w, 10).tolist()
        assert all(0 <= i < ROWS[d] for d, i in pairs)


def test_sampler_no_repeats_then_cycles(caplog):
    s = IntervalSampler(ROWS, seed=3)
    w = np.array([0.5, 0.5, 0.0])
    with caplog.at_level(logging.INFO, logger="ddk.pipeline.scheduler"):
        code = []
        for k in range(3):  # 3 code rows per interval: 9 > 7, so epoch 1 starts in interval 2
            code += [i for d, i in s.draw(k, w, 6) if d == "code"]
    assert len(code) == 9
    # order within the interval is shuffled, so check sets: epoch 0 is all 7 rows, no repeats
    assert sorted(code[:6]) == sorted(set(code[:6]))
    assert s.epoch["code"] == 1 and s.cursor["code"] == 2 and s.epoch["math"] == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("'code'" in m and "epoch 1" in m for m in msgs) == 1
    assert not any("'math'" in m for m in msgs)


def test_sampler_epoch_is_a_permutation():
    s = IntervalSampler(ROWS, seed=5)
    w = np.array([1.0, 0.0, 0.0])
    rows = [i for d, i in s.draw(0, w, 7)]
    assert sorted(rows) == list(range(7))  # exactly one epoch, no repeats
    rows2 = [i for d, i in s.draw(1, w, 14)]  # two more full epochs within one interval
    assert sorted(rows2) == sorted(list(range(7)) * 2)
    assert s.epoch["code"] == 2


def test_sampler_resume_equivalence():
    ws = [np.array([0.3, 0.3, 0.4]), np.array([0.6, 0.2, 0.2]), np.array([0.1, 0.1, 0.8])]
    full = IntervalSampler(ROWS, seed=11)
    draws = [full.draw(k, w, 16) for k, w in enumerate(ws)]

    first = IntervalSampler(ROWS, seed=11)
    assert first.draw(0, ws[0], 16) == draws[0]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = IntervalSampler(ROWS, seed=11)
    resumed.load_state_dict(state)
    assert [resumed.draw(k, ws[k], 16) for k in (1, 2)] == draws[1:]

    with pytest.raises(ValueError, match="same seed"):
        IntervalSampler(ROWS, seed=12).load_state_dict(state)


def test_sampler_ranks_disjoint_and_complete():
    w = np.array([0.25, 0.25, 0.5])
    single = IntervalSampler(ROWS, seed=7).draw(0, w, 24)
    world = 4
    parts = [IntervalSampler(ROWS, seed=7).draw(0, w, 24, rank=r, world_size=world) for r in range(world)]
    assert all(len(p) == 24 // world for p in parts)
    assert sorted(sum(parts, [])) == sorted(single)
    assert len(set(sum(parts, []))) == 24  # disjoint; one epoch, so (domain, row) pairs are unique
    with pytest.raises(ValueError, match="rank"):
        IntervalSampler(ROWS, seed=7).draw(0, w, 24, rank=4, world_size=4)


def test_sampler_deterministic_and_seeded():
    w = np.array([0.2, 0.3, 0.5])
    a = [IntervalSampler(ROWS, seed=0).draw(k, w, 20) for k in range(2)]
    b = [IntervalSampler(ROWS, seed=0).draw(k, w, 20) for k in range(2)]
    assert a == b
    assert IntervalSampler(ROWS, seed=1).draw(0, w, 20) != a[0]


def test_sampler_validation():
    s = IntervalSampler({"a": 0, "b": 10}, seed=0)
    with pytest.raises(ValueError, match="no train rows"):
        s.draw(0, np.array([0.5, 0.5]), 4)
    assert s.draw(0, np.array([0.0, 1.0]), 4) and s.cursor["b"] == 4
    with pytest.raises(ValueError, match="sum to 1"):
        s.draw(1, np.array([0.2, 0.2]), 4)
