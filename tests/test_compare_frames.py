"""`ddk compare`'s tables from polars frames: the same compare.json as the dict loops it
replaced (frozen below as `_reference_summarize`), and compare_runs.parquet's rows."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ddk.pipeline.config import ConfigError
from ddk.pipeline.stats import metrics_vs_teacher, paired_bootstrap, seed_spread
from ddk.stages.compare import (BOOTSTRAP, PAPER_BASES, REFERENCE, RUNS_FRAME_SCHEMA, VARIANTS, VS_CACHE, WARMUP_STEPS, Run,
                                markdown, runs_frame, summarize, write_runs_frame)
from ddk.stages.distill import read_metrics

DOMAINS = ["code", "prose", "math"]
SEEDS = 3
ROWS = 6


# ---------------------------------------------------------------- the reference: summarize() before polars, frozen
def _reference_summarize(runs: dict[str, list[Run]], row_weights: dict[str, np.ndarray] | None = None) -> dict:
    """stages/compare.summarize as it was before its tables came from polars frames (verbatim but
    for names): the expected output of the new one."""
    first = next(iter(runs.values()))[0].results
    test = first["test"]
    teacher = test["teacher_loss"]
    for label, rs in runs.items():
        other = rs[0].results["test"]["teacher_loss"]
        if any(abs(other[d] - teacher[d]) > 1e-4 for d in teacher):
            raise ConfigError("cannot be paired")
    modes = {label: _reference_mode_summary(rs, teacher) for label, rs in runs.items()}
    weights = row_weights
    if weights is None and "row_weight" in test:
        weights = {d: np.asarray(v) for d, v in test["row_weight"].items()}
    vs_reference = {}
    if REFERENCE in runs:
        for label, rs in runs.items():
            if label != REFERENCE:
                vs_reference[label] = paired_bootstrap(_reference_row_losses(rs), _reference_row_losses(runs[REFERENCE]),
                                                       {d: np.asarray(v) for d, v in test["teacher_row_loss"].items()},
                                                       row_weights=weights, **BOOTSTRAP)
    rows_t = {d: np.asarray(v) for d, v in test["teacher_row_loss"].items()}
    pairs = [(label, base) for label in runs if label in dict(VARIANTS) for base in PAPER_BASES if base in runs]
    if all(m in runs for m in PAPER_BASES):
        pairs.insert(0, PAPER_BASES)
    variants_vs_paper = {f"{a} − {b}": paired_bootstrap(_reference_row_losses(runs[a]), _reference_row_losses(runs[b]), rows_t,
                                                        row_weights=weights, **BOOTSTRAP)
                         for a, b in pairs}
    vs_cache = {f"{label} − {label.removesuffix(VS_CACHE)}": paired_bootstrap(
        _reference_row_losses(runs[label]), _reference_row_losses(runs[label.removesuffix(VS_CACHE)]), rows_t, row_weights=weights,
        **BOOTSTRAP)
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


def _reference_mode_summary(runs: list[Run], teacher: dict[str, float]) -> dict:
    per_seed = []
    for r in runs:
        per_seed.append({
            "seed": r.seed,
            "run_dir": str(r.dir),
            **metrics_vs_teacher(r.results["test"]["student_after_loss"], teacher),
            "validation_mean_ce": statistics.fmean(r.results["student_after_loss"].values()),
            "tokens": r.results["tokens"],
            "tokens_per_s": _reference_train_speed(r.dir),
        })
    worst = Counter(p["worst_domain"] for p in per_seed).most_common(1)[0]
    speeds = [p["tokens_per_s"] for p in per_seed if p["tokens_per_s"] is not None]
    return {
        "ppl": {d: seed_spread([p["ppl"][d] for p in per_seed]) for d in teacher},
        "mean_ce": seed_spread([p["mean_ce"] for p in per_seed]),
        "mean_ratio": seed_spread([p["mean_ratio"] for p in per_seed]),
        "worst_ratio": seed_spread([p["worst_ratio"] for p in per_seed]),
        "worst_domain": worst[0],
        "worst_domain_seeds": worst[1],
        "tokens_per_s": seed_spread(speeds) if speeds else None,
        "per_seed": per_seed,
    }


def _reference_row_losses(runs: list[Run]) -> dict[str, np.ndarray]:
    domains = runs[0].results["domains"]
    return {d: np.array([r.results["test"]["student_after_row_loss"][d] for r in runs]) for d in domains}


def _reference_train_speed(run_dir: Path) -> float | None:
    speeds = [m["tokens_per_s"] for m in read_metrics(run_dir, "train")]
    return statistics.median(speeds[WARMUP_STEPS:] or speeds) if speeds else None


# ---------------------------------------------------------------- synthetic finished runs
def _write_metrics(run_dir: Path, speeds: list[float] | None, rng: np.random.Generator) -> None:
    """metrics.jsonl as distill writes it: train records (with these tokens/s) between eval
    records that carry per-domain dicts; None: no metrics.jsonl at all."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if speeds is None:
        return
    lines = []
    for step, speed in enumerate(speeds, start=1):
        if step % 2 == 1:
            lines.append({"kind": "eval", "step": step - 1, "tokens": (step - 1) * 64,
                          "ratio": {d: float(rng.uniform(1, 2)) for d in DOMAINS}, "weights": {d: 1 / 3 for d in DOMAINS}})
        lines.append({"kind": "train", "step": step, "loss": float(rng.uniform(2, 3)), "ce": 2.0, "kl": 0.5, "lr": 1e-3,
                      "grad_norm": 1.0, "tokens_per_s": speed, "tokens": 64})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _run(root: Path, label: str, seed: int, rng: np.random.Generator, teacher_rows: dict, shift: float,
         speeds: list[float] | None, worst: str | None = None) -> Run:
    """A finished run with random per-row test losses `shift` nats above the teacher's on
    average; `worst`: the domain pushed furthest above it (the seed's worst ratio)."""
    after_rows = {d: [v + shift + float(rng.normal(0, 0.05)) + (0.3 if d == worst else 0.0) for v in rows]
                  for d, rows in teacher_rows.items()}
    after = {d: statistics.fmean(v) for d, v in after_rows.items()}
    teacher = {d: statistics.fmean(v) for d, v in teacher_rows.items()}
    # validation losses in another domain order than the test's: a mean over domains may not depend on it
    validation = {d: after[d] + float(rng.normal(0, 0.1)) for d in reversed(DOMAINS)}
    run_dir = root / label / f"seed-{seed}"
    _write_metrics(run_dir, speeds, rng)
    results = {"domains": DOMAINS, "steps": 12, "tokens": 768, "interval": 2, "student_after_loss": validation,
               "config": {"cache_dir": f"/caches/{label}"}, "identity": {"cache_manifest_sha256": "ab" * 32},
               "test": {"teacher_loss": teacher, "student_before_loss": {d: v + 1.0 for d, v in teacher.items()},
                        "student_after_loss": after, "teacher_row_loss": teacher_rows, "student_after_row_loss": after_rows}}
    return Run(label, seed, run_dir, results)


