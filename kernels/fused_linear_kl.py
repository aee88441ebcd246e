"""Fused LM head + cross-entropy + sparse KL: the [N, V] logits are never materialised.

The training objective (Eq. 3, docs/DESIGN.md section 1.3) on student hidden states h [N, H],
LM-head weight W [V, H] (bias b optional), next-token targets t and the cached teacher support:

    z = h W^T + b,    loss = mean_i CE(z_i, t_i) + gamma * mean_i T^2 KL_i(z_i / T)

with KL_i the sparse KL of kernels/sparse_kl.py (teacher top-k plus one tail bucket, the
tail only at T = 1; ragged supports padded with id -1 and log-prob -inf, as there) and
both means over the unmasked positions (t_i != ignore_index).
Per row, with p = softmax(z), p^T = softmax(z / T), n the number of unmasked rows:

    dloss/dz_j = (p_j - [j = t] + gamma * T * dKL_j) / n

    dKL_j = Q p^T_j - q_j                       for j in the support S
    dKL_j = Q p^T_j - q_tail p^T_j / p_tail     for j not in S

(Q = sum_S q_s + q_tail; the tail terms drop out without the tail). With g = dloss/dz:
dh = g W, dW = g^T h, db = sum_i g_i.

Memory. At V = 151936 and 8192 tokens the bf16 logits alone are 2.5 GB, the fp32 copy
the CE takes 5 GB and their gradients as much again. Here tokens are processed in
chunks of c rows: z_c = h_c W^T (a matmul), one pass computes the chunk's CE and KL and
overwrites z_c with g_c in place (z_c is not needed afterwards), then dh_c = g_c W and
dW += g_c^T h_c. Beyond the gradients dh [N, H] and dW [V, H] (fp32) and a few
[N]-sized row vectors, the extra memory is one [c, V] buffer in the compute dtype, O(c V)
whatever N is.

dW is accumulated by the GEMM itself: for bf16/fp16 operands on CUDA,
torch.addmm(dW, g_c^T, h_c, out_dtype=float32, out=dW) reads and writes the fp32
accumulator in cuBLAS's epilogue, so there is neither a [V, H] product per chunk nor a
separate elementwise pass over dW (on an H200 at 4096 x 128256, that `add_` was 41 % of
the fused head's GPU time at the old 520-token chunk). Where torch has no such op (CPU,
torch < 2.8), a probe made once per device type and dtype picks the old path: the
product rounded to the compute dtype, then added into the fp32 accumulator.

Chunk size: the memory/time trade. Each chunk costs a fixed read and write of the fp32
dW accumulator (8 V H bytes, at memory bandwidth) next to its 6 c V H matmul FLOPs, so
small chunks leave the GEMMs waiting on memory. Measured on an H200 (bf16, N = 8192,
k = 64, still with the separate `add_`): at H x V = 4096 x 128256 a chunk of 520 tokens
(the old default: 256 MiB counted as fp32, while the buffer is really bf16) took
77.5 ms, 1024 60.0, 2048 52.8, 4096 48.3 (unfused 52.2 ms, Liger's fused KL 43.0); at
1536 x 151936, 440 -> 41.4, 1024 29.1, 2048 26.6, 4096 24.1 (unfused 35.8). The floor is
the three bf16 GEMMs alone: ~33 ms at 4096 x 128256, ~8.5 ms at 896 x 151936. So on
CUDA the default (``default_chunk_tokens``) is CUDA_TOKENS_PER_SM tokens per SM (4224 on
the 132 SMs of an H100/H200: more SMs run a chunk's GEMMs faster but not the
accumulator's read and write, so the chunk grows with them), capped so that the buffer,
counted in its real dtype, stays under min(CUDA_CHUNK_BYTES_MAX, device memory /
CUDA_CHUNK_MEMORY_SHARE): 1.08 GB of bf16 at V = 128256, 1.28 GB at 151936 (fp32 logits
at 151936 hit the 2 GiB cap at 3528 tokens), against 14-17 GB of logits and gradients
unfused. On CPU (the torch path, which works on an fp32 copy of the chunk) the chunk's
fp32 logits are kept under CPU_CHUNK_BYTES. ``chunk_tokens`` overrides either.

Why the gradient is computed in the forward (as in Liger-Kernel's fused linear
cross-entropy): the backward would need the chunk logits again, so it would redo the
h_c W^T matmul for every chunk (a third more matmul FLOPs), or the forward would have to
keep all logits (the [N, V] buffer this module exists to avoid). The loss is a scalar,
so its gradient is known up to the scalar grad_output: the forward computes dh, dW, db
for grad_output = 1 and the backward only scales them. Under no_grad, or when neither
hidden, weight nor bias requires a gradient, only the losses are computed.

Implementations: on CUDA the matmuls are cuBLAS (torch) and each chunk's loss and
gradient come from one Triton kernel, one program per row, that streams the row twice
(an online logsumexp with the support gathered; then the gradient written over the
logits), with the numerics of kernels/sparse_kl.py: log-space combination, the student
tail as the difference of bit-identical exp terms and an exact re-sum when its share is
tiny. That difference needs the row's sums in fp64 (see _fused_ce_kl_kernel); without the
tail bucket (tail_logmass=None: sampled caches, T != 1, CE only) they are fp32. The torch
implementation (CPU, and the reference anywhere) runs the same chunk loop with the loss
and gradient from torch ops.

Autocast: under torch.autocast the matmuls run in the autocast dtype, as nn.Linear's
would (h, W, b cast, logits in that dtype); the loss arithmetic is fp32 in every case,
and the gradients come back in the inputs' own dtypes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .sparse_kl import (
    EXACT_TAIL_BELOW,
    GPU_BWD_BLOCK_V,
    GPU_FWD_BLOCK_V,
    GPU_NUM_WARPS,
    INTERPRETER_BLOCK_V,
    LOG_P_TAIL_MIN,
    _backward_row_terms,
    _put_support,
    _support_slots,
    _teacher_log_probs,
    _torch_forward,
    triton,
)


# Default chunk sizes (chunk_tokens=None); the module docstring gives the measured trade.
# CPU: bytes of one chunk's fp32 logits, the torch path's working copy.
CPU_CHUNK_BYTES = 256 << 20
# CUDA: tokens per SM: the chunk's matmul FLOPs then scale with the device's compute while
# its fixed cost (one read and write of the fp32 dW accumulator) stays a few percent.
CUDA_TOKENS_PER_SM = 32
# CUDA: the chunk buffer, in the bytes it really takes, stays under both of these.
CUDA_CHUNK_BYTES_MAX = 2 << 30
CUDA_CHUNK_MEMORY_SHARE = 16  # at most total device memory / this
# The torch path on CUDA keeps an fp32 working copy of the chunk and one fp32 temporary
# next to the buffer: bytes per logit on top of the buffer's own.
TORCH_PATH_EXTRA_BYTES = 8
# Chunk sizes are rounded down to a multiple of this (tensor-core friendly matmul shapes).
CHUNK_MULTIPLE = 8

# The fused kernel streams a row in blocks of these many logits (sparse_kl.py's measured
# choice); the interpreter costs per operation, so on CPU a whole row is one block.
# Module constants, read at every launch, so that the tests can force many blocks per row.
GPU_STATS_BLOCK_V = GPU_FWD_BLOCK_V
GPU_GRAD_BLOCK_V = GPU_BWD_BLOCK_V
INTERPRETER_STATS_BLOCK_V = INTERPRETER_BLOCK_V
INTERPRETER_GRAD_BLOCK_V = INTERPRETER_BLOCK_V


def _device_facts(device: torch.device) -> tuple[int, int]:
    """(SM count, total memory in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.total_memory


def default_chunk_tokens(vocab: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", use_triton: bool = True) -> int:
    """Tokens per chunk when chunk_tokens is None (see the module docstring).

    dtype is the compute dtype, the chunk buffer's (the autocast dtype under autocast);
    use_triton says which path runs on CUDA (the torch path needs fp32 scratch too).
    CPU: the chunk's fp32 logits take <= CPU_CHUNK_BYTES. CUDA: CUDA_TOKENS_PER_SM per SM,
    fewer if the buffer would pass min(CUDA_CHUNK_BYTES_MAX, memory /
    CUDA_CHUNK_MEMORY_SHARE).
    """
    device = torch.device(device)
    if device.type == "cuda":
        sms, total_memory = _device_facts(device)
        per_logit = dtype.itemsize + (0 if use_triton else TORCH_PATH_EXTRA_BYTES)
        cap = min(CUDA_CHUNK_BYTES_MAX, total_memory // CUDA_CHUNK_MEMORY_SHARE)
        rows = min(CUDA_TOKENS_PER_SM * sms, cap // (per_logit * vocab))
    else:
        rows = CPU_CHUNK_BYTES // (4 * vocab)
    return max(CHUNK_MULTIPLE, rows // CHUNK_MULTIPLE * CHUNK_MULTIPLE)


class _Teacher(NamedTuple):
    """The teacher as the loss sees it: ids [N, k], log q [N, k] (tempered, masked rows at
    -inf) and log q_tail [N] (None without the tail bucket)."""

    ids: Tensor
    log_q: Tensor
    log_q_tail: Tensor | None

    def rows(self, r: slice) -> "_Teacher":
        return _Teacher(self.ids[r], self.log_q[r],
                        None if self.log_q_tail is None else self.log_q_tail[r])


@dataclass(frozen=True)
class _Options:
    gamma: float
    temperature: float
    chunk_tokens: int
    use_triton: bool
    ignore_index: int
    compute_dtype: torch.dtype
    needs_grad: tuple[bool, bool, bool]  # hidden, weight, bias


def _torch_chunk(logits, targets, teacher, inv_n, ce_out, kl_out, opts, write_grad):
    """Per-row CE and KL of one chunk; with write_grad, d(loss)/d(logits) over the logits."""
    t = opts.temperature
    inv_t = 1.0 / t
    z = logits.float()  # the chunk itself when fp32, else an fp32 copy
    valid = targets != opts.ignore_index
    tgt = torch.where(valid, targets, 0)[:, None]
    z_t = z.gather(1, tgt).squeeze(1)
    if teacher is None:
        lse = torch.logsumexp(z, 1)
    else:
        # real is None unless some slot is padding (id -1), and ids are then safe to
        # gather (padding replaced by 0): see _support_slots.
        ids, real = slots = _support_slots(teacher.ids)
        kl_rows, row_max, log_sum, log_p_tail = _torch_forward(
            z, ids, teacher.log_q, teacher.log_q_tail, inv_t, slots)
        lse = row_max + log_sum if inv_t == 1.0 else torch.logsumexp(z, 1)
        kl_out.copy_(kl_rows.mul_(t * t))
    ce_out.copy_(torch.where(valid, lse - z_t, 0.0))
    if not write_grad:
        return
    # Per-row weights of the CE and KL gradients, the 1/n of the means folded in.
    w_ce = valid.float() * inv_n
    w_kl = opts.gamma * t * inv_n
    if teacher is None:
        z.sub_(lse[:, None]).exp_().mul_(w_ce[:, None])
    else:
        q_grad, coef, inv_sum = _backward_row_terms(teacher.log_q, teacher.log_q_tail,
                                                    log_sum, log_p_tail)
        q = teacher.log_q.exp()
        z_s = z.gather(1, ids)
        p_s = (z_s - lse[:, None]).exp()
        p_t_s = (z_s * inv_t - row_max[:, None]).exp() * inv_sum[:, None]
        support = w_ce[:, None] * p_s + w_kl * (q_grad[:, None] * p_t_s - q)
        if inv_t != 1.0:
            kl_part = (z * inv_t).sub_(row_max[:, None]).exp_().mul_((w_kl * coef)[:, None])
            z.sub_(lse[:, None]).exp_().mul_(w_ce[:, None]).add_(kl_part)
        elif teacher.log_q_tail is None:
            # One softmax serves both terms: p_j = exp(z_j - m) / S for CE and KL alike.
            z.sub_(row_max[:, None]).exp_().mul_((w_ce * inv_sum + w_kl * coef)[:, None])
        else:
            # dz_j = p_j (w_ce + w_kl Q) - w_kl q_tail p_j / p_tail, written as
            # (p_j / p_tail) * factor: q_tail / p_tail reaches 1 / P_TAIL_MIN when the
            # student tail nears the floor and, times gamma, could leave the fp32 range,
            # while p_j / p_tail <= 1 off the support and the factor is bounded. (Support
            # lanes may overflow here; the scatter below overwrites them.)
            live_q_tail = q_grad - q.sum(1)
            factor = log_p_tail.exp() * (w_ce + w_kl * q_grad) - w_kl * live_q_tail
            z.sub_((lse + log_p_tail)[:, None]).exp_().mul_(factor[:, None])
        if real is None:
            z.scatter_(1, ids, support)
        else:
            # Padding slots (q = 0) write nothing: the lane their safe id aliases keeps
            # its off-support value.
            _put_support(z, ids, real, support)
    z.scatter_add_(1, tgt, -w_ce[:, None])
    if z.data_ptr() != logits.data_ptr():
        logits.copy_(z)


if triton is not None:
    import triton.language as tl

    # The rare rows whose student tail share is tiny re-sum the tail exactly. sparse_kl.py
    # keeps that pass in a kernel of its own (inside its common kernel it cost up to 1.6x
    # on an H100); here it must sit in the one kernel per chunk, since the gradient pass
    # of the same program needs its result.
    from .sparse_kl import _exact_log_p_tail

    @triton.jit
    def _fused_ce_kl_kernel(
        logits_ptr, stride_row, targets_ptr, ids_ptr, log_q_ptr, log_q_tail_ptr, inv_n_ptr,
        ce_ptr, kl_ptr,
        V, K, ignore_index, inv_t, gamma_t, kl_scale, exact_tail_below, log_p_tail_min,
        HAS_KL: tl.constexpr, HAS_TAIL: tl.constexpr, TEMPERED: tl.constexpr,
        WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
        BLOCK_STATS: tl.constexpr, BLOCK_GRAD: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """One row: CE and KL (T^2-scaled) stored; with WRITE_GRAD, dloss/dz over z.

        ids must be sorted ascending within the row (the gradient pass walks them
        alongside the stream), padding (-1) first. log_q is tempered and masked on the
        host, -inf at padding. ACC is the dtype of the row's sums: fp64 with the tail,
        whose share is a difference of two sums, fp32 otherwise (see _acc_dtype).
        """
        row = tl.program_id(0).to(tl.int64)
        z_row = logits_ptr + row * stride_row
        out_ty = logits_ptr.dtype.element_ty
        target = tl.load(targets_ptr + row)
        ce = 0.0
        kl = 0.0
        if target != ignore_index:
            z_t = tl.load(z_row + target).to(tl.float32)
            m = z_t
            if HAS_KL:
                k_off = tl.arange(0, BLOCK_K)
                ids_row = ids_ptr + row * K
                log_q_row = log_q_ptr + row * K
                ids = tl.load(ids_row + k_off, mask=k_off < K, other=-1)
                # Padding slots (id -1) are not in the support: no z_s, no q. They sort
                # first, and the walks below step over them (no lane equals -1).
                k_mask = (k_off < K) & (ids >= 0)
                z_s = tl.load(z_row + ids, mask=k_mask, other=0.0).to(tl.float32)
                z_s = tl.where(k_mask, z_s, -float("inf"))
                # The running max starts at a row logit (the support's max, or the
                # target's when that is larger, which forces p_tail > 1 / (k + 1)): it
                # moves only if an off-support logit beats it, so in the small-tail case
                # each exp term of the stream is bit-identical to the one recomputed
                # from z_s below and only the ACC sums round (see sparse_kl.py).
                m = tl.maximum(m, tl.max(z_s, 0))
            # Pass 1: sum of exp(z - m) (and of exp(z / T - m / T) when tempered).
            acc = tl.zeros([], dtype=ACC)
            acc_u = tl.zeros([], dtype=ACC)
            for start in range(0, V, BLOCK_STATS):
                off = start + tl.arange(0, BLOCK_STATS)
                z = tl.load(z_row + off, mask=off < V, other=-float("inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, 0))
                acc = acc * tl.exp(m - m_new).to(ACC) + tl.sum(tl.exp(z - m_new).to(ACC), 0)
                if TEMPERED:
                    # Rounding is monotone: max(z / T) is m / T, so exp(...) <= 1 here too.
                    acc_u = acc_u * tl.exp(m * inv_t - m_new * inv_t).to(ACC) + tl.sum(
                        tl.exp(z * inv_t - m_new * inv_t).to(ACC), 0)
                m = m_new
            log_sum = tl.log(acc.to(tl.float32))
            ce = (m - z_t) + log_sum
            if HAS_KL:
                if TEMPERED:
                    m_u = m * inv_t
                    log_sum_u = tl.log(acc_u.to(tl.float32))
                    u_s = z_s * inv_t
                else:
                    m_u = m
                    log_sum_u = log_sum
                    u_s = z_s
                logp_s = tl.where(k_mask, (u_s - m_u) - log_sum_u, 0.0)
                log_q = tl.load(log_q_row + k_off, mask=k_mask, other=-float("inf"))
                # q = 0 terms are 0; the where keeps 0 * inf (NaN) out of the sum.
                q = tl.exp(log_q)
                kl = tl.sum(q * (tl.where(q > 0, log_q, 0.0) - logp_s), 0)
                q_grad = tl.sum(q, 0)
                ratio = 0.0
                if HAS_TAIL:
                    tail = acc - tl.sum(tl.exp(z_s - m).to(ACC), 0)
                    share = (tl.maximum(tail, 0.0) / acc).to(tl.float32)
                    # Shares below the threshold are replaced by the exact re-sum.
                    log_pt = tl.log(tl.maximum(share, exact_tail_below))
                    if share < exact_tail_below:
                        log_pt = _exact_log_p_tail(z_row, ids_row, V, K, m, log_sum,
                                                   BLOCK_STATS)
                    log_pt = tl.maximum(log_pt, log_p_tail_min)
                    log_qt = tl.load(log_q_tail_ptr + row)
                    q_t = tl.exp(log_qt)
                    # As for the support: no 0 * -inf where q_t = 0 (tail_logmass -inf).
                    kl += tl.where(q_t > 0, q_t * (tl.where(q_t > 0, log_qt, 0.0) - log_pt),
                                   0.0)
                    # A log p_tail clamped at the floor is constant in z: no gradient.
                    live = log_pt > log_p_tail_min
                    ratio = tl.where(live, tl.exp(log_qt - log_pt), 0.0)
                    q_grad += tl.where(live, q_t, 0.0)
                inv_sum_u = tl.exp(-log_sum_u)
                # Off the support dKL_j = exp(z_j / T - m_u) * coef; coef itself may be
                # ~1 / P_TAIL_MIN, so it multiplies the exp term before any other factor.
                coef = (q_grad - ratio) * inv_sum_u
                q_inv_sum_u = q_grad * inv_sum_u
                kl = kl * kl_scale
            # Pass 2: the gradient, written over the logits it is computed from.
            if WRITE_GRAD:
                inv_n = tl.load(inv_n_ptr)
                inv_sum = tl.exp(-log_sum)
                if HAS_KL:
                    p = 0
                    nxt = tl.load(ids_row)
                for start in range(0, V, BLOCK_GRAD):
                    off = start + tl.arange(0, BLOCK_GRAD)
                    z = tl.load(z_row + off, mask=off < V, other=-float("inf")).to(tl.float32)
                    e = tl.exp(z - m)
                    dz = e * inv_sum
                    if HAS_KL:
                        if TEMPERED:
                            e_u = tl.exp(z * inv_t - m_u)
                        else:
                            e_u = e
                        dz += (e_u * coef) * gamma_t
                        while nxt < start + BLOCK_GRAD:
                            q_s = tl.exp(tl.load(log_q_row + p))
                            dz = tl.where(off == nxt,
                                          e * inv_sum + gamma_t * (q_inv_sum_u * e_u - q_s), dz)
                            p += 1
                            nxt = tl.load(ids_row + p, mask=p < K, other=V + BLOCK_GRAD)
                    dz = tl.where(off == target, dz - 1.0, dz)
                    tl.store(z_row + off, (dz * inv_n).to(out_ty), mask=off < V)
        else:
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_GRAD):
                    off = start + tl.arange(0, BLOCK_GRAD)
                    tl.store(z_row + off, tl.zeros([BLOCK_GRAD], dtype=out_ty), mask=off < V)
        tl.store(ce_ptr + row, ce)
        tl.store(kl_ptr + row, kl)


def _acc_dtype(has_tail: bool):
    """The dtype of the kernel's row sums.

    With the tail, p_tail is the difference of two sums, over the row and over the support,
    of bit-identical exp terms: it keeps the sums' absolute error, relative to the row's
    sum. Measured at V = 151936 (blocks of 4096, logits ~ N(0, 2^2) with the support
    lifted, 8 rows per point, against an exact fp64 sum): fp32 sums leave a relative
    error in p_tail of 1.7e-6 at tail shares ~0.1, 4.5e-4 at ~1e-3, 7e-3 at ~5e-5, 0.76
    at ~1e-6 and over 1 below; fp64 sums keep it under 7e-8 at every share above the
    exact pass's 2^-30. Rows of a real student whose top-64 holds all but 1e-3 of its mass
    are common, and sending them all to the exact re-sum would cost a third read of the
    row. Without the tail the sums only give log S, where fp32 errs by <= 4.2e-7 in the
    same measurement (the loss's own fp32 rounding): fp32 there. Through the kernel itself
    (interpreter, blocks of 4096, V = 151936, the real-vocabulary test's rows, no tail,
    T = 1 and 2), fp32 and fp64 sums gave the same errors against the fp64 reference:
    loss, CE and KL within 6e-8 relative, gradients within 1.1e-6 of their largest entry.
    """
    return tl.float64 if has_tail else tl.float32


def _fused_blocks(logits) -> tuple[int, int]:
    """(BLOCK_STATS, BLOCK_GRAD) for this chunk, from the module constants."""
    row = triton.next_power_of_2(logits.shape[1])
    if logits.is_cuda:
        return min(GPU_STATS_BLOCK_V, row), min(GPU_GRAD_BLOCK_V, row)
    return min(INTERPRETER_STATS_BLOCK_V, row), min(INTERPRETER_GRAD_BLOCK_V, row)


def _triton_chunk(logits, targets, teacher, inv_n, ce_out, kl_out, opts, write_grad):
    n, v = logits.shape
    t = opts.temperature
    has_kl = teacher is not None
    has_tail = has_kl and teacher.log_q_tail is not None
    # Without the KL (or the tail) the kernel never touches these pointers.
    ids = teacher.ids if has_kl else targets
    log_q = teacher.log_q if has_kl else ce_out
    log_q_tail = teacher.log_q_tail if has_tail else ce_out
    k = ids.shape[1] if has_kl else 1
    block_stats, block_grad = _fused_blocks(logits)
    _fused_ce_kl_kernel[(n,)](
        logits, logits.stride(0), targets, ids, log_q, log_q_tail, inv_n,
        ce_out, kl_out,
        v, k, opts.ignore_index, 1.0 / t, opts.gamma * t, t * t,
        EXACT_TAIL_BELOW, LOG_P_TAIL_MIN,
        HAS_KL=has_kl, HAS_TAIL=has_tail, TEMPERED=t != 1.0, WRITE_GRAD=write_grad,
        ACC=_acc_dtype(has_tail),
        BLOCK_STATS=block_stats, BLOCK_GRAD=block_grad,
        BLOCK_K=max(16, triton.next_power_of_2(k)),
        num_warps=GPU_NUM_WARPS,
    )


@functools.cache
def _gemm_has_fp32_out(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.addmm and torch.mm take out_dtype=float32 for `dtype` operands here.

    Decided once per device type and dtype by a probe on 2 x 2 matrices, checked against
    the exact result (beta = 1 must accumulate), rather than per chunk: CUDA has the op
    from torch 2.8 (some versions refuse an fp32 addend), CPU builds have none
    (torch 2.13: NotImplementedError).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device_type)
    acc = torch.full((2, 2), 0.5, device=device_type)
    product = torch.empty(2, 2, device=device_type)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        torch.mm(a, a, out_dtype=torch.float32, out=product)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    expected = torch.tensor([[7.0, 10.0], [15.0, 22.0]])
    return bool(torch.equal(product.cpu(), expected) and torch.equal(acc.cpu(), expected + 0.5))


def _add_matmul(acc, a, b, fp32_out):
    """acc += a @ b into the fp32 accumulator.

    fp32_out (_gemm_has_fp32_out): the GEMM reads and writes acc itself, its products
    summed in fp32 and never rounded to a/b's dtype. Otherwise (CPU, older torch) a bf16/fp16
    product is rounded to its dtype once per chunk into a [V, H] temporary, then added.
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif fp32_out:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def _fused_pass(hidden, weight, bias, targets, teacher, opts):
    """(ce_sum, kl_sum, 1 / n_valid, (dh, dW, db)), the gradients of the mean loss for
    grad_output = 1 (None where not needed), chunk by chunk."""
    n = hidden.shape[0]
    v = weight.shape[0]
    dt = opts.compute_dtype
    need_h, need_w, need_b = opts.needs_grad
    write_grad = need_h or need_w or need_b
    x = hidden.to(dt)
    w = weight.to(dt)
    b = None if bias is None else bias.to(dt)
    inv_n = 1.0 / (targets != opts.ignore_index).sum().clamp(min=1).float()
    ce_rows = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    kl_rows = torch.zeros_like(ce_rows)
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    db = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
    step = min(opts.chunk_tokens, max(n, 1))
    logits_buf = torch.empty(step, v, dtype=dt, device=hidden.device)
    chunk_fn = _triton_chunk if opts.use_triton else _torch_chunk
    fp32_out = _gemm_has_fp32_out(hidden.device.type, dt)
    for r0 in range(0, n, step):
        r = slice(r0, r0 + step)
        xc = x[r]
        logits = logits_buf[: xc.shape[0]]
        if b is None:
            torch.mm(xc, w.t(), out=logits)
        else:
            torch.addmm(b, xc, w.t(), out=logits)
        chunk_fn(logits, targets[r], None if teacher is None else teacher.rows(r), inv_n,
                 ce_rows[r], kl_rows[r], opts, write_grad)
        grad = logits  # now holds dloss/dlogits
        if need_h:
            if dh.dtype == dt:
                torch.mm(grad, w, out=dh[r])
            elif fp32_out and dh.dtype == torch.float32:
                # fp32 hidden under autocast: written by the GEMM, no bf16 temporary.
                torch.mm(grad, w, out_dtype=torch.float32, out=dh[r])
            else:
                dh[r] = torch.mm(grad, w)
        if need_w:
            _add_matmul(dw, grad.t(), xc, fp32_out)
        if need_b:
            db.add_(grad.sum(0, dtype=torch.float32))
    grads = (dh,
             None if dw is None else dw.to(weight.dtype),
             None if db is None else db.to(bias.dtype))
    return ce_rows.sum(), kl_rows.sum(), inv_n, grads


class FusedLinearDistillFunction(torch.autograd.Function):
    """(loss, ce_mean, kl_mean) from hidden, weight, bias; see fused_linear_distill_loss.

    The gradients are computed in the forward and handed to autograd in the backward,
    scaled by grad_output; the backward can therefore run once per forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, opts):
        with torch.autocast(hidden.device.type, enabled=False):
            ce_sum, kl_sum, inv_n, grads = _fused_pass(hidden, weight, bias, targets, teacher,
                                                       opts)
        # Held as an attribute, not saved tensors, so that the backward can release them
        # and autograd can adopt dW as .grad without copying it.
        ctx.grads = grads
        ce = ce_sum * inv_n
        kl = kl_sum * inv_n
        ctx.mark_non_differentiable(ce, kl)
        return ce + opts.gamma * kl, ce, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_distill_loss: backward ran twice; its gradient "
                               "is computed in the forward and handed over once")
        grads, ctx.grads = ctx.grads, None
        out = tuple(None if g is None else g.mul_(grad_loss) for g in grads)
        return out + (None, None, None)


def _check_inputs(hidden, weight, targets, topk_ids, topk_logprobs, tail_logmass, gamma,
                  temperature, bias, chunk_tokens, impl, autocast):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    n, v = hidden.shape[0], weight.shape[0]
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError("hidden and weight must be floating point")
    dtypes = {hidden.dtype, weight.dtype} | (set() if bias is None else {bias.dtype})
    if not autocast and len(dtypes) != 1:
        raise ValueError(f"hidden, weight and bias must share one dtype outside autocast, got "
                         f"{sorted(map(str, dtypes))}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"bias must be [{v}], got {tuple(bias.shape)}")
    if targets.shape != (n,) or targets.is_floating_point():
        raise ValueError(f"targets must be [{n}] integer ids, got {tuple(targets.shape)} "
                         f"{targets.dtype}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'triton', 'torch' or 'auto', got {impl!r}")
    if impl == "triton" and triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if gamma > 0:
        if topk_ids is None or topk_logprobs is None:
            raise ValueError("gamma > 0 needs topk_ids and topk_logprobs")
        if (topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_ids.shape[1] < 1
                or topk_logprobs.shape != topk_ids.shape or topk_ids.is_floating_point()):
            raise ValueError(f"topk_ids and topk_logprobs must both be [{n}, k] (integer ids), "
                             f"got {tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}")
        if tail_logmass is not None and tail_logmass.shape != (n,):
            raise ValueError(f"tail_logmass must be [{n}], got {tuple(tail_logmass.shape)}")


def _check_ids_in_vocab(targets, topk_ids, vocab, ignore_index):
    """Out-of-range ids would be read out of bounds by the kernel: refuse them (one sync).
    A support id of -1 is padding, never read."""
    bad_target = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    bad = torch.stack([bad_target.any(),
                       torch.zeros((), dtype=torch.bool, device=targets.device)
                       if topk_ids is None else ((topk_ids < -1) | (topk_ids >= vocab)).any()])
    bad_targets, bad_ids = bad.tolist()
    if bad_targets:
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    if bad_ids:
        raise ValueError(f"topk_ids must lie in [0, {vocab}) (the LM head's vocabulary) or "
                         f"be -1 (padding)")


def fused_linear_distill_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    topk_ids: Tensor | None,
    topk_logprobs: Tensor | None,
    tail_logmass: Tensor | None,
    gamma: float = 0.0,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    chunk_tokens: int | None = None,
    impl: str = "auto",
    ignore_index: int = -100,
    check_ids: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """CE(hidden @ weight.T + bias, targets) + gamma * sparse KL, without [N, V] logits.

    Args:
        hidden: [N, H] final hidden states (after the final norm).
        weight: [V, H] LM-head weight (may be the tied embedding); V may exceed the
            teacher's vocabulary (padding).
        targets: [N] next-token ids; ``ignore_index`` marks masked positions (no CE, no KL).
        topk_ids: [N, k] int64/int32 teacher support ids, distinct within a row, or -1
            for a padding slot (ragged supports padded to width k, anywhere in the row; a
            row may have 1..k real slots, and only masked rows may be padded
            throughout). A padding slot is absent: no teacher mass, and not part of the
            support that the student's tail bucket excludes (unused when gamma == 0).
        topk_logprobs: [N, k] teacher log-probs at T = 1 over the full vocabulary (-inf for
            zero mass); must be -inf at every padding slot.
        tail_logmass: [N] log(1 - sum_k p_teacher), the sum over the real slots; None
            disables the tail bucket, which is also off when temperature != 1; -inf makes
            its term 0. A support that holds all the teacher's mass (a sampled cache, q =
            count / samples) should pass None: the same loss and gradient as -inf
            everywhere, without the tail machinery (no support-sum difference, no exact
            tail pass, fp32 row sums in the kernel).
        gamma: loss = CE_mean + gamma * KL_mean; 0 -> fused CE only.
        temperature: T as in ``sparse_kl_loss``: student log_softmax(z / T), teacher support
            renormalised at T, KL scaled by T^2. The CE always uses T = 1.
        bias: [V] optional LM-head bias.
        chunk_tokens: tokens per chunk (None: ``default_chunk_tokens``, sized for the
            device; a smaller one saves memory, a larger one time, see the module
            docstring).
        impl: "triton", "torch", or "auto" (triton on CUDA, torch elsewhere).
        ignore_index: the target id of masked positions.
        check_ids: refuse out-of-range targets and support ids (one host sync); False when
            the caller checked them on the host (stage two: the cache reader).

    Returns:
        (loss, ce_mean, kl_mean): fp32 scalars; only ``loss`` carries a gradient (to
        hidden, weight and bias, in their dtypes). Both means are over the unmasked
        positions; with none, all three are 0 (where F.cross_entropy would give NaN).
    """
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    _check_inputs(hidden, weight, targets, topk_ids, topk_logprobs, tail_logmass, gamma,
                  temperature, bias, chunk_tokens, impl, autocast)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and triton is not None else "torch"
    use_kl = gamma > 0
    vocab = weight.shape[0]
    if check_ids:  # one host sync; callers that checked the ids on the host skip it
        _check_ids_in_vocab(targets, topk_ids if use_kl else None, vocab, ignore_index)

    teacher = None
    if use_kl:
        valid = targets != ignore_index
        log_q, log_q_tail = _teacher_log_probs(topk_logprobs, tail_logmass, valid,
                                               float(temperature), torch.float32)
        ids = topk_ids
        if impl == "triton":
            # The kernel walks each row's support in ascending id order.
            ids, order = ids.sort(dim=1)
            log_q = log_q.gather(1, order)
        teacher = _Teacher(ids.contiguous(), log_q.contiguous(), log_q_tail)

    grad_on = torch.is_grad_enabled()
    needs_grad = tuple(grad_on and t is not None and t.requires_grad
                       for t in (hidden, weight, bias))
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    use_triton = impl == "triton"
    opts = _Options(
        gamma=float(gamma),
        temperature=float(temperature),
        chunk_tokens=chunk_tokens or default_chunk_tokens(vocab, compute_dtype, hidden.device,
                                                          use_triton),
        use_triton=use_triton,
        ignore_index=ignore_index,
        compute_dtype=compute_dtype,
        needs_grad=needs_grad,
    )
    hidden = hidden.contiguous()
    targets = targets.long().contiguous()
    if any(needs_grad):
        return FusedLinearDistillFunction.apply(hidden, weight, bias, targets, teacher, opts)
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        ce_sum, kl_sum, inv_n, _ = _fused_pass(hidden, weight, bias, targets, teacher, opts)
    ce = ce_sum * inv_n
    kl = kl_sum * inv_n
    return ce + opts.gamma * kl, ce, kl


class FusedLinearDistillLoss(nn.Module):
    """``fused_linear_distill_loss`` with gamma, temperature, chunking and impl fixed."""

    def __init__(self, gamma: float = 0.0, temperature: float = 1.0,
                 chunk_tokens: int | None = None, impl: str = "auto", ignore_index: int = -100):
        super().__init__()
        self.gamma = gamma
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.impl = impl
        self.ignore_index = ignore_index

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor,
                topk_ids: Tensor | None = None, topk_logprobs: Tensor | None = None,
                tail_logmass: Tensor | None = None,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return fused_linear_distill_loss(
            hidden, weight, targets, topk_ids, topk_logprobs, tail_logmass,
            gamma=self.gamma, temperature=self.temperature, bias=bias,
            chunk_tokens=self.chunk_tokens, impl=self.impl, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, temperature={self.temperature}, "
                f"chunk_tokens={self.chunk_tokens}, impl={self.impl!r}")
