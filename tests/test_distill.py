"""Stage two on the tiny cache: modes, the DDK scheduler in the loop, resume, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ddk.stages.distill as distill_mod
from ddk.pipeline.cache.manifest import CacheError
from ddk.pipeline.config import ConfigError, load_config
from ddk.pipeline.scheduler import discrepancy_factor, smooth_update
from ddk.stages.cli import main as cli
from ddk.stages.distill import TrainingError, distill, read_metrics

QUIET = lambda *_: None  # noqa: E731


def _cfg(tiny_cache, out, *extra):
    cfg, _ = tiny_cache
    base = [f"distill.out_dir={json.dumps(str(out))}", "distill.steps=6", "distill.batch_rows=4", "distill.interval=2",
            "distill.checkpoint_every=3", "distill.warmup_steps=2", "distill.lr=3e-3"]
    return load_config(cfg.source_path, base + list(extra))


def _weights(evals, domains):
    return [np.array([e["weights"][d] for d in domains]) for e in evals]


FIXED_MIX = {"code": 1.0, "reference": 1.0, "docstrings": 2.0, "unicode": 4.0}


@pytest.mark.parametrize("mode", ["cpt", "kd", "ddk", "ddk-no-smoothing", "ddk-equal-sampling", "kd-fixed"])
def test_modes_follow_their_weighting_rule(tiny_cache, tmp_path, mode):
    extra = {"cpt": ["distill.mode=cpt"], "kd": ["distill.mode=kd"], "ddk": [],
             "ddk-no-smoothing": ["distill.no_smoothing=true"], "ddk-equal-sampling": ["distill.equal_sampling=true"],
             "kd-fixed": ["distill.mode=kd", "distill.kd_domains=fixed",
                          "distill.domain_weights={" + ", ".join(f"{k} = {v}" for k, v in FIXED_MIX.items()) + "}"]}[mode]
    cfg = _cfg(tiny_cache, tmp_path / mode, *extra)
    res = distill(cfg, log=QUIET)
    assert res["mode"] == mode
    domains = res["domains"]
    evals = read_metrics(tmp_path / mode, "eval")
    train = read_metrics(tmp_path / mode, "train")
    assert [e["step"] for e in evals] == [0, 2, 4] and len(train) == 6
    assert all(np.isfinite(t["loss"]) for t in train)
    if mode == "cpt":
        assert all(t["kl"] == 0.0 for t in train)
    else:
        assert all(t["kl"] > 0.0 for t in train)
    w = _weights(evals, domains)
    ratios = [np.array([e["ratio"][d] for d in domains]) for e in evals]
    ppl_t = np.array([np.exp(evals[0]["teacher_loss"][d]) for d in domains])
    if mode in ("cpt", "kd"):
        rows = np.array([tiny_cache[1]["domains"][d]["train_rows"] for d in domains], dtype=float)
        for x in w:
            np.testing.assert_allclose(x, rows / rows.sum())
    elif mode == "ddk-equal-sampling":
        for x in w:
            np.testing.assert_allclose(x, np.full(len(domains), 0.25))
    elif mode == "kd-fixed":  # the given mix, normalized
        fixed = np.array([FIXED_MIX[d] for d in domains]) / sum(FIXED_MIX.values())
        for x in w:
            np.testing.assert_allclose(x, fixed)
    elif mode == "ddk-no-smoothing":
        for x, r in zip(w, ratios):
            np.testing.assert_allclose(x, discrepancy_factor(r * ppl_t, ppl_t), rtol=1e-9)
    else:  # ddk: r_0 from Eq. 1, then Eq. 2 with alpha = 0.5 every K steps
        np.testing.assert_allclose(w[0], discrepancy_factor(ratios[0] * ppl_t, ppl_t), rtol=1e-9)
        for t in (1, 2):
            np.testing.assert_allclose(w[t], smooth_update(w[t - 1], ratios[t] * ppl_t, ppl_t, 0.5), rtol=1e-9)
    assert (tmp_path / mode / "domain_ppl.png").exists() and (tmp_path / mode / "domain_weights.png").exists()


def test_ddk_favours_the_domains_where_the_student_lags(tiny_cache, tmp_path):
    res = distill(_cfg(tiny_cache, tmp_path / "d"), log=QUIET)
    ev = read_metrics(tmp_path / "d", "eval")[0]
    worst = max(ev["ratio"], key=ev["ratio"].get)
    best = min(ev["ratio"], key=ev["ratio"].get)
    assert ev["weights"][worst] > ev["weights"][best]
    assert res["final_weights"][worst] >= 0.5 / 4  # the (1 - alpha)/N floor holds for all


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_cache, tmp_path, monkeypatch):
    full = distill(_cfg(tiny_cache, tmp_path / "a", "distill.steps=8", "distill.mode=kd"), log=QUIET)
    real_loss, calls = distill_mod.Trainer.micro_step, {"n": 0}

    def killed_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # a kill between checkpoints (last one: step 3)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distill_mod.Trainer, "micro_step", killed_at_step_5)
    cfg_b = _cfg(tiny_cache, tmp_path / "b", "distill.steps=8", "distill.mode=kd")
    with pytest.raises(KeyboardInterrupt):
        distill(cfg_b, log=QUIET)
    monkeypatch.setattr(distill_mod.Trainer, "micro_step", real_loss)
    with pytest.raises(ConfigError, match="pass --resume"):
        distill(cfg_b, log=QUIET)
    resumed = distill(cfg_b, resume=True, log=QUIET)
    a, b = read_metrics(tmp_path / "a", "train"), read_metrics(tmp_path / "b", "train")
    assert [r["step"] for r in b] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    assert resumed["student_after_loss"] == pytest.approx(full["student_after_loss"], rel=1e-6)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tiny_cache, tmp_path, monkeypatch):
    real_loss, calls = distill_mod.Trainer.micro_step, {"n": 0}

    def nan_at_step_5(*args, **kwargs):
        calls["n"] += 1
        parts = real_loss(*args, **kwargs)
        if calls["n"] == 5:
            parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(distill_mod.Trainer, "micro_step", nan_at_step_5)
    with pytest.raises(TrainingError, match=r"at step 4 .*last good checkpoint: .*ckpt-0000003"):
        distill(_cfg(tiny_cache, tmp_path / "n", "distill.mode=kd"), log=QUIET)
    assert (tmp_path / "n" / "ckpt-0000003" / "model" / "config.json").exists()


def test_student_with_another_tokenizer_or_smaller_vocab_is_refused(tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from ddk.pipeline.builtin_corpus import builtin_domains
    from ddk.pipeline.tiny_models import train_tokenizer

    cfg, _ = tiny_cache
    other = tmp_path / "other"
    shutil.copytree(cfg.student_path(), other)
    train_tokenizer(builtin_domains(5_000)[:1], 300, 5_000).save_pretrained(other)
    with pytest.raises(CacheError, match="uses another tokenizer"):
        distill(_cfg(tiny_cache, tmp_path / "o", f"distill.student={json.dumps(str(other))}"), log=QUIET)
    small = tmp_path / "small"
    model = AutoModelForCausalLM.from_pretrained(cfg.student_path())
    model.resize_token_embeddings(200)
    model.save_pretrained(small)
    for f in cfg.student_path().glob("tokenizer*"):
        shutil.copy(f, small)
    with pytest.raises(CacheError, match="vocab_size 200"):
        distill(_cfg(tiny_cache, tmp_path / "s", f"distill.student={json.dumps(str(small))}"), log=QUIET)


def test_cli_errors_are_one_line(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    runner = CliRunner()
    r = runner.invoke(cli, ["distill", "--config", cfg.source_path, "--set", "distill.mode=online"])
    assert r.exit_code != 0 and "unknown mode 'online'" in r.output
    r = runner.invoke(cli, ["distill", "--config", cfg.source_path, "--set", f"distill.cache_dir={json.dumps(str(tmp_path / 'none'))}"])
    assert r.exit_code == 1 and "manifest.json not found" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["distill", "--config", cfg.source_path, "--mode", "cpt", "--no-smoothing"])
    assert r.exit_code == 1 and "ablations of mode 'ddk'" in r.output


def test_cli_distill_then_eval(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    out = json.dumps(str(tmp_path / "run"))
    runner = CliRunner()
    r = runner.invoke(cli, ["distill", "--config", cfg.source_path, "--set", f"distill.out_dir={out}", "--set", "distill.steps=4",
                            "--set", "distill.batch_rows=4", "--set", "distill.interval=2"])
    assert r.exit_code == 0, r.output
    assert "student after" in r.output and "unicode" in r.output
    r = runner.invoke(cli, ["eval", "--config", cfg.source_path, "--set", f"distill.out_dir={out}"])
    assert r.exit_code == 0, r.output
    assert "ckpt-0000004" in r.output and "ppl ratio" in r.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["student_after_loss"]) == {"code", "reference", "docstrings", "unicode"}
    torch.manual_seed(0)


def test_resume_refuses_another_run_and_names_what_differs(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    out = tmp_path / "r"
    short = ("distill.steps=3", "distill.checkpoint_every=3")
    distill(_cfg(tiny_cache, out, *short), log=QUIET)
    for override, field in [("distill.gamma=0.5", "distill.gamma"), ("distill.seed=1", "distill.seed"),
                            ("distill.steps=6", "distill.steps"), ("distill.mode=kd", "distill.mode"),
                            ("distill.interval=3", "distill.interval"), ("distill.min_lr=1e-5", "distill.min_lr"),
                            ("distill.temperature=2.0", "distill.temperature"), ("distill.batch_rows=2", "distill.batch_rows")]:
        with pytest.raises(ConfigError, match=rf"--resume: .*ckpt-0000003 was made with {field} = "):
            distill(_cfg(tiny_cache, out, *short, override), resume=True, log=QUIET)
    # How the run is computed may change: another loss implementation resumes the same run.
    again = distill(_cfg(tiny_cache, out, *short, "distill.loss_impl=unfused"), resume=True, log=QUIET)
    assert again["steps"] == 3
    # Another cache or another initial student under the same paths is refused too.
    other_cache = tmp_path / "cache-copy"
    shutil.copytree(cfg.cache_path(), other_cache)
    manifest = json.loads((other_cache / "manifest.json").read_text())
    manifest["created"] = "another day"
    (other_cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="another teacher cache"):
        distill(_cfg(tiny_cache, out, *short, f"distill.cache_dir={json.dumps(str(other_cache))}"), resume=True, log=QUIET)
    from transformers import AutoModelForCausalLM

    student = tmp_path / "student-copy"
    shutil.copytree(cfg.student_path(), student)
    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(student)
    with pytest.raises(ConfigError, match="another initial student"):
        distill(_cfg(tiny_cache, out, *short, f"distill.student={json.dumps(str(student))}"), resume=True, log=QUIET)


def test_grad_clip_zero_means_no_clipping_and_still_trains(tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, _ = tiny_cache
    distill(_cfg(tiny_cache, tmp_path / "c", "distill.steps=2", "distill.grad_clip=0", "distill.mode=kd"), log=QUIET)
    before = AutoModelForCausalLM.from_pretrained(cfg.student_path()).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "c" / "ckpt-0000002" / "model").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged with grad_clip = 0: {set(before) - set(changed)}"
    train = read_metrics(tmp_path / "c", "train")
    assert all(np.isfinite(t["grad_norm"]) and t["grad_norm"] > 0 for t in train)


def test_results_report_the_held_out_test_split(tiny_cache, tmp_path):
    cfg, m = tiny_cache
    res = distill(_cfg(tiny_cache, tmp_path / "t", "distill.steps=2"), log=QUIET)
    test = res["test"]
    for d in res["domains"]:
        assert len(test["student_after_row_loss"][d]) == len(test["teacher_row_loss"][d]) == m["domains"][d]["test_rows"]
        assert test["student_after_loss"][d] == pytest.approx(np.mean(test["student_after_row_loss"][d]))
        assert test["teacher_loss"][d] == pytest.approx(m["domains"][d]["teacher_test_loss"], rel=1e-6)
        assert test["student_after_loss"][d] != res["student_after_loss"][d]  # another split than validation
    assert len(res["identity"]["cache_manifest_sha256"]) == 64 and len(res["identity"]["student_sha256"]) == 64


@pytest.mark.parametrize("mode", ["kd", "cpt"])
def test_fused_and_unfused_loss_train_the_same_run(tiny_cache, tmp_path, mode):
    """distill.loss_impl changes how the loss is computed, not what: the same loss curve
    and the same final student (fp32 on CPU: summation order only)."""
    runs = {impl: distill(_cfg(tiny_cache, tmp_path / impl, "distill.steps=4", f"distill.mode={mode}",
                               f"distill.loss_impl={impl}"), log=QUIET) for impl in ("fused", "unfused")}
    fused, unfused = read_metrics(tmp_path / "fused", "train"), read_metrics(tmp_path / "unfused", "train")
    for key in ("loss", "ce", "kl", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in fused], [r[key] for r in unfused], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(list(runs["fused"]["test"]["student_after_loss"].values()),
                               list(runs["unfused"]["test"]["student_after_loss"].values()), rtol=1e-5)


def test_a_head_that_is_not_plain_linear_is_refused_for_the_fused_loss(tiny_cache):
    from transformers import AutoModelForCausalLM

    from ddk.pipeline.objective import Objective
    from ddk.pipeline.student import StudentLM

    cfg, _ = tiny_cache
    model = AutoModelForCausalLM.from_pretrained(cfg.student_path())
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: named in the refusal
    with pytest.raises(ConfigError, match="final_logit_softcapping.*distill.loss_impl = \"unfused\""):
        StudentLM(model, Objective(0.2))
    model.config.final_logit_softcapping = None
    real_forward = model.forward

    def scaled_logits(*args, **kwargs):  # an unnamed head transform: caught by the numeric check
        out = real_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled_logits
    with pytest.raises(ConfigError, match="logits differ from decoder"):
        StudentLM(model, Objective(0.2))
    StudentLM(model, Objective(0.2, loss_impl="unfused"))  # the unfused path uses the model's own logits


def test_evaluation_rows_agree_between_the_fused_and_the_unfused_student(tiny_cache):
    from transformers import AutoModelForCausalLM

    from ddk.pipeline.cache.reader import TopKCacheReader
    from ddk.pipeline.evaluate import mean_token_loss
    from ddk.pipeline.objective import Objective
    from ddk.pipeline.student import StudentLM

    cfg, _ = tiny_cache
    model = AutoModelForCausalLM.from_pretrained(cfg.student_path()).eval()
    rows = TopKCacheReader(cfg.cache_path()).token_rows([("code", "test", i) for i in range(4)])
    fused = StudentLM(model, Objective(0.0, loss_impl="fused"))(rows)
    unfused = StudentLM(model, Objective(0.0, loss_impl="unfused"))(rows)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    # and both equal the plain HF forward's mean CE over the same rows
    assert float(fused.mean()) == pytest.approx(mean_token_loss(model, rows.numpy()), rel=1e-5)
