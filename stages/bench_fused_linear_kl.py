"""Benchmark the fused LM head + CE + sparse KL against the unfused path, side by side.

Both compute loss = CE + gamma * sparse KL (teacher top-k plus tail) from hidden states
h [N, H] and the LM-head weight W [V, H], forward and backward (gradients to h and W):
  unfused  the Hugging Face way: logits = h @ W^T in the inputs' dtype, then
           F.cross_entropy(logits.float()) + ddk's sparse_kl_loss (Triton on CUDA, the
           chunked torch path on CPU) under plain autograd;
  fused    ddk.kernels.fused_linear_kl (token chunks; the [N, V] logits never exist).

Peak memory is what one fwd+bwd step allocates on top of its inputs, the returned
gradients included: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the
peak resident set of a fresh process per measurement (the CPU allocator has no counters).

    python -m ddk.stages.bench_fused_linear_kl              # CUDA if available, else CPU
    python -m ddk.stages.bench_fused_linear_kl --shapes 896x151936 --tokens 4096 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform

import torch
import torch.nn.functional as F

from ddk.kernels.fused_linear_kl import default_chunk_tokens, fused_linear_distill_loss
from ddk.kernels.sparse_kl import sparse_kl_loss
from ddk.stages.bench_sparse_kl import time_and_peak

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# H x V: Liger-Kernel's published distillation shape (Llama-3 vocabulary), then the
# LM heads of Qwen2.5-0.5B and -1.5B (Qwen's padded vocabulary).
DEFAULT_SHAPES = {"cuda": ["4096x128256", "896x151936", "1536x151936"], "cpu": ["256x32000"]}
DEFAULT_TOKENS = {"cuda": 8192, "cpu": 1024}
DEFAULT_DTYPE = {"cuda": "bf16", "cpu": "fp32"}
# Fused runs per shape, by chunk_tokens (0 = the default for V). On CPU the default
# chunk holds all 1024 tokens; a small one shows the memory the chunking saves.
DEFAULT_CHUNKS = {"cuda": [0], "cpu": [0, 128]}
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


def unfused_loss(hidden, weight, targets, ids, lp, tail, gamma, chunk_tokens):
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits.float(), targets)
    return ce + gamma * sparse_kl_loss(logits, ids, lp, tail)


def fused_loss(hidden, weight, targets, ids, lp, tail, gamma, chunk_tokens):
    return fused_linear_distill_loss(hidden, weight, targets, ids, lp, tail, gamma=gamma,
                                     chunk_tokens=chunk_tokens or None)[0]


LOSSES = {"unfused": unfused_loss, "fused": fused_loss}


def measure(variant, chunk, n, h, v, k, dtype, device, gamma, warmup, repeats) -> dict:
    """Median fwd+bwd seconds and peak extra bytes of one variant at one shape."""
    hidden, weight, targets, ids, lp, tail = make_inputs(n, h, v, k, dtype, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    fn = LOSSES[variant]

    def step():
        loss = fn(hidden, weight, targets, ids, lp, tail, gamma, chunk)
        grads = torch.autograd.grad(loss, [hidden, weight])
        return loss.item(), grads

    seconds, peak, (loss, _) = time_and_peak(step, device, warmup, repeats)
    # The chunk as run: the default for V, capped at N.
    chunk_run = min(chunk or default_chunk_tokens(v), n) if variant == "fused" else None
    return dict(variant=variant, chunk_tokens=chunk_run, hidden=h, vocab=v, tokens=n, k=k,
                dtype=str(dtype).removeprefix("torch."), device=device, loss=loss,
                time_ms=seconds * 1e3, peak_bytes=peak)


def measure_isolated(*args) -> dict:
    # A fresh process per CPU measurement: its peak RSS then belongs to this case alone.
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        if row["variant"] != "fused":
            continue
        base = next(r for r in rows if r["variant"] == "unfused"
                    and (r["hidden"], r["vocab"]) == (row["hidden"], row["vocab"]))
        out.append(dict(hidden=row["hidden"], vocab=row["vocab"],
                        chunk_tokens=row["chunk_tokens"],
                        time_fused_over_unfused=row["time_ms"] / base["time_ms"],
                        mem_fused_over_unfused=row["peak_bytes"] / max(base["peak_bytes"], 1),
                        loss_diff=abs(row["loss"] - base["loss"])))
    return out


def print_table(rows: list[dict], ratio_rows: list[dict]):
    head = (f"{'H':>5} {'V':>7} {'N':>6} {'variant':>8} {'chunk':>6} {'fwd+bwd ms':>11} "
            f"{'peak extra MiB':>15} {'loss':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        chunk = "-" if r["chunk_tokens"] is None else str(r["chunk_tokens"])
        print(f"{r['hidden']:>5} {r['vocab']:>7} {r['tokens']:>6} {r['variant']:>8} {chunk:>6} "
              f"{r['time_ms']:>11.2f} {r['peak_bytes'] / 2**20:>15.1f} {r['loss']:>9.5f}")
    print()
    for e in ratio_rows:
        print(f"H={e['hidden']} V={e['vocab']} chunk={e['chunk_tokens']}: fused/unfused "
              f"time {e['time_fused_over_unfused']:.3g}, peak memory "
              f"{e['mem_fused_over_unfused']:.3g}; |loss diff| {e['loss_diff']:.2e}")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m ddk.stages.bench_fused_linear_kl",
        description="LM head + CE + sparse KL forward+backward: fused vs unfused.")
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
                   help="fused runs by chunk size, 0 = the default for V (default: "
                        f"{DEFAULT_CHUNKS['cuda']} on CUDA, {DEFAULT_CHUNKS['cpu']} on CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs (default: 2 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, help="timed runs (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
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
    run = measure if device == "cuda" else measure_isolated

    rows = []
    for h, v in shapes:
        for variant, chunk in [("unfused", 0)] + [("fused", c) for c in chunks]:
            rows.append(run(variant, chunk, n, h, v, args.k, dtype, device, args.gamma,
                            warmup, repeats))
            if device == "cuda":
                torch.cuda.empty_cache()
    ratio_rows = ratios(rows)
    hw = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"device: {hw}, torch {torch.__version__}, dtype {dtype}, N={n}, k={args.k}, "
          f"gamma={args.gamma}")
    if device == "cpu":
        print("CPU run: GPU numbers (the default shapes, bf16, the Triton kernel) need a GPU; "
              "peak memory here is peak RSS growth.")
    print_table(rows, ratio_rows)
    print()
    print(LIGER_QUOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=hw, torch=torch.__version__, results=rows, ratios=ratio_rows,
                           liger_quote=LIGER_QUOTE), f, indent=2)


if __name__ == "__main__":
    main()
