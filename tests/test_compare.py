"""`ddk compare`: every (mode, seed) from one cache, test-split statistics, reuse only of identical runs."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from ddk.stages.cli import main as cli
from ddk.stages.compare import Run, markdown, summarize
from ddk.stages.distill import read_metrics

MODES = ["kd", "ddk"]  # the reference and the method: enough for every check here (test_distill covers each mode)
SEEDS = 2
STEPS = 4


@pytest.fixture(scope="module")
def compared(tiny_cache, tmp_path_factory):
    """One compare run over private copies of the cache and student (the refusal test alters them)."""
    cfg, _ = tiny_cache
    root = tmp_path_factory.mktemp("compare")
    cache, student = root / "cache", root / "student"
    shutil.copytree(cfg.cache_path(), cache)
    shutil.copytree(cfg.student_path(), student)
    out = root / "cmp"
    args = ["compare", "--config", cfg.source_path, "--out", str(out), "--modes", ",".join(MODES), "--seeds", str(SEEDS),
            "--set", f"distill.steps={STEPS}", "--set", "distill.batch_rows=4", "--set", "distill.interval=2",
            "--set", f"distill.cache_dir={json.dumps(str(cache))}", "--set", f"distill.student={json.dumps(str(student))}"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return args, out, cache, student


def test_every_mode_and_seed_trains_the_same_budget_and_is_reported_on_test(compared):
    _, out, _, _ = compared
    s = json.loads((out / "compare.json").read_text())
    assert list(s["modes"]) == MODES and s["seeds"] == list(range(SEEDS)) and s["split"] == "test"
    consumed = set()
    for label, m in s["modes"].items():
        assert [p["seed"] for p in m["per_seed"]] == list(range(SEEDS))
        for p in m["per_seed"]:
            run_dir = out / label / f"seed-{p['seed']}"
            results = json.loads((run_dir / "results.json").read_text())
            assert results["config"]["seed"] == p["seed"] and results["mode"] == label
            # The budget as trained: every step once, the tokens its train records say it consumed.
            train = read_metrics(run_dir, "train")
            assert [r["step"] for r in train] == list(range(1, STEPS + 1))
            assert p["tokens"] == sum(r["tokens"] for r in train)
            consumed.add(p["tokens"])
            # The numbers are the run's TEST losses, not its validation ones.
            after, teacher = results["test"]["student_after_loss"], results["test"]["teacher_loss"]
            assert p["mean_ce"] == pytest.approx(statistics.fmean(after.values()))
            assert p["ratio"] == pytest.approx({d: math.exp(after[d] - teacher[d]) for d in s["domains"]})
            assert p["worst_ratio"] == max(p["ratio"].values()) and p["ratio"][p["worst_domain"]] == p["worst_ratio"]
        # Seeds change the data order, hence the result; the spread is over those seeds.
        per_seed_ce = [p["mean_ce"] for p in m["per_seed"]]
        assert len(set(per_seed_ce)) == SEEDS
        assert m["mean_ce"]["mean"] == pytest.approx(statistics.fmean(per_seed_ce))
        assert m["mean_ce"]["std"] == pytest.approx(statistics.stdev(per_seed_ce))
    assert len(consumed) == 1  # the same budget for every mode and seed

    assert set(s["vs_reference"]) == {"ddk"}
    for label, d in s["vs_reference"].items():
        ce = d["mean_ce"]
        assert d["n_seeds"] == SEEDS and ce["low"] <= ce["diff"] <= ce["high"]
        # The bootstrap's point estimate (from the per-row losses) is the table's difference.
        assert ce["diff"] == pytest.approx(s["modes"][label]["mean_ce"]["mean"] - s["modes"]["kd"]["mean_ce"]["mean"], abs=1e-6)
    assert s["order_by_mean_ce"] == sorted(MODES, key=lambda m: s["modes"][m]["mean_ce"]["mean"])

    md = (out / "compare.md").read_text()
    for text in ("| teacher |", "| student before |", "±", "Paired difference to kd", "Order by mean test CE"):
        assert text in md
    best = s["order_by_mean_ce"][0]
    for label in MODES:  # one row per mode, the best in bold; ddk once more in the difference table
        assert md.count(f"| {label} |") + md.count(f"| **{label}** |") == (1 if label == "kd" else 2)
        assert (f"| **{label}** |" in md) == (label == best)
    assert (out / "compare_ppl.png").exists() and (out / "compare_ratio.png").exists()

    # compare_runs.parquet: the rows the tables are aggregated from, one per (mode, seed, domain)
    frame = pl.read_parquet(out / "compare_runs.parquet")
    assert frame.height == len(MODES) * SEEDS * len(s["domains"]) and not list(out.glob("compare_runs.parquet.*"))
    for label, m in s["modes"].items():
        for p in m["per_seed"]:
            rows = frame.filter(pl.col("mode") == label, pl.col("seed") == p["seed"])
            assert rows["domain"].to_list() == s["domains"] and set(rows["run_dir"]) == {p["run_dir"]}
            assert rows["test_ppl"].to_list() == [p["ppl"][d] for d in s["domains"]]
            assert rows["test_ppl_ratio"].to_list() == [p["ratio"][d] for d in s["domains"]]
            assert set(rows["tokens"]) == {p["tokens"]} and set(rows["train_tokens_per_s"]) == {p["tokens_per_s"]}


def test_kd_fitted_fits_the_mix_to_the_runs_then_trains_kd_with_it(compared, tmp_path):
    """`--modes ...,kd-fitted` in one command: the other modes' runs (reused), the fit, then kd with the fitted mix.
    (Before the refusal test below, which alters the fixture's student.)"""
    args, out, _, _ = compared
    mine = tmp_path / "cmp"  # a copy: the fixture's directory is shared with the other tests
    shutil.copytree(out, mine, ignore=shutil.ignore_patterns("ckpt-*", "latest"))
    args = [a if a != str(out) else str(mine) for a in args]
    args[args.index("--modes") + 1] = ",".join(MODES + ["kd-fitted", "kd-fitted-worst"])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert r.output.count("reusing its results") == len(MODES) * SEEDS and r.output.count("fitting it to the finished runs") == 2
    for mode, name in (("kd-fitted", "fitted_mix.json"), ("kd-fitted-worst", "fitted_mix_worst.json")):
        fitted = json.loads((mine / name).read_text())
        assert len(fitted["runs"]) == len(MODES) * SEEDS  # neither fit saw the other's runs
        for seed in range(SEEDS):
            res = json.loads((mine / mode / f"seed-{seed}" / "results.json").read_text())
            total = sum(fitted["weights"].values())
            assert res["final_weights"] == pytest.approx({d: w / total for d, w in fitted["weights"].items()})
    assert fitted["worst_bound"]["from"].startswith("kd's worst")
    s = json.loads((mine / "compare.json").read_text())
    assert {"kd-fitted", "kd-fitted-worst"} <= set(s["modes"]) and "kd-fitted-worst − ddk" in s["variants_vs_paper"]


def test_reruns_reuse_or_resume_each_run_and_refuse_what_changed(compared):
    args, out, cache, student = compared
    runner = CliRunner()
    again = runner.invoke(cli, args)
    assert again.exit_code == 0 and again.output.count("reusing its results") == len(MODES) * SEEDS
    assert f"{out / 'compare.json'}, {out / 'compare_runs.parquet'}" in again.output  # the "written:" line names it

    shutil.rmtree(out / "kd" / "seed-1")  # one (mode, seed) is missing: only it trains again
    (out / "ddk" / "seed-0" / "results.json").unlink()  # one stopped after its last checkpoint: resumed
    partial = runner.invoke(cli, args)
    assert partial.exit_code == 0, partial.output
    assert partial.output.count("reusing its results") == len(MODES) * SEEDS - 2
    assert "resuming from" in partial.output and (out / "kd" / "seed-1" / "results.json").exists()

    changed = runner.invoke(cli, [*args, "--set", "distill.lr=0.002"])
    assert changed.exit_code == 1 and "distill.lr = 0.001 there, 0.002 now" in changed.output
    assert "delete" in changed.output and "--out" in changed.output

    manifest = cache / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original + b"\n")  # a rebuilt cache: another manifest
    rebuilt = runner.invoke(cli, args)
    manifest.write_bytes(original)
    assert rebuilt.exit_code == 1 and "another cache" in rebuilt.output and "cache_manifest_sha256" in rebuilt.output

    _retrain(student)
    retrained = runner.invoke(cli, args)
    assert retrained.exit_code == 1 and "another initial student" in retrained.output and "student_sha256" in retrained.output


