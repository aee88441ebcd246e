"""`ddk fit-mix`: the fixed domain mix fitted to a comparison's finished runs
(pipeline/mix_fit.py), written to <compare dir>/fitted_mix.json for `ddk compare --modes
...,kd-fitted` (kd with that mix, paired against kd, equal sampling and DDK on the test split)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..pipeline.atomic import write_json_atomic
from ..pipeline.config import ConfigError
from ..pipeline.mix_fit import RunMix, bootstrap_mixes, fit_log_share, mean_shares, optimal_mix
from ..pipeline.plots import plot_mix_fit
from .distill import read_metrics

FITTED_MIX = "fitted_mix.json"
# Runs the fit leaves out: cpt (another objective: no teacher), the fitted mix's own runs
# (the fit would then depend on its own output) and runs from another cache (--vs-cache).
NOT_FITTED = ("cpt", "kd-fitted")


def fit_mix(compare_dir: Path, extrapolate: float = 1.5, log=print, run_dirs: list[Path] | None = None) -> dict:
    """Fit, print, and write <compare_dir>/fitted_mix.json and fitted_mix.png. run_dirs: the
    runs to fit (compare passes those it has just checked against its config, cache and
    student); by default every finished run under compare_dir but NOT_FITTED's and
    --vs-cache's, which must then agree among themselves (checked: same_runs)."""
    if run_dirs is None:
        run_dirs = sorted(p.parent for p in Path(compare_dir).glob("*/seed-*/results.json")
                          if p.parent.parent.name not in NOT_FITTED and "@" not in p.parent.parent.name)
    if not run_dirs:
        raise ConfigError(f"{compare_dir}: no finished runs (<mode>/seed-<s>/results.json); run `ddk compare` there first")
    results = [_results(d) for d in run_dirs]
    domains = same_runs(run_dirs, results)
    runs = [read_run(d, r) for d, r in zip(run_dirs, results)]
    labels = [d.parent.name for d in run_dirs]
    shares, ce = np.array([r.shares for r in runs]), np.array([r.ce for r in runs])
    try:
        fit = fit_log_share(domains, shares, ce)
    except ValueError as e:
        raise ConfigError(f"{compare_dir}: {e}") from None
    mix = optimal_mix(fit, extrapolate)
    # how firmly the runs pin the mix down: 95 % of the mixes fitted to resampled runs
    boot = bootstrap_mixes(domains, shares, ce, extrapolate)
    band = np.percentile(boot, [2.5, 97.5], axis=0) if len(boot) else np.full((2, len(domains)), np.nan)
    by_mode: dict[str, list] = {}
    for label, run in zip(labels, runs):
        by_mode.setdefault(label, []).append(run)
    observed = {m: float(np.mean([r.ce.mean() for r in rs])) for m, rs in by_mode.items()}
    predicted = {m: float(np.mean([fit.predicted_mean_ce(r.shares) for r in rs])) for m, rs in by_mode.items()}
    uniform = np.full(len(domains), 1.0 / len(domains))
    result = {
        "domains": domains,
        "weights": dict(zip(domains, mix.round(6).tolist())),
        "weights_95": {d: [float(band[0, i]), float(band[1, i])] for i, d in enumerate(domains)},
        "bootstrap": {"replicates": int(len(boot)), "resampled": "runs, with replacement", "rng_seed": 0},
        "fit": {"model": "CE_i = a_i - b_i * log(mean share_i), least squares over the runs, validation CE",
                "a": fit.a.tolist(), "b": fit.b.tolist(), "r2": fit.r2.tolist(),
                "share_low": fit.lo.tolist(), "share_high": fit.hi.tolist(), "extrapolate": extrapolate},
        "predicted_mean_val_ce": {"fitted": fit.predicted_mean_ce(mix), "uniform": fit.predicted_mean_ce(uniform), **predicted},
        "observed_mean_val_ce": observed,
        "runs": [str(d) for d in run_dirs],
    }
    points = {m: ([r.shares.tolist() for r in rs], [r.ce.tolist() for r in rs]) for m, rs in by_mode.items()}
    result["plot"] = str(plot_mix_fit(domains, points, fit.a.tolist(), fit.b.tolist(), mix.tolist(),
                                      Path(compare_dir) / "fitted_mix.png"))
    write_json_atomic(Path(compare_dir) / FITTED_MIX, result)
    log(f"fitted to {len(runs)} runs of {len(by_mode)} modes ({', '.join(by_mode)}) in {compare_dir}: validation CE per domain "
        f"against the log of its mean share")
    log(f"{'domain':<16}{'b (nats/e-fold)':>16}{'R^2':>7}{'shares seen':>16}{'fitted share':>14}{'95 % (runs resampled)':>23}")
    for i, d in enumerate(domains):
        log(f"{d:<16}{fit.b[i]:>16.3f}{fit.r2[i]:>7.2f}{f'{fit.lo[i]:.3f}..{fit.hi[i]:.3f}':>16}{mix[i]:>14.3f}"
            f"{f'{band[0, i]:.3f}..{band[1, i]:.3f}':>23}")
    log(f"domain-mean validation CE, fitted (observed): " + ", ".join(
        f"{m} {predicted[m]:.4f} ({observed[m]:.4f})" for m in by_mode) +
        f"; uniform {fit.predicted_mean_ce(uniform):.4f}; the fitted mix {fit.predicted_mean_ce(mix):.4f}")
    log(f"written: {Path(compare_dir) / FITTED_MIX}, {result['plot']}; train it with `ddk compare --out {compare_dir} --modes kd,ddk-equal-sampling,kd-fitted` "
        f"(paired on the test split), or one run with --set distill.mode=kd --set distill.kd_domains=fixed "
        f"--set 'distill.domain_weights={toml_table(result['weights'])}'")
    return result


