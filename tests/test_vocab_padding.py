"""A teacher padded beyond the student within one family (Qwen2.5-7B: 152,064 rows, the
0.5B: 151,936, the tokenizer: 151,851 ids here), end to end on Qwen's tokenizer: the cache
stores ids below the tokenizer's length, folds the padded ids' mass into the tail (counted
in the manifest and by `ddk cache inspect`), and the smaller student distils from it."""

from __future__ import annotations

import json
import math

import numpy as np

import pytest
import torch
from click.testing import CliRunner

from ddk.pipeline.cache.reader import TopKCacheReader
from ddk.pipeline.config import load_config
from ddk.stages.cli import main as cli
from ddk.stages.distill import distill
from ddk.stages.teacher_cache import teacher_cache

QUIET = lambda *_: None  # noqa: E731
TEACHER_ROWS, STUDENT_ROWS, TOKENIZER_LEN = 152_064, 151_936, 151_851
PADDED_ID = 152_000  # a row no text maps to, given a frequent token's output row


@pytest.fixture(scope="module")
def padded_pair(tmp_path_factory):
    """(config overrides, root): tiny Qwen2 models on Qwen's tokenizer, the teacher's
    embedding and head resized to 152,064 rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("padded")
    base = [f"models.out_dir={json.dumps(str(root / 'models'))}", "corpus.max_train_rows=4", "corpus.val_rows=2",
            "corpus.test_rows=2", "corpus.seq_len=32", "corpus.builtin_chars_per_domain=60000",
            "models.teacher.pretrain_steps=6", "models.student.pretrain_steps=2", "models.teacher.hidden_size=64",
            "models.teacher.num_layers=1", "models.teacher.num_heads=1", "models.teacher.intermediate_size=128",
            "models.student.hidden_size=64", "models.student.num_heads=1", "models.student.intermediate_size=128",
            "models.tie_word_embeddings=false"]
    cfg = load_config("configs/qwen-vocab.toml", base)
    from ddk.pipeline.corpus import load_domains
    from ddk.pipeline.tiny_models import make_tiny_models

    make_tiny_models(cfg.models, load_domains(cfg.corpus), cfg.corpus)
    teacher = AutoModelForCausalLM.from_pretrained(root / "models" / "teacher")
    teacher.resize_token_embeddings(TEACHER_ROWS, mean_resizing=False)
    with torch.no_grad():
        frequent = 220  # " " in Qwen's vocabulary: its output row is large on this corpus
        teacher.lm_head.weight[PADDED_ID] = teacher.lm_head.weight[frequent] * 1.5
    teacher.save_pretrained(root / "teacher-padded")
    AutoTokenizer.from_pretrained(root / "models" / "teacher").save_pretrained(root / "teacher-padded")
    overrides = base + [f"teacher.path={json.dumps(str(root / 'teacher-padded'))}", "teacher.backend=hf",
                        f"cache.out_dir={json.dumps(str(root / 'cache'))}", "cache.rows_per_shard=8",
                        f"distill.out_dir={json.dumps(str(root / 'run'))}", "distill.steps=2", "distill.batch_rows=2",
                        "distill.interval=1"]
    return overrides, root


def test_a_padded_teacher_caches_tokenizer_ids_and_folds_the_rest(padded_pair):
    overrides, root = padded_pair
    cfg = load_config("configs/qwen-vocab.toml", overrides)
    m = teacher_cache(cfg, log=QUIET)
    assert m["teacher"]["vocab_rows"] == TEACHER_ROWS
    assert m["codec"]["vocab_size"] == m["tokenizer"]["vocab_size"] == TOKENIZER_LEN
    fold = m["vocab_fold"]
    assert fold["teacher_rows"] == TEACHER_ROWS and fold["id_bound"] == TOKENIZER_LEN
    assert fold["positions"] == m["tokens"]  # every predicted position of every shard
    assert fold["in_top_k"] > 0 and 0 < fold["mean_mass"] <= fold["max_mass"] < 1
    reader = TopKCacheReader(cfg.cache.out_dir)
    keys = [(d, "train", 0) for d in m["domains"]]
    batch = reader.batch(keys)
    assert int(batch.topk_ids.max()) < TOKENIZER_LEN
    # The stored distribution (kept + tail) still sums to one: the folded mass is in the tail.
    total = torch.logsumexp(torch.cat([batch.topk_logprobs.double(), batch.tail_logmass.double()[..., None]], -1), -1)
    assert torch.allclose(total, torch.zeros_like(total), atol=2e-3)
    out = CliRunner().invoke(cli, ["cache", "inspect", cfg.cache.out_dir])
    assert out.exit_code == 0, out.output
    assert f"teacher has {TEACHER_ROWS:,} rows for {TOKENIZER_LEN:,} tokenizer ids" in out.output


def test_the_smaller_student_of_the_family_distils_from_it(padded_pair):
    from transformers import AutoConfig

    overrides, root = padded_pair
    cfg = load_config("configs/qwen-vocab.toml", overrides + ["distill.mode=kd"])
    teacher_cache(cfg, log=QUIET)  # complete: nothing to do
    assert AutoConfig.from_pretrained(cfg.student_path()).vocab_size == STUDENT_ROWS
    result = distill(cfg, log=QUIET)
    assert result["steps"] == 2
    assert all(math.isfinite(v) for v in result["test"]["student_after_loss"].values())


def test_padded_ids_in_a_fixed_top_k_are_folded_into_the_tail():
    """vLLM's path: a top-k batch with ids past the bound keeps the rest most likely first,
    pads the freed slots (-1 / -inf) and moves their mass to the tail; the total is 1."""
    from ddk.pipeline.teachers.base import TopK
    from ddk.pipeline.teachers.support import fold_padded_ids

    lp = np.log(np.array([[[0.5, 0.2, 0.1, 0.05]], [[0.4, 0.3, 0.2, 0.05]]], np.float64))
    ids = np.array([[[7, 152_000, 3, 151_900]], [[1, 2, 3, 4]]], np.int32)
    tail = np.log(1 - np.exp(lp).sum(-1))
    topk = TopK(ids=ids, logprobs=lp.astype(np.float32), target_logprob=np.zeros((2, 1), np.float32),
                tail_logmass=tail.astype(np.float32))
    out, stats = fold_padded_ids(topk, bound=151_851, targets=np.array([[5], [6]]))
    assert out.ids[0, 0].tolist() == [7, 3, -1, -1] and out.ids[1, 0].tolist() == [1, 2, 3, 4]
    assert np.isneginf(out.logprobs[0, 0, 2:]).all()
    np.testing.assert_allclose(np.exp(out.tail_logmass[0, 0]), 1 - 0.5 - 0.1, rtol=1e-6)
    assert out.tail_logmass[1, 0] == topk.tail_logmass[1, 0]
    assert stats["positions"] == 2 and stats["in_support"] == 1
    np.testing.assert_allclose(stats["mass_sum"], 0.25, rtol=1e-6)


def test_a_position_whose_whole_top_k_is_padded_keeps_its_target():
    from ddk.pipeline.teachers.base import TopK
    from ddk.pipeline.teachers.support import fold_padded_ids

    lp = np.log(np.array([[[0.6, 0.3]]]))
    topk = TopK(ids=np.array([[[120, 101]]], np.int32), logprobs=lp.astype(np.float32),
                target_logprob=np.log(np.array([[0.04]], np.float32)), tail_logmass=np.log(np.array([[0.1]], np.float32)))
    out, stats = fold_padded_ids(topk, bound=100, targets=np.array([[7]]))
    assert out.ids[0, 0].tolist() == [7, -1]
    np.testing.assert_allclose(np.exp(out.logprobs[0, 0, 0]), 0.04, rtol=1e-6)
    np.testing.assert_allclose(np.exp(out.tail_logmass[0, 0]), 1 - 0.04, rtol=1e-6)  # 0.1 + 0.9 folded - 0.04
    assert stats["in_support"] == 1


def test_a_cache_begun_before_the_fold_resumes_readable(padded_pair, tmp_path):
    """A plan pinned by an older ddk (id space = the teacher's rows, no teacher.vocab_rows)
    is resumed with its own plan: the shards and the manifest agree, and the cache reads."""
    import shutil

    overrides, root = padded_pair
    cfg = load_config("configs/qwen-vocab.toml", overrides)
    teacher_cache(cfg, log=QUIET)
    legacy = tmp_path / "cache"
    shutil.copytree(cfg.cache.out_dir, legacy)
    plan = json.loads((legacy / "plan.json").read_text())
    del plan["teacher"]["vocab_rows"]
    plan["codec"]["vocab_size"] = plan["tokenizer"]["vocab_size"] = TEACHER_ROWS
    (legacy / "plan.json").write_text(json.dumps(plan))
    for p in [legacy / "manifest.json", *legacy.rglob("*.parquet")]:
        p.unlink()
    m = teacher_cache(load_config("configs/qwen-vocab.toml", overrides + [f"cache.out_dir={json.dumps(str(legacy))}"]), log=QUIET)
    assert m["codec"]["vocab_size"] == m["tokenizer"]["vocab_size"] == TEACHER_ROWS and "vocab_fold" not in m
    reader = TopKCacheReader(legacy)
    batch = reader.batch([(d, "train", 0) for d in m["domains"]])
    assert batch.topk_ids.shape[0] == len(m["domains"])
