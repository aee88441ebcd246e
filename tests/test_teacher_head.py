"""Stage one's chunked teacher head (pipeline/teachers/hf.py, kernels/teacher_head.py):
the same cache bytes as the unchunked capture, the Triton stats pass against the torch
path, sampled draws independent of batching, and ids past the tokenizer folded away."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddk.kernels.teacher_head import block_topk, sample_chunk, topk_chunk, topk_chunk_torch
from ddk.pipeline.config import load_config
from ddk.pipeline.teachers.base import TopK
from ddk.pipeline.teachers.hf import HFTeacher, chunk_tokens_for
from ddk.pipeline.teachers.support import draws_to_support, draws_to_support_torch
from ddk.stages.teacher_cache import teacher_cache

from triton_params import TRITON_SKIP

QUIET = lambda *_: None  # noqa: E731


def unchunked_topk(self, rows: np.ndarray) -> TopK:
    """The capture before the head was chunked (ddk up to 2026-12): the model's whole
    [B, L, V] logits in fp32, torch.topk, the tail by a scatter and a second logsumexp."""
    ids = torch.as_tensor(np.array(rows, dtype=np.int64), device=self.device)
    with torch.no_grad():
        logits = self.model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        target = torch.gather(logits, -1, ids[:, 1:, None]).squeeze(-1) - lse.squeeze(-1)
        top_vals, top_ids = torch.topk(logits, self.k, dim=-1)
        rest = logits.scatter(-1, top_ids, float("-inf"))
        tail = (torch.logsumexp(rest, dim=-1, keepdim=True) - lse).squeeze(-1)
    return TopK(ids=top_ids.to(torch.int32).numpy(), logprobs=(top_vals - lse).numpy().astype(np.float32),
                target_logprob=target.numpy().astype(np.float32), tail_logmass=tail.numpy().astype(np.float32))


def _parquet_bytes(cache_dir):
    return {p.relative_to(cache_dir).as_posix(): p.read_bytes() for p in sorted(cache_dir.rglob("*.parquet"))}


def test_chunked_capture_writes_the_unchunked_capture_bytes(tiny_models, tiny_config_path, tmp_path, monkeypatch):
    """Shards byte-identical to the unchunked capture, with chunks that split rows (40
    positions, rows of 32) and one chunk per batch. (On this CPU BLAS a GEMM of >= 3 rows
    at the tiny teacher's hidden size rounds each row as the whole batch's does.)"""
    caches = {}
    for name, chunk in (("chunk40", 40), ("chunk4096", 4096)):
        cfg = load_config(tiny_config_path, [f"cache.out_dir={json.dumps(str(tmp_path / name))}",
                                             f"teacher.chunk_tokens={chunk}"])
        teacher_cache(cfg, log=QUIET)
        caches[name] = _parquet_bytes(tmp_path / name)
    monkeypatch.setattr(HFTeacher, "topk", unchunked_topk)
    cfg = load_config(tiny_config_path, [f"cache.out_dir={json.dumps(str(tmp_path / 'unchunked'))}"])
    teacher_cache(cfg, log=QUIET)
    reference = _parquet_bytes(tmp_path / "unchunked")
    assert len(reference) > 4
    assert caches["chunk40"] == reference
    assert caches["chunk4096"] == reference


def test_chunked_head_is_used_for_a_plain_head_and_not_for_a_soft_capped_one(tiny_models):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg, _ = tiny_models
    llama = HFTeacher(str(cfg.teacher_path()), k=8)
    assert llama.chunked
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=2.0))
    teacher = HFTeacher.from_model(gemma, k=8, chunk_tokens=7)
    assert not teacher.chunked  # the probe saw tanh soft-capping: the model's own logits are used
    rows = np.random.default_rng(0).integers(0, 300, (3, 21))
    got, want = teacher.topk(rows), unchunked_topk(teacher, rows)
    for field in ("ids", "logprobs", "target_logprob", "tail_logmass"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def _logits_with_ties(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * 4
    z = (z * 2).round() / 2  # coarse values: many ties, also at the k-th kept value
    z[0, -3:] = z[0].max() + 1  # the row max in the last block (the running-max rescale)
    return z.to(dtype)


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bound_pad", [0, 37])
def test_triton_stats_pass_matches_the_torch_path(dtype, bound_pad):
    """Many blocks per row (V = 1000, blocks of 128 under the interpreter), ties at the k-th
    value, ids past the bound: lse, tail, target, folded mass against the torch path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, k = 1000, 16
    z = _logits_with_ties(24, vocab, dtype).to(device)
    bound = vocab - bound_pad
    if bound_pad:
        z[1, bound + 3] = z[1].max() + 2  # a padded id that would have been in the top-k
    targets = torch.randint(0, bound, (24,), generator=torch.Generator().manual_seed(1)).to(device)
    ref = topk_chunk_torch(z.clone(), targets, k, bound)
    got = topk_chunk(z.clone(), targets, k, bound, impl="triton")
    # Values: the same k values (tied ids may differ between the dtypes' topk calls).
    torch.testing.assert_close(got.logprobs.sort(-1).values, ref.logprobs.sort(-1).values, atol=2e-5, rtol=0)
    assert bool((got.ids < bound).all())
    torch.testing.assert_close(got.target_logprob, ref.target_logprob, atol=2e-5, rtol=0)
    torch.testing.assert_close(got.tail_logmass, ref.tail_logmass, atol=5e-5, rtol=0)
    torch.testing.assert_close(got.folded_logmass, ref.folded_logmass, atol=5e-5, rtol=0)
    assert torch.equal(got.folded_in_topk, ref.folded_in_topk)
    assert bool(ref.folded_in_topk[1]) == bool(bound_pad)


