"""Sparse KL (kernels/sparse_kl.py) against a dense fp64 autograd reference.

Runs on CUDA when available (the Triton kernel compiled), else on CPU with the Triton
kernel under the interpreter.
"""

import math

import pytest
import torch
from triton_params import DEVICE, IMPLS

from ddk.kernels import sparse_kl as sk

# Loss and gradient tolerances against the fp64 reference. bf16 logits are exact inputs
# to both sides and all arithmetic is fp32, so the bf16 loss is as tight as fp32; its
# gradient is rounded to bf16 on the way out: half a step (2^-8) on GPU, a whole step
# (2^-7) under the interpreter, whose fp32 -> bf16 cast truncates.
FP32_LOSS = dict(rtol=1e-5, atol=1e-6)
FP32_GRAD = dict(rtol=1e-5, atol=1e-7)
BF16_LOSS = dict(rtol=1e-5, atol=1e-6)
BF16_GRAD = dict(rtol=1e-2, atol=1e-7)
TOL = {torch.float32: (FP32_LOSS, FP32_GRAD), torch.bfloat16: (BF16_LOSS, BF16_GRAD)}


def reference(logits, ids, logprobs, tail, mask, temperature):
    """Per-row loss and its autograd gradient, fp64, straight from the formula."""
    z = logits.detach().double().requires_grad_()
    rows = torch.arange(z.shape[0], device=z.device)
    if mask is not None:
        rows = rows[mask]
    logp = torch.log_softmax(z[rows] / temperature, dim=1)
    log_q = logprobs[rows].double()
    if temperature != 1.0:
        log_q = torch.log_softmax(log_q / temperature, dim=1)
        tail = None
    q = log_q.exp()
    loss = torch.where(q > 0, q * (log_q - logp.gather(1, ids[rows].long())), 0.0).sum(1)
    if tail is not None:
        log_p_tail = logp.scatter(1, ids[rows].long(), -math.inf).logsumexp(1)
        log_p_tail = log_p_tail.clamp(min=sk.LOG_P_TAIL_MIN)
        log_qt = tail[rows].double()
        qt = log_qt.exp()
        loss = loss + torch.where(qt > 0, qt * (log_qt - log_p_tail), 0.0)
    full = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    return full.index_put((rows,), loss * temperature**2), z


def teacher(n, v, k, gen, scale=2.0):
    """Top-k of a random teacher: ids (shuffled within the row), log-probs, tail mass."""
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * scale
    log_p = torch.log_softmax(t, dim=1)
    lp, ids = log_p.topk(k, dim=1)
    perm = torch.argsort(torch.rand(n, k, generator=gen), dim=1)
    lp, ids = lp.gather(1, perm), ids.gather(1, perm)
    tail = torch.log1p(-lp.exp().sum(1))
    return ids.to(DEVICE), lp.float().to(DEVICE), tail.float().to(DEVICE)


def run(impl, logits, ids, lp, tail, mask=None, temperature=1.0, weights=None):
    x = logits.detach().clone().requires_grad_()
    rows = sk.sparse_kl_loss(x, ids, lp, tail, mask, temperature, reduction="none", impl=impl)
    w = torch.ones_like(rows) if weights is None else weights
    (rows * w).sum().backward()
    return rows.detach(), x.grad


def check(impl, logits, ids, lp, tail, mask=None, temperature=1.0, weights=None, tol=None):
    loss_tol, grad_tol = tol or TOL[logits.dtype]
    rows, grad = run(impl, logits, ids, lp, tail, mask, temperature, weights)
    ref_rows, z = reference(logits, ids, lp, tail, mask, temperature)
    w = torch.ones_like(ref_rows) if weights is None else weights.double()
    (ref_rows * w).sum().backward()
    assert rows.dtype == torch.float32 and grad.dtype == logits.dtype
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.double(), ref_rows.detach(), **loss_tol)
    torch.testing.assert_close(grad.double(), z.grad, **grad_tol)
    if mask is not None:
        assert (grad[~mask] == 0).all() and (rows[~mask] == 0).all()