def _not_finished(run_dir: Path, e: Exception) -> ConfigError:
    return ConfigError(f"{run_dir}: not a finished run of ddk distill ({type(e).__name__}: {e}); "
                       f"finish it (ddk compare resumes it) or move it out of the comparison")


def _results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError) as e:
        raise _not_finished(run_dir, e) from None


def read_run(run_dir: Path, results: dict | None = None) -> RunMix:
    """A finished run's RunMix: its validation CE from results.json (`results`, when the
    caller has read it already) and its mean shares from the interval weights of its eval
    records in metrics.jsonl."""
    results = _results(run_dir) if results is None else results
    try:
        domains, steps = results["domains"], results["steps"]
        evals = [e for e in read_metrics(run_dir, "eval") if "weights" in e and e["step"] < steps]
        if not evals:
            raise ValueError("no evaluation records with domain weights in metrics.jsonl")
        shares = mean_shares([e["step"] for e in evals], np.array([[e["weights"][d] for d in domains] for e in evals]), steps)
        ce = np.array([results["student_after_loss"][d] for d in domains], np.float64)
        seed = int(run_dir.name.removeprefix("seed-"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _not_finished(run_dir, e) from None
    return RunMix(results.get("mode", run_dir.parent.name), seed, shares, ce)


def same_runs(run_dirs: list[Path], results: list[dict]) -> list[str]:
    """The domains of runs that may be fitted together: the same domains, cache, initial
    student and budget as the first (a run of another comparison left in the directory
    would otherwise be fitted silently). Refuses naming the first run that differs."""
    first = results[0]
    for d, r in zip(run_dirs[1:], results[1:]):
        for what, mine, theirs in (("domains", r.get("domains"), first.get("domains")), ("steps", r.get("steps"), first.get("steps")),
                                   ("cache and initial student", r.get("identity"), first.get("identity"))):
            if mine != theirs:
                raise ConfigError(f"{d / 'results.json'}: its {what} differ from {run_dirs[0] / 'results.json'}'s; runs of another "
                                  f"comparison cannot be fitted with these: move it out of {d.parent.parent}")
    return first["domains"]


def toml_table(weights: dict) -> str:
    """{german = 0.2, "es-ES.utf8" = 0.1, ...}: a TOML inline table, as --set reads it (bare
    keys where TOML allows them, else quoted and escaped: a JSON string is a TOML basic string)."""
    return "{" + ", ".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)} = {v!r}"
                           for k, v in weights.items()) + "}"
