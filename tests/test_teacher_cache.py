"""Stage one end to end on the tiny teacher (hf backend): shards, manifest, reader, resume, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddk.pipeline.cache.manifest import CacheError, load_manifest
from ddk.pipeline.cache.reader import TopKCacheReader, verify_cache
from ddk.pipeline.config import ConfigError, load_config
from ddk.pipeline.teachers.hf import HFTeacher
from ddk.stages.cli import main as cli
from ddk.stages.teacher_cache import teacher_cache

QUIET = lambda *_: None  # noqa: E731


def _files(cache_dir):
    return {p.relative_to(cache_dir).as_posix(): p.read_bytes() for p in sorted(cache_dir.rglob("*.parquet"))}


def test_tiny_teacher_beats_student_on_every_domain(tiny_models):
    _, report = tiny_models
    for domain, t in report["val_loss"]["teacher"].items():
        assert t < report["val_loss"]["student"][domain], domain


def test_manifest_records_what_design_asks(tiny_cache):
    cfg, m = tiny_cache
    assert m["k"] == 8 and m["seq_len"] == 32 and m["tokenizer"]["vocab_size"] >= 300
    assert len(m["teacher"]["weights_sha256"]) == 64 and m["teacher"]["dtype"] == "float32"
    assert set(m["domains"]) == {"code", "reference", "docstrings", "unicode"}
    assert 0 < m["fidelity"]["max_abs_logprob_error"] <= 2**-11 + 1e-9
    # KL(exact top-k + tail || stored), measured by the writer: ~ step^2 / 24 per position
    assert 0 < m["fidelity"]["mean_kl_distortion"] < (2**-10) ** 2
    for d in m["domains"].values():
        assert d["val_rows"] == 4 and d["test_rows"] == 4 and d["train_rows"] > 0
        assert {s["split"] for s in d["shards"]} == {"train", "val", "test"}
        assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in d["shards"])
        assert math.isclose(d["teacher_val_ppl"], math.exp(d["teacher_val_loss"]))
        assert math.isclose(d["teacher_test_ppl"], math.exp(d["teacher_test_loss"]))
        assert d["tokens"] == (d["train_rows"] + d["val_rows"] + d["test_rows"]) * m["seq_len"]
    # throughput over the whole loop, and without the first shard's one-time costs
    shards = sum(len(d["shards"]) for d in m["domains"].values())
    assert shards > 1 and m["capture"]["tokens_per_s"] > 0 and m["capture"]["steady_tokens_per_s"] > 0


def test_cached_teacher_loss_equals_an_independent_transformers_forward(tiny_cache):
    """The teacher's per-domain loss (val and test) recomputed with a plain transformers
    forward on the packed rows, nothing of ddk's teacher backends or reader involved."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ddk.pipeline.corpus import load_domains
    from ddk.pipeline.packing import pack_domains

    cfg, m = tiny_cache
    tok = AutoTokenizer.from_pretrained(cfg.teacher_path())
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher_path(), dtype=torch.float32).eval()
    for packed in pack_domains(load_domains(cfg.corpus), tok, cfg.corpus):
        for split in ("val", "test"):
            ids = torch.as_tensor(packed.rows(split), dtype=torch.long)
            with torch.no_grad():
                logits = model(input_ids=ids[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)).item()
            assert math.isclose(loss, m["domains"][packed.name][f"teacher_{split}_loss"], rel_tol=1e-5), (packed.name, split)


