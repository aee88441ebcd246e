"""The paper's comparison from one cache: cpt, kd, ddk and DDK's two ablations, over seeds.

Every mode trains the same student with the same token budget and hyper-parameters (the
config's [distill] section) once per seed 0..n-1 (`distill.seed`: data order and
sampler); only the mode switches differ. Run (mode, seed) lives in
`<out>/<mode>/seed-<s>/`. A re-run resumes an unfinished run from its checkpoint and
reuses a finished one only when it is the run that would be made now: the same
[distill] config, the same cache (manifest sha256) and the same initial student
(weights sha256); any other finished run is refused, naming what differs.

Everything reported comes from the cache's held-out TEST split, which neither training
nor the scheduler sees (docs/DESIGN.md section 8): per mode, the mean and sample standard
deviation over seeds of per-domain PPL, mean CE, mean and worst student/teacher PPL
ratio and training tokens/s; and each mode's paired difference to KD with a bootstrap
interval (pipeline/stats.py). compare.json holds every number (per seed too),
compare.md the tables, compare_ppl.png the modes per domain with error bars (the
paper's Fig. 1) and compare_ratio.png lS/lT over training for DDK beside w/o FS (its
Fig. 3; seed 0, on the validation rows the scheduler steers by).

compare_runs.parquet holds what the tables are aggregated from, one row per (mode, seed,
domain): test CE, the teacher's test CE, PPL, student/teacher PPL ratio, validation CE,
tokens and train tokens/s (RUNS_FRAME_SCHEMA), to query in polars or DuckDB, e.g.
`pl.read_parquet("compare_runs.parquet").group_by("mode", "domain").agg(pl.col("test_ppl").mean())`.

--vs-cache DIR: every mode also trains from a second cache of the same teacher and corpus
(e.g. another cache.k, top_p, quantizer or support), labelled `<mode>@vs-cache`, and each
is paired with the same mode on the config's cache: what the cache's settings cost the
student, on the same test rows.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..pipeline.atomic import atomic_path, write_json_atomic, write_text_atomic
from ..pipeline.checkpoint import latest_checkpoint
from ..pipeline.config import Config, ConfigError, load_config
from ..pipeline.run_identity import cache_identity, student_identity
from ..pipeline.stats import metrics_vs_teacher, paired_bootstrap, seed_spread
from .distill import RESUMABLE_WITH_CHANGED, distill, read_metrics, run_label, saved_config
from .fit_mix import FITTED_MIX, FITTED_MIX_WORST, NOT_FITTED, fit_mix, toml_table

# (label, config overrides): one tool, five switches.
MODES: list[tuple[str, list[str]]] = [
    ("cpt", ["distill.mode=cpt"]),
    ("kd", ["distill.mode=kd"]),
    ("ddk", ["distill.mode=ddk"]),
    ("ddk-no-smoothing", ["distill.mode=ddk", "distill.no_smoothing=true"]),
    ("ddk-equal-sampling", ["distill.mode=ddk", "distill.equal_sampling=true"]),
]
# Beyond the paper (issue "DDK beyond the paper", pipeline/scheduler.py): run with
# --modes; not in the default comparison. Chosen on the embedded default only.
VARIANTS: list[tuple[str, list[str]]] = [
    # the CE gap in nats: weights proportional to (lS/lT)^(1/tau); r_0 smoothed like Eq. 2
    ("ddk-log-ratio-t0.1", ["distill.mode=ddk", "distill.discrepancy=log-ratio", "distill.discrepancy_temperature=0.1",
                            "distill.smooth_initial=true"]),
    ("ddk-log-ratio-t0.3", ["distill.mode=ddk", "distill.discrepancy=log-ratio", "distill.discrepancy_temperature=0.3",
                            "distill.smooth_initial=true"]),
    # the paper's ratio with guardrails: r_0 smoothed, every domain in [0.1, 0.5]
    ("ddk-guarded", ["distill.mode=ddk", "distill.smooth_initial=true", "distill.weight_floor=0.1", "distill.weight_cap=0.5"]),
    # what a domain's data buys (pipeline/scheduler.py, "rules beyond the paper"):
    # Eq. 2 around KD's proportional mix; the learning-progress bandit; the gap times progress
    ("ddk-prior-tilt", ["distill.mode=ddk", "distill.ddk_rule=prior-tilt"]),
    ("ddk-progress", ["distill.mode=ddk", "distill.ddk_rule=progress"]),
    ("ddk-gap-progress", ["distill.mode=ddk", "distill.ddk_rule=gap-progress"]),
]
ALL_MODES = MODES + VARIANTS
# kd with the fixed mix `ddk fit-mix` fitted to this comparison's other runs (its
# fitted_mix.json in --out, fitted there first when absent, after the other modes ran);
# judged on the test split the fit never saw. kd-fitted-worst: the same fit's best mix
# that keeps every domain within kd's worst validation PPL ratio (fit-mix --worst-ratio kd).
FITTED = "kd-fitted"
FITTED_WORST = "kd-fitted-worst"
FITTED_MODES = {FITTED: (FITTED_MIX, None), FITTED_WORST: (FITTED_MIX_WORST, "kd")}  # mode: (its file in --out, --worst-ratio)
PAPER_BASES = ("ddk", "ddk-equal-sampling")  # what a variant is also paired against
# The paper's baseline: every other mode's paired difference is measured against it.
REFERENCE = "kd"
BOOTSTRAP = {"replicates": 2000, "confidence": 0.95, "rng_seed": 0}
# A run's speed is the median tokens/s of its train steps after these first ones, which
# include start-up (allocation, first shard reads).
WARMUP_STEPS = 5
# compare_runs.parquet (runs_frame): one row per (mode, seed, domain), in the runs' order and
# the teacher's domain order. A run's tokens and speed repeat on each of its domains' rows.
RUNS_FRAME_SCHEMA: dict[str, pl.DataType] = {
    "mode": pl.String(),
    "seed": pl.Int64(),
    "domain": pl.String(),
    "test_ce": pl.Float64(),  # the trained student's mean CE on the domain's test rows, nats
    "teacher_test_ce": pl.Float64(),  # the first run's teacher: every mode is measured against it
    "test_ppl": pl.Float64(),  # exp(test_ce)
    "test_ppl_ratio": pl.Float64(),  # student PPL / teacher PPL = exp(test_ce - teacher_test_ce)
    "validation_ce": pl.Float64(),  # on the validation rows the scheduler steered by
    "tokens": pl.Int64(),  # trained tokens of the run
    "train_tokens_per_s": pl.Float64(),  # the run's median after the warm-up; null: no train records
    "run_dir": pl.String(),
}


@dataclass
class Run:
    """One finished (mode, seed) run: where it lives and its results.json."""

    label: str
    seed: int
    dir: Path
    results: dict


VS_CACHE = "@vs-cache"  # the label suffix of a mode trained from --vs-cache


def compare(config_path, overrides: list[str], out: Path, modes: list[str] | None = None, seeds: int = 3, log=print,
            vs_cache: Path | None = None) -> dict:
    unknown = sorted(set(modes or []) - {label for label, _ in ALL_MODES} - set(FITTED_MODES))
    if unknown:
        raise ConfigError(f"unknown modes {unknown}; choose from {[label for label, _ in ALL_MODES] + list(FITTED_MODES)}")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: a comparison needs at least 1 seed (3 or more to see run-to-run noise)")
    wanted = MODES if modes is None else [m for m in ALL_MODES if m[0] in modes]
    if vs_cache is not None:
        if not (Path(vs_cache) / "manifest.json").exists():
            raise ConfigError(f"--vs-cache {vs_cache}: no manifest.json there; point it at a finished `ddk teacher-cache` directory")
        wanted = [*wanted, *((label + VS_CACHE, [*extra, f"distill.cache_dir={json.dumps(str(vs_cache))}"]) for label, extra in wanted)]
    out.mkdir(parents=True, exist_ok=True)
    identities: dict[tuple[str, str], dict] = {}  # hashed once per compare, only if a run is to be reused
    runs = {}
    for label, extra in wanted:
        _refuse_single_seed_layout(out / label)
        runs[label] = [_run(config_path, list(overrides), label, extra, seed, out, identities, log) for seed in range(seeds)]
    for fitted, (name, worst_ratio) in FITTED_MODES.items():  # last: the fit may use the runs just made (not from --vs-cache)
        if modes is None or fitted not in modes:
            continue
        if not (out / name).exists():
            log(f"[{fitted}] no {out / name} yet: fitting it to the finished runs in {out} (ddk fit-mix"
                + (f" --worst-ratio {worst_ratio})" if worst_ratio else ")"))
            fit_mix(out, log=log, worst_ratio=worst_ratio, run_dirs=[r.dir for label, rs in runs.items() if label not in NOT_FITTED
                                                                     and not label.endswith(VS_CACHE) for r in rs])
        runs[fitted] = [_run(config_path, list(overrides), fitted, fitted_overrides(out, fitted), seed, out, identities, log)
                        for seed in range(seeds)]
    frame = runs_frame(runs)
    summary = summarize(runs, _test_row_weights(load_config(config_path, list(overrides))), frame=frame)
    write_json_atomic(out / "compare.json", summary)
    write_runs_frame(frame, out / "compare_runs.parquet")
    write_text_atomic(out / "compare.md", markdown(summary))
    summary["plots"] = [str(p) for p in plot(summary, runs, out)]
    log(markdown(summary))
    log(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare_runs.parquet'}, {', '.join(summary['plots'])}")
    return summary


def fitted_overrides(out: Path, mode: str = FITTED) -> list[str]:
    """kd-fitted's (or kd-fitted-worst's) config: kd with the mix in its file in --out."""
    name, worst_ratio = FITTED_MODES[mode]
    path = Path(out) / name
    if not path.exists():
        raise ConfigError(f"mode {mode}: {path} not found; fit it to this comparison's runs first: ddk fit-mix --compare-dir {out}"
                          + (f" --worst-ratio {worst_ratio}" if worst_ratio else ""))
    weights = json.loads(path.read_text())["weights"]
    return ["distill.mode=kd", "distill.kd_domains=fixed", f"distill.domain_weights={toml_table(weights)}"]


def _refuse_single_seed_layout(mode_dir: Path) -> None:
    if (mode_dir / "results.json").exists():
        raise ConfigError(f"{mode_dir / 'results.json'} is a single-seed run of an older ddk, made before per-seed runs and the held-out "
                          f"test split; delete {mode_dir} or pass another --out")


def _run(config_path, overrides: list[str], label: str, extra: list[str], seed: int, out: Path,
         identities: dict, log) -> Run:
    run_dir = out / label / f"seed-{seed}"
    cfg = load_config(config_path, [*overrides, *extra, f"distill.seed={seed}", f"distill.out_dir={json.dumps(str(run_dir))}"])
    base = label.removesuffix(VS_CACHE)
    assert run_label(cfg) == ("ddk-variant" if base in dict(VARIANTS) else "kd-fixed" if base in FITTED_MODES else base)
    results_path = run_dir / "results.json"
    if results_path.exists():
        key = (str(cfg.cache_path()), str(cfg.student_path()))
        if key not in identities:
            identities[key] = {"cache_manifest_sha256": cache_identity(key[0]), "student_sha256": student_identity(key[1])}
        done = json.loads(results_path.read_text())
        refusal = reuse_refusal(done, cfg, identities[key], run_dir)
        if refusal:
            raise ConfigError(refusal)
        log(f"[{label} seed {seed}] finished earlier in {run_dir}; reusing its results")
        return Run(label, seed, run_dir, done)
    return Run(label, seed, run_dir, distill(cfg, resume=latest_checkpoint(run_dir) is not None, log=log))


def reuse_refusal(done: dict, cfg: Config, identity: dict, run_dir: Path) -> str | None:
    """Why the finished run in `run_dir` (its results.json `done`) is not the run `cfg` would
    make now, in one line with the fix; None when it is (same [distill] config, cache and
    initial student). `identity` holds the current cache's and student's hashes."""
    where = run_dir / "results.json"
    fix = f"delete {run_dir} to train it again, or pass another --out"
    if "test" not in done or "identity" not in done:
        return f"{where} predates the held-out test split (it has no 'test' and 'identity' entries), so it cannot be reported; {fix}"
    now = json.loads(json.dumps(asdict(cfg.distill)))  # as results.json stores it
    # The rule of --resume: fields that say where a run lives or how it is computed (out_dir,
    # kernels, precision, ...) do not make it another run; cache and student are compared by hash below.
    then = saved_config(done["config"])
    changed = [k for k in sorted(now.keys() | then.keys())
               if k not in RESUMABLE_WITH_CHANGED and then.get(k) != now.get(k)]
    if changed:
        diffs = ", ".join(f"distill.{k} = {then.get(k)!r} there, {now.get(k)!r} now" for k in changed)
        return f"{where} was made with another [distill] config ({diffs}); {fix}"
    for key, what, path in (("cache_manifest_sha256", "cache", cfg.cache_path()), ("student_sha256", "initial student", cfg.student_path())):
        if done["identity"].get(key) != identity[key]:
            return (f"{where} was trained from another {what} than {path} holds now ({key} {str(done['identity'].get(key))[:12]} there, "
                    f"{identity[key][:12]} now); {fix}")
    return None


def _test_row_weights(cfg: Config) -> dict[str, np.ndarray] | None:
    """A masked (chat) cache's trained positions per test row, per domain; None otherwise."""
    from ..pipeline.cache.reader import TopKCacheReader
    from ..pipeline.evaluate import row_weights, split_keys

    reader = TopKCacheReader(cfg.cache_path())
    if not reader.masked:
        return None
    return {d: row_weights(reader, keys) for d, keys in split_keys(reader, "test").items()}


