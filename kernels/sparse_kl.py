"""Sparse KL(teacher || student) over a cached teacher top-k support plus one tail bucket.

For a row of student logits z (vocabulary V), teacher support S (k distinct ids) with
probabilities q_s and teacher tail mass q_tail = 1 - sum_S q_s (docs/DESIGN.md section 3):

    loss = sum_{s in S} q_s (log q_s - log p_s) + q_tail (log q_tail - log p_tail)

with log p = log_softmax(z) and p_tail = 1 - sum_S p_s, the student's mass outside S
treated as one bucket. Terms with q = 0 contribute 0. The gradient (T = 1) is

    dz_j = Q p_j - q_j                      for j in S
    dz_j = Q p_j - q_tail p_j / p_tail      for j not in S

with Q = sum_S q_s + q_tail (Q = sum_S q_s when the tail term is disabled).

Ragged supports: rows may hold fewer than k real entries, padded to the common width k
with slots of id -1 and log-prob -inf, anywhere in the row. A padding slot is absent: it
carries no teacher mass, is not part of S (so p_tail = 1 - sum of p_s over the real ids
only) and writes no gradient. A ragged row's loss and gradient are those of the same row
with only its real entries.

Temperature T != 1 (Hinton et al.): the student uses log_softmax(z / T); the teacher's
support probabilities become q_s proportional to exp(lp_s / T), renormalised over the
support; the tail term is disabled, because only the tail's total mass is cached and
not its shape, so its tempered mass is unknown; the loss is multiplied by T^2 so that
gradient magnitudes stay comparable across temperatures.

Two implementations share one autograd contract (``SparseKLFunction``): a Triton
kernel pair (CUDA, or CPU under ``TRITON_INTERPRET=1``) and a chunked plain-torch path
(CPU training, and the reference the kernel is tested against). Neither keeps an
[N, V] fp32 buffer: the forward saves only per-row statistics, the backward re-reads
the logits and writes the gradient (in the logits' dtype) straight into its output.
Arithmetic is fp32 whatever the logits' dtype (with the tail the kernel sums the row in
fp64, for the tail's difference of sums; fp64 logits are computed in fp64 on the torch
path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves CPU training without triton
    triton = None

# log p_tail is clamped at log of the smallest normal fp32, where fp32 exp relative to
# the row max stops resolving the tail: a student tail that underflows (or is empty,
# V == k) then gives a finite loss, and a term whose teacher tail is ~0 stays ~0 instead
# of becoming 0 * inf.
P_TAIL_MIN = torch.finfo(torch.float32).tiny
LOG_P_TAIL_MIN = math.log(P_TAIL_MIN)

# Bytes of fp32 scratch per row chunk on the torch path; its temporaries are a small
# multiple of this, whatever N is.
TORCH_CHUNK_BYTES = 1 << 27

# The GPU kernels stream a row in blocks of this many logits, one program per row (the
# fastest of 2048..8192 x 4..8 warps on an H100, bf16, V = 32000 and 151936). The
# interpreter costs per operation rather than per element, so on CPU a whole row is one
# block.
GPU_FWD_BLOCK_V = 4096
GPU_BWD_BLOCK_V = 2048
GPU_NUM_WARPS = 4
INTERPRETER_BLOCK_V = 1 << 18


def _rows_per_chunk(vocab: int) -> int:
    return max(1, TORCH_CHUNK_BYTES // (4 * vocab))


def _shift(chunk, inv_t, row_max, out):
    """out = chunk / T - row_max, in out's dtype (the compute dtype)."""
    if inv_t == 1.0:
        torch.sub(chunk, row_max[:, None], out=out)
    else:
        out.copy_(chunk).mul_(inv_t).sub_(row_max[:, None])