def test_reader_returns_what_the_teacher_computed(tiny_cache):
    """Decode rows from the shards and compare with a fresh teacher forward pass."""
    cfg, m = tiny_cache
    reader = TopKCacheReader(cfg.cache.out_dir)
    keys = [("unicode", "val", 1), ("code", "train", 20), ("reference", "train", 3)]
    batch = reader.batch(keys)
    teacher = HFTeacher(str(cfg.teacher_path()), k=8)
    ref = teacher.topk(batch.input_ids.numpy())
    order = np.argsort(ref.ids, axis=-1)  # the cache stores each position's support sorted by id
    np.testing.assert_array_equal(batch.topk_ids.numpy(), np.take_along_axis(ref.ids, order, -1))
    np.testing.assert_allclose(batch.topk_logprobs.numpy(), np.take_along_axis(ref.logprobs, order, -1), atol=2**-11 + 1e-6)
    np.testing.assert_allclose(batch.target_logprob.numpy(), ref.target_logprob, atol=1e-5)
    np.testing.assert_allclose(batch.tail_logmass.numpy(), ref.tail_logmass, atol=1e-5)
    # The tail is exact: kept mass + tail mass = 1 at every position, including the last.
    total = torch.logsumexp(torch.cat([batch.topk_logprobs.double(), batch.tail_logmass.double()[..., None]], -1), -1)
    assert torch.allclose(total, torch.zeros_like(total), atol=2e-3)
    assert batch.topk_ids.shape == (3, 32, 8) and batch.input_ids.shape == (3, 33)
    # Teacher val loss in the manifest equals the mean -target logprob of the val rows.
    val = reader.batch([("code", "val", i) for i in range(4)])
    assert math.isclose(-val.target_logprob.double().mean().item(), m["domains"]["code"]["teacher_val_loss"], rel_tol=1e-6)


def test_rerun_is_noop_and_resume_rewrites_only_missing(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.out_dir, cache)
    before = _files(cache)
    cfg2 = load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(cache))}"])
    logs = []
    teacher_cache(cfg2, log=logs.append)
    assert "nothing to do" in logs[-1] and _files(cache) == before
    # Simulate a run killed mid-way: no manifest, two shards gone, a stray temp file.
    (cache / "manifest.json").unlink()
    victims = ["reference/train-00001.parquet", "unicode/val-00000.parquet"]
    for v in victims:
        (cache / v).unlink()
    (cache / "code" / "train-00002.parquet.tmp").write_bytes(b"half a shard")
    logs.clear()
    teacher_cache(cfg2, log=logs.append)
    assert any("resuming, 2 of" in line for line in logs)
    assert _files(cache) == before  # byte-identical to the uninterrupted run
    assert verify_cache(cache) == []


def test_existing_cache_with_other_config_is_refused(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.out_dir, cache)
    before = _files(cache)
    out = f"cache.out_dir={json.dumps(str(cache))}"
    with pytest.raises(CacheError, match=r"different config \(k: 8 vs 4\)"):
        teacher_cache(load_config(cfg.source_path, [out, "cache.k=4"]), log=QUIET)
    # (the tiny models' identity includes seq_len too: point at the teacher itself)
    teacher = f"teacher.path={json.dumps(str(cfg.teacher_path()))}"
    with pytest.raises(CacheError, match="seq_len: 32 vs 24"):
        teacher_cache(load_config(cfg.source_path, [out, teacher, "corpus.seq_len=24"]), log=QUIET)
    assert _files(cache) == before  # nothing written, nothing lost


def test_teacher_with_other_tokenizer_is_refused(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.out_dir, cache)
    other = tmp_path / "other-models"
    overrides = [f"cache.out_dir={json.dumps(str(cache))}", f"models.out_dir={json.dumps(str(other))}", "models.vocab_size=300"]
    with pytest.raises(CacheError, match="started with another tokenizer"):
        teacher_cache(load_config(cfg.source_path, overrides), log=QUIET)