@pytest.fixture
def runs(tmp_path) -> dict[str, list[Run]]:
    """Five modes over three seeds with every case the tables meet: speeds past the warm-up, too
    short a run to skip it (odd and even counts), no metrics at all; a worst domain that wins
    2 of 3 seeds, a three-way tie (the first seed's wins) and a second cache whose teacher loss
    differs within the pairing tolerance."""
    rng = np.random.default_rng(7)
    teacher_rows = {d: [float(x) for x in rng.uniform(1.0 + i, 1.5 + i, ROWS)] for i, d in enumerate(DOMAINS)}
    speeds = lambda n: [float(x) for x in rng.uniform(1e4, 5e4, n)]  # noqa: E731
    plan = {  # label: (shift, [(speeds, worst domain) per seed])
        "kd": (0.5, [(speeds(12), "math"), (speeds(13), "prose"), (speeds(12), "math")]),
        "ddk": (0.45, [(speeds(3), "code"), (speeds(4), "prose"), (speeds(WARMUP_STEPS), "math")]),  # all short; a tie
        "ddk-equal-sampling": (0.47, [(None, None), (speeds(9), None), (None, None)]),  # one seed with a speed
        "ddk-guarded": (0.46, [(None, "code")] * SEEDS),  # no speed at all
    }
    out = {label: [_run(tmp_path, label, s, rng, teacher_rows, shift, *seed_plan[s]) for s in range(SEEDS)]
           for label, (shift, seed_plan) in plan.items()}
    nudged = {d: [v + 2e-5 for v in rows] for d, rows in teacher_rows.items()}  # the same teacher, to within 1e-4
    out["kd" + VS_CACHE] = [_run(tmp_path, "kd" + VS_CACHE, s, rng, nudged, 0.52, speeds(10)) for s in range(SEEDS)]
    return out


