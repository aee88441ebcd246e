"""Stage one's per-position work on one chunk of teacher logits: the top-k with its exact
tail, or k draws from the full softmax, plus the target token's log-prob.

The teacher's LM head is applied chunk by chunk (pipeline/teachers/hf.py), so `logits`
here is one [c, V] chunk in the model's dtype, never the [B, L, V] of a whole batch.
Every function takes `bound` <= V: ids >= bound are rows of the teacher's embedding that
the tokenizer never emits (Qwen2.5-7B pads to 152,064 rows, its tokenizer has 151,665
ids). They are never stored: their mass goes into the tail (top-k) or is left out of the
draws (sampled), and `folded_logmass` reports it per position (-inf when bound == V).

Top-k, for logits z of one position, lse = logsumexp(z) in fp32:
    ids, vals = top-k of z[:bound]
    logprobs = vals - lse,  target = z[t] - lse
    tail = log(sum_{j not in ids} exp(z_j)) - lse     (the mass outside the support,
                                                      summed directly, never 1 - sum p)
Two implementations with the same contract:
  torch   the reference, and the path on CPU: an fp32 copy of the chunk, torch.logsumexp,
          torch.topk, the kept entries scattered to -inf and a second logsumexp. Its bytes
          equal the unchunked capture's (tests/test_teacher_head.py).
  triton  CUDA: the top-k through block maxima (`block_topk`: the max of every block of
          64 logits, the k best blocks, the top-k of their k * 64 logits; values exact,
          in the chunk's own dtype), then ONE streaming read of the chunk per row
          computing the max, sum exp(z - m), the sum over the tail and the folded sum. A token is in the tail when z_j < v_k (the
          k-th kept value) or j >= bound; tokens tied with v_k that topk did not keep are
          counted exactly: (ties in the row) - (ties among the kept) times exp(v_k - m).
          The torch path reads and writes the chunk ~6 times in fp32 (~50 bytes per
          logit); this reads it once in bf16, which is what keeps the capture near the
          speed of the bare forward (make bench-capture).
          Precision: fp32 sums of exp(z - m) <= 1 terms (relative error ~1e-6 at
          V = 152k, far below the codec's logprob step, 2^-10 nats by default); a tail below
          e^-87 of the row max underflows to -inf (mass < 1e-37, not representable in the
          codec anyway).

Sampled (support = "sampled"): k draws per position by inverse CDF from
p = softmax(z[:bound]) (ids >= bound are left out and the rest renormalised), blocked in
two levels so that the chunk is read about once, in its own dtype:
  level one   ids [0, bound) in blocks of SAMPLE_BLOCK = 64 logits (the last one partial):
              per block b, M_b = max z and S_b = sum exp(z - M_b) in fp32. One read of
              the chunk: a Triton kernel on CUDA (`_block_stats_kernel`, a [GROUP, 64]
              tile of one row per program); on CPU torch on one fp32 copy of the chunk.
  blocks      (torch, [c, V / 64]) m = max_b M_b, w_b = S_b exp(M_b - m) and the block
              CDF W = cumsum(w) in fp64, total T = W[-1]. Draw j with uniform u_j:
              t = u_j T, its block b = the first with W_b > t (the last block that can
              be reached, W_b = T, for t >= T), and its fraction within the block
              f = (t - W_{b-1}) / (W_b - W_{b-1}), clamped to [0, 1 - 2^-24].
  in block    e_i = exp(z_i - M_b) over the block's 64 logits again (k * 64 logits a
              row: 3 % of the chunk at k = 64, V = 152k), cumsum in fp32, and the draw
              is the first i with cumsum_i > f * sum(e) and e_i > 0 (none: the last
              i with e_i > 0). A Triton kernel on CUDA (`_pick_in_block_kernel`), torch
              on CPU (gathering from the level-one fp32 copy, nothing recomputed).
The target's log-prob and `folded_logmass` use lse over ALL V ids, as the top-k path:
lse = logaddexp(m + log T, logsumexp(z[bound:])), the ids >= bound (at most a few hundred)
by torch on their slice. The uniforms come from the caller (one torch.Generator per row,
pipeline/teachers/hf.py): a row's draws do not depend on how rows are batched or chunked,
on the same device type (CUDA and CPU sum in different orders: their draws may differ
where u T lies within rounding of a CDF boundary).
Why blocked: the plain inverse CDF (an fp32 copy of the chunk, exp, a cumsum over V,
searchsorted) read and wrote ~6 fp32 [c, V] buffers and ran the capture at 0.71 of the
bare forward on an H200 at the Qwen2.5-1.5B shape (0.91 at 7B, where the decoder weighs more); this reads the bf16 chunk once plus 3 % of it.
Why 64: a row of 64 bf16 logits is one 128-byte line; the block arrays (M, S fp32, W fp64:
16 bytes a block, 1/8 of the chunk's bf16 bytes) and the in-block step (k * 64 logits)
both stay small; 128 would double the in-block re-read for no gain in the first read.
Precision: a draw equals the float64 inverse CDF over ids < bound except where u T lies
within the rounding of a boundary: the fp32 sums of <= 64 terms exp(.) <= 1 (relative
error ~1e-7, at worst 64 * 2^-24 = 4e-6, of the block's mass) and fp64 across blocks
(tests/test_teacher_head.py checks it against float64 with a margin of 1e-4 of the mass).
An id is never drawn when its e_i is 0 in fp32 (z_i < M_b - 103: mass < 1e-44 of its
block's max) and, as before, the uniforms' 24 bits resolve probabilities to 2^-24; ids
>= bound and ids of logit -inf are never drawn.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines use the torch path
    triton = None

# Logits per program block of the Triton stats pass (a power of two; the interpreter on
# CPU uses a small one so the tests reach many blocks per row).
GPU_BLOCK_V = 2048
INTERPRETER_BLOCK_V = 128


# Logits per block of block_topk's first pass.
TOPK_BLOCK = 64
# Logits per block of the blocked sampler (a power of two; why 64: the module docstring).
# It is part of the draw procedure (pipeline/teachers/hf.py's SAMPLER names it).
SAMPLE_BLOCK = 64
# Blocks per program of its level-one kernel (GROUP * SAMPLE_BLOCK logits a program, as
# _block_max_kernel), and draws per program of its in-block kernel; the interpreter on CPU
# uses small groups so the tests reach many programs per row.
GPU_SAMPLE_GROUP, INTERPRETER_SAMPLE_GROUP = 32, 4
PICK_DRAWS = 16


def resolve_impl(impl: str, is_cuda: bool) -> str:
    """impl "auto": "triton" on CUDA when triton is importable, else "torch"."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        return "triton" if is_cuda and triton is not None else "torch"
    return impl


