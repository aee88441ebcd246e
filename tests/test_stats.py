"""pipeline/stats.py on synthetic data whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ddk.pipeline.stats import metrics_vs_teacher, paired_bootstrap, seed_spread


def test_seed_spread_is_sample_std_and_extremes():
    s = seed_spread([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["mean"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))  # sum of squares 5, over n - 1 = 3
    one = seed_spread([7.0])
    assert one == {"n": 1, "mean": 7.0, "std": None, "min": 7.0, "max": 7.0}
    with pytest.raises(ValueError, match="no values"):
        seed_spread([])


def test_metrics_vs_teacher_worst_is_the_max_ratio_and_names_its_domain():
    teacher = {"code": 2.0, "prose": 3.0, "math": 1.0}
    student = {"code": 2.5, "prose": 3.1, "math": 1.7}
    m = metrics_vs_teacher(student, teacher)
    assert m["ppl"] == pytest.approx({d: math.exp(v) for d, v in student.items()})
    assert m["mean_ce"] == pytest.approx((2.5 + 3.1 + 1.7) / 3)
    assert m["ratio"]["math"] == pytest.approx(math.exp(0.7))
    assert m["worst_domain"] == "math" and m["worst_ratio"] == max(m["ratio"].values())
    assert m["mean_ratio"] == pytest.approx((math.exp(0.5) + math.exp(0.1) + math.exp(0.7)) / 3)
    with pytest.raises(ValueError, match="math"):
        metrics_vs_teacher({"code": 1.0, "prose": 1.0}, teacher)


def _teacher(rng, rows=(40, 60)):
    return {f"d{i}": rng.normal(3.0, 1.0, n) for i, n in enumerate(rows)}


def test_identical_modes_differ_by_exactly_zero_and_not_significantly():
    rng = np.random.default_rng(1)
    t = _teacher(rng)
    a = {d: t[d] + rng.normal(0.5, 0.3, (3, t[d].size)) for d in t}
    r = paired_bootstrap(a, a, t, replicates=300)
    for key in ("mean_ce", "mean_ratio"):
        assert r[key] == {"diff": 0.0, "low": 0.0, "high": 0.0, "significant": False}


def test_constant_shift_is_recovered_exactly_and_significant():
    rng = np.random.default_rng(2)
    t = _teacher(rng)
    b = {d: t[d] + rng.normal(0.5, 0.3, (3, t[d].size)) for d in t}
    a = {d: b[d] + 0.1 for d in t}
    r = paired_bootstrap(a, b, t, replicates=300)
    ce = r["mean_ce"]
    assert ce["diff"] == pytest.approx(0.1) and ce["low"] == pytest.approx(0.1) and ce["high"] == pytest.approx(0.1)
    assert ce["significant"] and r["mean_ratio"]["diff"] > 0 and r["mean_ratio"]["significant"]


def test_mean_ratio_is_the_mean_over_domains_of_ppl_ratios():
    t = {"x": np.full(10, 2.0), "y": np.full(20, 1.0)}
    a = {"x": np.full((2, 10), 2.0 + math.log(2.0)), "y": np.full((2, 20), 1.0)}  # ratios 2 and 1
    b = {"x": np.full((2, 10), 2.0), "y": np.full((2, 20), 1.0)}  # ratios 1 and 1
    r = paired_bootstrap(a, b, t, replicates=50)
    assert r["mean_ratio"]["diff"] == pytest.approx(0.5)
    assert r["mean_ce"]["diff"] == pytest.approx(math.log(2.0) / 2)


def test_pairing_cancels_seed_and_row_effects_shared_by_both_modes():
    """A small real effect under large seed-to-seed and row-to-row variation that both modes
    share: paired, it is significant; resampled unpaired, it would drown in that variation."""
    rng = np.random.default_rng(3)
    t = _teacher(rng, rows=(50, 50))
    seed_effect = np.array([-0.5, 0.0, 0.5])[:, None]  # one seed's data order helps both modes
    b = {d: t[d] + 1.0 + seed_effect + rng.normal(0.0, 0.01, (3, t[d].size)) for d in t}
    a = {d: b[d] - 0.03 + rng.normal(0.0, 0.01, b[d].shape) for d in t}
    r = paired_bootstrap(a, b, t, replicates=1000)
    ce = r["mean_ce"]
    assert ce["significant"] and ce["high"] < 0 and ce["low"] <= ce["diff"] <= ce["high"]
    assert ce["diff"] == pytest.approx(-0.03, abs=0.005)
    assert ce["high"] - ce["low"] < 0.02  # unpaired, the seed effect alone spans 1.0


def test_noise_alone_is_not_significant():
    rng = np.random.default_rng(4)
    t = _teacher(rng, rows=(30, 30))
    a = {d: t[d] + rng.normal(0.5, 0.5, (3, t[d].size)) for d in t}
    b = {d: t[d] + rng.normal(0.5, 0.5, (3, t[d].size)) for d in t}
    r = paired_bootstrap(a, b, t, replicates=1000)
    assert r["mean_ce"]["low"] < 0 < r["mean_ce"]["high"] and not r["mean_ce"]["significant"]


def test_one_seed_resamples_rows_with_the_textbook_standard_error():
    """n = 1: only rows are resampled; the 95 % interval is then ~ +-1.96 sd/sqrt(rows) of the
    per-row differences (the bootstrap of a mean)."""
    rng = np.random.default_rng(5)
    rows = 400
    t = {"only": rng.normal(3.0, 1.0, rows)}
    b = {"only": (t["only"] + 0.5)[None, :]}
    row_diff = rng.normal(-0.02, 0.2, rows)
    a = {"only": b["only"] + row_diff}
    r = paired_bootstrap(a, b, t, replicates=2000)
    assert r["n_seeds"] == 1
    half = (r["mean_ce"]["high"] - r["mean_ce"]["low"]) / 2
    assert half == pytest.approx(1.96 * row_diff.std(ddof=1) / math.sqrt(rows), rel=0.1)
    assert r["mean_ce"]["diff"] == pytest.approx(row_diff.mean())


def test_fixed_rng_seed_gives_the_same_interval():
    rng = np.random.default_rng(6)
    t = _teacher(rng)
    a = {d: t[d] + rng.normal(0.5, 0.3, (2, t[d].size)) for d in t}
    b = {d: t[d] + rng.normal(0.5, 0.3, (2, t[d].size)) for d in t}
    assert paired_bootstrap(a, b, t, replicates=600) == paired_bootstrap(a, b, t, replicates=600)
    assert paired_bootstrap(a, b, t, replicates=600, rng_seed=1) != paired_bootstrap(a, b, t, replicates=600)


def test_unpaired_shapes_are_refused_naming_the_domain():
    t = {"x": np.zeros(5), "y": np.zeros(4)}
    good = {"x": np.zeros((2, 5)), "y": np.zeros((2, 4))}
    with pytest.raises(ValueError, match="'y'.*4 rows"):
        paired_bootstrap(good, {"x": np.zeros((2, 5)), "y": np.zeros((2, 3))}, t)
    with pytest.raises(ValueError, match="'x'.*same seeds"):
        paired_bootstrap(good, {"x": np.zeros((3, 5)), "y": np.zeros((3, 4))}, t)


def test_paired_bootstrap_row_weights_give_the_token_weighted_difference():
    """Masked (chat) caches: rows weighted by their trained positions. Weights of one are the
    unweighted test; a weight of zero drops the row; the point difference is the weighted one."""
    from ddk.pipeline.stats import paired_bootstrap

    rng = np.random.default_rng(0)
    a = {"x": rng.random((3, 6)) + 1, "y": rng.random((3, 4)) + 1}
    b = {"x": rng.random((3, 6)) + 1, "y": rng.random((3, 4)) + 1}
    t = {"x": rng.random(6), "y": rng.random(4)}
    plain = paired_bootstrap(a, b, t, replicates=200)
    ones = paired_bootstrap(a, b, t, replicates=200, row_weights={"x": np.ones(6), "y": np.ones(4)})
    assert plain == ones
    w = {"x": np.array([3, 1, 0, 2, 5, 1.0]), "y": np.array([1, 1, 2, 7.0])}
    got = paired_bootstrap(a, b, t, replicates=200, row_weights=w)
    want = np.mean([((a[d] - b[d]) @ w[d] / w[d].sum()).mean() for d in ("x", "y")])
    np.testing.assert_allclose(got["mean_ce"]["diff"], want, rtol=1e-12)
    dropped = paired_bootstrap({d: np.delete(v, 2, 1) if d == "x" else v for d, v in a.items()},
                               {d: np.delete(v, 2, 1) if d == "x" else v for d, v in b.items()},
                               {"x": np.delete(t["x"], 2), "y": t["y"]}, replicates=1,
                               row_weights={"x": np.delete(w["x"], 2), "y": w["y"]})
    np.testing.assert_allclose(dropped["mean_ce"]["diff"], got["mean_ce"]["diff"], rtol=1e-12)