def _support_slots(ids):
    """(ids, valid) for the torch path: ``valid`` is None when no slot is padded (the
    dense fast path, ids as given), else the [N, k] mask of real slots, with ids whose
    padding (-1) is replaced by 0 so that gathers stay in range; a gathered padding value
    is masked by its caller, and only valid slots are ever written (``_put_support``)."""
    ids = ids.long()
    valid = ids >= 0
    if bool(valid.all()):
        return ids, None
    return ids.clamp(min=0), valid


def _put_support(e, ids, valid, values):
    """e[i, ids[i, s]] = values (a [rows, k] tensor or a scalar) for the valid slots only.

    Through the coordinates of the valid slots: a padding slot's safe id may alias a real
    one of its row, which a scatter of every slot would overwrite in an unspecified order.
    """
    rows, slots = valid.nonzero(as_tuple=True)
    if torch.is_tensor(values):
        values = values[rows, slots]
    e[rows, ids[rows, slots]] = values


def _torch_forward(logits, topk_ids, log_q, log_q_tail, inv_t, slots=None):
    """Per-row loss and statistics; ``slots`` = ``_support_slots(topk_ids)`` when the
    caller has it already."""
    n, v = logits.shape
    cdt = log_q.dtype
    ids, valid = _support_slots(topk_ids) if slots is None else slots
    loss = torch.empty(n, dtype=cdt, device=logits.device)
    row_max = torch.empty_like(loss)
    log_sum = torch.empty_like(loss)
    log_p_tail = torch.empty_like(loss) if log_q_tail is not None else None
    step = _rows_per_chunk(v)
    scratch = torch.empty(min(n, step), v, dtype=cdt, device=logits.device)
    for r0 in range(0, n, step):
        r = slice(r0, r0 + step)
        chunk = logits[r]
        e = scratch[: chunk.shape[0]]
        # Rounding is monotone, so the max of the scaled row is the scaled max. Shifting
        # by it first keeps z - m exact near the top: log p stays accurate even for
        # logits of magnitude 1e4.
        m = chunk.amax(1).to(cdt) * inv_t
        _shift(chunk, inv_t, m, e)
        # A padding slot's z_s is that of the id it aliases, finite; its q is 0, so the
        # where below drops its term.
        z_s = e.gather(1, ids[r])
        e.exp_()
        if log_q_tail is not None:
            # Sum the tail with the support zeroed out, rather than 1 - P_S: exact even
            # when the support holds all but 1e-30 of the student's mass.
            e_s = e.gather(1, ids[r])
            if valid is None:
                tail = e.scatter_(1, ids[r], 0.0).sum(1)
            else:
                e_s.masked_fill_(~valid[r], 0.0)
                _put_support(e, ids[r], valid[r], 0.0)
                tail = e.sum(1)
            ls = (tail + e_s.sum(1)).log()
            lpt = (tail.clamp(min=P_TAIL_MIN).log() - ls).clamp(min=LOG_P_TAIL_MIN)
            log_p_tail[r] = lpt
        else:
            ls = e.sum(1).log()
        logp_s = z_s - ls[:, None]
        q = log_q[r].exp()
        rows = torch.where(q > 0, q * (log_q[r] - logp_s), 0.0).sum(1)
        if log_q_tail is not None:
            rows += _tail_term(log_q_tail[r], lpt)
        loss[r] = rows
        row_max[r] = m
        log_sum[r] = ls
    return loss, row_max, log_sum, log_p_tail


def _tail_term(log_q_tail, log_p_tail):
    q_tail = log_q_tail.exp()
    return torch.where(q_tail > 0, q_tail * (log_q_tail - log_p_tail), 0.0)


