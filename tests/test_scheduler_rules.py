"""The scheduling rules beyond the paper that weigh what a domain's data buys
(pipeline/scheduler.py): their equations, their edge cases, and the scheduler modes."""

from __future__ import annotations

import numpy as np
import pytest

from ddk.pipeline.config import ConfigError, load_config
from ddk.pipeline.scheduler import (DomainScheduler, discrepancy_factor, gap_times_progress, learning_progress,
                                    prior_tilt_initial, prior_tilt_update, progress_weights, smooth_update)

LS, LT = np.array([30.0, 12.0, 8.0]), np.array([10.0, 10.0, 4.0])
PRIOR = np.array([0.6, 0.3, 0.1])


def test_prior_tilt_is_eq2_with_the_prior_as_floor():
    r = np.array([0.5, 0.3, 0.2])
    got = prior_tilt_update(r, LS, LT, PRIOR, alpha=0.5)
    psi = r * np.exp(LS / LT)
    np.testing.assert_allclose(got, 0.5 * psi / psi.sum() + 0.5 * PRIOR, rtol=1e-12)
    # with a uniform prior it is the paper's Eq. 2
    uniform = np.full(3, 1 / 3)
    np.testing.assert_allclose(prior_tilt_update(r, LS, LT, uniform), smooth_update(r, LS, LT), rtol=1e-12)
    np.testing.assert_allclose(prior_tilt_initial(LS, LT, PRIOR), 0.5 * discrepancy_factor(LS, LT) + 0.5 * PRIOR)
    assert got.min() >= 0.5 * PRIOR.min() - 1e-15  # every domain keeps half its prior share


def test_learning_progress_is_the_drop_per_share_and_ignores_rises():
    g = learning_progress([3.0, 2.0, 1.0], [2.5, 2.1, 0.9], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(g, [1.0, 0.0, 0.4])
    with pytest.raises(ValueError, match="positive shares"):
        learning_progress([1.0], [0.5], [0.0])


def test_progress_weights_keep_an_exploration_floor_from_the_prior():
    w = progress_weights([1.0, 0.0, 3.0], PRIOR, floor=0.2)
    np.testing.assert_allclose(w, 0.2 * PRIOR + 0.8 * np.array([0.25, 0.0, 0.75]))
    assert w.sum() == pytest.approx(1.0) and w[1] == pytest.approx(0.2 * PRIOR[1])
    np.testing.assert_allclose(progress_weights([0.0, 0.0, 0.0], PRIOR), PRIOR)  # no progress: the prior
    with pytest.raises(ValueError, match=">= 0"):
        progress_weights([-1.0, 0.0, 1.0], PRIOR)


def test_gap_times_progress_gives_nothing_to_a_matched_or_stalled_domain():
    g = gap_times_progress([20.0, 10.0, 9.0], [10.0, 10.0, 3.0], [1.0, 5.0, 0.0])
    np.testing.assert_allclose(g, [np.log(2.0), 0.0, 0.0])


def _run(mode, ces):
    s = DomainScheduler(["a", "b", "c"], mode, interval=10, rows_per_domain={"a": 60, "b": 30, "c": 10})
    teacher = np.exp(np.array([2.0, 2.0, 1.0]))
    for i, ce in enumerate(ces):
        s.update(10 * i, np.exp(np.asarray(ce)), teacher)
    return s


@pytest.mark.parametrize("mode", ["progress", "gap-progress"])
def test_progress_modes_start_from_kd_mix_and_follow_what_pays(mode):
    # domain c lags most (gap 2 nats) but its CE never moves; a keeps improving
    s = _run(mode, [[3.0, 3.0, 3.0], [2.6, 2.9, 3.0], [2.3, 2.85, 3.0]])
    np.testing.assert_allclose(s.history[0].weights, PRIOR)  # step 0: nothing measured yet
    w = np.array(s.history[-1].weights)
    assert w[2] == pytest.approx(0.2 * PRIOR[2])  # c gets only the exploration floor
    if mode == "progress":
        assert w[0] > PRIOR[0]  # a bought the most CE per share
    else:  # the gap weighs in: b (0.85 nats behind, still improving) gains over its prior
        assert w[1] > PRIOR[1]
    # the EMA of progress survives a checkpoint
    t = DomainScheduler(["a", "b", "c"], mode, interval=10, rows_per_domain={"a": 60, "b": 30, "c": 10})
    t.load_state_dict(s.state_dict())
    teacher = np.exp(np.array([2.0, 2.0, 1.0]))
    np.testing.assert_allclose(t.update(30, np.exp([2.1, 2.8, 3.0]), teacher), s.update(30, np.exp([2.1, 2.8, 3.0]), teacher))


def test_the_paper_ddk_pours_into_the_lagging_domain_that_does_not_pay():
    """The contrast the rules exist for (the held-back corpus): Eq. 1-2 give the most to c."""
    s = _run("ddk", [[3.0, 3.0, 3.0], [2.6, 2.9, 3.0], [2.3, 2.85, 3.0]])
    assert int(np.argmax(s.history[-1].weights)) == 2


def test_config_selects_and_checks_the_rule():
    from ddk.stages.distill import scheduler_mode

    cfg = load_config(None, ["distill.ddk_rule=gap-progress"])
    assert scheduler_mode(cfg) == "gap-progress"
    # a rule with a mode or ablation that has no Eq. 1-2 to replace is refused, not ignored
    for other in (["distill.equal_sampling=true"], ["distill.no_smoothing=true"], ["distill.mode=kd"], ["distill.mode=cpt"]):
        with pytest.raises(ConfigError, match="distill.ddk_rule = 'progress'"):
            load_config(None, ["distill.ddk_rule=progress", *other])
    with pytest.raises(ConfigError, match="distill.ddk_rule"):
        load_config(None, ["distill.ddk_rule=doremi"])
    with pytest.raises(ConfigError, match="progress_floor"):
        load_config(None, ["distill.progress_floor=1.5"])