def test_k_larger_than_vocab_is_refused(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    with pytest.raises(ConfigError, match=r"cache.k = 100000 exceeds the teacher's vocabulary"):
        teacher_cache(load_config(cfg.source_path, ["cache.k=100000", f"cache.out_dir={json.dumps(str(tmp_path / 'c'))}"]), log=QUIET)
    assert not (tmp_path / "c").exists()


def test_non_cache_directory_is_not_touched(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(CacheError, match="not a ddk cache"):
        teacher_cache(load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(tmp_path))}"]), log=QUIET)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_verify_and_reader_name_a_damaged_shard(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.out_dir, cache)
    victim = cache / "docstrings" / "train-00000.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x40
    victim.write_bytes(bytes(data))
    truncated = cache / "code" / "val-00000.parquet"
    truncated.write_bytes(truncated.read_bytes()[:200])
    problems = verify_cache(cache)
    assert any("docstrings/train-00000.parquet: sha256 mismatch" in p for p in problems)
    assert any("code/val-00000.parquet" in p and "truncated" in p for p in problems)
    with pytest.raises(CacheError, match="code/val-00000.parquet: missing, truncated or corrupted"):
        TopKCacheReader(cache).batch([("code", "val", 0)])
    result = CliRunner().invoke(cli, ["cache", "verify", str(cache)])
    assert result.exit_code == 1 and "2 problem(s)" in result.output


def test_cli_inspect_verify_and_help(tiny_cache):
    cfg, _ = tiny_cache
    runner = CliRunner()
    out = runner.invoke(cli, ["cache", "inspect", cfg.cache.out_dir])
    assert out.exit_code == 0, out.output
    assert "bytes/token" in out.output and "max abs logprob error" in out.output and "unicode" in out.output
    assert runner.invoke(cli, ["cache", "verify", cfg.cache.out_dir]).exit_code == 0
    for cmd in (["--help"], ["teacher-cache", "--help"], ["tiny-models", "--help"], ["cache", "inspect", "--help"]):
        assert runner.invoke(cli, cmd).exit_code == 0
    missing = runner.invoke(cli, ["cache", "inspect", "/nonexistent/cache"])
    assert missing.exit_code == 1 and "manifest.json not found" in missing.output
    assert load_manifest(cfg.cache.out_dir)["bytes_per_token"] > 0


def test_two_workers_write_the_same_cache_and_redo_only_missing_shards(tiny_cache, tmp_path):
    """`make teacher-cache WORKERS=2`: disjoint shard subsets in two processes, merged by one manifest."""
    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    overrides = [f"cache.out_dir={json.dumps(str(cache))}", "cache.workers=2"]
    logs = []
    teacher_cache(load_config(cfg.source_path, overrides), log=logs.append)
    reference = _files(Path(cfg.cache.out_dir))
    assert _files(cache) == reference
    # One worker "crashed" after part of its subset: only its missing shards are redone.
    (cache / "manifest.json").unlink()
    for v in ["code/train-00001.parquet", "docstrings/train-00003.parquet", "unicode/train-00005.parquet"]:
        (cache / v).unlink()
    logs.clear()
    teacher_cache(load_config(cfg.source_path, overrides), log=logs.append)
    assert any("resuming, 3 of" in line and "2 worker(s)" in line for line in logs)
    assert _files(cache) == reference and verify_cache(cache) == []


def test_the_engine_runs_in_the_dtype_the_manifest_records(tiny_cache, monkeypatch):
    """teacher.dtype reaches the engine (the vLLM path once lost it inside a comment, so a
    bf16 teacher ran in fp32 under a manifest saying bfloat16), and an engine that reports
    another dtype than the plan is refused before any shard is written."""
    import ddk.pipeline.teachers.vllm as vllm_mod
    from ddk.pipeline.cache.manifest import CachePlan
    from ddk.stages.capture_worker import make_backend

    cfg, m = tiny_cache
    assert m["capture"]["engine_dtype"] == m["teacher"]["dtype"] == "float32"  # the hf engine, as it reported itself
    plan = CachePlan.load(cfg.cache_path())
    capture = {"backend": "vllm", "seed": 0, "teacher": {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.5,
                                                          "cpu_kvcache_gib": 1, "enforce_eager": True}}

    class FakeEngine:
        """Stands in for VLLMTeacher: reports the dtype it was asked for, or a fixed one."""

        name, forced = "vllm", None

        def __init__(self, path, k, max_len, dtype="float32", **kwargs):
            self.dtype = self.forced or dtype

        def close(self):
            pass

    monkeypatch.setattr(vllm_mod, "VLLMTeacher", FakeEngine)
    plan.teacher = {**plan.teacher, "dtype": "bfloat16"}
    assert make_backend(plan, capture).dtype == "bfloat16"
    FakeEngine.forced = "float32"
    with pytest.raises(CacheError, match="runs the teacher in float32, but the cache's plan records teacher.dtype = bfloat16"):
        make_backend(plan, capture)


def test_a_full_disk_during_capture_stops_with_what_to_free_and_keeps_the_shards(tiny_cache, tmp_path, monkeypatch):
    import errno

    from ddk.pipeline.cache.writer import TopKShardWriter

    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    overrides = [f"cache.out_dir={json.dumps(str(cache))}"]
    real_write, calls = TopKShardWriter.write, {"n": 0}

    def write(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *a, **k)

    monkeypatch.setattr(TopKShardWriter, "write", write)
    with pytest.raises(CacheError, match=r"\.parquet: no space left on the device .* free about [\d.]+ GiB there .* re-run "
                                         r"`ddk teacher-cache`: the shards already written are kept"):
        teacher_cache(load_config(cfg.source_path, overrides), log=QUIET)
    assert len(_files(cache)) == 3
    monkeypatch.setattr(TopKShardWriter, "write", real_write)
    logs = []
    teacher_cache(load_config(cfg.source_path, overrides), log=logs.append)
    assert any("resuming" in line for line in logs)
    assert _files(cache) == _files(Path(cfg.cache.out_dir))


def test_a_sqrt_prob_cache_end_to_end(tiny_cache, tmp_path):
    """cache.logprob_quantizer = "sqrt-prob": written, indexed with its distortion, read back
    close to the teacher's own log-probs where they matter (the likely tokens)."""
    cfg, ref = tiny_cache
    cache = tmp_path / "cache"
    m = teacher_cache(load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(cache))}", "cache.logprob_quantizer=sqrt-prob"]),
                      log=QUIET)
    assert m["codec"]["logprob_quantizer"] == "sqrt-prob" and m["codec"]["sqrt_prob_levels"] == 255
    assert ref["fidelity"]["mean_kl_distortion"] < m["fidelity"]["mean_kl_distortion"] < 8 / (6 * 255**2) * 1.5
    assert m["bytes"] < ref["bytes"]
    batch = TopKCacheReader(cache).batch([("code", "val", 0)])
    exact = TopKCacheReader(cfg.cache.out_dir).batch([("code", "val", 0)])
    np.testing.assert_array_equal(batch.topk_ids.numpy(), exact.topk_ids.numpy())
    u, u_ref = np.exp(batch.topk_logprobs.numpy() / 2), np.exp(exact.topk_logprobs.numpy() / 2)
    assert np.abs(u - u_ref).max() <= 0.5 / 255 + 2**-11  # half a level, plus the reference's own step
    out = CliRunner().invoke(cli, ["cache", "inspect", str(cache)])
    assert "codec logprob sqrt-prob, 255 levels" in out.output and "distortion mean KL" in out.output


