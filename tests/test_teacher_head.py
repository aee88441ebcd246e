"""Stage one's chunked teacher head (pipeline/teachers/hf.py, kernels/teacher_head.py):
the same cache bytes as the unchunked capture, the Triton stats pass against the torch
path, sampled draws independent of batching, and ids past the tokenizer folded away."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddk.kernels.teacher_head import block_topk, sample_block_stats, sample_chunk, topk_chunk, topk_chunk_torch
from ddk.pipeline.config import load_config
from ddk.pipeline.teachers.base import TopK
from ddk.pipeline.teachers.hf import HFTeacher, chunk_tokens_for
from ddk.pipeline.teachers.support import draws_to_support, draws_to_support_torch
from ddk.stages.teacher_cache import teacher_cache

from triton_params import DEVICE, IMPLS, TRITON_SKIP

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


@pytest.mark.parametrize("block", [16, 64])
def test_sampled_draws_follow_the_softmax_below_the_bound(block):
    """The draw frequency of each id equals softmax(z[:bound]) renormalised, within 5
    binomial standard errors sqrt(p (1 - p) / n) (an id outside by chance: < 6e-7 each),
    over rows of many blocks (300 ids: 19 blocks of 16, 5 of 64, the last partial); ids
    past the bound are never drawn."""
    vocab, bound, n = 300, 283, 200_000
    z = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 2
    u = torch.rand(1, n, generator=torch.Generator().manual_seed(1))
    out = sample_chunk(z, torch.zeros(1, dtype=torch.long), u, bound, impl="torch", block=block)
    freq = torch.bincount(out.draws[0], minlength=vocab).double() / n
    p = torch.softmax(z[0, :bound].double(), -1)
    assert freq[bound:].sum() == 0
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq[:bound] - p).abs() <= 5 * se + 1e-12).all())
    full = torch.log_softmax(z.double(), -1)[0]
    torch.testing.assert_close(out.folded_logmass.double(), torch.logsumexp(full[bound:], -1)[None], atol=1e-6, rtol=0)


# A draw may differ from the float64 inverse CDF only where u * T lies this close to a CDF
# boundary, as a share of the mass T: the fp32 rounding of a block's sum, of the in-block
# cumsum and of the fraction is at most (2 * 64 + 4) * 2^-24 = 8e-6 of it at 64 logits a
# block (kernels/teacher_head.py), typically ~1e-7.
BOUNDARY_MARGIN = 1e-5


def _sampler_logits(vocab: int, bound: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of every kind the sampler meets: flat, plain, peaked; one-hot-ish with -inf and
    logits so negative their probability is 0 in float64 too; whole blocks at -inf; the
    row max in the last (partial) block below the bound; most of the mass past the bound."""
    g = torch.Generator().manual_seed(vocab + bound)
    z = torch.randn(9, vocab, generator=g)
    z[0] *= 0.05  # flat
    z[1] *= 2
    z[2] *= 8  # peaked
    z[3] = float("-inf")
    z[3, [5, 6, 300, bound - 1]] = torch.tensor([0.0, -3.0, -1e4, -2.0])  # one-hot-ish; -1e4: p = 0
    z[4, :200] = float("-inf")  # many whole blocks of -inf, then a plain row
    z[4, 400:450] = float("-inf")
    z[5] = z[5] * 3 - 150  # all far below 0
    z[6, bound - 2] = z[6].max() + 6  # the max in the partial last block
    z[7, ::2] = float("-inf")  # every other id impossible
    z[8] *= 4
    if bound < vocab:
        z[8, bound + 1] = z[8, :bound].max() + 12  # ~all the mass on a padded id
    return z.to(dtype)