def block_topk(logits: Tensor, k: int, bound: int) -> tuple[Tensor, Tensor]:
    """The k largest values of logits[:, :bound] per row and their ids, as torch.topk
    (values equal; among tied values the ids kept may differ).

    Why it is exact: take the k blocks of TOPK_BLOCK logits with the largest maxima. A
    top-k logit e outside them lies in a block whose max >= e, so each chosen block holds
    a logit >= e (its max): k logits >= e among the candidates, and e is not needed. Why
    it is fast: one read of the chunk for the block maxima, then top-k over V / 64 maxima
    and over k * 64 candidates, instead of torch.topk's radix passes over all V logits."""
    c = logits.shape[0]
    full = bound // TOPK_BLOCK * TOPK_BLOCK
    maxima = _block_maxima(logits, full // TOPK_BLOCK)
    if full < bound:
        maxima = torch.cat([maxima, logits[:, full:bound].amax(-1, keepdim=True)], 1)
    if k >= maxima.shape[1]:
        return torch.topk(logits[:, :bound], k, dim=-1)
    blocks = torch.topk(maxima, k, dim=-1).indices
    cols = (blocks[:, :, None] * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=logits.device)).reshape(c, -1)
    candidates = logits.gather(1, cols.clamp(max=bound - 1)).masked_fill_(cols >= bound, float("-inf"))
    vals, pos = torch.topk(candidates, k, dim=-1)
    return vals, cols.gather(1, pos)


