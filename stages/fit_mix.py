"""`ddk fit-mix`: the fixed domain mix fitted to a comparison's finished runs
(pipeline/mix_fit.py), written to <compare dir>/fitted_mix.json for `ddk compare --modes
...,kd-fitted` (kd with that mix, paired against kd, equal sampling and DDK on the test split).
With --worst-ratio, the best mix whose every domain stays within a student/teacher PPL
ratio (a number, or `kd`: KD's worst, as its runs here measured it on validation), written
to fitted_mix_worst.json for compare's kd-fitted-worst."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..pipeline.atomic import write_json_atomic
from ..pipeline.config import ConfigError
from ..pipeline.mix_fit import RunMix, bootstrap_mixes, bounded_mix, fit_log_share, frontier, mean_shares, optimal_mix
from ..pipeline.plots import plot_mix_fit, plot_mix_frontier
from .distill import read_metrics

FITTED_MIX = "fitted_mix.json"
FITTED_MIX_WORST = "fitted_mix_worst.json"  # the mix under a worst-domain bound (--worst-ratio)
# Runs the fit leaves out: cpt (another objective: no teacher), the fitted mixes' own runs
# (the fit would then depend on its own output) and runs from another cache (--vs-cache).
NOT_FITTED = ("cpt", "kd-fitted", "kd-fitted-worst")


def fit_mix(compare_dir: Path, extrapolate: float = 1.5, log=print, run_dirs: list[Path] | None = None,
            worst_ratio: str | float | None = None) -> dict:
    """Fit, print, and write <compare_dir>/fitted_mix.json, fitted_mix.png (each domain's
    runs and line) and fitted_mix_frontier.png (the fitted mean against the worst domain's
    bound). run_dirs: the runs to fit (compare passes those it has just checked against its
    config, cache and student); by default every finished run under compare_dir but
    NOT_FITTED's and --vs-cache's, which must then agree among themselves (checked:
    same_runs). worst_ratio (a PPL ratio > 1, or "kd": the worst domain of this comparison's
    kd runs on validation): the bounded mix instead, written to fitted_mix_worst.json."""
    compare_dir = Path(compare_dir)
    if run_dirs is None:
        run_dirs = sorted(p.parent for p in compare_dir.glob("*/seed-*/results.json")
                          if p.parent.parent.name not in NOT_FITTED and "@" not in p.parent.parent.name)
    if not run_dirs:
        raise ConfigError(f"{compare_dir}: no finished runs (<mode>/seed-<s>/results.json); run `ddk compare` there first")
    results = [_results(d) for d in run_dirs]
    domains = same_runs(run_dirs, results)
    runs = [read_run(d, r) for d, r in zip(run_dirs, results)]
    shares, ce = np.array([r.shares for r in runs]), np.array([r.ce for r in runs])
    try:
        fit = fit_log_share(domains, shares, ce)
    except ValueError as e:
        raise ConfigError(f"{compare_dir}: {e}") from None
    teacher_ce = teacher_val_ce(run_dirs[0], results[0], domains)
    by_mode: dict[str, list[RunMix]] = {}
    for d, run in zip(run_dirs, runs):
        by_mode.setdefault(d.parent.name, []).append(run)

    # the mix: the fitted mean's best, within the worst-domain bound when one is asked for
    bound = None if worst_ratio is None else worst_bound(worst_ratio, by_mode, teacher_ce, compare_dir)
    max_gap = None if bound is None else bound["max_gap"]
    try:
        mix = optimal_mix(fit, extrapolate) if bound is None else bounded_mix(fit, teacher_ce, max_gap, extrapolate)
    except ValueError as e:
        raise ConfigError(f"{compare_dir}: --worst-ratio {worst_ratio}: {e}") from None
    # how firmly the runs pin it down: 95 % of the mixes fitted to resampled runs (a bound held where it is)
    boot = bootstrap_mixes(domains, shares, ce, extrapolate, teacher_ce=teacher_ce, max_gap=max_gap)
    band = np.percentile(boot, [2.5, 97.5], axis=0) if len(boot) else np.full((2, len(domains)), np.nan)
    ratios = np.exp(fit.predicted_ce(mix) - teacher_ce)
    uniform = np.full(len(domains), 1.0 / len(domains))
    result = {
        "domains": domains,
        "weights": dict(zip(domains, mix.round(6).tolist())),
        "weights_95": {d: [float(band[0, i]), float(band[1, i])] for i, d in enumerate(domains)},
        "bootstrap": {"replicates": int(len(boot)), "resampled": "runs, with replacement", "rng_seed": 0},
        "fit": {"model": "CE_i = a_i - b_i * log(mean share_i), least squares over the runs, validation CE",
                "a": fit.a.tolist(), "b": fit.b.tolist(), "r2": fit.r2.tolist(),
                "share_low": fit.lo.tolist(), "share_high": fit.hi.tolist(), "extrapolate": extrapolate},
        "predicted_mean_val_ce": {"fitted": fit.predicted_mean_ce(mix), "uniform": fit.predicted_mean_ce(uniform),
                                  **{m: float(np.mean([fit.predicted_mean_ce(r.shares) for r in rs])) for m, rs in by_mode.items()}},
        "observed_mean_val_ce": {m: float(np.mean([r.ce.mean() for r in rs])) for m, rs in by_mode.items()},
        "predicted_val_ppl_ratio": dict(zip(domains, ratios.tolist())),
        "worst_bound": bound,
        "frontier": [(float(np.exp(g)), m) for g, m in frontier(fit, teacher_ce, extrapolate)],
        "runs": [str(d) for d in run_dirs],
    }

    # the plots: each domain's runs and line; what the worst domain's bound costs the mean
    name = FITTED_MIX if bound is None else FITTED_MIX_WORST
    stem = compare_dir / Path(name).stem
    points = {m: ([r.shares.tolist() for r in rs], [r.ce.tolist() for r in rs]) for m, rs in by_mode.items()}
    result["plot"] = str(plot_mix_fit(domains, points, fit.a.tolist(), fit.b.tolist(), mix.tolist(), stem.with_suffix(".png")))
    observed_worst = {m: (float(np.exp(worst_gap(rs, teacher_ce))), result["observed_mean_val_ce"][m]) for m, rs in by_mode.items()}
    result["frontier_plot"] = str(plot_mix_frontier(result["frontier"], observed_worst, (float(ratios.max()), fit.predicted_mean_ce(mix)),
                                                    stem.with_name(stem.name + "_frontier.png"),
                                                    bound=None if bound is None else bound["ratio"]))
    write_json_atomic(compare_dir / name, result)
    _report(result, band, compare_dir / name, log)
    return result


def _report(result: dict, band: np.ndarray, path: Path, log) -> None:
    """The fit, the mix and how to train it, as `ddk fit-mix` prints them."""
    domains, fit, predicted = result["domains"], result["fit"], result["predicted_mean_val_ce"]
    observed, ratios, bound = result["observed_mean_val_ce"], result["predicted_val_ppl_ratio"], result["worst_bound"]
    log(f"fitted to {len(result['runs'])} runs of {len(observed)} modes ({', '.join(observed)}) in {path.parent}: "
        f"validation CE per domain against the log of its mean share")
    log(f"{'domain':<16}{'b (nats/e-fold)':>16}{'R^2':>7}{'shares seen':>16}{'fitted share':>14}{'95 % (runs resampled)':>23}")
    for i, d in enumerate(domains):
        seen, resampled = f"{fit['share_low'][i]:.3f}..{fit['share_high'][i]:.3f}", f"{band[0, i]:.3f}..{band[1, i]:.3f}"
        log(f"{d:<16}{fit['b'][i]:>16.3f}{fit['r2'][i]:>7.2f}{seen:>16}{result['weights'][d]:>14.3f}{resampled:>23}")
    log("domain-mean validation CE, fitted (observed): " + ", ".join(f"{m} {predicted[m]:.4f} ({observed[m]:.4f})" for m in observed)
        + f"; uniform {predicted['uniform']:.4f}; the fitted mix {predicted['fitted']:.4f}")
    worst = max(ratios, key=ratios.get)
    log(f"the fitted mix's worst validation PPL ratio: {ratios[worst]:.3f} ({worst})"
        + ("" if bound is None else f"; bound {bound['ratio']:.3f} ({bound['from']})"))
    mode = "kd-fitted" if bound is None else "kd-fitted-worst"
    log(f"written: {path}, {result['plot']}, {result['frontier_plot']}; train it with "
        f"`ddk compare --out {path.parent} --modes kd,ddk-equal-sampling,{mode}` "
        f"(paired on the test split), or one run with --set distill.mode=kd --set distill.kd_domains=fixed "
        f"--set 'distill.domain_weights={toml_table(result['weights'])}'")


def teacher_val_ce(run_dir: Path, results: dict, domains: list[str]) -> np.ndarray:
    """The teacher's validation CE per domain, from a run's results.json (every run of one
    comparison has the same: same cache, same split)."""
    try:
        return np.array([results["teacher_loss"][d] for d in domains], np.float64)
    except (KeyError, TypeError) as e:
        raise _not_finished(run_dir, e) from None


def worst_gap(runs: list[RunMix], teacher_ce: np.ndarray) -> float:
    """The largest over domains of the runs' mean validation CE minus the teacher's (nats)."""
    return float(np.max(np.mean([r.ce for r in runs], 0) - teacher_ce))


def worst_bound(worst_ratio: str | float, by_mode: dict[str, list[RunMix]], teacher_ce: np.ndarray, compare_dir) -> dict:
    """--worst-ratio as a gap in nats: a PPL ratio > 1 as given, or "kd": the largest over
    domains of the kd runs' mean validation CE minus the teacher's."""
    if str(worst_ratio) == "kd":
        if "kd" not in by_mode:
            raise ConfigError(f"{compare_dir}: --worst-ratio kd needs this comparison's kd runs (none among the runs fitted); "
                              f"run `ddk compare --modes kd,...` there first, or give a ratio such as 1.2")
        gap = worst_gap(by_mode["kd"], teacher_ce)
        return {"ratio": float(np.exp(gap)), "max_gap": gap, "from": "kd's worst domain, validation, mean over its seeds"}
    try:
        ratio = float(worst_ratio)
    except ValueError:
        ratio = float("nan")
    if not ratio > 1.0:
        raise ConfigError(f"--worst-ratio {worst_ratio!r}: give a student/teacher PPL ratio above 1 (e.g. 1.2) or `kd`")
    return {"ratio": ratio, "max_gap": float(np.log(ratio)), "from": "given"}


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