def _float64_draws(z: torch.Tensor, u: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse CDF over ids < bound in float64, and which uniforms lie within
    BOUNDARY_MARGIN of the mass of one of its boundaries."""
    z64 = z[:, :bound].double()
    cdf = torch.exp(z64 - z64.amax(-1, keepdim=True)).cumsum(-1)
    total = cdf[:, -1:]
    t = u.double() * total
    draws = torch.searchsorted(cdf, t, right=True)
    nearest = torch.searchsorted(cdf, t).clamp(max=bound - 1)
    gap = torch.minimum((cdf.gather(1, nearest) - t).abs(), (cdf.gather(1, (nearest - 1).clamp(min=0)) - t).abs())
    return draws, gap <= BOUNDARY_MARGIN * total


def _uniforms(rows: int, k: int, seed: int) -> torch.Tensor:
    u = torch.rand(rows, k, generator=torch.Generator().manual_seed(seed))
    u[:, 0], u[:, 1] = 0.0, 1.0 - 2.0**-24  # torch.rand's extremes: the first and last possible ids
    return u


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, bound, block", [(1000, 1000, 16), (1000, 963, 16), (2053, 2053, 64), (2053, 1990, 64)])
def test_blocked_draws_equal_the_float64_inverse_cdf(impl, dtype, vocab, bound, block):
    """Every draw equals the float64 inverse CDF's unless u * T is within BOUNDARY_MARGIN of
    a boundary (< 5 % of the uniforms: 2e-5 of the mass around each of up to 1000
    boundaries in the flat row); no draw, near a boundary or not, is an id >= bound or of
    probability 0; target and folded log-masses as the full softmax in float64."""
    z = _sampler_logits(vocab, bound, dtype).to(DEVICE)
    u = _uniforms(z.shape[0], 256, seed=vocab + bound).to(DEVICE)
    targets = torch.tensor([0, 1, 2, 300, 7, 8, bound - 2, 1, bound + 1 if bound < vocab else 5], device=DEVICE)
    out = sample_chunk(z, targets, u, bound, impl=impl, block=block)
    want, near = _float64_draws(z, u, bound)
    assert bool((out.draws == want)[~near].all())
    assert near.double().mean() < 0.05
    assert torch.equal(out.draws[:, 0], want[:, 0])  # u = 0: the first id of positive mass, exactly
    assert bool((out.draws < bound).all())
    assert bool((z.gather(1, out.draws).double() > -1000).all())  # never a -inf (or p = 0) id
    logp = torch.log_softmax(z.double(), -1)
    torch.testing.assert_close(out.target_logprob.double(), logp.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=1e-6)
    folded = torch.logsumexp(logp[:, bound:], -1)  # -inf when bound == vocab (an empty slice)
    torch.testing.assert_close(out.folded_logmass.double(), folded, atol=1e-5, rtol=1e-6)


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sampler_matches_the_torch_path(dtype):
    """Level one: the block maxima equal, the block sums within 1e-6 relative (fp32 sums of
    <= 16 terms in two orders); the draws equal except near a CDF boundary."""
    vocab, bound, block = 1000, 963, 16
    z = _sampler_logits(vocab, bound, dtype).to(DEVICE)
    ref_max, ref_sum = sample_block_stats(z, bound, block, impl="torch")
    got_max, got_sum = sample_block_stats(z, bound, block, impl="triton")
    assert ref_max.shape == (z.shape[0], 61) and torch.equal(got_max, ref_max)
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-6, atol=0)
    u = _uniforms(z.shape[0], 128, seed=3).to(DEVICE)
    targets = torch.zeros(z.shape[0], dtype=torch.long, device=DEVICE)
    ref = sample_chunk(z, targets, u, bound, impl="torch", block=block)
    got = sample_chunk(z, targets, u, bound, impl="triton", block=block)
    _, near = _float64_draws(z, u, bound)
    assert bool((got.draws == ref.draws)[~near].all())
    torch.testing.assert_close(got.target_logprob, ref.target_logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.folded_logmass, ref.folded_logmass, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_rows_draws_do_not_depend_on_the_chunk_it_is_in(impl):
    """The same row and uniforms give the same draws, to the bit, alone or among others."""
    z = _sampler_logits(1000, 963, torch.bfloat16).to(DEVICE)
    u = _uniforms(z.shape[0], 64, seed=4).to(DEVICE)
    targets = torch.zeros(z.shape[0], dtype=torch.long, device=DEVICE)
    whole = sample_chunk(z, targets, u, 963, impl=impl, block=16)
    part = sample_chunk(z[3:5].clone(), targets[3:5], u[3:5].clone(), 963, impl=impl, block=16)
    assert torch.equal(part.draws, whole.draws[3:5])
    assert torch.equal(part.target_logprob, whole.target_logprob[3:5])


@pytest.mark.parametrize("impl", IMPLS)
def test_sampler_takes_strided_rows_transposed_uniforms_and_k_off_the_kernel_grid(impl):
    """The chunk as a view of a wider buffer (row stride > V, as hf.py's chunks of a
    [positions, V] buffer are), uniforms that are a transposed view, and k = 37 (not a
    multiple of the draws per kernel program): the same draws as contiguous inputs."""
    vocab, bound = 1000, 963
    z = _sampler_logits(vocab, bound, torch.bfloat16).to(DEVICE)
    wide = torch.full((z.shape[0], vocab + 40), 7.0, dtype=z.dtype, device=DEVICE)
    wide[:, :vocab] = z
    strided = wide[:, :vocab]
    assert strided.stride(0) == vocab + 40
    u = _uniforms(37, z.shape[0], seed=5).to(DEVICE).t()  # [rows, 37], not contiguous
    targets = torch.zeros(z.shape[0], dtype=torch.long, device=DEVICE)
    ref = sample_chunk(z, targets, u.contiguous(), bound, impl=impl, block=16)
    got = sample_chunk(strided, targets, u, bound, impl=impl, block=16)
    assert ref.draws.shape == (z.shape[0], 37)
    assert torch.equal(got.draws, ref.draws) and torch.equal(got.target_logprob, ref.target_logprob)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_without_finite_logits_gives_a_nan_target_not_a_crash(impl):
    """NaN logits, or -inf at every id below the bound: no out-of-bounds index (on CUDA a
    device assert); the row's target log-prob is NaN, which HFTeacher refuses by name."""
    vocab, bound = 1000, 963
    z = _sampler_logits(vocab, bound, torch.float32).to(DEVICE)
    z[1, 10] = float("nan")
    z[2, :bound] = float("-inf")
    u = _uniforms(z.shape[0], 32, seed=6).to(DEVICE)
    out = sample_chunk(z, torch.zeros(z.shape[0], dtype=torch.long, device=DEVICE), u, bound, impl=impl, block=16)
    assert bool(out.target_logprob[1:3].isnan().all()) and bool(out.target_logprob[[0, 5, 6]].isfinite().all())
    assert bool(((out.draws >= 0) & (out.draws < vocab)).all())


def test_the_hf_teacher_refuses_non_finite_logits(tiny_models):
    from ddk.pipeline.teachers.base import TeacherOutputError

    cfg, _ = tiny_models
    teacher = HFTeacher(str(cfg.teacher_path()), k=8, support="sampled")
    rows = np.random.default_rng(0).integers(0, 300, (2, 17))
    with torch.no_grad():
        teacher.model.get_output_embeddings().weight[5] = float("nan")
    with pytest.raises(TeacherOutputError, match="not finite at"):
        teacher.topk(rows)


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
    # Triton top-k reads bf16 logits only; Triton sampling adds its block arrays (0.25 bytes a
    # logit) and [c, k] draws; the CPU sampler an fp32 copy; torch top-k two fp32 buffers.
    fused = chunk_tokens_for(v, torch.bfloat16, "topk", fused_stats=True)
    sampled = chunk_tokens_for(v, torch.bfloat16, "sampled", fused_stats=True, k=64)
    sampled_torch = chunk_tokens_for(v, torch.bfloat16, "sampled", fused_stats=False, k=64)
    torch_path = chunk_tokens_for(v, torch.bfloat16, "topk", fused_stats=False)
    assert fused > sampled > sampled_torch > torch_path >= 64
    assert fused * v * 2 <= 1 << 30 and sampled * v * 2.25 <= 1 << 30 and sampled >= 0.85 * fused
    assert sampled_torch * v * 6.25 <= 1 << 30 and torch_path * v * 10 <= 1 << 30
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