def _block_maxima(logits: Tensor, blocks: int) -> Tensor:
    """[c, blocks]: the max of each of the first `blocks` blocks of TOPK_BLOCK logits per
    row. On CUDA a Triton kernel: torch's amax over a last dimension of 64 ran at ~0.4 TB/s
    on an H200 (2.6 ms a chunk of 3520 x 151936 bf16, 13 of the capture's 137 GPU ms)."""
    if triton is None or not (logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return logits[:, : blocks * TOPK_BLOCK].unflatten(1, (-1, TOPK_BLOCK)).amax(-1)
    out = torch.empty(logits.shape[0], blocks, dtype=logits.dtype, device=logits.device)
    group = 32
    _block_max_kernel[(logits.shape[0], triton.cdiv(blocks, group))](
        logits, logits.stride(0), out, blocks, BLOCK=TOPK_BLOCK, GROUP=group, num_warps=4)
    return out


class TopKChunk(NamedTuple):
    ids: Tensor  # [c, k] int64, most likely first
    logprobs: Tensor  # [c, k] fp32
    target_logprob: Tensor  # [c] fp32
    tail_logmass: Tensor  # [c] fp32
    folded_logmass: Tensor  # [c] fp32, log of the mass on ids >= bound (-inf if none)
    folded_in_topk: Tensor  # [c] bool, an id >= bound would have been in the top-k


class SampledChunk(NamedTuple):
    draws: Tensor  # [c, k] int64 token ids, unsorted
    target_logprob: Tensor  # [c] fp32
    folded_logmass: Tensor  # [c] fp32


def _folded(z: Tensor, bound: int, lse: Tensor) -> Tensor:
    if bound == z.shape[1]:
        return torch.full_like(lse, float("-inf"))
    return torch.logsumexp(z[:, bound:].float(), -1) - lse


def topk_chunk_torch(logits: Tensor, targets: Tensor, k: int, bound: int) -> TopKChunk:
    """The reference: the unchunked capture's arithmetic, row by row identical."""
    z = logits.float()  # the chunk itself when fp32 (a scratch buffer: overwritten below)
    lse = torch.logsumexp(z, -1)
    target = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    vals, ids = torch.topk(z[:, :bound], k, dim=-1)
    folded = _folded(z, bound, lse)
    in_topk = (z[:, bound:].amax(-1) > vals[:, -1]) if bound < z.shape[1] else torch.zeros_like(lse, dtype=torch.bool)
    tail = torch.logsumexp(z.scatter_(-1, ids, float("-inf")), -1) - lse
    return TopKChunk(ids, vals - lse[:, None], target, tail, folded, in_topk)


if triton is not None:

    @triton.jit
    def _block_max_kernel(z_ptr, stride, out_ptr, blocks, BLOCK: tl.constexpr, GROUP: tl.constexpr):
        """GROUP blocks of one row: each block's max."""
        row = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        cols = b[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        z = tl.load(z_ptr + row * stride + cols, mask=(b < blocks)[:, None], other=-float("inf"))
        tl.store(out_ptr + row * blocks + b, tl.max(z, 1), mask=b < blocks)

    @triton.jit
    def _topk_stats_kernel(z_ptr, stride, kth_ptr, kept_ties_ptr, target_ptr,
                           lse_ptr, tail_ptr, tgt_ptr, folded_ptr, in_topk_ptr,
                           V, bound, BLOCK: tl.constexpr):
        """One row: lse, the tail's log-mass, the target's log-prob, the folded log-mass
        and whether an id >= bound beats the k-th kept value; one read of the row."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride
        kth = tl.load(kth_ptr + row)
        m = kth  # a row value: the running max starts finite (it only grows)
        s = tl.zeros([], dtype=tl.float32)  # sum exp(z - m)
        r = tl.zeros([], dtype=tl.float32)  # over the tail
        f = tl.zeros([], dtype=tl.float32)  # over ids >= bound
        ties = tl.zeros([], dtype=tl.int32)  # z == kth among ids < bound
        f_max = -float("inf")
        for start in range(0, V, BLOCK):
            off = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + off, mask=off < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            padded = off >= bound
            s = s * scale + tl.sum(e, 0)
            r = r * scale + tl.sum(tl.where((z < kth) | padded, e, 0.0), 0)
            f = f * scale + tl.sum(tl.where(padded, e, 0.0), 0)
            ties += tl.sum(((z == kth) & (off < bound)).to(tl.int32), 0)
            f_max = tl.maximum(f_max, tl.max(tl.where(padded, z, -float("inf")), 0))
            m = m_new
        kept_ties = tl.load(kept_ties_ptr + row)
        r += (ties - kept_ties).to(tl.float32) * tl.exp(kth - m)
        log_s = tl.log(s)
        lse = m + log_s
        z_t = tl.load(z_row + tl.load(target_ptr + row)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(tail_ptr + row, tl.log(r) - log_s)
        tl.store(tgt_ptr + row, z_t - lse)
        tl.store(folded_ptr + row, tl.log(f) - log_s)
        tl.store(in_topk_ptr + row, (f_max > kth).to(tl.int8))

    @triton.jit
    def _block_stats_kernel(z_ptr, stride, max_ptr, sum_ptr, blocks, bound,
                            BLOCK: tl.constexpr, GROUP: tl.constexpr):
        """GROUP blocks of one row: each block's max M and sum exp(z - M) over its ids < bound."""
        row = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        cols = b[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        z = tl.load(z_ptr + row * stride + cols, mask=cols < bound, other=-float("inf")).to(tl.float32)
        m = tl.max(z, 1)
        m_safe = tl.where(m == -float("inf"), 0.0, m)  # a block of -inf logits sums to 0, not nan
        s = tl.sum(tl.exp(z - m_safe[:, None]), 1)
        tl.store(max_ptr + row * blocks + b, m, mask=b < blocks)
        tl.store(sum_ptr + row * blocks + b, s, mask=b < blocks)

    @triton.jit
    def _pick_in_block_kernel(z_ptr, stride, block_ptr, frac_ptr, out_ptr, k, bound,
                              BLOCK: tl.constexpr, DRAWS: tl.constexpr):
        """DRAWS draws of one row: in its block, the first id whose cumulative
        exp(z - M_b) exceeds the draw's fraction of the block's sum."""
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * DRAWS + tl.arange(0, DRAWS)
        live = j < k
        blk = tl.load(block_ptr + row * k + j, mask=live, other=0)
        frac = tl.load(frac_ptr + row * k + j, mask=live, other=0.0)
        i = tl.arange(0, BLOCK)
        cols = blk[:, None] * BLOCK + i[None, :]
        z = tl.load(z_ptr + row * stride + cols, mask=live[:, None] & (cols < bound),
                    other=-float("inf")).to(tl.float32)
        m = tl.max(z, 1)
        m_safe = tl.where(m == -float("inf"), 0.0, m)
        e = tl.exp(z - m_safe[:, None])
        threshold = frac * tl.sum(e, 1)
        cum = tl.cumsum(e, 1)
        # e > 0: an id of probability 0 is never drawn, whatever the scan's rounding.
        first = tl.min(tl.where((cum > threshold[:, None]) & (e > 0), i[None, :], BLOCK), 1)
        last = tl.max(tl.where(e > 0, i[None, :], 0), 1)
        pick = tl.where(first < BLOCK, first, last)
        tl.store(out_ptr + row * k + j, blk * BLOCK + pick, mask=live)


def topk_chunk_triton(logits: Tensor, targets: Tensor, k: int, bound: int) -> TopKChunk:
    """torch.topk in the chunk's dtype, then one Triton pass for lse, tail and target."""
    if triton is None:
        raise RuntimeError("topk_chunk_triton needs the triton package")
    c, v = logits.shape
    vals, ids = block_topk(logits, k, bound)
    vals = vals.float()
    kth = vals[:, -1].contiguous()
    kept_ties = (vals == kth[:, None]).sum(-1, dtype=torch.int32)
    out = torch.empty(4, c, dtype=torch.float32, device=logits.device)
    in_topk = torch.empty(c, dtype=torch.int8, device=logits.device)
    block = GPU_BLOCK_V if logits.is_cuda else INTERPRETER_BLOCK_V
    _topk_stats_kernel[(c,)](logits, logits.stride(0), kth, kept_ties, targets.contiguous(),
                             out[0], out[1], out[2], out[3], in_topk,
                             v, bound, BLOCK=min(block, triton.next_power_of_2(v)), num_warps=8)
    lse, tail, target, folded = out
    return TopKChunk(ids, vals - lse[:, None], target, tail, folded, in_topk.bool())


def topk_chunk(logits: Tensor, targets: Tensor, k: int, bound: int, impl: str = "auto") -> TopKChunk:
    """The top-k support of one chunk of logits [c, V] (see the module docstring).
    impl: "torch", "triton", or "auto" (triton on CUDA when importable)."""
    fn = topk_chunk_triton if resolve_impl(impl, logits.is_cuda) == "triton" else topk_chunk_torch
    return fn(logits, targets, k, bound)


def _block_exp_torch(logits: Tensor, bound: int, block: int) -> tuple[Tensor, Tensor]:
    """(M [c, nb] fp32, e [c, nb, block] fp32): per block of ids < bound, its max and
    exp(z - M_b), 0 past bound. The one fp32 [c, V] buffer of the CPU path."""
    c = logits.shape[0]
    blocks = -(-bound // block)
    e = torch.empty(c, blocks * block, dtype=torch.float32, device=logits.device)
    e[:, :bound] = logits[:, :bound]  # exact in fp32
    e[:, bound:] = float("-inf")
    e = e.view(c, blocks, block)
    block_max = e.amax(-1)
    safe = torch.where(torch.isneginf(block_max), 0.0, block_max)  # a block of -inf logits: e = 0, not nan
    e.sub_(safe[..., None]).exp_()
    return block_max, e


def sample_block_stats(logits: Tensor, bound: int, block: int = SAMPLE_BLOCK,
                       impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Level one of the blocked sampler: (M, S), each [c, ceil(bound / block)] fp32, the
    max and sum exp(z - M) of each block of ids < bound (the last block partial)."""
    if resolve_impl(impl, logits.is_cuda) == "torch":
        block_max, e = _block_exp_torch(logits, bound, block)
        return block_max, e.sum(-1)
    if triton is None:
        raise RuntimeError("the triton sampler needs the triton package")
    if logits.stride(1) != 1:
        raise ValueError("the triton sampler needs each row of logits contiguous (stride 1 along V)")
    blocks = -(-bound // block)
    block_max = torch.empty(logits.shape[0], blocks, dtype=torch.float32, device=logits.device)
    block_sum = torch.empty_like(block_max)
    group = GPU_SAMPLE_GROUP if logits.is_cuda else INTERPRETER_SAMPLE_GROUP
    _block_stats_kernel[(logits.shape[0], triton.cdiv(blocks, group))](
        logits, logits.stride(0), block_max, block_sum, blocks, bound, BLOCK=block, GROUP=group, num_warps=4)
    return block_max, block_sum


def _pick_in_blocks_torch(e: Tensor, chosen: Tensor, fraction: Tensor) -> Tensor:
    """Per draw, its position in its block (e [c, nb, block] from _block_exp_torch, chosen
    and fraction [c, k]): the first i with cumsum(e)_i > fraction * sum(e), at most the
    block's last id of positive mass. torch's cumsum on CPU runs sequentially (with a
    float64 accumulator): nondecreasing, and rising exactly at the ids with e_i > 0, so
    the id found has e_i > 0 and binary searches over the [block] rows do the rest."""
    c, k = chosen.shape
    block = e.shape[-1]
    cum = e.gather(1, chosen[..., None].expand(-1, -1, block)).view(c * k, block)  # the index is a view
    cum.cumsum_(-1)
    total = cum[:, -1:].contiguous()
    first = torch.searchsorted(cum, fraction.reshape(-1, 1) * total, right=True)
    last = torch.searchsorted(cum, total)  # where the cumsum reaches its total
    return torch.minimum(first, last).view(c, k)


def sample_chunk(logits: Tensor, targets: Tensor, uniforms: Tensor, bound: int, impl: str = "auto",
                 block: int = SAMPLE_BLOCK) -> SampledChunk:
    """k draws per position (uniforms [c, k] in [0, 1)) from softmax(logits[:, :bound]) by
    the blocked inverse CDF, and the target's log-prob under the full softmax (module
    docstring). impl: "torch", "triton", or "auto" (triton on CUDA when importable);
    block: logits per block, a power of two (SAMPLE_BLOCK; the tests use smaller ones)."""
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    c, v = logits.shape
    impl = resolve_impl(impl, logits.is_cuda)
    if impl == "torch":
        block_max, e = _block_exp_torch(logits, bound, block)
        block_sum = e.sum(-1)
    else:
        block_max, block_sum = sample_block_stats(logits, bound, block, impl)
    # Across blocks in fp64 ([c, V / block]: small): its rounding, ~1e-16 of the mass, is
    # far below the fp32 block sums' own.
    row_max = block_max.amax(-1, keepdim=True).double()
    cdf = block_max.double().sub_(row_max).exp_().mul_(block_sum).cumsum_(-1)  # W_b
    total = cdf[:, -1:].contiguous()  # T
    lse = row_max.squeeze(-1) + total.squeeze(-1).log()  # over ids < bound
    if bound < v:
        above = torch.logsumexp(logits[:, bound:].float(), -1).double()
        lse = torch.logaddexp(lse, above)
        folded = (above - lse).float()
    else:
        folded = torch.full((c,), float("-inf"), device=logits.device)
    target = (logits.gather(-1, targets[:, None]).squeeze(-1).double() - lse).float()

    t = uniforms.double() * total
    # W_b > W_{b-1} for the block found (the first W_b > t): its mass is positive. `last`,
    # the first block with W_b = T, bounds it should t reach T.
    last = torch.searchsorted(cdf, total)
    # A row whose logits are NaN, or -inf at every id below the bound, has a NaN CDF: its
    # block index is clamped into range (no out-of-bounds gather, no device assert) and
    # its target log-prob is NaN, which the caller refuses (pipeline/teachers/hf.py).
    chosen = torch.searchsorted(cdf, t, right=True).clamp_(max=last).clamp_(max=cdf.shape[1] - 1)
    hi = cdf.gather(1, chosen)
    lo = torch.where(chosen > 0, cdf.gather(1, (chosen - 1).clamp_(min=0)), 0.0)
    fraction = ((t - lo) / (hi - lo)).float().clamp_(0.0, 1.0 - 2.0**-24)
    if impl == "torch":
        pick = _pick_in_blocks_torch(e, chosen, fraction)
        draws = chosen * block + pick
    else:
        k = uniforms.shape[1]
        draws = torch.empty(c, k, dtype=torch.int64, device=logits.device)
        # the kernel indexes [c, k] arrays as row * k + j: contiguous (uniforms may not be)
        _pick_in_block_kernel[(c, triton.cdiv(k, PICK_DRAWS))](
            logits, logits.stride(0), chosen.contiguous(), fraction.contiguous(), draws, k, bound,
            BLOCK=block, DRAWS=PICK_DRAWS, num_warps=4)
    return SampledChunk(draws, target, folded)