# (N, V, k): V = 151936 is not a power of two; k is ragged across cases.
SHAPES = [(6, 1000, 1), (5, 1000, 128), (4, 32000, 64), (3, 151936, 37)]
MODES = {"tail": (True, 1.0), "no_tail": (False, 1.0), "T2": (True, 2.0)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(impl, dtype, mode, shape):
    n, v, k = shape
    use_tail, temperature = MODES[mode]
    gen = torch.Generator().manual_seed(n * v + k)
    ids, lp, tail = teacher(n, v, k, gen)
    logits = (torch.randn(n, v, generator=gen) * 3).to(DEVICE, dtype)
    mask = torch.ones(n, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    lp[1], tail[1] = math.nan, math.nan  # a padding row's cache slot may hold anything
    # Unequal upstream gradients per row, one of them 0 on a live row.
    weights = torch.rand(n, generator=gen).to(DEVICE)
    weights[-1] = 0.0
    check(impl, logits, ids, lp, tail if use_tail else None, mask, temperature, weights)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_v", [16, 128])
@pytest.mark.parametrize("mode", list(MODES))
def test_many_blocks_per_row(impl, block_v, mode, monkeypatch):
    """Rows streamed in many blocks: rising logits move the running maxima block after
    block, the support fills whole blocks, shares some and misses others, and one row's
    tail is small enough for the exact tail pass."""
    monkeypatch.setattr(sk, "GPU_FWD_BLOCK_V", block_v)
    monkeypatch.setattr(sk, "GPU_BWD_BLOCK_V", block_v)
    monkeypatch.setattr(sk, "INTERPRETER_BLOCK_V", block_v)
    n, v, k = 3, 1000, 48
    use_tail, temperature = MODES[mode]
    gen = torch.Generator().manual_seed(11)
    rest = [32 + torch.randperm(v - 32, generator=gen)[: k - 32] for _ in range(n)]
    ids = torch.stack([torch.cat([torch.arange(32), r]) for r in rest])
    ids = ids.gather(1, torch.argsort(torch.rand(n, k, generator=gen), dim=1)).to(DEVICE)
    lp = torch.log_softmax(torch.randn(n, k, generator=gen), dim=1) + math.log(0.8)
    tail = torch.full((n,), math.log(0.2))
    logits = torch.randn(n, v, generator=gen) + torch.linspace(0.0, 20.0, v)
    logits[0].scatter_(0, ids[0].cpu(), 60.0)  # p_tail ~ 1e-15: the exact tail pass
    check(impl, logits.to(DEVICE), ids, lp.to(DEVICE), tail.to(DEVICE) if use_tail else None,
          temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_logits(impl):
    gen = torch.Generator().manual_seed(7)
    ids, lp, tail = teacher(3, 1000, 16, gen)
    logits = (torch.randn(3, 1000, generator=gen) * 3).to(DEVICE, torch.float16)
    check(impl, logits, ids, lp, tail, tol=(FP32_LOSS, dict(rtol=1e-3, atol=1e-7)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extreme_logits(impl, dtype):
    """1e4-scale logits, teacher log-probs at ~0 and -inf: finite and still exact."""
    n, v, k = 4, 2000, 8
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]).to(DEVICE)
    logits = (torch.randn(n, v, generator=gen) * 1e4).to(DEVICE, dtype)
    lp = torch.full((n, k), -math.inf, device=DEVICE)
    lp[:, 0] = math.log1p(-1e-6)  # near-certain teacher
    lp[:, 1] = math.log(1e-6) - 1.0
    tail = torch.log1p(-lp.exp().sum(1))
    tail[0] = -math.inf  # no teacher mass outside the support
    check(impl, logits, ids, lp, tail, tol=(dict(rtol=1e-5, atol=1e-5), TOL[dtype][1]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("log_qt", [-math.inf, -40.0, math.log(0.1)], ids=["qt0", "qt_tiny", "qt"])
def test_student_tail_underflows(impl, log_qt):
    """One huge support logit: p_tail ~ exp(-1e4) underflows and log p_tail is clamped.

    A ~0 teacher tail keeps its term ~0; a real one gives a large finite loss whose tail
    term, constant in z at the clamp, has no gradient.
    """
    n, v, k = 3, 1000, 4
    gen = torch.Generator().manual_seed(2)
    ids, lp, _ = teacher(n, v, k, gen)
    logits = torch.randn(n, v, generator=gen).to(DEVICE)
    logits.scatter_(1, ids[:, :1], 1e4)
    tail = torch.full((n,), log_qt, device=DEVICE)
    check(impl, logits, ids, lp, tail, weights=torch.full((n,), 10.0, device=DEVICE))


@pytest.mark.parametrize("impl", IMPLS)
def test_tail_near_floor_large_upstream_grad(impl):
    """p_tail ~ e^-86, just above the clamp: q_tail / p_tail ~ 1e37, finite only until
    it meets a large grad_output, so the kernel must not form their product."""
    n, v, k = 2, 64, 4
    gen = torch.Generator().manual_seed(10)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]).to(DEVICE)
    logits = torch.full((n, v), -1e4, device=DEVICE)
    logits.scatter_(1, ids, torch.tensor([0.0, -1.0, -2.0, -3.0], device=DEVICE).expand(n, k))
    off_support = torch.ones(n, v, dtype=torch.bool, device=DEVICE).scatter_(1, ids, False)
    logits[0, off_support[0].nonzero()[0]] = -86.0
    logits[1, off_support[1].nonzero()[0]] = -80.0
    lp = (torch.log_softmax(torch.randn(n, k, generator=gen), dim=1) + math.log(0.5)).to(DEVICE)
    tail = torch.full((n,), math.log(0.5), device=DEVICE)
    # exp and log of arguments near 86 carry an absolute error ~86 eps into q_tail / p_tail.
    tol = (dict(rtol=1e-5, atol=1e-6), dict(rtol=2e-5, atol=1e-7))
    check(impl, logits, ids, lp, tail, weights=torch.full((n,), 100.0, device=DEVICE), tol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_support_covers_vocab(impl):
    """V == k: the student tail is empty (p_tail = 0 exactly) and so is the teacher's."""
    gen = torch.Generator().manual_seed(3)
    ids, lp, tail = teacher(3, 16, 16, gen)
    tail.fill_(-math.inf)
    check(impl, torch.randn(3, 16, generator=gen).to(DEVICE), ids, lp, tail)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("boost", [25.0, 30.0])
def test_tiny_student_tail_keeps_precision(impl, boost):
    """p_tail ~ 3e-8 or 2e-10 (either side of the kernel's EXACT_TAIL_BELOW) against
    q_tail = 0.1: no cancellation in 1 - sum_S p_s."""
    n, v, k = 3, 2000, 8
    gen = torch.Generator().manual_seed(4)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]).to(DEVICE)
    logits = torch.randn(n, v, generator=gen).to(DEVICE)
    logits.scatter_(1, ids, boost + torch.randn(n, k, generator=gen).to(DEVICE))
    lp = (torch.log_softmax(torch.randn(n, k, generator=gen), dim=1) + math.log(0.9)).to(DEVICE)
    tail = torch.full((n,), math.log(0.1), device=DEVICE)
    check(impl, logits, ids, lp, tail)


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_ids(impl):
    gen = torch.Generator().manual_seed(5)
    ids, lp, tail = teacher(3, 1000, 16, gen)
    logits = torch.randn(3, 1000, generator=gen).to(DEVICE)
    check(impl, logits, ids.int(), lp, tail)


@pytest.mark.parametrize("impl", IMPLS)
def test_reductions_ignore_masked_rows(impl):
    gen = torch.Generator().manual_seed(6)
    n, v, k = 6, 1000, 16
    ids, lp, tail = teacher(n, v, k, gen)
    logits = torch.randn(n, v, generator=gen).to(DEVICE)
    mask = torch.tensor([True, False, True, True, False, True], device=DEVICE)
    mean = sk.sparse_kl_loss(logits, ids, lp, tail, mask, impl=impl)
    live = sk.sparse_kl_loss(logits[mask], ids[mask], lp[mask], tail[mask], impl=impl)
    total = sk.sparse_kl_loss(logits, ids, lp, tail, mask, reduction="sum", impl=impl)
    rows = sk.sparse_kl_loss(logits, ids, lp, tail, mask, reduction="none", impl=impl)
    torch.testing.assert_close(mean, live, **FP32_LOSS)
    torch.testing.assert_close(total, rows.sum(), **FP32_LOSS)
    torch.testing.assert_close(mean, total / 4, **FP32_LOSS)
    assert (rows[~mask] == 0).all()
    none_live = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    assert sk.sparse_kl_loss(logits, ids, lp, tail, none_live, impl=impl).item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradcheck_torch_fp64(temperature):
    gen = torch.Generator().manual_seed(8)
    ids, lp, tail = teacher(3, 12, 4, gen)
    mask = torch.tensor([True, False, True], device=DEVICE)
    z = torch.randn(3, 12, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()

    def f(x):
        return sk.sparse_kl_loss(x, ids, lp, tail, mask, temperature, reduction="none",
                                 impl="torch")

    assert torch.autograd.gradcheck(f, (z,))


def test_module_matches_function():
    gen = torch.Generator().manual_seed(9)
    ids, lp, tail = teacher(4, 500, 8, gen)
    logits = torch.randn(4, 500, generator=gen).to(DEVICE)
    module = sk.SparseKLLoss(temperature=2.0, reduction="sum", impl="torch")
    torch.testing.assert_close(
        module(logits, ids, lp, tail),
        sk.sparse_kl_loss(logits, ids, lp, tail, temperature=2.0, reduction="sum", impl="torch"))


def test_rejects_bad_arguments():
    logits = torch.randn(2, 10)
    ids = torch.zeros(2, 3, dtype=torch.long)
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        sk.sparse_kl_loss(logits[0], ids, lp, None)
    with pytest.raises(ValueError):
        sk.sparse_kl_loss(logits, ids[:1], lp[:1], None)
    with pytest.raises(ValueError):
        sk.sparse_kl_loss(logits, ids, lp, None, reduction="avg")


# Ragged supports: padding slots (id -1, log-prob -inf) anywhere in a row.
RAGGED_K = 8
# Per row: the slots that hold real ids (the rest are padding). Row 1 is masked and
# padded throughout; row 2 has a single real slot; the others pad at the end, in the
# middle, at the front, or not at all.
RAGGED_SLOTS = [range(6), [], [0], [0, 1, 2, 3, 4], [0, 2, 5, 7], [6, 7], [1, 3, 4], range(8)]
RAGGED_MASKED = 1
RAGGED_CONFIDENT = 3  # its student tail share is far below sk.EXACT_TAIL_BELOW


def ragged_teacher(n, v, gen, slots=RAGGED_SLOTS, k=RAGGED_K):
    """A teacher top-k cut to each row's slots: (ids, lp, tail) padded to width k, and
    per row the dense (ids, lp) of its real slots alone. Id 0 is a real id of row 0 (which
    has padding too) and of no other row: the torch path's padding gathers from id 0, and
    a padding slot that wrote there would show."""
    t = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    t[:, 0] = -30.0
    t[0, 0] = 10.0
    lp_full, ids_full = torch.log_softmax(t, dim=1).topk(k, dim=1)
    ids = torch.full((n, k), -1, dtype=torch.long)
    lp = torch.full((n, k), -math.inf, dtype=torch.float64)
    dense = []
    for i, row in enumerate(slots):
        row = list(row)
        row_ids, row_lp = ids_full[i, : len(row)], lp_full[i, : len(row)]
        ids[i, row], lp[i, row] = row_ids, row_lp
        dense.append((row_ids.to(DEVICE), row_lp.float().to(DEVICE)))
    tail = torch.log1p(-lp.exp().sum(1))
    return ids.to(DEVICE), lp.float().to(DEVICE), tail.float().to(DEVICE), dense


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_v", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_ragged_support_matches_dense_rows(impl, block_v, dtype, mode, monkeypatch):
    """Each ragged row gives the loss and gradient of the fp64 reference on its real
    entries alone (a dense row of narrower k); a masked row may be all padding. One
    row's tail share is tiny (the exact tail pass, its ids led by padding); block_v=128
    streams rows in many blocks."""
    if block_v is not None:
        for name in ("GPU_FWD_BLOCK_V", "GPU_BWD_BLOCK_V", "INTERPRETER_BLOCK_V"):
            monkeypatch.setattr(sk, name, block_v)
    use_tail, temperature = MODES[mode]
    n, v = len(RAGGED_SLOTS), 1000
    gen = torch.Generator().manual_seed(12)
    ids, lp, tail, dense = ragged_teacher(n, v, gen)
    logits = torch.randn(n, v, generator=gen) * 3
    conf = dense[RAGGED_CONFIDENT][0].cpu()
    logits[RAGGED_CONFIDENT, conf] = 60.0 + torch.randn(len(conf), generator=gen)
    logits = logits.to(DEVICE, dtype)
    mask = torch.ones(n, dtype=torch.bool, device=DEVICE)
    mask[RAGGED_MASKED] = False
    lp[RAGGED_MASKED], tail[RAGGED_MASKED] = math.nan, math.nan
    weights = torch.rand(n, generator=gen).to(DEVICE) + 0.5
    tail = tail if use_tail else None
    rows, grad = run(impl, logits, ids, lp, tail, mask, temperature, weights)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    loss_tol, grad_tol = TOL[dtype]
    assert rows[RAGGED_MASKED] == 0 and (grad[RAGGED_MASKED] == 0).all()
    for i, (row_ids, row_lp) in enumerate(dense):
        if i == RAGGED_MASKED:
            continue
        row_tail = None if tail is None else tail[i : i + 1]
        ref_row, z = reference(logits[i : i + 1], row_ids[None], row_lp[None], row_tail, None,
                               temperature)
        (ref_row * weights[i].double()).sum().backward()
        torch.testing.assert_close(rows[i : i + 1].double(), ref_row.detach(), **loss_tol)
        torch.testing.assert_close(grad[i : i + 1].double(), z.grad, **grad_tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_tail", [True, False], ids=["tail_-inf", "no_tail"])
def test_sampled_support_without_tail_mass(impl, dtype, with_tail):
    """Sampled supports: q = count / samples over the distinct sampled ids (padded
    ragged), tail_logmass = -inf on every row. Against the plain dense KL(q || softmax(z)),
    whose gradient is softmax(z) - q."""
    n, v, k, samples = 5, 1000, 16, 12
    gen = torch.Generator().manual_seed(13)
    teacher_p = torch.softmax(torch.randn(n, v, generator=gen, dtype=torch.float64) * 2, dim=1)
    teacher_p[:, 0] = 0.0  # id 0, which padding aliases on the torch path, is never drawn
    counts = torch.zeros(n, v, dtype=torch.float64)
    for i in range(n):
        draws = torch.multinomial(teacher_p[i], samples if i else 1, replacement=True,
                                  generator=gen)
        counts[i].index_add_(0, draws, torch.ones(len(draws), dtype=torch.float64))
    q = counts / counts.sum(1, keepdim=True)
    ids = torch.full((n, k), -1, dtype=torch.long)
    lp = torch.full((n, k), -math.inf)
    for i in range(n):
        drawn = q[i].nonzero().squeeze(1)
        slots = torch.randperm(k, generator=gen)[: len(drawn)]
        ids[i, slots] = drawn
        lp[i, slots] = q[i, drawn].log().float()
    assert (ids < 0).any(1).all()
    # The target as the kernel sees it: q rounded to the fp32 log-probs it is given.
    q = torch.zeros(n, v, dtype=torch.float64)
    for i in range(n):
        real = ids[i] >= 0
        q[i, ids[i, real]] = lp[i, real].double().exp()
    logits = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    tail = torch.full((n,), -math.inf, device=DEVICE) if with_tail else None
    weights = torch.rand(n, generator=gen) + 0.5
    rows, grad = run(impl, logits.to(DEVICE), ids.to(DEVICE), lp.to(DEVICE), tail,
                     weights=weights.to(DEVICE))
    logp = torch.log_softmax(logits.double(), dim=1)
    ref_rows = torch.where(q > 0, q * (q.log() - logp), 0.0).sum(1)
    ref_grad = (logp.exp() - q) * weights.double()[:, None]
    loss_tol, grad_tol = TOL[dtype]
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.double().cpu(), ref_rows, **loss_tol)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, **grad_tol)
