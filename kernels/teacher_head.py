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

Sampled (support = "sampled"): inverse-CDF sampling. p = softmax(z[:bound]) (ids >= bound
are left out and the rest renormalised), cdf = cumsum(exp(z - m)) in fp32, and draw j for
uniform u is the first id whose cdf exceeds u * cdf[-1]. The uniforms come from the
caller (one torch.Generator per row, pipeline/teachers/hf.py), so a row's draws do not
depend on how rows are batched or chunked. Ids whose probability is below one fp32 ulp
of the running sum (~6e-8 of the mass before them) cannot be drawn: a bias of that size,
far below the 1/k a draw carries.
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
    if impl == "auto":
        impl = "triton" if logits.is_cuda and triton is not None else "torch"
    fn = topk_chunk_triton if impl == "triton" else topk_chunk_torch
    return fn(logits, targets, k, bound)


def sample_chunk(logits: Tensor, targets: Tensor, uniforms: Tensor, bound: int) -> SampledChunk:
    """k draws per position (uniforms [c, k] in [0, 1)) from softmax(logits[:, :bound]) by
    inverse CDF, and the target's log-prob under the full softmax."""
    z = logits.float() if logits.dtype != torch.float32 else logits.clone()
    m = z.amax(-1, keepdim=True)
    e = z.sub_(m).exp_()  # [c, V] fp32, in place: <= 1, the max at 1
    total = e.sum(-1)
    lse = m.squeeze(-1) + total.log()
    target = logits.gather(-1, targets[:, None]).squeeze(-1).float() - lse
    folded = (e[:, bound:].sum(-1).log() - total.log()) if bound < e.shape[1] else torch.full_like(lse, float("-inf"))
    # In place (no second [c, V] fp32 buffer) unless ids >= bound are cut off: searchsorted
    # wants a contiguous boundary tensor, and the slice is not.
    cdf = e.cumsum_(-1) if bound == e.shape[1] else torch.cumsum(e[:, :bound], -1)
    draws = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True).clamp_(max=bound - 1)
    return SampledChunk(draws, target, folded)
