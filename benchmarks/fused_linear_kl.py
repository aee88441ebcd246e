"""Benchmark the fused LM head + CE + sparse KL against the unfused path and the matmul floor.

All arms run forward and backward (gradients to h and W) from hidden states h [N, H] and
the LM-head weight W [V, H]:
  unfused  the Hugging Face way: logits = h @ W^T in the inputs' dtype, then
           F.cross_entropy(logits.float()) + ddk's sparse_kl_loss (Triton on CUDA, the
           chunked torch path on CPU) under plain autograd;
  fused    ddk.kernels.fused_linear_kl (token chunks; the [N, V] logits never exist), at
           its default chunk and, on CUDA, a sweep of chunk sizes;
  floor    the three matmuls alone, unchunked: logits = h W^T, dh = g W, dW = g^T h (dW
           with fp32 output where torch has it; g stands in as the logits themselves), the
           time no fused head can beat;
  liger_*  Liger-Kernel anchors, on CUDA when `liger_kernel` is importable (never
           required): fused linear CE (no KL), fused linear KL against a dense [N, V]
           target (the top-k scattered), fused linear JSD against a dense teacher (teacher
           hidden states and head of the student's shape). Their losses differ from ours;
           an arm that this Liger version lacks, or that fails, is reported with its error.

Peak memory is what one fwd+bwd step allocates on top of its inputs, the returned
gradients included: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the
peak resident set of a fresh process per measurement (the CPU allocator has no counters).
Liger's dense targets are inputs, made before the baseline, so not counted.

    python -m ddk.benchmarks.fused_linear_kl              # CUDA if available, else CPU
    python -m ddk.benchmarks.fused_linear_kl --shapes 896x151936 --tokens 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform

import torch
import torch.nn.functional as F

from ddk.kernels.fused_linear_kl import (
    _gemm_has_fp32_out,
    default_chunk_tokens,
    fused_linear_distill_loss,
)
from ddk.kernels.sparse_kl import sparse_kl_loss, triton
from ddk.benchmarks.sparse_kl import time_and_peak

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# H x V: Liger-Kernel's published distillation shape (Llama-3 vocabulary), then the
# LM heads of Qwen2.5-0.5B and -1.5B (Qwen's padded vocabulary).
DEFAULT_SHAPES = {"cuda": ["4096x128256", "896x151936", "1536x151936"], "cpu": ["256x32000"]}
DEFAULT_TOKENS = {"cuda": 8192, "cpu": 1024}
DEFAULT_DTYPE = {"cuda": "bf16", "cpu": "fp32"}
# Fused runs per shape, by chunk_tokens (0 = the default for the device). On CUDA the
# sweep brackets the default (~4096 tokens on an H100/H200); on CPU the default chunk holds
# all 1024 tokens, and a small one shows the memory the chunking saves.
DEFAULT_CHUNKS = {"cuda": [0, 1024, 2048, 4096, 8192], "cpu": [0, 128]}
LIGER_ARMS = ("liger_ce", "liger_kl_dense", "liger_jsd_dense")
LIGER_QUOTE = ("Liger-Kernel's own published figure (theirs, not measured here): fused "
               "chunked JSD distillation, H=4096 V=128256 B*T=8192 bf16 with DENSE teacher "
               "logits, H100 80GB: 60.7 ms fwd+bwd, 11.1 GB peak (plain torch: 213 ms, 68.9 GB).")


def parse_shape(text: str) -> tuple[int, int]:
    h, v = text.lower().split("x")
    return int(h), int(v)


def make_inputs(n, h, v, k, dtype, device, seed=0):
    """Hidden states, LM head (logits of std ~2), targets, and a teacher top-k with 5 %
    tail mass; distinct support ids per row."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=gen, device=device) * (2 / math.sqrt(h))).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    # A distinct set shifted per row (mod V) stays distinct within every row.
    shift = torch.randint(0, v, (n, 1), generator=gen, device=device)
    ids = (shift + torch.randperm(v, generator=gen, device=device)[:k]) % v
    logprobs = torch.log_softmax(torch.randn(n, k, generator=gen, device=device) * 2, dim=1)
    logprobs += math.log(0.95)
    tail = torch.full((n,), math.log(0.05), device=device)
    return hidden, weight, targets, ids, logprobs, tail