def _torch_backward(logits, topk_ids, log_q, q_grad, coef, inv_sum, row_max, scale, inv_t,
                    grad):
    n, v = logits.shape
    cdt = log_q.dtype
    ids, valid = _support_slots(topk_ids)
    step = _rows_per_chunk(v)
    # fp32 logits: the gradient rows themselves are the scratch.
    scratch = None if grad.dtype == cdt else torch.empty(min(n, step), v, dtype=cdt,
                                                         device=logits.device)
    for r0 in range(0, n, step):
        r = slice(r0, r0 + step)
        chunk = logits[r]
        e = grad[r] if scratch is None else scratch[: chunk.shape[0]]
        _shift(chunk, inv_t, row_max[r], e)
        p_s = e.gather(1, ids[r]).exp_().mul_(inv_sum[r, None])
        # coef * scale alone may overflow (see _backward_row_terms); e * coef does not.
        e.exp_().mul_(coef[r, None]).mul_(scale[r, None])
        support = (q_grad[r, None] * p_s - log_q[r].exp()) * scale[r, None]
        if valid is None:
            e.scatter_(1, ids[r], support)
        else:
            _put_support(e, ids[r], valid[r], support)
        if scratch is not None:
            grad[r] = e


def _backward_row_terms(log_q, log_q_tail, log_sum, log_p_tail):
    """Per-row factors of the gradient (before grad_output), shared by both paths.

    Returns (Q, coef, 1 / S) with S = sum_j exp(z_j - m): off the support
    dz_j = exp(z_j - m) * coef, coef = (Q - q_tail / p_tail) / S; the support entries
    are Q p_s - q_s instead. q_tail / p_tail <= 1 / P_TAIL_MIN is finite in
    fp32, and since p_j <= p_tail off the support each product stays <= q_tail; only
    coef times a large grad_output could overflow, so that is applied last.
    """
    inv_sum = torch.exp(-log_sum)
    q_grad = log_q.exp().sum(1)
    if log_q_tail is None:
        return q_grad, q_grad * inv_sum, inv_sum
    # A log p_tail clamped at the floor is constant in z: its term has no gradient, as
    # in the loss actually computed.
    live = log_p_tail > LOG_P_TAIL_MIN
    ratio = torch.where(live, torch.exp(log_q_tail - log_p_tail), 0.0)
    q_grad = q_grad + torch.where(live, log_q_tail.exp(), 0.0)
    return q_grad, (q_grad - ratio) * inv_sum, inv_sum


# The tail mass comes from one fp64 difference, sum over all logits minus sum over the
# support, of bit-identical fp32 exp terms: exact to ~1e-15 of the row's sum (to fp32
# rounding if an off-support logit is the row's max, when p_tail > 1 / (k + 1)), in a
# single streaming pass as fast as a plain logsumexp. Rows whose tail is below
# EXACT_TAIL_BELOW of the sum get a second pass, in a kernel of its own (the rare path
# inside the common kernel slowed it by up to 1.6x on an H100), that sums the tail on
# its own with its own running max, walking the row's support ids in ascending order
# alongside the stream (a handful per block: k + nblocks steps per row, not a
# comparison of every logit with all k ids). The backward walks the ids the same way to
# write the support lanes in its single pass.
#
# The gradient is computed in the backward, from the saved per-row statistics, not
# written during the forward as Liger's cross-entropy does. The traffic is the same
# (forward: one read; backward: one read, one write; Liger: two reads and a write in the
# forward), but the logits stay intact (the training loss adds CE on the same logits, so
# they cannot be overwritten with the gradient), no [N, V] gradient is held from the
# forward to the backward or computed at all under no_grad, and grad_output is applied
# in the same pass instead of a second one.
EXACT_TAIL_BELOW = 2.0**-30