def _shared_teacher_loss(runs: dict[str, list[Run]]) -> dict[str, float]:
    """The teacher's per-domain test CE, the first run's; a ConfigError if another mode's
    cache holds another teacher or other test rows (its runs could not be paired)."""
    teacher = next(iter(runs.values()))[0].results["test"]["teacher_loss"]
    for rs in runs.values():
        other = rs[0].results["test"]["teacher_loss"]
        if any(abs(other[d] - teacher[d]) > 1e-4 for d in teacher):
            raise ConfigError(f"{rs[0].dir}: its cache's teacher test loss differs from the first run's ({other} vs {teacher}): "
                              f"the two caches do not hold the same teacher on the same test rows, so they cannot be paired")
    return teacher


def runs_frame(runs: dict[str, list[Run]]) -> pl.DataFrame:
    """The runs as one long frame (RUNS_FRAME_SCHEMA, compare_runs.parquet): a row per (mode,
    seed, domain) with the test numbers, measured against the first run's teacher (the same
    for every run of one cache, or of two caches of one teacher and corpus) by
    metrics_vs_teacher, which defines them (a domain a run lacks is an error there)."""
    teacher = _shared_teacher_loss(runs)
    rows = []
    for label, rs in runs.items():
        for r in rs:
            student = r.results["test"]["student_after_loss"]
            m = metrics_vs_teacher(student, teacher)
            speed = _train_speed(r.dir)
            rows += [{"mode": label, "seed": r.seed, "domain": d, "test_ce": student[d], "teacher_test_ce": teacher_ce,
                      "test_ppl": m["ppl"][d], "test_ppl_ratio": m["ratio"][d],
                      "validation_ce": r.results["student_after_loss"][d], "tokens": r.results["tokens"],
                      "train_tokens_per_s": speed, "run_dir": str(r.dir)}
                     for d, teacher_ce in teacher.items()]
    return pl.DataFrame(rows, schema=RUNS_FRAME_SCHEMA)