def _unfused(inputs, gamma, chunk):
    hidden, weight, targets, ids, lp, tail = inputs
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits.float(), targets)
    return ce + gamma * sparse_kl_loss(logits, ids, lp, tail)


def _fused(inputs, gamma, chunk):
    hidden, weight, targets, ids, lp, tail = inputs
    return fused_linear_distill_loss(hidden, weight, targets, ids, lp, tail, gamma=gamma,
                                     chunk_tokens=chunk or None)[0]


def _liger(variant, inputs, gamma):
    """A loss closure for one Liger arm (raises where this Liger version lacks it), and
    the extra inputs it needs, made here, before the memory baseline."""
    hidden, weight, targets, ids, lp, tail = inputs
    if variant == "liger_ce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda: loss(weight, hidden, targets)
    if variant == "liger_kl_dense":
        from liger_kernel.transformers.fused_linear_kl_div import LigerFusedLinearKLDivLoss

        # The support renormalised, scattered into a dense target: what Liger needs as input.
        target = torch.zeros(hidden.shape[0], weight.shape[0], dtype=hidden.dtype,
                             device=hidden.device)
        target.scatter_(1, ids, torch.softmax(lp, dim=1).to(hidden.dtype))
        try:
            kl = LigerFusedLinearKLDivLoss(accum_dtype=torch.float32)
        except TypeError:  # versions without accum_dtype accumulate in the weight's dtype
            kl = LigerFusedLinearKLDivLoss()
        ce = _liger("liger_ce", inputs, gamma)
        return lambda: ce() + gamma * kl(hidden, weight, target, targets)
    if variant == "liger_jsd_dense":
        from liger_kernel.transformers import LigerFusedLinearJSD

        gen = torch.Generator(device=hidden.device).manual_seed(1)
        teacher_hidden = torch.randn(hidden.shape, generator=gen, device=hidden.device).to(
            hidden.dtype)
        teacher_weight = torch.randn(weight.shape, generator=gen, device=weight.device).mul_(
            2 / math.sqrt(weight.shape[1])).to(weight.dtype)
        jsd = LigerFusedLinearJSD(jsd_beta=0.5)
        return lambda: jsd(hidden, weight, teacher_hidden, teacher_weight, targets)
    raise ValueError(variant)


def _floor_step(hidden, weight):
    """The fused head's three matmuls alone, unchunked; returns the two gradients."""
    fp32_out = _gemm_has_fp32_out(hidden.device.type, hidden.dtype)

    def step():
        logits = hidden @ weight.t()
        dh = logits @ weight  # the logits stand in for their gradient g
        if fp32_out:  # the op form that _gemm_has_fp32_out probed
            dw = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            torch.mm(logits.t(), hidden, out_dtype=torch.float32, out=dw)
        else:
            dw = torch.mm(logits.t(), hidden).float()
        return None, (dh, dw)

    return step, fp32_out