def test_torch_top_k_folds_padded_ids_into_the_tail():
    vocab, bound, k = 300, 280, 8
    z = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * 3
    z[2, 290] = 20.0  # a padded id with most of the mass
    targets = torch.zeros(6, dtype=torch.long)
    out = topk_chunk_torch(z.clone(), targets, k, bound)
    assert bool((out.ids < bound).all()) and bool(out.folded_in_topk[2]) and not bool(out.folded_in_topk[0])
    p = torch.softmax(z.double(), -1)
    kept = p.gather(-1, out.ids).sum(-1)
    torch.testing.assert_close(out.tail_logmass.double().exp(), 1 - kept, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.folded_logmass.double().exp(), p[:, bound:].sum(-1), atol=1e-6, rtol=1e-5)


def test_sampled_draws_follow_the_softmax_below_the_bound():
    """The draw frequency of each id equals softmax(z[:bound]) renormalised (5 standard
    errors), ids past the bound are never drawn."""
    vocab, bound, n = 40, 33, 400_000
    z = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 2
    u = torch.rand(1, n, generator=torch.Generator().manual_seed(1))
    out = sample_chunk(z, torch.zeros(1, dtype=torch.long), u, bound)
    freq = torch.bincount(out.draws[0], minlength=vocab).double() / n
    p = torch.softmax(z[0, :bound].double(), -1)
    assert freq[bound:].sum() == 0
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq[:bound] - p).abs() <= 5 * se + 1e-12).all())
    full = torch.log_softmax(z.double(), -1)[0]
    torch.testing.assert_close(out.folded_logmass.double(), torch.logsumexp(full[bound:], -1)[None], atol=1e-6, rtol=0)


def test_a_rows_draws_do_not_depend_on_batching_or_chunking(tiny_models):
    cfg, _ = tiny_models
    rows = np.random.default_rng(0).integers(0, 300, (3, 33))
    whole = HFTeacher(str(cfg.teacher_path()), k=16, support="sampled", sample_seed=5, chunk_tokens=4096).topk(rows)
    teacher = HFTeacher(str(cfg.teacher_path()), k=16, support="sampled", sample_seed=5, chunk_tokens=7)
    alone = teacher.topk(rows[1:2])
    np.testing.assert_array_equal(alone.ids[0], whole.ids[1])
    np.testing.assert_array_equal(alone.logprobs[0], whole.logprobs[1])
    other_seed = HFTeacher(str(cfg.teacher_path()), k=16, support="sampled", sample_seed=6).topk(rows[1:2])
    assert not np.array_equal(other_seed.ids, alone.ids)


def test_chunk_size_follows_the_logit_bytes():
    v = 151936
    # Triton top-k reads bf16 logits only; sampling adds an fp32 buffer; torch top-k two.
    fused = chunk_tokens_for(v, torch.bfloat16, "topk", fused_stats=True)
    sampled = chunk_tokens_for(v, torch.bfloat16, "sampled", fused_stats=True)
    torch_path = chunk_tokens_for(v, torch.bfloat16, "topk", fused_stats=False)
    assert fused > sampled > torch_path >= 64
    assert fused * v * 2 <= 1 << 30 and sampled * v * 6 <= 1 << 30 and torch_path * v * 10 <= 1 << 30
    assert chunk_tokens_for(320, torch.float32, "topk", fused_stats=False) == 8192


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, bound", [(4096, 4096), (4096, 4001), (1000, 1000), (300, 300)])
def test_block_top_k_keeps_the_top_k_values(dtype, vocab, bound):
    """Values equal to torch.topk's (ties included: the coarse logits tie often), ids below
    the bound and holding those values; the top-k spread over many blocks, or packed in one."""
    k = 16
    z = _logits_with_ties(40, vocab, dtype)
    z[1, 64:80] = 100  # the whole top-k in one block
    z[2, bound - 3:bound] = 90  # in the partial last block below the bound
    vals, ids = block_topk(z, k, bound)
    ref = torch.topk(z[:, :bound], k, dim=-1).values
    assert torch.equal(vals, ref)
    assert bool((ids < bound).all()) and torch.equal(z.gather(1, ids), vals)
    assert all(len(set(r.tolist())) == k for r in ids)


def test_draw_counts_on_the_device_equal_the_host_ones():
    rng = np.random.default_rng(0)
    for high in (3, 40, 5000):  # few distinct ids (long runs) to all distinct
        draws = rng.integers(0, high, (300, 64))
        ids, lp = draws_to_support_torch(torch.as_tensor(draws), 64)
        ref_ids, ref_lp = draws_to_support(draws, 64)
        np.testing.assert_array_equal(ids.numpy(), ref_ids)
        np.testing.assert_array_equal(lp.numpy(), ref_lp)


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_maxima_kernel_matches_amax(dtype):
    from ddk.kernels.teacher_head import TOPK_BLOCK, _block_maxima

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = 151936 if device == "cuda" else 4096  # the interpreter is slow
    z = torch.randn(37 if device == "cuda" else 3, vocab, device=device).to(dtype)
    for blocks in (vocab // TOPK_BLOCK, 40, 33):
        ref = z[:, : blocks * TOPK_BLOCK].unflatten(1, (-1, TOPK_BLOCK)).amax(-1)
        assert torch.equal(_block_maxima(z, blocks), ref)
