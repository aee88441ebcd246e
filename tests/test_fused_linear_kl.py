"""Fused LM head + CE + sparse KL (kernels/fused_linear_kl.py) against the unfused path.

The reference is what the training loop computed before: logits = F.linear(h, W, b),
F.cross_entropy(logits.float()) + gamma * sparse_kl_loss(logits, impl="torch"), under
plain autograd. fp32 inputs are checked against that reference in fp64 (the same fp32
inputs, upcast); bf16 inputs and autocast against the same reference in the same
precision. The many-block tests (small blocks forced, as tests/test_sparse_kl.py does)
and the real-vocabulary ones use inputs whose logits are exact in bf16, so that fp32 and
bf16 runs both meet fp64 formulas written out here (dense_reference). Runs on CUDA when
available, else on CPU with the Triton kernel under the interpreter (small shapes).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from triton_params import DEVICE, IMPLS
from torch.utils._python_dispatch import TorchDispatchMode

from ddk.kernels import fused_linear_kl as fk
from ddk.kernels import sparse_kl as sk
from ddk.kernels.sparse_kl import sparse_kl_loss

IGNORE = -100

# fp32 against fp64 on the same inputs: fp32 matmuls and loss arithmetic only.
# Gradient entries that are ~0 by cancellation get an absolute tolerance relative to the
# tensor's largest entry.
FP32_TOL = dict(rtol=1e-5, rel_atol=1e-6)
# bf16 (and autocast) against the same computation unfused: both round the logits and
# their gradient to bf16 (2^-8 relative), but at different points (the fused path folds
# the 1/n mean into its fp32 gradient before rounding; the chunked matmuls and the
# chunk-by-chunk fp32 sum of dW round differently from one [N, V] matmul).
BF16_TOL = dict(rtol=2e-2, rel_atol=2e-2)
# The losses see the same bf16 logits on both sides, up to the rare element a chunked
# bf16 matmul rounds differently: fp32-level agreement, with margin.
BF16_LOSS_TOL = dict(rtol=1e-3, atol=1e-4)


# N = 37 tokens, H = 16, V = 300 with a teacher vocabulary of 280 (the LM head is padded),
# k = 8. Rows 8..15 are masked: with chunk_tokens = 8 that chunk is all padding.
N, H, V, TEACHER_V, K = 37, 16, 300, 280, 8
MASKED = [3, *range(8, 16)]
CONFIDENT_ROW = 5  # its support holds all but ~1e-18 of the student's mass


def make_problem(seed=0, n=N, h=H, v=V, teacher_v=TEACHER_V, k=K):
    """fp32 CPU tensors: hidden, weight, bias, targets, and a teacher top-k with its tail.

    The last hidden dimension is zero except on CONFIDENT_ROW, where it lifts that row's
    support logits by ~45 through the matching weight entries: the student tail share
    (~1e-18) is below the kernel's exact-tail threshold, and below what the difference
    1 - sum_S p resolves even in fp64.
    """
    gen = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(n, teacher_v, generator=gen, dtype=torch.float64) * 2
    lp, ids = torch.log_softmax(t_logits, dim=1).topk(k, dim=1)
    perm = torch.argsort(torch.rand(n, k, generator=gen), dim=1)  # unsorted support
    lp, ids = lp.gather(1, perm), ids.gather(1, perm)
    tail = torch.log1p(-lp.exp().sum(1))
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    bias = torch.randn(v, generator=gen) * 0.1
    hidden[:, -1] = 0.0
    weight[:, -1] = 0.0
    hidden[CONFIDENT_ROW, -1] = 1.0
    weight[ids[CONFIDENT_ROW], -1] = 45.0
    targets = torch.randint(0, teacher_v, (n,), generator=gen)
    targets[MASKED] = IGNORE
    return hidden, weight, bias, targets, ids, lp.float(), tail.float()


def _unfused(hidden, weight, bias, targets, kl_of_logits, gamma, scale):
    """Plain-autograd loss parts and the gradients of scale * loss; kl_of_logits(logits)
    gives the KL term (called only when gamma > 0)."""
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias) if x is not None]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    logits = F.linear(h, w, b)
    ce = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, targets,
                         ignore_index=IGNORE)
    kl = kl_of_logits(logits) if gamma > 0 else torch.zeros((), dtype=ce.dtype, device=ce.device)
    loss = ce + gamma * kl
    grads = torch.autograd.grad(loss * scale, leaves)
    return loss.detach(), ce.detach(), kl.detach(), grads


def reference(hidden, weight, bias, targets, ids, lp, tail, gamma, temperature, scale):
    """Unfused loss parts and the gradients of scale * loss, plain autograd."""
    return _unfused(hidden, weight, bias, targets,
                    lambda logits: sparse_kl_loss(logits, ids, lp, tail, mask=targets != IGNORE,
                                                  temperature=temperature, impl="torch"),
                    gamma, scale)


def fused(hidden, weight, bias, targets, ids, lp, tail, gamma, temperature, scale, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)
              if x is not None]
    b = leaves[2] if bias is not None else None
    loss, ce, kl = fk.fused_linear_distill_loss(
        leaves[0], leaves[1], targets, ids, lp, tail, gamma=gamma, temperature=temperature,
        bias=b, **kw)
    (loss * scale).backward()
    return loss.detach(), ce, kl, [x.grad for x in leaves]


def assert_close_scaled(actual, expected, rtol, rel_atol):
    atol = rel_atol * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# name: (gamma, temperature, use_tail, chunk_tokens, use_bias)
CASES = {
    # 37 = 4 x 8 + 5: a ragged last chunk, and chunk 8..15 entirely masked.
    "kd_tail_chunk8": (0.5, 1.0, True, 8, True),
    # chunk_tokens=None: the default, far above N, so one chunk.
    "kd_no_tail_one_chunk": (0.5, 1.0, False, None, False),
    # T = 2: tempered student and teacher, T^2 scaling; the tail is given but unused.
    "kd_T2_chunk16": (0.3, 2.0, True, 16, True),
    # gamma = 0: fused CE only, no teacher inputs at all.
    "ce_only_chunk5": (0.0, 1.0, False, 5, True),
}
DTYPES = ["fp32", "bf16", "autocast_bf16"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_unfused(impl, dtype, case):
    gamma, temperature, use_tail, chunk, use_bias = CASES[case]
    hidden, weight, bias, targets, ids, lp, tail = (x.to(DEVICE) for x in make_problem())
    bias = bias if use_bias else None
    tail = tail if use_tail else None
    if gamma == 0:
        ids = lp = tail = None
    scale = 1.5  # grad_output != 1
    args = (targets, ids, lp, tail, gamma, temperature, scale)
    if dtype == "fp32":
        ref_inputs = [None if x is None else x.double() for x in (hidden, weight, bias)]
        ref = reference(*ref_inputs, *args)
        out = fused(hidden, weight, bias, *args, chunk_tokens=chunk, impl=impl)
        loss_tol = dict(rtol=FP32_TOL["rtol"], atol=FP32_TOL["rel_atol"])
        grad_tol = FP32_TOL
    else:
        if dtype == "bf16":
            hidden, weight = hidden.bfloat16(), weight.bfloat16()
            bias = None if bias is None else bias.bfloat16()
        enabled = dtype == "autocast_bf16"
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=enabled):
            ref = reference(hidden, weight, bias, *args)
            out = fused(hidden, weight, bias, *args, chunk_tokens=chunk, impl=impl)
        loss_tol, grad_tol = BF16_LOSS_TOL, BF16_TOL
    loss, ce, kl, grads = out
    ref_loss, ref_ce, ref_kl, ref_grads = ref
    for value in (loss, ce, kl):
        assert value.dtype == torch.float32 and value.shape == ()
    assert not ce.requires_grad and not kl.requires_grad
    torch.testing.assert_close(loss.double(), ref_loss.double(), **loss_tol)
    torch.testing.assert_close(ce.double(), ref_ce.double(), **loss_tol)
    torch.testing.assert_close(kl.double(), ref_kl.double(), **loss_tol)
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    for g, ref_g, x in zip(grads, ref_grads, inputs):
        assert g.dtype == x.dtype and torch.isfinite(g).all()
        assert_close_scaled(g, ref_g, **grad_tol)
    # Masked positions take no part: their rows of d hidden are exactly 0.
    assert (grads[0][MASKED] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_gets_summed_gradient(impl):
    """The LM head is the embedding's own Parameter: its grad sums both uses."""
    _, _, _, targets, ids, lp, tail = (x.to(DEVICE) for x in make_problem(seed=1))
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    mix = (torch.randn(H, H, generator=gen) * 0.3).to(DEVICE)

    def grads(lm_loss, dtype):
        emb = torch.nn.Embedding(V, H).to(DEVICE, dtype)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(V, H, generator=torch.Generator().manual_seed(3)))
        a = mix.to(dtype).clone().requires_grad_()
        hidden = torch.tanh(emb(input_ids) @ a)
        loss = lm_loss(hidden, emb.weight)
        loss.backward()
        return emb.weight.grad, a.grad

    def unfused(hidden, weight):
        logits = hidden @ weight.t()
        return (F.cross_entropy(logits, targets, ignore_index=IGNORE)
                + 0.5 * sparse_kl_loss(logits, ids, lp, tail, mask=targets != IGNORE,
                                       impl="torch"))

    def fused_loss(hidden, weight):
        return fk.fused_linear_distill_loss(hidden, weight, targets, ids, lp, tail, gamma=0.5,
                                            chunk_tokens=8, impl=impl)[0]

    for g, ref_g in zip(grads(fused_loss, torch.float32), grads(unfused, torch.float64)):
        assert_close_scaled(g, ref_g, **FP32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_and_frozen_inputs(impl):
    hidden, weight, bias, targets, ids, lp, tail = (x.to(DEVICE) for x in make_problem())
    kw = dict(gamma=0.5, bias=bias, chunk_tokens=8, impl=impl)
    h = hidden.clone().requires_grad_()
    with_grad = fk.fused_linear_distill_loss(h, weight, targets, ids, lp, tail, **kw)
    with torch.no_grad():
        without = fk.fused_linear_distill_loss(h, weight, targets, ids, lp, tail, **kw)
    assert with_grad[0].requires_grad and not without[0].requires_grad
    for a, b in zip(with_grad, without):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    # Only hidden requires a gradient (frozen head): it matches the unfused one.
    with_grad[0].backward()
    ref = reference(hidden.double(), weight.double(), bias.double(), targets, ids, lp, tail,
                    0.5, 1.0, 1.0)[3]
    assert_close_scaled(h.grad, ref[0], **FP32_TOL)
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_ids_and_targets(impl):
    hidden, weight, bias, targets, ids, lp, tail = (x.to(DEVICE) for x in make_problem())
    kw = dict(gamma=0.5, bias=bias, chunk_tokens=16, impl=impl)
    wide = fk.fused_linear_distill_loss(hidden, weight, targets, ids, lp, tail, **kw)
    narrow = fk.fused_linear_distill_loss(hidden, weight, targets.int(), ids.int(), lp, tail, **kw)
    for a, b in zip(wide, narrow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_twice_is_refused():
    hidden, weight, _, targets, ids, lp, tail = (x.to(DEVICE) for x in make_problem())
    w = weight.clone().requires_grad_()
    loss = fk.fused_linear_distill_loss(hidden, w, targets, ids, lp, tail, gamma=0.5,
                                        impl="torch")[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_all_masked_gives_zero_loss_and_gradient():
    hidden, weight, _, targets, ids, lp, tail = (x.to(DEVICE) for x in make_problem())
    w = weight.clone().requires_grad_()
    masked = torch.full_like(targets, IGNORE)
    loss, ce, kl = fk.fused_linear_distill_loss(hidden, w, masked, ids, lp, tail, gamma=0.5,
                                                impl="torch")
    loss.backward()
    assert loss.item() == ce.item() == kl.item() == 0.0
    assert (w.grad == 0).all()


# The kernel's dense formula overflows on support lanes, which it then overwrites; the
# interpreter (numpy) warns about it.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
def test_student_tail_near_floor_with_large_gamma(impl):
    """p_tail ~ e^-86, just above the clamp: gamma * q_tail / p_tail ~ 5e38 exceeds fp32
    although every gradient entry is finite, so no path may form that product.

    With W = I the hidden states are the logits and d hidden is d logits, exactly.
    """
    n, v, k = 2, 64, 4
    gen = torch.Generator().manual_seed(10)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    logits = torch.full((n, v), -1e4)
    logits.scatter_(1, ids, torch.tensor([0.0, -1.0, -2.0, -3.0]).expand(n, k))
    off_support = torch.ones(n, v, dtype=torch.bool).scatter_(1, ids, False)
    logits[0, off_support[0].nonzero()[0]] = -86.0
    logits[1, off_support[1].nonzero()[0]] = -80.0
    lp = torch.log_softmax(torch.randn(n, k, generator=gen), dim=1) + math.log(0.5)
    tail = torch.full((n,), math.log(0.5))
    targets = ids[:, 0].clone()
    hidden, weight, targets, ids, lp, tail = (
        x.to(DEVICE) for x in (logits, torch.eye(v), targets, ids, lp, tail))
    args = (targets, ids, lp, tail, 100.0, 1.0, 1.0)
    ref = reference(hidden.double(), weight.double(), None, *args)
    loss, _, _, grads = fused(hidden, weight, None, *args, impl=impl)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    # exp and log of arguments near 86 carry an absolute error ~86 eps into q_tail / p_tail.
    assert torch.isfinite(grads[0]).all()
    assert_close_scaled(grads[0], ref[3][0], rtol=2e-5, rel_atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in bytes, that any aten op produces (bytes, because the
    Triton interpreter moves kernel arguments as raw byte storages)."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_never_materialises_full_logits(impl):
    """Forward and backward never produce a tensor larger than one chunk of logits, while
    the unfused path, watched the same way, does (N x V = 8 chunks)."""
    n, h, v, chunk = 64, 4, 512, 8
    hidden, weight, bias, targets, ids, lp, tail = (
        x.to(DEVICE) for x in make_problem(n=n, h=h, v=v, teacher_v=v))
    args = (targets, ids, lp, tail, 0.5, 1.0, 1.0)
    with LargestTensor() as unfused_mode:
        reference(hidden, weight, bias, *args)
    with LargestTensor() as fused_mode:
        fused(hidden, weight, bias, *args, chunk_tokens=chunk, impl=impl)
    # One fp32 chunk of logits; V x H and N x H are smaller here, so the gradients fit too.
    bound = chunk * v * 4
    assert unfused_mode.max_bytes >= n * v * 4
    assert fused_mode.max_bytes <= bound


def _bad(**changes):
    hidden, weight, bias, targets, ids, lp, tail = make_problem()
    kw = dict(hidden=hidden, weight=weight, targets=targets, topk_ids=ids, topk_logprobs=lp,
              tail_logmass=tail, gamma=0.5, bias=bias)
    for key, change in changes.items():
        kw[key] = change(kw[key]) if callable(change) else change
    return kw


BAD_INPUTS = {
    "hidden_1d": (_bad(hidden=lambda x: x[0]), "hidden must be"),
    "hidden_size_mismatch": (_bad(weight=lambda w: w[:, :-1]), "hidden must be"),
    "dtype_mismatch": (_bad(weight=lambda w: w.double()), "share one dtype"),
    "targets_shape": (_bad(targets=lambda t: t[:-1]), "targets must be"),
    "targets_float": (_bad(targets=lambda t: t.float()), "targets must be"),
    "bias_shape": (_bad(bias=lambda b: b[:-1]), "bias must be"),
    "impl": (_bad(impl="cuda"), "impl must be"),
    "temperature_zero": (_bad(temperature=0.0), "temperature must be"),
    "gamma_negative": (_bad(gamma=-0.1), "gamma must be"),
    "chunk_zero": (_bad(chunk_tokens=0), "chunk_tokens"),
    "no_teacher": (_bad(topk_ids=None), "needs topk_ids"),
    "topk_shape": (_bad(topk_logprobs=lambda x: x[:, :-1]), "topk_ids and topk_logprobs"),
    "tail_shape": (_bad(tail_logmass=lambda x: x[:-1]), "tail_logmass must be"),
    "ids_beyond_vocab": (_bad(topk_ids=lambda x: x.clone().fill_(V)), "topk_ids must lie"),
    # -1 is padding; any other negative id is refused, even a single one.
    "ids_negative": (_bad(topk_ids=lambda x: x.clone().fill_(-2)), "topk_ids must lie"),
    "one_id_negative": (_bad(topk_ids=lambda x: x.clone().index_put_((torch.tensor(0),
                                                                       torch.tensor(3)),
                                                                      torch.tensor(-2))),
                        "topk_ids must lie"),
    "one_id_beyond_vocab": (_bad(topk_ids=lambda x: x.clone().index_put_((torch.tensor(4),
                                                                           torch.tensor(0)),
                                                                          torch.tensor(V))),
                            "topk_ids must lie"),
    "target_beyond_vocab": (_bad(targets=lambda t: t.clone().fill_(V)), "targets must lie"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs(case):
    kw, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        fk.fused_linear_distill_loss(**kw)


def test_module_matches_function():
    hidden, weight, bias, targets, ids, lp, tail = (x.to(DEVICE) for x in make_problem())
    module = fk.FusedLinearDistillLoss(gamma=0.3, temperature=2.0, chunk_tokens=8, impl="torch")
    expected = fk.fused_linear_distill_loss(hidden, weight, targets, ids, lp, tail, gamma=0.3,
                                            temperature=2.0, bias=bias, chunk_tokens=8,
                                            impl="torch")
    for a, b in zip(module(hidden, weight, targets, ids, lp, tail, bias=bias), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [300, 128256, 151936, 1 << 26])
def test_default_chunk_tokens_cpu(vocab):
    """CPU: the largest multiple of CHUNK_MULTIPLE whose fp32 logits fit CPU_CHUNK_BYTES
    (at least CHUNK_MULTIPLE), whatever the compute dtype (the torch path works in fp32)."""
    for dtype in (torch.float32, torch.bfloat16):
        chunk = fk.default_chunk_tokens(vocab, dtype, "cpu")
        assert chunk % fk.CHUNK_MULTIPLE == 0 and chunk >= fk.CHUNK_MULTIPLE
        assert chunk * vocab * 4 <= max(fk.CPU_CHUNK_BYTES, fk.CHUNK_MULTIPLE * vocab * 4)
        assert (chunk + fk.CHUNK_MULTIPLE) * vocab * 4 > fk.CPU_CHUNK_BYTES


# (SMs, total memory): an H200 (132 SMs, 141 GiB), a 24 GiB card with 128 SMs (the
# memory cap binds at large V), a 16 GiB card with 40 SMs (the SM count binds).
CUDA_DEVICES = {"h200": (132, 141 << 30), "24g_128sm": (128, 24 << 30), "16g_40sm": (40, 16 << 30)}


@pytest.mark.parametrize("device", list(CUDA_DEVICES))
@pytest.mark.parametrize("vocab", [32000, 128256, 151936])
def test_default_chunk_tokens_cuda(device, vocab, monkeypatch):
    """CUDA (device facts stubbed): CUDA_TOKENS_PER_SM per SM unless the buffer, counted in
    its real dtype (plus the torch path's fp32 scratch), would pass the memory cap; the
    largest such multiple of CHUNK_MULTIPLE."""
    sms, memory = CUDA_DEVICES[device]
    monkeypatch.setattr(fk, "_device_facts", lambda _device: (sms, memory))
    cap = min(fk.CUDA_CHUNK_BYTES_MAX, memory // fk.CUDA_CHUNK_MEMORY_SHARE)
    for dtype in (torch.bfloat16, torch.float32):
        for use_triton in (True, False):
            chunk = fk.default_chunk_tokens(vocab, dtype, "cuda", use_triton)
            per_logit = dtype.itemsize + (0 if use_triton else fk.TORCH_PATH_EXTRA_BYTES)

            def fits(c):
                return c <= fk.CUDA_TOKENS_PER_SM * sms and c * vocab * per_logit <= cap

            assert chunk % fk.CHUNK_MULTIPLE == 0 and fits(chunk)
            assert not fits(chunk + fk.CHUNK_MULTIPLE)
    if device == "h200" and vocab > 100_000:
        # The measured knee (module docstring): ~4096 tokens at these vocabularies, in bf16;
        # fp32 logits hit the 2 GiB cap at V = 151936.
        assert fk.default_chunk_tokens(vocab, torch.bfloat16, "cuda") == 4224
        assert fk.default_chunk_tokens(151936, torch.float32, "cuda") == 3528


def test_default_chunk_follows_compute_dtype_and_path(monkeypatch):
    """chunk_tokens=None asks for the chunk of the buffer really used: the autocast dtype
    under autocast, the inputs' dtype otherwise, and the path that runs."""
    calls = []
    real = fk.default_chunk_tokens
    monkeypatch.setattr(fk, "default_chunk_tokens",
                        lambda *args: calls.append(args) or real(*args))
    hidden, weight, _, targets, *_ = make_problem()
    fk.fused_linear_distill_loss(hidden, weight, targets, None, None, None, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fk.fused_linear_distill_loss(hidden, weight, targets, None, None, None, impl="torch")
    assert calls == [(V, torch.float32, hidden.device, False),
                     (V, torch.bfloat16, hidden.device, False)]
    fk.fused_linear_distill_loss(hidden, weight, targets, None, None, None, chunk_tokens=8,
                                 impl="torch")
    assert len(calls) == 2  # an explicit chunk_tokens is used as given


def ragged_problem(seed=4):
    """make_problem with ragged supports: per row 1..K real slots anywhere in the row, the
    rest padding (id -1, log-prob -inf), the masked rows 8..15 padded throughout, the tail
    recomputed over the real slots. Returns the padded inputs and, per row, the dense
    (ids, lp) of the real slots alone. CONFIDENT_ROW keeps its tiny student tail: only its
    real ids are lifted (its ids are led by padding in the kernel's exact tail pass)."""
    hidden, weight, bias, targets, ids, lp, _ = make_problem(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    patterns = [list(range(K)), [0], [0, 1, 2], [2, 5], [1, 3, 4, 6, 7], [K - 1]]
    ragged_ids = torch.full_like(ids, -1)
    ragged_lp = torch.full_like(lp, -math.inf)
    dense = []
    for i in range(N):
        if 8 <= i < 16:
            slots = []
        elif i < len(patterns):
            slots = patterns[i]
        else:
            count = int(torch.randint(1, K + 1, (1,), generator=gen))
            slots = sorted(torch.randperm(K, generator=gen)[:count].tolist())
        ragged_ids[i, slots] = ids[i, slots]
        ragged_lp[i, slots] = lp[i, slots]
        dense.append((ids[i, slots], lp[i, slots]))
    assert len(dense[CONFIDENT_ROW][0]) < K
    weight[:, -1] = 0.0
    weight[dense[CONFIDENT_ROW][0], -1] = 45.0
    tail = torch.log1p(-ragged_lp.double().exp().sum(1)).float()
    return hidden, weight, bias, targets, ragged_ids, ragged_lp, tail, dense


def per_row_reference(hidden, weight, bias, targets, dense, tail, gamma, temperature, scale):
    """As reference(), with each unmasked row's KL from its dense real entries alone."""
    live = (targets != IGNORE).nonzero().squeeze(1).tolist()

    def kl(logits):
        return sum(sparse_kl_loss(logits[i : i + 1], dense[i][0][None], dense[i][1][None],
                                  None if tail is None else tail[i : i + 1],
                                  temperature=temperature, reduction="sum", impl="torch")
                   for i in live) / len(live)

    return _unfused(hidden, weight, bias, targets, kl, gamma, scale)


# name: (temperature, use_tail)
RAGGED_CASES = {"tail": (1.0, True), "no_tail": (1.0, False), "T2": (2.0, True)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("case", list(RAGGED_CASES))
def test_ragged_support_matches_dense_rows(impl, dtype, case):
    """Padding slots are absent: the loss and d hidden, d W, d bias equal those of the
    unfused loss whose KL takes each row's real entries alone (chunk_tokens=8: chunks
    with and without padding, and one padded throughout)."""
    temperature, use_tail = RAGGED_CASES[case]
    hidden, weight, bias, targets, ids, lp, tail, dense = ragged_problem()
    to_dev = lambda x: x.to(DEVICE)  # noqa: E731
    hidden, weight, bias, targets, ids, lp, tail = map(
        to_dev, (hidden, weight, bias, targets, ids, lp, tail))
    dense = [(to_dev(a), to_dev(b)) for a, b in dense]
    tail = tail if use_tail else None
    gamma, scale = 0.5, 1.5
    if dtype == "fp32":
        ref = per_row_reference(hidden.double(), weight.double(), bias.double(), targets, dense,
                                tail, gamma, temperature, scale)
        loss_tol = dict(rtol=FP32_TOL["rtol"], atol=FP32_TOL["rel_atol"])
        grad_tol = FP32_TOL
    else:
        hidden, weight, bias = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
        ref = per_row_reference(hidden, weight, bias, targets, dense, tail, gamma, temperature,
                                scale)
        loss_tol, grad_tol = BF16_LOSS_TOL, BF16_TOL
    out = fused(hidden, weight, bias, targets, ids, lp, tail, gamma, temperature, scale,
                chunk_tokens=8, impl=impl)
    for value, ref_value in zip(out[:3], ref[:3]):
        torch.testing.assert_close(value.double(), ref_value.double(), **loss_tol)
    for g, ref_g, x in zip(out[3], ref[3], (hidden, weight, bias)):
        assert g.dtype == x.dtype and torch.isfinite(g).all()
        assert_close_scaled(g, ref_g, **grad_tol)
    assert (out[3][0][MASKED] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tail_kind", ["tail_-inf", "tail_None"])
def test_sampled_support_without_tail_mass(impl, dtype, tail_kind):
    """Sampled supports, q = count / samples over the distinct sampled ids (ragged),
    tail_logmass = -inf on every row, or None (what stage two passes for a sampled cache:
    no tail machinery, fp32 row sums): with W = I (hidden = logits, d hidden = d logits)
    against the dense CE + gamma KL(q || softmax(z)), gradient
    (softmax(z) - onehot(t) + gamma (softmax(z) - q)) / n."""
    n, v, k, samples, gamma = 6, 64, 16, 12, 0.7
    gen = torch.Generator().manual_seed(21)
    teacher_p = torch.softmax(torch.randn(n, v, generator=gen, dtype=torch.float64) * 2, dim=1)
    teacher_p[:, 0] = 0.0  # id 0, which padding aliases on the torch path, is never drawn
    ids = torch.full((n, k), -1, dtype=torch.long)
    lp = torch.full((n, k), -math.inf)
    q = torch.zeros(n, v, dtype=torch.float64)
    for i in range(n):
        draws = torch.multinomial(teacher_p[i], samples if i else 1, replacement=True,
                                  generator=gen)
        drawn, counts = draws.unique(return_counts=True)
        slots = torch.randperm(k, generator=gen)[: len(drawn)]
        ids[i, slots] = drawn
        lp[i, slots] = (counts.double() / len(draws)).log().float()
        q[i, drawn] = lp[i, slots].double().exp()  # as the kernel sees it, fp32-rounded
    assert (ids < 0).any(1).all()
    targets = torch.randint(1, v, (n,), generator=gen)
    targets[2] = IGNORE
    logits = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    tail = torch.full((n,), -math.inf, device=DEVICE) if tail_kind == "tail_-inf" else None
    h = logits.to(DEVICE).requires_grad_()
    loss, ce, kl = fk.fused_linear_distill_loss(
        h, torch.eye(v, dtype=dtype, device=DEVICE), targets.to(DEVICE), ids.to(DEVICE),
        lp.to(DEVICE), tail, gamma=gamma, chunk_tokens=8, impl=impl)
    loss.backward()
    live = targets != IGNORE
    z = logits.double()[live]
    logp = torch.log_softmax(z, dim=1)
    ql = q[live]
    onehot = F.one_hot(targets[live], v).double()
    ref_ce = -(onehot * logp).sum(1).mean()
    ref_kl = torch.where(ql > 0, ql * (ql.log() - logp), 0.0).sum(1).mean()
    ref_grad = torch.zeros(n, v, dtype=torch.float64)
    ref_grad[live] = (logp.exp() - onehot + gamma * (logp.exp() - ql)) / live.sum()
    tol = dict(rtol=FP32_TOL["rtol"], atol=FP32_TOL["rel_atol"])
    torch.testing.assert_close(ce.double().cpu(), ref_ce, **tol)
    torch.testing.assert_close(kl.double().cpu(), ref_kl, **tol)
    torch.testing.assert_close(loss.double().cpu(), ref_ce + gamma * ref_kl, **tol)
    grad_tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    assert torch.isfinite(h.grad).all()
    assert_close_scaled(h.grad.cpu(), ref_grad, **grad_tol)


# Many blocks per row: the fused kernel's blocks forced small (as tests/test_sparse_kl.py
# does for its own kernel) so that V = 1500 spans 12..24 blocks, the last one partial.
MB_N, MB_H, MB_V, MB_K = 20, 16, 1500, 12
# Logits rise along V: the row max is off the support, in the last block. Rows 0 and 10
# have early targets, so the kernel's running max (started at the target's or the
# support's logit) climbs block after block; row 7's target is the row's last logit.
MB_RAMP_ROWS = (0, 7, 10)
MB_RISING_ROWS = (0, 10)
MB_LATE_TARGET_ROW = 2  # support in the first third of V, target in the last block
MB_CONFIDENT_ROW = 3  # support lifted: tail share < 1e-10, below the exact-pass threshold
MB_LIFT = 32.0
MB_MASKED = (4, 9)  # row 9 is padding throughout
MB_RAGGED = {5: [0], 6: [1, 4, 8], 8: [3, 11], 9: []}  # real slots; the others padding
MB_RAMP_TOP = 40.0


def many_block_problem(seed=30, v=MB_V):
    """hidden, weight, bias, targets, ids, lp, tail: fp32 CPU tensors on a grid (multiples
    of 1/4 below 64 in magnitude, for the logits too), so that the logits are exact in bf16
    and fp32 alike and both dtypes meet the same fp64 reference.

    The last two hidden dimensions steer rows: one adds a ramp over the vocabulary (rows
    MB_RAMP_ROWS), one lifts MB_CONFIDENT_ROW's support by MB_LIFT."""
    gen = torch.Generator().manual_seed(seed)
    n, h, k = MB_N, MB_H, MB_K

    def grid(shape, step, reach):
        return torch.randint(-reach, reach + 1, shape, generator=gen).float() * step

    hidden = grid((n, h), 0.5, 2)
    weight = grid((v, h), 0.5, 2)
    bias = grid((v,), 0.25, 2)
    hidden[:, -2:] = 0.0
    weight[:, -2:] = 0.0
    weight[:, -1] = torch.floor(torch.linspace(0.0, MB_RAMP_TOP, v) * 4) / 4
    hidden[list(MB_RAMP_ROWS), -1] = 1.0
    hidden[list(MB_RAMP_ROWS), : h // 2] = 0.0  # less noise on the ramp: a steady climb
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    for row in MB_RAMP_ROWS:
        ids[row] = torch.randperm(v // 2, generator=gen)[:k]
    ids[MB_LATE_TARGET_ROW] = torch.randperm(v // 3, generator=gen)[:k]
    hidden[MB_CONFIDENT_ROW, -2] = 1.0
    weight[ids[MB_CONFIDENT_ROW], -2] = MB_LIFT
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[list(MB_RISING_ROWS)] = torch.tensor([5, 70])
    targets[7] = v - 1  # in the partial last block, with the row max
    targets[MB_LATE_TARGET_ROW] = v - 3
    targets[list(MB_MASKED)] = IGNORE
    lp = torch.log_softmax(torch.randn(n, k, generator=gen), dim=1) + math.log(0.8)
    tail = torch.full((n,), math.log(0.2))
    for row, slots in MB_RAGGED.items():
        pad = torch.ones(k, dtype=torch.bool)
        pad[slots] = False
        ids[row, pad] = -1
        lp[row, pad] = -math.inf
        if slots:
            lp[row, slots] = torch.log_softmax(lp[row, slots], 0) + math.log(0.8)
    lp[MB_MASKED[0]] = math.nan  # a masked row's cache slots may hold anything
    tail[list(MB_MASKED)] = math.nan
    z = hidden.double() @ weight.double().t()
    for logits in (z, z + bias.double()):
        assert logits.abs().max() < 64, "logits off the grid"
        assert torch.equal(logits, logits.bfloat16().double()), "logits off the grid"
        row, support = logits[MB_CONFIDENT_ROW], ids[MB_CONFIDENT_ROW]
        tail_share = (row.scatter(0, support, -math.inf).logsumexp(0) - row.logsumexp(0)).exp()
        assert tail_share < sk.EXACT_TAIL_BELOW  # the exact tail pass
    return hidden, weight, bias, targets, ids, lp, tail


def dense_reference(hidden, weight, bias, targets, ids, lp, tail, gamma, temperature, scale):
    """fp64 (loss, ce, kl), the gradients of scale * loss to hidden, weight, bias, and those
    to the logits, straight from the formulas: the CE and the T^2-scaled sparse KL with its
    tail bucket (T = 1 only), padding slots (-1) absent, means over the unmasked rows."""
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)
              if x is not None]
    h, w = leaves[0], leaves[1]
    z = h @ w.t()
    if bias is not None:
        z = z + leaves[2]
    live = (targets != IGNORE).nonzero().squeeze(1)
    zl = z[live]
    ce = -torch.log_softmax(zl, 1).gather(1, targets[live, None]).mean()
    real = ids[live] >= 0
    safe = ids[live].clamp(min=0)
    log_q = lp[live].double().masked_fill(~real, -math.inf)
    log_p = torch.log_softmax(zl / temperature, 1)
    if temperature != 1.0:
        log_q = torch.log_softmax(log_q / temperature, 1)
    q = log_q.exp()
    kl_rows = torch.where(q > 0, q * (log_q - log_p.gather(1, safe)), 0.0).sum(1)
    if tail is not None and temperature == 1.0:
        in_support = torch.zeros_like(zl, dtype=torch.bool)
        rows, slots = real.nonzero(as_tuple=True)
        in_support[rows, safe[rows, slots]] = True
        log_pt = log_p.masked_fill(in_support, -math.inf).logsumexp(1).clamp(min=fk.LOG_P_TAIL_MIN)
        log_qt = tail[live].double()
        q_t = log_qt.exp()
        kl_rows = kl_rows + torch.where(q_t > 0, q_t * (log_qt - log_pt), 0.0)
    kl = (kl_rows * temperature**2).mean()
    loss = ce + gamma * kl
    *grads, dz = torch.autograd.grad(loss * scale, leaves + [z])
    return loss.detach(), ce.detach(), kl.detach(), grads, dz


def force_blocks(monkeypatch, stats, grad):
    """The fused kernel streams rows in blocks of `stats` (pass 1, exact tail pass) and
    `grad` (gradient pass) logits, compiled or interpreted."""
    for prefix in ("GPU", "INTERPRETER"):
        monkeypatch.setattr(fk, f"{prefix}_STATS_BLOCK_V", stats)
        monkeypatch.setattr(fk, f"{prefix}_GRAD_BLOCK_V", grad)


def running_max_moves(z, row_ids, target, block):
    """How many blocks move the kernel's running max of one row (it starts at the larger of
    the target's and the support's logits), and by how much in all."""
    real = row_ids[row_ids >= 0]
    m = max(z[target].item(), z[real].max().item())
    start, moves = m, 0
    for b0 in range(0, len(z), block):
        top = z[b0 : b0 + block].max().item()
        if top > m:
            m, moves = top, moves + 1
    return moves, m - start


# BF16 gradients against fp64: the logits are exact (the grid) and the loss arithmetic
# fp32, so only the gradient's roundings to bf16 differ (g over the logits, d hidden's
# output): half a step, 2^-8 relative, each; a whole step, 2^-7, for g under the
# interpreter, whose fp32 -> bf16 cast truncates. Entries ~0 by cancellation get an
# absolute tolerance relative to the tensor's largest.
# Measured on CPU: up to 8.8e-3 of the largest entry (d hidden, interpreter), 6.1e-3 on the
# torch path; the relative part needed with this atol, up to 7.2e-3.
MB_BF16_GRAD_TOL = dict(rtol=2e-2, rel_atol=4e-3)
# d hidden = g W sums V products: an fp32 GEMM over K = 151936 terms rounds by up to about
# sqrt(K) 2^-24 = 2.3e-5 of the terms' scale. Measured on an H200 (cuBLAS, torch 2.11): one
# entry in 320 off by 3.0e-6 (no tail) and 4.2e-6 (T = 2) of the largest, in the torch and
# the Triton path alike, so the matmul's rounding and not the loss kernel's.
REAL_VOCAB_FP32_GRAD_TOL = dict(rtol=1e-5, rel_atol=2.5e-5)
BF16_HALF_STEP = 2.0**-8
FP32_SUM_SLACK = 1e-5  # relative to a bound: fp32 sums over N <= 512 terms
# What d W may pass dw_bound by, relative to its largest entry: a margin for the fp32
# arithmetic of g itself, outside the bound. Measured on CPU: never past the bound (both
# paths, the fallback GEMM and an emulated fp32-out one, V = 1500 and 151936); a bf16
# accumulator passes it by 2.5e-3 or more (and the CPU fallback the fp32-out bound by up
# to 3.8e-6).
DW_EXCESS_SLACK = 1e-6


def dw_bound(ref_dz, hidden, g_rounding, fp32_out, bf16_result):
    """Per-entry bound on |dW - ref| for bf16 operands. Each g_ij is rounded to bf16 once
    (g_rounding relative) and the products and sums are fp32: g_rounding * (|g|^T |h|).
    Without an fp32-out GEMM (CPU, torch < 2.8) each chunk's product is rounded to bf16 as
    well (half a step of a partial sum <= |g|^T |h|). A bf16 weight gets its gradient
    rounded twice more: cast from the fp32 accumulator, then scaled by grad_output in
    place (the backward). ref_dz: the fp64 d logits."""
    h = hidden.double().cpu()
    ref_dw = ref_dz.t() @ h
    per_term = g_rounding + (0.0 if fp32_out else BF16_HALF_STEP)
    bound = (ref_dz.abs().t() @ h.abs()) * per_term * (1 + FP32_SUM_SLACK)
    if bf16_result:
        bound += ref_dw.abs() * (2 * BF16_HALF_STEP)
    return ref_dw, bound


def dw_excess(dw, ref_dz, hidden, g_rounding, fp32_out):
    """How far |dW - ref| passes dw_bound at worst, relative to the largest |ref| entry
    (<= 0 within it)."""
    ref_dw, bound = dw_bound(ref_dz, hidden, g_rounding, fp32_out, dw.dtype == torch.bfloat16)
    return ((dw.double().cpu() - ref_dw).abs() - bound).max().item() / ref_dw.abs().max().item()


def g_rounding(impl):
    """The relative rounding of the d logits stored in bf16 by this path."""
    return 2 * BF16_HALF_STEP if impl == "triton" and DEVICE == "cpu" else BF16_HALF_STEP


# name: (temperature, use_tail, use_bias, (stats block, grad block)). The bias only enters
# the matmuls (and d bias), not the kernel: on in two modes, off in one.
MB_MODES = {"tail_bias": (1.0, True, True, (128, 64)),
            "no_tail": (1.0, False, False, (64, 128)),
            "T2_bias": (2.0, True, True, (64, 64))}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MB_MODES))
def test_many_block_rows_match_fp64(impl, mode, dtype, monkeypatch):
    """Rows streamed in 12..24 blocks (V = 1500, the last block partial) by both passes:
    the running max rising block after block off the support (a ramp), the target in a
    later block than the support and in the partial last block, supports spread over
    many blocks, one row in the exact tail pass (its support walk across blocks), ragged
    rows, masked rows (one padded throughout), 3 chunks of 8, 8 and 4 rows. Loss, d hidden,
    d W and d bias against the fp64 formulas."""
    temperature, use_tail, use_bias, (stats, grad) = MB_MODES[mode]
    force_blocks(monkeypatch, stats, grad)
    hidden, weight, bias, targets, ids, lp, tail = many_block_problem()
    bias = bias if use_bias else None
    tail = tail if use_tail else None
    # The problem does what the docstring says, at these block sizes.
    z = hidden.double() @ weight.double().t() + (0.0 if bias is None else bias.double())
    for row in MB_RISING_ROWS:
        moves, rise = running_max_moves(z[row], ids[row], targets[row], stats)
        assert moves >= 4 and rise > 10.0
    assert ids[MB_LATE_TARGET_ROW].max() // grad < targets[MB_LATE_TARGET_ROW] // grad
    spread = [len(set((r[r >= 0] // stats).tolist())) for r in ids]
    assert sorted(spread)[len(spread) // 2] >= 5
    check_against_fp64(impl, dtype, temperature, hidden, weight, bias, targets, ids, lp, tail)


def check_against_fp64(impl, dtype, temperature, hidden, weight, bias, targets, ids, lp, tail,
                       fp32_grad_tol=FP32_TOL):
    """Loss parts and d hidden, d W, d bias of the fused loss (chunks of 8 rows) against
    dense_reference, for grid inputs (exact logits) run in fp32 or bf16."""
    gamma, scale = 0.7, 1.5
    ref = dense_reference(hidden, weight, bias, targets, ids, lp, tail, gamma, temperature, scale)
    dev = [None if x is None else x.to(DEVICE) for x in (hidden, weight, bias, targets, ids, lp,
                                                          tail)]
    if dtype == "bf16":
        dev[:3] = [None if x is None else x.bfloat16() for x in dev[:3]]
    h, w, b, t, i, q, qt = dev
    loss, ce, kl, grads = fused(h, w, b, t, i, q, qt, gamma, temperature, scale, chunk_tokens=8,
                                impl=impl)
    loss_tol = dict(rtol=FP32_TOL["rtol"], atol=FP32_TOL["rel_atol"])  # exact logits: both dtypes
    for value, ref_value in zip((loss, ce, kl), ref[:3]):
        torch.testing.assert_close(value.double().cpu(), ref_value, **loss_tol)
    for name, g, ref_g, x in zip(("d hidden", "d W", "d bias"), grads, ref[3], (h, w, b)):
        assert g.dtype == x.dtype and torch.isfinite(g).all(), name
        if dtype == "fp32":
            assert_close_scaled(g.cpu(), ref_g, **fp32_grad_tol)
        elif name == "d W":
            fp32_out = fk._gemm_has_fp32_out(DEVICE, w.dtype)
            assert dw_excess(g, ref[4], hidden, g_rounding(impl), fp32_out) <= DW_EXCESS_SLACK
        else:
            assert_close_scaled(g.cpu(), ref_g, **MB_BF16_GRAD_TOL)
    assert (grads[0][list(MB_MASKED)] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode, dtype", [("tail_bias", "fp32"), ("no_tail", "fp32"),
                                         ("T2_bias", "fp32"), ("no_tail", "bf16")])
def test_real_vocab_rows_match_fp64(impl, mode, dtype):
    """The many-block problem at V = 151936 with the kernel's own block sizes: 38 and 75
    blocks per row compiled (one under the interpreter, ~3 s a case). Holds the fp32 row
    sums of the no-tail and tempered kernels (and the fp64 ones with the tail) to the
    fp64 reference at a real vocabulary."""
    temperature, use_tail, use_bias, _ = MB_MODES[mode]
    hidden, weight, bias, targets, ids, lp, tail = many_block_problem(seed=31, v=151936)
    check_against_fp64(impl, dtype, temperature, hidden, weight, bias if use_bias else None,
                       targets, ids, lp, tail if use_tail else None, REAL_VOCAB_FP32_GRAD_TOL)


def grid_problem(n, h, v, k, seed):
    """A problem whose logits are exact in bf16 (multiples of 1/4, |z| < 64), with a
    constant hidden feature (h[:, 0] = 1): that column of dW sums every token's gradient
    with one sign per vocabulary entry, where roundings add up instead of cancelling."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, h), generator=gen).float() * 0.5
    hidden[:, 0] = 1.0
    weight = torch.randint(-2, 3, (v, h), generator=gen).float() * 0.5
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=gen), dim=1) + math.log(0.9)
    tail = torch.full((n,), math.log(0.1))
    targets = torch.randint(0, v, (n,), generator=gen)
    z = hidden.double() @ weight.double().t()
    assert z.abs().max() < 64 and torch.equal(z, z.bfloat16().double()), "logits off the grid"
    return hidden, weight, targets, ids, lp, tail


def test_dw_accumulates_bf16_products_in_fp32():
    """d W of bf16 operands (autocast, fp32 master weight: the accumulator is the gradient
    returned) over 64 chunks stays within dw_bound of the fp64 reference, entry by entry:
    no rounding of the running sum. A bf16 accumulator (the faster alternative) passes
    that bound on the same problem, so the test tells them apart.

    impl="auto": the accumulation is the same code for both paths, and the compiled kernel
    on CUDA, the torch path on CPU (the interpreter's 64 launches would take seconds)."""
    impl = "auto"
    n, h, v, k, chunk = 512, 8, 64, 4, 8
    hidden, weight, targets, ids, lp, tail = grid_problem(n, h, v, k, seed=40)
    ref = dense_reference(hidden, weight, None, targets, ids, lp, tail, 0.5, 1.0, 1.0)
    ref_dz = ref[4]
    w = weight.to(DEVICE).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fk.fused_linear_distill_loss(
            hidden.to(DEVICE), w, targets.to(DEVICE), ids.to(DEVICE), lp.to(DEVICE),
            tail.to(DEVICE), gamma=0.5, chunk_tokens=chunk, impl=impl)[0]
    loss.backward()
    assert w.grad.dtype == torch.float32
    fp32_out = fk._gemm_has_fp32_out(DEVICE, torch.bfloat16)
    # Measured: -6.4e-4 on CPU (fallback), and -6.7e-4 for an fp32 sum of the same bf16
    # products (the CUDA path) against its tighter bound.
    assert dw_excess(w.grad, ref_dz, hidden, BF16_HALF_STEP, fp32_out) <= DW_EXCESS_SLACK
    # The foil: the same bf16 gradients and per-chunk products, summed in bf16 (measured
    # +2.5e-3 against the looser bound, +9.9e-3 against the tighter).
    g = ref_dz.bfloat16()
    acc = torch.zeros(v, h, dtype=torch.bfloat16)
    for r0 in range(0, n, chunk):
        acc += g[r0 : r0 + chunk].t() @ hidden[r0 : r0 + chunk].bfloat16()
    assert dw_excess(acc.float(), ref_dz, hidden, BF16_HALF_STEP, fp32_out) > DW_EXCESS_SLACK


class FreshTensors(TorchDispatchMode):
    """Counts the tensors of one shape that aten ops produce in fresh storage (not written
    into one of their inputs, as out= and in-place ops do)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape
                    and t.untyped_storage().data_ptr() not in inputs):
                self.count += 1
        return out


@pytest.mark.parametrize("dtype", ["fp32", "autocast_bf16", "bf16"])
def test_no_weight_sized_temporary_per_chunk(dtype):
    """d W is accumulated in place: at most two [V, H] tensors in all, however many
    chunks; only the fallback for bf16 without an fp32-out GEMM (CPU, torch < 2.8) makes
    one product per chunk."""
    n, h, v, chunk = 64, 8, 48, 8
    hidden, weight, targets, ids, lp, tail = grid_problem(n, h, v, 4, seed=41)
    if dtype == "bf16":
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    w = weight.to(DEVICE).requires_grad_()
    args = (hidden.to(DEVICE), w, targets.to(DEVICE), ids.to(DEVICE), lp.to(DEVICE),
            tail.to(DEVICE))
    with FreshTensors((v, h)) as mode, torch.autocast(DEVICE, dtype=torch.bfloat16,
                                                      enabled=dtype == "autocast_bf16"):
        loss = fk.fused_linear_distill_loss(*args, gamma=0.5, chunk_tokens=chunk, impl="torch")[0]
        loss.backward()
    # The accumulator; under autocast the bf16 copy of the fp32 weight that the matmuls use;
    # for a bf16 weight, its gradient cast back to bf16.
    expected = 1 + (dtype != "fp32")
    if dtype != "fp32" and not fk._gemm_has_fp32_out(DEVICE, torch.bfloat16):
        expected += n // chunk
    assert mode.count == expected