def write_runs_frame(frame: pl.DataFrame, path: Path) -> None:
    """`frame` as Parquet at `path`, atomically: a reader sees the old file or the whole new one."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def summarize(runs: dict[str, list[Run]], row_weights: dict[str, np.ndarray] | None = None,
              frame: pl.DataFrame | None = None) -> dict:
    """Every number of the comparison (compare.json): per mode and seed, spread over seeds,
    paired differences to KD. All on the test split. row_weights: a masked cache's trained
    positions per test row (else the runs' own record of them, if any). frame: runs_frame(runs),
    when the caller has it already."""
    first = next(iter(runs.values()))[0].results
    test = first["test"]
    teacher = _shared_teacher_loss(runs)  # one cache (or two of one teacher and corpus): the same for every run
    if frame is None:
        frame = runs_frame(runs)
    modes = {label: _mode_summary(frame.filter(pl.col("mode") == label)) for label in runs}
    # a masked (chat) cache: rows weighted by their trained positions, as the tables' means are
    weights = row_weights
    if weights is None and "row_weight" in test:
        weights = {d: np.asarray(v) for d, v in test["row_weight"].items()}
    vs_reference = {}
    if REFERENCE in runs:
        for label, rs in runs.items():
            if label != REFERENCE:
                vs_reference[label] = paired_bootstrap(_row_losses(rs), _row_losses(runs[REFERENCE]),
                                                       {d: np.asarray(v) for d, v in test["teacher_row_loss"].items()},
                                                       row_weights=weights, **BOOTSTRAP)
    # The variants beyond the paper also against what they would replace: the paper's DDK and ES.
    rows_t = {d: np.asarray(v) for d, v in test["teacher_row_loss"].items()}
    pairs = [(label, base) for label in runs if label in dict(VARIANTS) or label in FITTED_MODES for base in PAPER_BASES if base in runs]
    if all(m in runs for m in PAPER_BASES):
        pairs.insert(0, PAPER_BASES)  # the paper's own claim: DDK against equal sampling
    variants_vs_paper = {f"{a} − {b}": paired_bootstrap(_row_losses(runs[a]), _row_losses(runs[b]), rows_t, row_weights=weights,
                                                        **BOOTSTRAP)
                         for a, b in pairs}
    # The second cache against the first, mode by mode.
    vs_cache = {f"{label} − {label.removesuffix(VS_CACHE)}": paired_bootstrap(
        _row_losses(runs[label]), _row_losses(runs[label.removesuffix(VS_CACHE)]), rows_t, row_weights=weights, **BOOTSTRAP)
        for label in runs if label.endswith(VS_CACHE) and label.removesuffix(VS_CACHE) in runs}
    return {
        "variants_vs_paper": variants_vs_paper,
        "vs_cache": vs_cache,
        "caches": {label: {"cache_dir": rs[0].results.get("config", {}).get("cache_dir") or "cache.out_dir",
                           "manifest_sha256": rs[0].results.get("identity", {}).get("cache_manifest_sha256")}
                   for label, rs in runs.items()},
        "split": "test",
        "domains": first["domains"],
        "seeds": [r.seed for r in next(iter(runs.values()))],
        "steps": first["steps"],
        "tokens": first["tokens"],
        "interval": first["interval"],
        "spread": "mean over seeds; std = sample standard deviation (n - 1), min/max = extreme seeds",
        "teacher": {"loss": teacher, "ppl": {d: math.exp(v) for d, v in teacher.items()},
                    "mean_ce": statistics.fmean(teacher.values())},
        # The initial student is the same for every run (its identity is checked).
        "student_before": metrics_vs_teacher(test["student_before_loss"], teacher),
        "modes": modes,
        "reference": REFERENCE,
        "vs_reference": vs_reference,
        "bootstrap": {**BOOTSTRAP, "interval": "percentile",
                      "row_weights": "each test row's trained positions (a masked cache)" if weights is not None else
                                     "none (every test row has seq_len positions)",
                      "resamples": "seeds with replacement, paired across the two modes; within each domain, test rows "
                                   "with replacement, the same rows for both modes and the teacher"},
        "order_by_mean_ce": sorted(modes, key=lambda m: modes[m]["mean_ce"]["mean"]),
    }


def _mode_summary(rows: pl.DataFrame) -> dict:
    """One mode's entry in compare.json from its rows of runs_frame: per seed,
    metrics_vs_teacher's numbers and the run's; over seeds, their seed_spread."""
    # Groups keep the frame's order: seeds as run, domains as the teacher lists them.
    seeds = rows.group_by("seed", maintain_order=True).agg(
        pl.col("run_dir", "tokens", "train_tokens_per_s").first(),
        pl.col("domain", "test_ce", "teacher_test_ce", "validation_ce"),
    )
    per_seed = [{
        "seed": s["seed"],
        "run_dir": s["run_dir"],
        **metrics_vs_teacher(dict(zip(s["domain"], s["test_ce"])), dict(zip(s["domain"], s["teacher_test_ce"]))),
        # On the rows the scheduler steered by: the gap to mean_ce shows what steering on them is worth.
        "validation_mean_ce": statistics.fmean(s["validation_ce"]),
        "tokens": s["tokens"],
        "tokens_per_s": s["train_tokens_per_s"],
    } for s in seeds.iter_rows(named=True)]
    # The domain that is worst in most seeds; a tie goes to the one that was worst first.
    worst_domain, worst_seeds = Counter(p["worst_domain"] for p in per_seed).most_common(1)[0]
    ppl_by_domain = rows.group_by("domain", maintain_order=True).agg(pl.col("test_ppl"))
    speeds = [p["tokens_per_s"] for p in per_seed if p["tokens_per_s"] is not None]  # None: no train records
    return {
        "ppl": {d: seed_spread(ppl) for d, ppl in ppl_by_domain.iter_rows()},
        "mean_ce": seed_spread([p["mean_ce"] for p in per_seed]),
        "mean_ratio": seed_spread([p["mean_ratio"] for p in per_seed]),
        "worst_ratio": seed_spread([p["worst_ratio"] for p in per_seed]),
        "worst_domain": worst_domain,
        "worst_domain_seeds": worst_seeds,
        "tokens_per_s": seed_spread(speeds) if speeds else None,
        "per_seed": per_seed,
    }


def _row_losses(runs: list[Run]) -> dict[str, np.ndarray]:
    """[seeds, test rows] of per-row student CE per domain, seeds in the runs' order."""
    domains = runs[0].results["domains"]
    return {d: np.array([r.results["test"]["student_after_row_loss"][d] for r in runs]) for d in domains}


def _train_speed(run_dir: Path) -> float | None:
    """The run's train tokens/s: the median over its train records after the warm-up; None
    without any."""
    speeds = [m["tokens_per_s"] for m in read_metrics(run_dir, "train")]
    # A run too short to skip the warm-up steps (a smoke test) keeps them all.
    return statistics.median(speeds[WARMUP_STEPS:] or speeds) if speeds else None


def markdown(s: dict) -> str:
    domains, n = s["domains"], len(s["seeds"])
    lines = [
        f"Test split, {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, s['seeds']))}) per mode, {s['steps']} steps "
        f"({s['tokens']:,} tokens per run, K = {s['interval']}). Held-out test rows per domain, never seen by training or "
        f"the scheduler. "
        + ("Each cell: mean ± sample standard deviation over seeds; mean CE also gives the min..max over seeds. "
           if n > 1 else "n = 1: one seed, no spread over seeds. ")
        + "Lower is better everywhere.",
        "",
        "| mode | " + " | ".join(f"{d} PPL" for d in domains) + " | mean CE (nats) | mean PPL ratio | worst PPL ratio | train tokens/s |",
        "|" + "---|" * (len(domains) + 5),
    ]
    t = s["teacher"]
    lines.append("| teacher | " + " | ".join(f"{t['ppl'][d]:.2f}" for d in domains) + f" | {t['mean_ce']:.4f} | 1.000 | 1.000 | |")
    b = s["student_before"]
    lines.append("| student before | " + " | ".join(f"{b['ppl'][d]:.2f}" for d in domains)
                 + f" | {b['mean_ce']:.4f} | {b['mean_ratio']:.3f} | {b['worst_ratio']:.3f} ({b['worst_domain']}) | |")
    order = s["order_by_mean_ce"]
    for label, m in s["modes"].items():
        name = f"**{label}**" if label == order[0] else label
        ce = m["mean_ce"]
        ce_cell = _pm(ce, ".4f") + (f" ({ce['min']:.4f}..{ce['max']:.4f})" if n > 1 else "")
        worst = f"{_pm(m['worst_ratio'], '.3f')} ({m['worst_domain']}, {m['worst_domain_seeds']}/{n} seeds)"
        speed = _pm(m["tokens_per_s"], ",.0f") if m["tokens_per_s"] else "n/a"
        lines.append(f"| {name} | " + " | ".join(_pm(m["ppl"][d], ".2f") for d in domains)
                     + f" | {ce_cell} | {_pm(m['mean_ratio'], '.3f')} | {worst} | {speed} |")
    lines += ["", *_difference_table(s), "", _in_words(s), ""]
    return "\n".join(lines)


def _pm(spread: dict, fmt: str) -> str:
    """'mean ± std' of a seed_spread (just the mean for one seed)."""
    return f"{spread['mean']:{fmt}}" + (f" ± {spread['std']:{fmt}}" if spread["std"] is not None else "")


def _difference_table(s: dict) -> list[str]:
    ref, bs = s["reference"], s["bootstrap"]
    if not s["vs_reference"]:
        return [f"No paired differences: {ref} is not among the compared modes (add it to --modes)."]
    pct = f"{bs['confidence'] * 100:g} %"
    n = len(s["seeds"])
    lines = [
        f"Paired difference to {ref} on the test split (mode − {ref}; negative = lower than {ref}, better). {pct} percentile "
        f"intervals of a paired bootstrap ({bs['replicates']} replicates, RNG seed {bs['rng_seed']}): each replicate resamples "
        f"the seeds with replacement (seed s of a mode paired with seed s of {ref}) and, within each domain, the test rows with "
        f"replacement (the same rows for both modes). Significant = the interval excludes 0."
        + (" n = 1 seed: the intervals cover test-row sampling only, not run-to-run noise." if n == 1 else
           f" Resampling {n} seeds gives (n - 1)/n = {(n - 1) / n:.2f} of their sample variance: few seeds make the intervals "
           f"somewhat narrow."),
        "",
        f"| mode | mean CE diff | {pct} CI | significant | mean ratio diff | {pct} CI | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += _pair_rows(s["vs_reference"])
    if s.get("vs_cache"):
        lines += ["", f"The same mode from the second cache (`{VS_CACHE}`) against the config's cache, paired the same way "
                      f"(second − first; negative = the second cache's student is better):", "",
                  f"| pair | mean CE diff | {pct} CI | significant | mean ratio diff | {pct} CI | significant |",
                  "|---|---|---|---|---|---|---|", *_pair_rows(s["vs_cache"])]
    if s.get("variants_vs_paper"):
        lines += ["", "The paper's DDK against ES, and the variants beyond the paper against both, paired the same way (first − second):", "",
                  f"| pair | mean CE diff | {pct} CI | significant | mean ratio diff | {pct} CI | significant |",
                  "|---|---|---|---|---|---|---|", *_pair_rows(s["variants_vs_paper"])]
    return lines


def _pair_rows(pairs: dict) -> list[str]:
    lines = []
    for label, d in pairs.items():
        ce, ratio = d["mean_ce"], d["mean_ratio"]
        lines.append(f"| {label} | {ce['diff']:+.4f} | [{ce['low']:+.4f}, {ce['high']:+.4f}] | {'yes' if ce['significant'] else 'no'} "
                     f"| {ratio['diff']:+.3f} | [{ratio['low']:+.3f}, {ratio['high']:+.3f}] | {'yes' if ratio['significant'] else 'no'} |")
    return lines


def _in_words(s: dict) -> str:
    modes, ref = s["modes"], s["reference"]
    words = "Order by mean test CE (lower is better): " + " < ".join(
        f"{m} ({modes[m]['mean_ce']['mean']:.4f})" for m in s["order_by_mean_ce"]) + "."
    if s["vs_reference"]:
        groups = {"significantly lower": [], "significantly higher": [], "no significant difference": []}
        for label, d in s["vs_reference"].items():
            ce = d["mean_ce"]
            groups[("significantly lower" if ce["diff"] < 0 else "significantly higher") if ce["significant"] else "no significant difference"].append(label)
        pct = f"{s['bootstrap']['confidence'] * 100:g} %"
        words += (f" Mean test CE against {ref} ({pct} paired bootstrap interval): "
                  + "; ".join(f"{key}: {', '.join(labels)}" for key, labels in groups.items() if labels) + ".")
    if len(s["seeds"]) == 1:
        words += " One seed: run-to-run noise is not measured; run with --seeds 3 or more before reading the order."
    return words


def plot(summary: dict, runs: dict[str, list[Run]], out: Path) -> list[Path]:
    from ..pipeline import plots

    domains, n = summary["domains"], len(summary["seeds"])
    columns = {"teacher": summary["teacher"]["ppl"], "student before": summary["student_before"]["ppl"],
               **{label: {d: m["ppl"][d]["mean"] for d in domains} for label, m in summary["modes"].items()}}
    errors = {label: {d: m["ppl"][d]["std"] for d in domains} for label, m in summary["modes"].items()}
    spread = f"mean ± std over {n} seeds" if n > 1 else "1 seed"
    paths = [plots.plot_domain_ppl(columns, out / "compare_ppl.png", title=f"Test perplexity per domain by mode ({spread})",
                                   errors=errors)]
    series = {}
    for label in ("ddk", "ddk-no-smoothing"):
        evals = read_metrics(runs[label][0].dir, "eval") if label in runs else []
        if evals:
            series[label] = ([e["tokens"] for e in evals], [[e["ratio"][d] for d in domains] for e in evals])
    if series:
        paths.append(plots.plot_ppl_ratio(series, domains, out / "compare_ratio.png",
                                          title=r"Student/teacher PPL ratio $\ell_S/\ell_T$ per domain on validation (seed 0)"))
    # The weights each DDK rule chose over training (seed 0): the paper's beside the variants.
    for label, label_runs in runs.items():
        evals = (read_metrics(label_runs[0].dir, "eval")
                 if label.startswith("ddk") and not label.startswith("ddk-equal-sampling") else [])
        if evals:
            paths.append(plots.plot_domain_weights([e["step"] for e in evals], [[e["weights"][d] for d in domains] for e in evals], domains,
                                                   out / f"compare_weights_{label}.png", title=f"Domain weights r_t, {label} (seed 0)"))
    return paths