def measure(variant, chunk, n, h, v, k, dtype, device, gamma, warmup, repeats) -> dict:
    """Median fwd+bwd seconds and peak extra bytes of one arm at one shape."""
    inputs = make_inputs(n, h, v, k, dtype, device)
    hidden, weight = inputs[0], inputs[1]
    row = dict(variant=variant, chunk_tokens=None, hidden=h, vocab=v, tokens=n, k=k,
               dtype=str(dtype).removeprefix("torch."), device=device)
    if variant == "floor":
        step, fp32_out = _floor_step(hidden, weight)
        row["dw_fp32_out"] = fp32_out
    else:
        hidden.requires_grad_()
        weight.requires_grad_()
        if variant in LIGER_ARMS:
            loss_fn = _liger(variant, inputs, gamma)
        else:
            loss_fn = {"unfused": _unfused, "fused": _fused}[variant]
            loss_fn = (lambda f: lambda: f(inputs, gamma, chunk))(loss_fn)

        def step():
            loss = loss_fn()
            return loss.item(), torch.autograd.grad(loss, [hidden, weight])

    seconds, peak, (loss, _) = time_and_peak(step, device, warmup, repeats)
    if variant == "fused":
        # The chunk as run: the default for the device, capped at N.
        row["chunk_tokens"] = min(chunk or default_chunk_tokens(
            v, dtype, device, device == "cuda" and triton is not None), n)
    row.update(loss=loss, time_ms=seconds * 1e3, peak_bytes=peak)
    if variant == "floor":
        row["tflops"] = 6 * n * h * v / seconds / 1e12
    return row


def measure_guarded(*args) -> dict:
    """measure(), with an optional arm's failure reported rather than raised."""
    variant = args[0]
    try:
        return measure(*args)
    except Exception as err:  # noqa: BLE001 - an anchor that fails is a row, not a crash
        if variant not in LIGER_ARMS:
            raise
        _, chunk, n, h, v, k, dtype, device, *_ = args
        return dict(variant=variant, chunk_tokens=None, hidden=h, vocab=v, tokens=n, k=k,
                    dtype=str(dtype).removeprefix("torch."), device=device,
                    error=f"{type(err).__name__}: {err}"[:300])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_isolated(*args) -> dict:
    # A fresh process per CPU measurement: its peak RSS then belongs to this case alone.
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_guarded, args)


def ratios(rows: list[dict]) -> list[dict]:
    """Per fused row: time and memory against the unfused path and the matmul floor."""
    out = []
    for row in rows:
        if row["variant"] != "fused":
            continue
        same = [r for r in rows if (r["hidden"], r["vocab"]) == (row["hidden"], row["vocab"])
                and "time_ms" in r]
        by = {r["variant"]: r for r in same if r["variant"] != "fused"}
        entry = dict(hidden=row["hidden"], vocab=row["vocab"], chunk_tokens=row["chunk_tokens"])
        if "unfused" in by:
            base = by["unfused"]
            entry.update(time_fused_over_unfused=row["time_ms"] / base["time_ms"],
                         mem_fused_over_unfused=row["peak_bytes"] / max(base["peak_bytes"], 1),
                         loss_diff=abs(row["loss"] - base["loss"]))
        if "floor" in by:
            entry["time_fused_over_floor"] = row["time_ms"] / by["floor"]["time_ms"]
        for arm in LIGER_ARMS:
            if arm in by:
                entry[f"time_fused_over_{arm}"] = row["time_ms"] / by[arm]["time_ms"]
        out.append(entry)
    return out