def _assert_same(new, old, where: str = "summary") -> None:
    """The same JSON document: keys in the same order, the same types, floats to 1e-12."""
    if isinstance(old, dict):
        assert isinstance(new, dict) and list(new) == list(old), f"{where}: keys {list(new)} != {list(old)}"
        for k in old:
            _assert_same(new[k], old[k], f"{where}.{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), f"{where}: {new} != {old}"
        for i, (a, b) in enumerate(zip(new, old)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(old, float):
        assert type(new) is float and math.isclose(new, old, rel_tol=1e-12, abs_tol=1e-12), f"{where}: {new!r} != {old!r}"
    else:
        assert type(new) is type(old) and new == old, f"{where}: {new!r} != {old!r}"


# ---------------------------------------------------------------- tests
def test_summary_from_frames_equals_the_dict_loops_it_replaced(runs):
    expected = _reference_summarize(runs)
    # the cases the fixture is built for are really there
    modes = expected["modes"]
    assert (modes["kd"]["worst_domain"], modes["kd"]["worst_domain_seeds"]) == ("math", 2)
    assert (modes["ddk"]["worst_domain"], modes["ddk"]["worst_domain_seeds"]) == ("code", 1)
    assert modes["ddk-guarded"]["tokens_per_s"] is None and modes["ddk-equal-sampling"]["tokens_per_s"]["n"] == 1
    got = summarize(runs)
    _assert_same(got, expected)
    assert markdown(got) == markdown(expected)
    # one mode, one seed: spreads without a std
    one = {"kd": runs["kd"][:1]}
    _assert_same(summarize(one), _reference_summarize(one))


def test_summary_from_a_given_frame_is_the_same(runs):
    frame = runs_frame(runs)
    _assert_same(summarize(runs, frame=frame), _reference_summarize(runs))


def test_runs_frame_has_one_row_per_mode_seed_and_domain(runs):
    frame = runs_frame(runs)
    assert frame.schema == pl.Schema(RUNS_FRAME_SCHEMA)
    assert frame.height == len(runs) * SEEDS * len(DOMAINS)
    assert frame.select("mode", "seed", "domain").unique().height == frame.height
    assert frame["mode"].unique(maintain_order=True).to_list() == list(runs)
    teacher = runs["kd"][0].results["test"]["teacher_loss"]  # the first run's: every mode is measured against it
    for label, rs in runs.items():
        for r in rs:
            rows = frame.filter(pl.col("mode") == label, pl.col("seed") == r.seed)
            assert rows["domain"].to_list() == DOMAINS and set(rows["run_dir"]) == {str(r.dir)}
            after = r.results["test"]["student_after_loss"]
            assert rows["test_ce"].to_list() == [after[d] for d in DOMAINS]
            assert rows["teacher_test_ce"].to_list() == [teacher[d] for d in DOMAINS]
            assert rows["test_ppl"].to_list() == pytest.approx([math.exp(after[d]) for d in DOMAINS], rel=1e-12)
            assert rows["test_ppl_ratio"].to_list() == pytest.approx(
                [math.exp(after[d]) / math.exp(teacher[d]) for d in DOMAINS], rel=1e-12)
            assert rows["validation_ce"].to_list() == [r.results["student_after_loss"][d] for d in DOMAINS]
            assert set(rows["tokens"]) == {768}
            assert rows["train_tokens_per_s"].to_list() == [_reference_train_speed(r.dir)] * len(DOMAINS)


def test_compare_runs_parquet_is_written_atomically_and_reads_back(runs, tmp_path):
    frame = runs_frame(runs)
    path = tmp_path / "compare_runs.parquet"
    write_runs_frame(frame, path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("compare_runs")] == ["compare_runs.parquet"]  # no temp left
    back = pl.read_parquet(path)
    assert back.schema == frame.schema and back.equals(frame)
    # what a user would ask of it: mean test CE per mode over seeds, as compare.json has it
    s = summarize(runs, frame=frame)
    by_mode = back.group_by("mode", "seed").agg(pl.col("test_ce").mean()).group_by("mode").agg(pl.col("test_ce").mean())
    for label, ce in by_mode.iter_rows():
        assert ce == pytest.approx(s["modes"][label]["mean_ce"]["mean"], rel=1e-12)


def test_teachers_that_differ_are_refused_before_any_frame(runs, tmp_path):
    rng = np.random.default_rng(1)
    other = {d: [v + 0.1 for v in rows] for d, rows in runs["kd"][0].results["test"]["teacher_row_loss"].items()}
    runs["kd" + VS_CACHE] = [_run(tmp_path / "other", "kd" + VS_CACHE, s, rng, other, 0.5, None) for s in range(SEEDS)]
    for build in (runs_frame, summarize):
        with pytest.raises(ConfigError, match="cannot be paired"):
            build(runs)