def _retrain(student: Path) -> None:
    """The same student path with other weights, as re-running `ddk tiny-models` would leave it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(student)


def test_runs_from_before_the_test_split_and_bad_options_are_refused(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    runner = CliRunner()

    def invoke(out: Path, *extra: str):
        return runner.invoke(cli, ["compare", "--config", cfg.source_path, "--out", str(out), "--modes", "cpt", "--seeds", "1", *extra])

    old = tmp_path / "old" / "cpt" / "seed-0"
    old.mkdir(parents=True)
    (old / "results.json").write_text(json.dumps({"mode": "cpt", "config": {}, "teacher_loss": {}, "student_after_loss": {}}))
    r = invoke(tmp_path / "old")
    assert r.exit_code == 1 and "predates the held-out test split" in r.output and f"delete {old}" in r.output

    single = tmp_path / "single" / "cpt"
    single.mkdir(parents=True)
    (single / "results.json").write_text("{}")
    r = invoke(tmp_path / "single")
    assert r.exit_code == 1 and "single-seed run of an older ddk" in r.output

    r = invoke(tmp_path / "x", "--modes", "cpt,online")
    assert r.exit_code == 1 and "unknown modes ['online']" in r.output
    assert invoke(tmp_path / "x", "--seeds", "0").exit_code == 2  # click refuses it before anything runs


def _fake_run(tmp_path: Path, label: str, seed: int, after_rows: dict, teacher_rows: dict) -> Run:
    """A finished run as summarize() reads it, with chosen per-row test losses."""
    mean = {d: statistics.fmean(v) for d, v in after_rows.items()}
    teacher = {d: statistics.fmean(v) for d, v in teacher_rows.items()}
    results = {"domains": list(teacher_rows), "steps": 10, "tokens": 640, "interval": 2, "student_after_loss": mean,
               "test": {"teacher_loss": teacher, "student_before_loss": {d: v + 1.0 for d, v in teacher.items()},
                        "student_after_loss": mean, "teacher_row_loss": teacher_rows, "student_after_row_loss": after_rows}}
    return Run(label, seed, tmp_path / label / f"seed-{seed}", results)


def test_summary_words_name_significant_differences_and_one_seed(tmp_path):
    teacher = {"a": [1.0, 1.2, 0.8, 1.1], "b": [2.0, 2.2, 1.9, 2.1]}
    kd = {d: [v + 0.5 for v in rows] for d, rows in teacher.items()}
    ddk = {d: [v - 0.2 for v in rows] for d, rows in kd.items()}  # lower on every row: significant
    cpt = {"a": [v + (0.05 if i % 2 else -0.05) for i, v in enumerate(kd["a"])], "b": kd["b"]}  # noise around kd
    runs = {label: [_fake_run(tmp_path, label, 0, rows, teacher)] for label, rows in (("cpt", cpt), ("kd", kd), ("ddk", ddk))}
    s = summarize(runs)
    assert s["vs_reference"]["ddk"]["mean_ce"]["significant"] and not s["vs_reference"]["cpt"]["mean_ce"]["significant"]
    assert s["modes"]["ddk"]["mean_ce"]["std"] is None and s["order_by_mean_ce"][0] == "ddk"
    md = markdown(s)
    assert "against kd (95 % paired bootstrap interval): significantly lower: ddk; no significant difference: cpt." in md
    assert "n = 1" in md and "±" not in md and "| **ddk** |" in md

    without_kd = markdown(summarize({"ddk": runs["ddk"]}))
    assert "kd is not among the compared modes" in without_kd


def test_variants_are_paired_against_the_papers_ddk_and_es(tmp_path):
    teacher = {"a": [1.0, 1.2, 0.8, 1.1], "b": [2.0, 2.2, 1.9, 2.1]}
    shifted = lambda by: {d: [v + by for v in rows] for d, rows in teacher.items()}  # noqa: E731
    modes = {"kd": 0.5, "ddk": 0.4, "ddk-equal-sampling": 0.3, "ddk-guarded": 0.35}
    runs = {label: [_fake_run(tmp_path, label, 0, shifted(by), teacher)] for label, by in modes.items()}
    s = summarize(runs)
    assert list(s["variants_vs_paper"]) == ["ddk − ddk-equal-sampling", "ddk-guarded − ddk", "ddk-guarded − ddk-equal-sampling"]
    assert s["variants_vs_paper"]["ddk-guarded − ddk"]["mean_ce"]["diff"] == pytest.approx(-0.05)
    assert s["variants_vs_paper"]["ddk − ddk-equal-sampling"]["mean_ce"]["diff"] == pytest.approx(0.1)
    md = markdown(s)
    assert "The paper's DDK against ES, and the variants beyond the paper against both" in md
    assert "| ddk-guarded − ddk | -0.0500 |" in md
    assert "variants_vs_paper" in summarize({k: runs[k] for k in ("kd", "ddk")}) and not summarize({k: runs[k] for k in ("kd", "ddk")})["variants_vs_paper"]


def test_a_second_cache_is_paired_mode_by_mode(tmp_path):
    teacher = {"a": [1.0, 1.2, 0.8, 1.1], "b": [2.0, 2.2, 1.9, 2.1]}
    shifted = lambda by: {d: [v + by for v in rows] for d, rows in teacher.items()}  # noqa: E731
    modes = {"kd": 0.5, "ddk": 0.4, "kd@vs-cache": 0.52, "ddk@vs-cache": 0.4}
    runs = {label: [_fake_run(tmp_path, label, 0, shifted(by), teacher)] for label, by in modes.items()}
    s = summarize(runs)
    assert list(s["vs_cache"]) == ["kd@vs-cache − kd", "ddk@vs-cache − ddk"]
    assert s["vs_cache"]["kd@vs-cache − kd"]["mean_ce"]["diff"] == pytest.approx(0.02)
    assert s["vs_cache"]["ddk@vs-cache − ddk"]["mean_ce"]["diff"] == pytest.approx(0.0)
    assert "| kd@vs-cache − kd | +0.0200 |" in markdown(s)
    other = {"a": [v + 0.1 for v in teacher["a"]], "b": teacher["b"]}  # another teacher or other test rows
    runs["kd@vs-cache"] = [_fake_run(tmp_path, "kd@vs-cache", 0, shifted(0.5), other)]
    with pytest.raises(Exception, match="cannot be paired"):
        summarize(runs)