def print_table(rows: list[dict], ratio_rows: list[dict]):
    head = (f"{'H':>5} {'V':>7} {'N':>6} {'arm':>16} {'chunk':>6} {'fwd+bwd ms':>11} "
            f"{'peak extra MiB':>15} {'loss':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        chunk = "-" if r["chunk_tokens"] is None else str(r["chunk_tokens"])
        lead = f"{r['hidden']:>5} {r['vocab']:>7} {r['tokens']:>6} {r['variant']:>16} {chunk:>6}"
        if "error" in r:
            print(f"{lead}  not run: {r['error']}")
            continue
        loss = "-" if r["loss"] is None else f"{r['loss']:.5f}"
        extra = f"  ({r['tflops']:.3g} TFLOP/s)" if "tflops" in r else ""
        print(f"{lead} {r['time_ms']:>11.2f} {r['peak_bytes'] / 2**20:>15.1f} {loss:>9}{extra}")
    print()
    for e in ratio_rows:
        parts = [f"H={e['hidden']} V={e['vocab']} chunk={e['chunk_tokens']}:"]
        if "time_fused_over_floor" in e:
            parts.append(f"fused/floor time {e['time_fused_over_floor']:.3g}")
        if "time_fused_over_unfused" in e:
            parts.append(f"fused/unfused time {e['time_fused_over_unfused']:.3g}, peak memory "
                         f"{e['mem_fused_over_unfused']:.3g}, |loss diff| {e['loss_diff']:.2e}")
        for arm in LIGER_ARMS:
            if f"time_fused_over_{arm}" in e:
                parts.append(f"fused/{arm} time {e[f'time_fused_over_{arm}']:.3g}")
        print(" ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:]))


def _liger_version() -> str | None:
    """Liger-Kernel's version if it imports (None: the anchors are skipped)."""
    try:
        import liger_kernel
    except Exception:  # noqa: BLE001 - absent or broken alike
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liger-kernel")
    except PackageNotFoundError:  # importable from a source tree, without metadata
        return getattr(liger_kernel, "__version__", "unknown version")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m ddk.benchmarks.fused_linear_kl",
        description="LM head + CE + sparse KL forward+backward: fused vs unfused vs the "
                    "matmul floor (and Liger-Kernel where importable).")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--shapes", nargs="+", metavar="HxV",
                   help=f"hidden x vocab (default: {DEFAULT_SHAPES['cuda']} on CUDA, "
                        f"{DEFAULT_SHAPES['cpu']} on CPU)")
    p.add_argument("--tokens", type=int, help="N (default: 8192 on CUDA, 1024 on CPU)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--gamma", type=float, default=0.2)
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="dtype of h and W (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--chunk-tokens", type=int, nargs="+",
                   help="fused runs by chunk size, 0 = the default for the device (default: "
                        f"{DEFAULT_CHUNKS['cuda']} on CUDA, {DEFAULT_CHUNKS['cpu']} on CPU)")
    p.add_argument("--no-floor", action="store_true", help="skip the matmul-floor arm")
    p.add_argument("--liger", choices=("auto", "off"), default="auto",
                   help="Liger-Kernel anchor arms: on CUDA when importable (auto), or never")
    p.add_argument("--warmup", type=int, help="untimed runs (default: 2 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, help="timed runs (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--json", metavar="PATH", help="also write all the numbers here")
    args = p.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [parse_shape(s) for s in (args.shapes or DEFAULT_SHAPES[device])]
    n = args.tokens or DEFAULT_TOKENS[device]
    dtype = DTYPES[args.dtype or DEFAULT_DTYPE[device]]
    chunks = args.chunk_tokens or DEFAULT_CHUNKS[device]
    warmup = args.warmup if args.warmup is not None else (2 if device == "cuda" else 1)
    repeats = args.repeats or (10 if device == "cuda" else 3)
    run = measure_guarded if device == "cuda" else measure_isolated
    liger = _liger_version() if device == "cuda" and args.liger == "auto" else None

    arms = [("unfused", 0)] + [("fused", c) for c in chunks]
    if not args.no_floor:
        arms.append(("floor", 0))
    if liger:
        arms += [(arm, 0) for arm in LIGER_ARMS]
    rows = []
    for h, v in shapes:
        for variant, chunk in arms:
            rows.append(run(variant, chunk, n, h, v, args.k, dtype, device, args.gamma,
                            warmup, repeats))
    ratio_rows = ratios(rows)
    hw = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"device: {hw}, torch {torch.__version__}, dtype {dtype}, N={n}, k={args.k}, "
          f"gamma={args.gamma}, liger-kernel {liger or 'not run'}")
    if device == "cpu":
        print("CPU run: GPU numbers (the default shapes, bf16, the Triton kernel) need a GPU; "
              "peak memory here is peak RSS growth.")
    print(LIGER_QUOTE)
    print()
    print_table(rows, ratio_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=hw, torch=torch.__version__, liger_kernel=liger, dtype=str(dtype),
                           tokens=n, k=args.k, gamma=args.gamma, results=rows,
                           ratios=ratio_rows, liger_quote=LIGER_QUOTE), f, indent=2)


if __name__ == "__main__":
    main()