def test_a_plan_from_before_the_quantizer_option_reads_as_fixed(tiny_cache, tmp_path):
    from ddk.pipeline.cache.manifest import CachePlan, check_compatible
    from ddk.pipeline.cache.reader import codec_from_manifest

    cfg, m = tiny_cache
    plan = json.loads((Path(cfg.cache.out_dir) / "plan.json").read_text())
    for key in ("logprob_quantizer", "sqrt_prob_levels"):
        plan["codec"].pop(key)
        m = {**m, "codec": {k: v for k, v in m["codec"].items() if k != key}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    old = CachePlan.load(tmp_path)
    check_compatible(old, CachePlan.load(Path(cfg.cache.out_dir)), tmp_path)  # a resume is not refused
    assert codec_from_manifest(m).logprob_quantizer == "fixed"


def test_a_cache_sampled_with_an_earlier_draw_procedure_is_read_but_not_resumed(tiny_cache, tmp_path):
    """A complete cache whose plan records another sampler (an earlier ddk's inverse CDF)
    stays usable: a re-run finds nothing to do. An incomplete one is not finished with
    this ddk's draws (two procedures in one cache): the capture worker refuses, naming both."""
    from ddk.pipeline.teachers.hf import SAMPLER

    cfg, _ = tiny_cache
    cache = tmp_path / "cache"
    sampled = load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(cache))}", "cache.support=sampled",
                                            "teacher.backend=hf"])
    teacher_cache(sampled, log=QUIET)
    plan = json.loads((cache / "plan.json").read_text())
    assert plan["codec"]["sampler"] == SAMPLER
    plan["codec"]["sampler"] = "inverse-cdf"  # what the ddk before the blocked sampler recorded
    (cache / "plan.json").write_text(json.dumps(plan))
    before = _files(cache)
    logs = []
    teacher_cache(sampled, log=logs.append)
    assert "nothing to do" in logs[-1] and _files(cache) == before
    (cache / "manifest.json").unlink()
    next(iter(sorted(cache.rglob("*.parquet")))).unlink()
    with pytest.raises(CacheError, match=f"'inverse-cdf'.*'{SAMPLER}'"):
        teacher_cache(sampled, log=QUIET)