if triton is not None:

    @triton.jit
    def _sparse_kl_fwd_kernel(
        logits_ptr, stride_row, ids_ptr, log_q_ptr, q_sum_ptr,
        loss_ptr, row_max_ptr, log_sum_ptr, tail_share_ptr,
        V, K, inv_t,
        HAS_TAIL: tl.constexpr, TEMPERED: tl.constexpr, ACC: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Support terms of the loss, row max, log-sum-exp, tail share of the sum. ACC is
        the dtype of the row's sum: fp64 with the tail, whose share is a difference of two
        sums, fp32 otherwise (see fused_linear_kl._acc_dtype for the measured errors)."""
        row = tl.program_id(0).to(tl.int64)
        z_row = logits_ptr + row * stride_row
        q_sum = tl.load(q_sum_ptr + row)
        loss = 0.0
        m = 0.0
        log_sum = 0.0
        share = 1.0
        # Q == 0: a padding row (or a teacher with no mass): loss and gradient are 0.
        if q_sum > 0:
            k_off = tl.arange(0, BLOCK_K)
            ids = tl.load(ids_ptr + row * K + k_off, mask=k_off < K, other=-1)
            # Padding slots (id -1) are not in the support: no z_s, no q.
            k_mask = (k_off < K) & (ids >= 0)
            z_s = tl.load(z_row + ids, mask=k_mask, other=0.0).to(tl.float32)
            if TEMPERED:
                z_s = z_s * inv_t
            z_s = tl.where(k_mask, z_s, -float("inf"))
            # The running max starts at the support's max and moves only if an
            # off-support logit beats every support logit, which forces
            # p_tail > 1 / (k + 1). Otherwise each exp term of the stream is bit-identical
            # to the one recomputed from z_s below, and only the ACC sums round.
            m = tl.max(z_s, 0)
            acc = tl.zeros([], dtype=ACC)
            for start in range(0, V, BLOCK_V):
                off = start + tl.arange(0, BLOCK_V)
                z = tl.load(z_row + off, mask=off < V, other=-float("inf")).to(tl.float32)
                if TEMPERED:
                    z = z * inv_t
                m_new = tl.maximum(m, tl.max(z, 0))
                acc = acc * tl.exp(m - m_new).to(ACC) + tl.sum(tl.exp(z - m_new).to(ACC), 0)
                m = m_new
            log_sum = tl.log(acc.to(tl.float32))
            if HAS_TAIL:
                tail = acc - tl.sum(tl.exp(z_s - m).to(ACC), 0)
                share = (tl.maximum(tail, 0.0) / acc).to(tl.float32)
            logp_s = tl.where(k_mask, (z_s - m) - log_sum, 0.0)
            log_q = tl.load(log_q_ptr + row * K + k_off, mask=k_mask, other=-float("inf"))
            # q = 0 terms are 0; the wheres keep 0 * inf (NaN) out of the sum.
            q = tl.exp(log_q)
            loss = tl.sum(q * (tl.where(q > 0, log_q, 0.0) - logp_s), 0)
        tl.store(loss_ptr + row, loss)
        tl.store(row_max_ptr + row, m)
        tl.store(log_sum_ptr + row, log_sum)
        if HAS_TAIL:
            tl.store(tail_share_ptr + row, share)

    @triton.jit
    def _exact_log_p_tail(z_row, ids_row, V, K, m, log_sum, BLOCK_V: tl.constexpr):
        """log p_tail of one row from the tail alone (support masked out, its own running
        max), for rows whose tail share is too small for the difference acc - sum_S.
        ids_row ascending; m, log_sum: the row's max and log-sum-exp relative to it. T = 1.
        Padding ids (-1) sort first and are stepped over in the first block: no lane
        equals -1, so they mask nothing."""
        m_t = -float("inf")
        acc_t = 0.0
        p = 0
        nxt = tl.load(ids_row)
        for start in range(0, V, BLOCK_V):
            off = start + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + off, mask=off < V, other=-float("inf")).to(tl.float32)
            while nxt < start + BLOCK_V:
                z = tl.where(off == nxt, -float("inf"), z)
                p += 1
                nxt = tl.load(ids_row + p, mask=p < K, other=V + BLOCK_V)
            m_new = tl.maximum(m_t, tl.max(z, 0))
            # No tail lane seen yet: any finite reference keeps the sum at 0.
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            acc_t = acc_t * tl.exp(m_t - m_ref) + tl.sum(tl.exp(z - m_ref), 0)
            m_t = m_new
        # acc_t is 0 (empty tail, m_t = -inf) or >= 1 (its max lane adds 1).
        return (m_t - m) + tl.log(tl.maximum(acc_t, 1.0)) - log_sum

    @triton.jit
    def _sparse_kl_tail_kernel(
        logits_ptr, stride_row, ids_ptr, row_max_ptr, log_sum_ptr, tail_share_ptr,
        log_p_tail_ptr, V, K, exact_tail_below, BLOCK_V: tl.constexpr,
    ):
        """log p_tail; rows with a tiny tail share sum the tail exactly. (T = 1 only.)"""
        row = tl.program_id(0).to(tl.int64)
        share = tl.load(tail_share_ptr + row)
        if share >= exact_tail_below:
            log_pt = tl.log(share)
        else:
            log_pt = _exact_log_p_tail(logits_ptr + row * stride_row, ids_ptr + row * K, V, K,
                                       tl.load(row_max_ptr + row), tl.load(log_sum_ptr + row), BLOCK_V)
        tl.store(log_p_tail_ptr + row, log_pt)

    @triton.jit
    def _sparse_kl_bwd_kernel(
        logits_ptr, stride_row, grad_ptr, stride_grad_row,
        ids_ptr, log_q_ptr, q_grad_ptr, scale_ptr, coef_ptr, inv_sum_ptr, row_max_ptr,
        V, K, inv_t,
        TEMPERED: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = logits_ptr + row * stride_row
        g_row = grad_ptr + row * stride_grad_row
        ids_row = ids_ptr + row * K
        log_q_row = log_q_ptr + row * K
        out_ty = grad_ptr.dtype.element_ty
        q_grad = tl.load(q_grad_ptr + row)
        scale = tl.load(scale_ptr + row)
        if (q_grad > 0) & (scale != 0):
            m = tl.load(row_max_ptr + row)
            coef = tl.load(coef_ptr + row)
            q_inv_sum = q_grad * tl.load(inv_sum_ptr + row)
            p = 0
            nxt = tl.load(ids_row)
            for start in range(0, V, BLOCK_V):
                off = start + tl.arange(0, BLOCK_V)
                z = tl.load(z_row + off, mask=off < V, other=-float("inf")).to(tl.float32)
                if TEMPERED:
                    z = z * inv_t
                e = tl.exp(z - m)
                dz = e * coef
                # Ascending ids: the leading padding (-1, q = 0) matches no lane.
                while nxt < start + BLOCK_V:
                    q_s = tl.exp(tl.load(log_q_row + p))
                    dz = tl.where(off == nxt, q_inv_sum * e - q_s, dz)
                    p += 1
                    nxt = tl.load(ids_row + p, mask=p < K, other=V + BLOCK_V)
                # Scaled last: coef * scale alone may overflow (see _backward_row_terms).
                tl.store(g_row + off, (dz * scale).to(out_ty), mask=off < V)
        else:
            for start in range(0, V, BLOCK_V):
                off = start + tl.arange(0, BLOCK_V)
                tl.store(g_row + off, tl.zeros([BLOCK_V], dtype=out_ty), mask=off < V)


def _block_v(logits, gpu_block_v):
    return min(gpu_block_v if logits.is_cuda else INTERPRETER_BLOCK_V,
               triton.next_power_of_2(logits.shape[1]))


def _triton_forward(logits, topk_ids, log_q, log_q_tail, inv_t):
    n, v = logits.shape
    k = topk_ids.shape[1]
    has_tail = log_q_tail is not None
    q_sum = log_q.exp().sum(1)
    if has_tail:
        q_sum += log_q_tail.exp()
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    row_max = torch.empty_like(loss)
    log_sum = torch.empty_like(loss)
    # Without the tail the kernel never touches this pointer: any tensor stands in.
    tail_share = torch.empty_like(loss) if has_tail else loss
    _sparse_kl_fwd_kernel[(n,)](
        logits, logits.stride(0), topk_ids, log_q, q_sum,
        loss, row_max, log_sum, tail_share,
        v, k, inv_t,
        HAS_TAIL=has_tail, TEMPERED=inv_t != 1.0, ACC=tl.float64 if has_tail else tl.float32,
        BLOCK_V=_block_v(logits, GPU_FWD_BLOCK_V), BLOCK_K=max(16, triton.next_power_of_2(k)),
        num_warps=GPU_NUM_WARPS,
    )
    if not has_tail:
        return loss, row_max, log_sum, None
    log_p_tail = torch.empty_like(loss)
    _sparse_kl_tail_kernel[(n,)](
        logits, logits.stride(0), topk_ids, row_max, log_sum, tail_share, log_p_tail,
        v, k, EXACT_TAIL_BELOW,
        BLOCK_V=_block_v(logits, GPU_FWD_BLOCK_V), num_warps=GPU_NUM_WARPS,
    )
    log_p_tail.clamp_(min=LOG_P_TAIL_MIN)
    loss += _tail_term(log_q_tail, log_p_tail)
    return loss, row_max, log_sum, log_p_tail


def _triton_backward(logits, topk_ids, log_q, q_grad, coef, inv_sum, row_max, scale, inv_t,
                     grad):
    n, v = logits.shape
    _sparse_kl_bwd_kernel[(n,)](
        logits, logits.stride(0), grad, grad.stride(0),
        topk_ids, log_q, q_grad, scale, coef, inv_sum, row_max,
        v, topk_ids.shape[1], inv_t,
        TEMPERED=inv_t != 1.0, BLOCK_V=_block_v(logits, GPU_BWD_BLOCK_V),
        num_warps=GPU_NUM_WARPS,
    )


class SparseKLFunction(torch.autograd.Function):
    """Per-row sparse KL [N] (already scaled by T^2); gradient w.r.t. the logits only.

    ``log_q`` [N, k] and ``log_q_tail`` [N] (or None) are the teacher's log-probs as the
    loss sees them (tempered, padding rows at -inf); see ``sparse_kl_loss``.
    """

    @staticmethod
    def forward(ctx, logits, topk_ids, log_q, log_q_tail, temperature, use_triton):
        if use_triton:
            # The kernels walk each row's support in ascending id order.
            topk_ids, order = topk_ids.sort(dim=1)
            log_q = log_q.gather(1, order)
        forward = _triton_forward if use_triton else _torch_forward
        loss, row_max, log_sum, log_p_tail = forward(logits, topk_ids, log_q, log_q_tail,
                                                     1.0 / temperature)
        if temperature != 1.0:
            loss.mul_(temperature**2)
        ctx.save_for_backward(logits, topk_ids, log_q, log_q_tail, row_max, log_sum,
                              log_p_tail)
        ctx.temperature = temperature
        ctx.use_triton = use_triton
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, topk_ids, log_q, log_q_tail, row_max, log_sum, log_p_tail = ctx.saved_tensors
        t = ctx.temperature
        q_grad, coef, inv_sum = _backward_row_terms(log_q, log_q_tail, log_sum, log_p_tail)
        # d/dz of T^2 * KL(u = z / T) is T * dKL/du.
        scale = (grad_loss.to(coef.dtype) * t).contiguous()
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        backward = _triton_backward if ctx.use_triton else _torch_backward
        backward(logits, topk_ids, log_q, q_grad, coef, inv_sum, row_max, scale, 1.0 / t, grad)
        return grad, None, None, None, None, None


def _teacher_log_probs(topk_logprobs, tail_logmass, mask, temperature, dtype):
    log_q = topk_logprobs.to(dtype)
    log_q_tail = None
    if temperature != 1.0:
        log_q = torch.log_softmax(log_q / temperature, dim=1)
    elif tail_logmass is not None:
        log_q_tail = tail_logmass.to(dtype)
    if mask is not None:
        # Padding rows get no teacher mass (Q = 0): zero loss and gradient, whatever
        # their cached values hold.
        log_q = log_q.masked_fill(~mask[:, None], -math.inf)
        if log_q_tail is not None:
            log_q_tail = log_q_tail.masked_fill(~mask, -math.inf)
    return log_q.contiguous(), None if log_q_tail is None else log_q_tail.contiguous()


def sparse_kl_loss(
    logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor | None,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """KL(teacher || student) over the teacher's cached support plus a tail bucket.

    Args:
        logits: [N, V] student logits (fp32, bf16, fp16; fp64 on the torch path).
        topk_ids: [N, k] int64 or int32 support ids, distinct within a row, or -1 for a
            padding slot (ragged supports padded to width k): a padding slot is absent,
            neither teacher mass nor part of the support that the student's tail bucket
            excludes. Slots may be padded anywhere in the row, a row may have 1..k real
            slots, and only masked rows may be padded throughout.
        topk_logprobs: [N, k] teacher log-probs at temperature 1, normalised over the
            full vocabulary (-inf for zero mass); must be -inf at every padding slot.
        tail_logmass: [N] log(1 - sum_k p_teacher), the sum over the real slots; None
            disables the tail term, and -inf (a teacher whose support holds all of its
            mass, e.g. sampled supports with log q = log(count / samples)) makes it 0.
            Ignored when ``temperature != 1`` (only the tail's total mass is known, not
            the shape that tempering it would need).
        mask: [N] bool, False marks padding rows (zero loss, zero gradient).
        temperature: T. The student uses log_softmax(logits / T), the teacher's support
            is renormalised to q_s proportional to exp(lp_s / T), and the loss is scaled
            by T^2 (Hinton et al.) so gradient magnitudes match T = 1.
        reduction: "mean" over unmasked rows, "sum", or "none" ([N], 0 at padding).
        impl: "triton", "torch", or "auto" (triton on CUDA logits, else torch).

    Returns:
        fp32 loss (fp64 for fp64 logits on the torch path); the gradient w.r.t. ``logits``
        comes back in the logits' dtype. The teacher inputs receive no gradient.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    n = logits.shape[0]
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_logprobs.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_logprobs must both be [{n}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}")
    if tail_logmass is not None and tail_logmass.shape != (n,):
        raise ValueError(f"tail_logmass must be [{n}], got {tuple(tail_logmass.shape)}")
    if mask is not None and mask.shape != (n,):
        raise ValueError(f"mask must be [{n}], got {tuple(mask.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if impl == "auto":
        impl = "triton" if logits.is_cuda and triton is not None else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton', 'torch' or 'auto', got {impl!r}")
    if impl == "triton" and triton is None:
        raise RuntimeError("impl='triton' needs the triton package")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    cdt = torch.float64 if logits.dtype == torch.float64 and impl == "torch" else torch.float32
    log_q, log_q_tail = _teacher_log_probs(topk_logprobs, tail_logmass, mask, temperature, cdt)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows = SparseKLFunction.apply(logits, topk_ids.contiguous(), log_q, log_q_tail,
                                  float(temperature), impl == "triton")
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (max(n, 1) if mask is None else mask.sum().clamp(min=1))


class SparseKLLoss(nn.Module):
    """``sparse_kl_loss`` with its temperature, reduction and implementation fixed."""

    def __init__(self, temperature: float = 1.0, reduction: str = "mean", impl: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.impl = impl

    def forward(self, logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                tail_logmass: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return sparse_kl_loss(logits, topk_ids, topk_logprobs, tail_logmass, mask,
                              self.temperature, self.reduction, self.impl)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, impl={self.impl!r}"
