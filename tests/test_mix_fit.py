"""The domain mix fitted to a comparison's runs (pipeline/mix_fit.py, `ddk fit-mix`,
compare's kd-fitted): the fit, the constrained optimum, reading runs, the CLI's file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddk.pipeline.config import ConfigError, load_config
from ddk.pipeline.mix_fit import bounded_mix, fit_log_share, frontier, gap_floors, mean_shares, optimal_mix
from ddk.pipeline.scheduler import DomainScheduler
from ddk.stages.cli import main as cli
from ddk.stages.compare import FITTED, FITTED_WORST, fitted_overrides
from ddk.stages.fit_mix import read_run

DOMAINS = ["a", "b", "c"]
A, B = np.array([4.0, 3.0, 5.0]), np.array([0.5, 0.2, 0.3])
TEACHER = np.array([4.0, 3.0, 4.5])  # validation CE; at the uniform mix the gaps are 0.55, 0.22, 0.83


def _mixes(n=12, seed=0):
    return np.random.default_rng(seed).dirichlet([20.0, 20.0, 20.0], size=n)


def test_the_fit_recovers_the_log_share_law_and_its_optimum():
    shares = _mixes()
    ce = A - B * np.log(shares)
    fit = fit_log_share(DOMAINS, shares, ce)
    np.testing.assert_allclose(fit.a, A, atol=1e-9)
    np.testing.assert_allclose(fit.b, B, atol=1e-9)
    np.testing.assert_allclose(fit.r2, 1.0)
    # unconstrained (ranges widened far enough): every marginal gain b_i / s_i equal, s = b / sum b
    np.testing.assert_allclose(optimal_mix(fit, extrapolate=100.0), B / B.sum(), atol=1e-9)
    np.testing.assert_allclose(fit.predicted_mean_ce(shares[0]), ce[0].mean())


def test_the_mix_stays_within_the_shares_the_runs_saw_and_is_the_best_there():
    shares = _mixes()
    ce = A - B * np.log(shares) + np.random.default_rng(1).normal(0, 0.01, shares.shape)
    fit = fit_log_share(DOMAINS, shares, ce)
    mix = optimal_mix(fit)
    assert mix.sum() == pytest.approx(1.0)
    assert np.all(mix >= fit.lo - 1e-12) and np.all(mix <= fit.hi + 1e-12)
    assert not np.allclose(mix, fit.b.clip(0) / fit.b.clip(0).sum())  # the box binds here (b's optimum gives b 0.2)
    # no feasible mix does better under the fit
    cand = np.random.default_rng(2).dirichlet([5.0, 5.0, 5.0], size=20000)
    cand = cand[np.all((cand >= fit.lo) & (cand <= fit.hi), axis=1)]
    assert len(cand) > 50
    best = min(fit.predicted_mean_ce(c) for c in cand)
    assert fit.predicted_mean_ce(mix) <= best + 1e-9
    with pytest.raises(ValueError, match="extrapolate"):
        optimal_mix(fit, extrapolate=0.5)


def test_a_domain_whose_loss_ignores_its_share_gets_its_smallest_share():
    shares = _mixes()
    ce = A - np.array([0.5, -0.1, 0.3]) * np.log(shares)
    fit = fit_log_share(DOMAINS, shares, ce)
    assert fit.b[1] < 0
    assert optimal_mix(fit)[1] == pytest.approx(fit.lo[1])


def test_the_fit_refuses_what_it_cannot_identify():
    shares = _mixes(4)
    ce = A - B * np.log(shares)
    with pytest.raises(ValueError, match="at least 3 runs"):
        fit_log_share(DOMAINS, shares[:2], ce[:2])
    flat = shares.copy()
    flat[:, 2] = 0.3
    flat[:, :2] = flat[:, :2] / flat[:, :2].sum(1, keepdims=True) * 0.7
    with pytest.raises(ValueError, match="domain 'c' got the same share"):
        fit_log_share(DOMAINS, flat, ce)


def test_mean_shares_weigh_each_interval_by_the_steps_it_ran():
    w = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(mean_shares([0, 10], w, 20), [0.5, 0.5])
    np.testing.assert_allclose(mean_shares([0, 10], w, 12), [10 / 12, 2 / 12])  # the last interval ran 2 steps


def _write_run(run_dir, mode, weights_per_eval, ce, steps=20, interval=10):
    run_dir.mkdir(parents=True)
    evals = [{"kind": "eval", "step": i * interval, "weights": dict(zip(DOMAINS, w))} for i, w in enumerate(weights_per_eval)]
    lines = [json.dumps(e) for e in evals] + [json.dumps({"kind": "train", "step": 1, "loss": 1.0})]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "results.json").write_text(json.dumps({"mode": mode, "steps": steps, "domains": DOMAINS,
                                                      "student_after_loss": dict(zip(DOMAINS, ce)),
                                                      "teacher_loss": dict(zip(DOMAINS, TEACHER.tolist()))}))


def _fake_compare(root, with_cpt=True):
    rng = np.random.default_rng(3)
    for m, mode in enumerate(["kd", "ddk", "ddk-equal-sampling"] + (["cpt"] if with_cpt else [])):
        for seed in range(2):
            ws = rng.dirichlet([10.0, 10.0, 10.0], size=2)
            s = ws.mean(0)
            ce = (A - B * np.log(s)) + (5.0 if mode == "cpt" else 0.0)  # cpt far off: it must be left out
            _write_run(root / mode / f"seed-{seed}", mode, ws.tolist(), ce.tolist())


def test_read_run_takes_validation_ce_and_the_mean_share(tmp_path):
    _write_run(tmp_path / "kd" / "seed-1", "kd", [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], [3.0, 2.0, 1.0])
    r = read_run(tmp_path / "kd" / "seed-1")
    assert (r.mode, r.seed) == ("kd", 1)
    np.testing.assert_allclose(r.shares, [0.3, 0.2, 0.5])
    np.testing.assert_allclose(r.ce, [3.0, 2.0, 1.0])


def test_cli_fit_mix_writes_the_mix_that_kd_fitted_trains(tmp_path):
    _fake_compare(tmp_path)
    with pytest.raises(ConfigError, match="ddk fit-mix --compare-dir"):
        fitted_overrides(tmp_path)
    r = CliRunner().invoke(cli, ["fit-mix", "--compare-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "fitted_mix.json").read_text())
    assert got["domains"] == DOMAINS and len(got["runs"]) == 6  # cpt's two runs left out
    assert all("cpt" not in p for p in got["runs"])
    np.testing.assert_allclose(got["fit"]["b"], B, atol=1e-6)  # the law the fake runs follow
    assert sum(got["weights"].values()) == pytest.approx(1.0, abs=1e-3)
    assert got["predicted_mean_val_ce"]["fitted"] <= got["predicted_mean_val_ce"]["uniform"] + 1e-9
    assert all(lo <= got["weights"][d] + 1e-3 and got["weights"][d] - 1e-3 <= hi for d, (lo, hi) in got["weights_95"].items())
    assert "fitted share" in r.output and "kd-fitted" in r.output
    assert (tmp_path / "fitted_mix.png").stat().st_size > 10_000 and got["plot"].endswith("fitted_mix.png")
    # compare's kd-fitted trains kd with exactly that mix
    overrides = fitted_overrides(tmp_path)
    cfg = load_config(None, overrides)
    assert (cfg.distill.mode, cfg.distill.kd_domains) == ("kd", "fixed")
    assert cfg.distill.domain_weights == pytest.approx(got["weights"])
    assert FITTED == "kd-fitted"


def test_cli_fit_mix_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["fit-mix", "--compare-dir", str(tmp_path)])
    assert r.exit_code != 0 and "no finished runs" in r.output and "Traceback" not in r.output


def test_fixed_weights_are_checked_where_they_are_given():
    s = DomainScheduler(DOMAINS, "fixed", interval=5, fixed_weights={"a": 1.0, "b": 1.0, "c": 2.0})
    np.testing.assert_allclose(s.update(0, [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]), [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="exactly the domains"):
        DomainScheduler(DOMAINS, "fixed", interval=5, fixed_weights={"a": 1.0})
    for bad, match in ((["distill.mode=kd", "distill.kd_domains=fixed"], "domain_weights"),
                       (["distill.mode=ddk", "distill.domain_weights={a = 1}"], "domain_weights"),
                       (["distill.mode=kd", "distill.kd_domains=fixed", "distill.domain_weights={a = -1, b = 2}"], ">= 0")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)


def test_the_bootstrap_band_is_tight_when_the_runs_follow_the_law_and_wider_when_noisy():
    from ddk.pipeline.mix_fit import bootstrap_mixes

    shares = _mixes(15)
    exact = bootstrap_mixes(DOMAINS, shares, A - B * np.log(shares), extrapolate=100.0, replicates=50)
    assert len(exact) == 50
    np.testing.assert_allclose(exact, np.tile(B / B.sum(), (50, 1)), atol=1e-6)
    noisy_ce = A - B * np.log(shares) + np.random.default_rng(4).normal(0, 0.05, shares.shape)
    noisy = bootstrap_mixes(DOMAINS, shares, noisy_ce, extrapolate=100.0, replicates=200)
    lo, hi = np.percentile(noisy, [2.5, 97.5], axis=0)
    point = optimal_mix(fit_log_share(DOMAINS, shares, noisy_ce), 100.0)
    assert np.all(hi - lo > 0.01) and np.all((lo <= point) & (point <= hi))


def test_compare_cannot_fit_kd_fitted_without_runs_to_fit_it_to(tmp_path):
    from ddk.stages.compare import compare

    with pytest.raises(ConfigError, match="no finished runs"):
        compare(None, [], tmp_path, modes=[FITTED], seeds=1, log=lambda *_: None)
    with pytest.raises(ConfigError, match="kd-fitted"):  # the unknown-mode message lists it
        compare(None, [], tmp_path, modes=["kd-fitter"], seeds=1, log=lambda *_: None)


def test_the_mix_never_leaves_its_bounds_when_the_answering_domains_are_all_at_their_top():
    from ddk.pipeline.mix_fit import LogShareFit

    fit = LogShareFit(DOMAINS, np.zeros(3), np.array([0.1, 0.1, -0.1]), np.ones(3), np.full(3, 0.2), np.array([0.4, 0.3, 0.5]))
    mix = optimal_mix(fit)
    np.testing.assert_allclose(mix, [0.4, 0.3, 0.3])  # a, b at their top; the rest to c, not a rescaling past the tops
    flat = LogShareFit(DOMAINS, np.zeros(3), np.zeros(3), np.ones(3), np.full(3, 0.2), np.full(3, 0.5))
    assert optimal_mix(flat).sum() == pytest.approx(1.0) and np.all(optimal_mix(flat) <= 0.5 + 1e-12)


def test_toml_table_reads_back_whatever_the_domain_names():
    import tomllib

    from ddk.stages.fit_mix import toml_table

    weights = {"german": 0.25, "es-ES": 0.25, "español": 0.125, 'a "quoted" name': 0.125, "dotted.name": 0.25}
    assert tomllib.loads("v = " + toml_table(weights))["v"] == weights


def test_fit_mix_refuses_runs_of_another_comparison_and_unfinished_ones(tmp_path):
    _fake_compare(tmp_path, with_cpt=False)
    odd = tmp_path / "ddk" / "seed-1" / "results.json"
    res = json.loads(odd.read_text())
    odd.write_text(json.dumps({**res, "steps": 40}))
    r = CliRunner().invoke(cli, ["fit-mix", "--compare-dir", str(tmp_path)])
    assert r.exit_code != 0 and str(odd) in r.output and "steps" in r.output and "Traceback" not in r.output
    odd.write_text(json.dumps(res))
    (tmp_path / "kd" / "seed-0" / "metrics.jsonl").write_text("")
    r = CliRunner().invoke(cli, ["fit-mix", "--compare-dir", str(tmp_path)])
    assert r.exit_code != 0 and "not a finished run" in r.output and "Traceback" not in r.output


def test_boolean_domain_weights_are_refused():
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(None, ["distill.mode=kd", "distill.kd_domains=fixed", "distill.domain_weights={a = true, b = 1}"])


def test_a_bound_on_the_worst_domain_is_a_floor_on_its_share_and_the_bounded_mix_is_the_best_under_it():
    shares = _mixes(20)
    fit = fit_log_share(DOMAINS, shares, A - B * np.log(shares))
    free = optimal_mix(fit)
    free_gaps = fit.predicted_ce(free) - TEACHER
    g = float(free_gaps.max()) - 0.02  # tighter than the free optimum's worst domain
    floors = gap_floors(fit, TEACHER, g)
    np.testing.assert_allclose(fit.predicted_ce(floors) - TEACHER, g)  # at its floor a domain sits on the bound
    mix = bounded_mix(fit, TEACHER, g)
    assert mix.sum() == pytest.approx(1.0) and np.all(fit.predicted_ce(mix) - TEACHER <= g + 1e-9)
    assert fit.predicted_mean_ce(mix) > fit.predicted_mean_ce(free)  # the bound costs the mean something
    cand = np.random.default_rng(5).dirichlet([8.0, 8.0, 8.0], size=40000)
    ok = np.all((cand >= fit.lo) & (cand <= fit.hi), axis=1) & np.all(fit.predicted_ce(cand) - TEACHER <= g, axis=1)
    assert ok.sum() > 20
    assert fit.predicted_mean_ce(mix) <= min(fit.predicted_mean_ce(c) for c in cand[ok]) + 1e-9
    # a bound the free optimum already meets changes nothing; one no mix meets names the domain
    np.testing.assert_allclose(bounded_mix(fit, TEACHER, float(free_gaps.max()) + 0.1), free)
    with pytest.raises(ValueError, match="domain 'a' needs a share of .* loosen the bound"):
        bounded_mix(fit, TEACHER, 0.2)


def test_the_frontier_runs_from_the_free_optimum_to_the_tightest_bound_and_never_gets_cheaper():
    shares = _mixes(20)
    fit = fit_log_share(DOMAINS, shares, A - B * np.log(shares))
    curve = frontier(fit, TEACHER, points=15)
    free = optimal_mix(fit)
    assert curve[0] == pytest.approx((float(np.max(fit.predicted_ce(free) - TEACHER)), fit.predicted_mean_ce(free)))
    worst, mean = np.array(curve).T
    assert len(curve) >= 10 and np.all(np.diff(worst) < 0) and np.all(np.diff(mean) >= -1e-12)
    with pytest.raises(ValueError):  # past the tightest bound no mix in the range meets it
        bounded_mix(fit, TEACHER, float(worst[-1]) - 0.01)


def test_cli_fit_mix_worst_ratio_kd_bounds_every_domain_by_kds_worst_and_kd_fitted_worst_trains_it(tmp_path):
    _fake_compare(tmp_path)
    with pytest.raises(ConfigError, match="--worst-ratio kd"):
        fitted_overrides(tmp_path, FITTED_WORST)
    r = CliRunner().invoke(cli, ["fit-mix", "--compare-dir", str(tmp_path), "--worst-ratio", "kd"])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "fitted_mix_worst.json").read_text())
    assert not (tmp_path / "fitted_mix.json").exists()  # kd-fitted's file is another
    kd_runs = [json.loads((tmp_path / "kd" / f"seed-{s}" / "results.json").read_text()) for s in range(2)]
    kd_ce = np.mean([[r["student_after_loss"][d] for d in DOMAINS] for r in kd_runs], axis=0)
    bound = float(np.exp(np.max(kd_ce - TEACHER)))
    assert got["worst_bound"]["ratio"] == pytest.approx(bound)
    assert max(got["predicted_val_ppl_ratio"].values()) <= bound + 1e-6
    assert sum(got["weights"].values()) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "fitted_mix_worst_frontier.png").stat().st_size > 10_000
    assert "bound" in r.output and "kd-fitted-worst" in r.output
    cfg = load_config(None, fitted_overrides(tmp_path, FITTED_WORST))
    assert (cfg.distill.mode, cfg.distill.kd_domains) == ("kd", "fixed")
    assert cfg.distill.domain_weights == pytest.approx(got["weights"])
    for bad, match in (("0.9", "above 1"), ("loose", "above 1"), ("1.0001", "loosen the bound")):
        r = CliRunner().invoke(cli, ["fit-mix", "--compare-dir", str(tmp_path), "--worst-ratio", bad])
        assert r.exit_code != 0 and match in r.output and "Traceback" not in r.output, r.output
