"""Benchmark the sparse KL: forward+backward time and peak memory, side by side.

Three ways to get the KL from a cached teacher top-k:
  dense   the teacher's top-k scattered into a dense [N, V] distribution, then
          F.kl_div(log_softmax(logits.float()), q) under plain autograd (no tail
          bucket, so its loss differs from the other two by the tail term);
  torch   ddk.kernels.sparse_kl with impl="torch" (row chunks, O(chunk x V) scratch);
  triton  ddk.kernels.sparse_kl with impl="triton" (CUDA only).

Peak memory is what a fwd+bwd step allocates on top of its inputs, the returned
gradient included: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the
peak resident set of a fresh process per measurement (the allocator has no counters).
Effective GB/s counts the minimum traffic, one read of the logits plus one write of
their gradient; the Triton kernel reads the logits twice (forward, backward), so the
bandwidth it really draws is 1.5x the figure shown.

    python -m ddk.benchmarks.sparse_kl                # CUDA if available, else CPU
    python -m ddk.benchmarks.sparse_kl --tokens 4096 8192 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from ddk.benchmarks.harness import sync
from ddk.kernels.sparse_kl import sparse_kl_loss

IMPLS = ("dense", "torch", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TOKENS = {"cuda": [4096, 8192], "cpu": [256]}
DEFAULT_DTYPE = {"cuda": "bf16", "cpu": "fp32"}


def make_inputs(n: int, v: int, k: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Student logits and a teacher top-k with 5 % tail mass, without any [N, V] scratch."""
    gen = torch.Generator(device=device).manual_seed(seed)
    # Filled by row blocks: a full-size fp32 temporary would inflate the CPU baseline.
    logits = torch.empty(n, v, dtype=dtype, device=device)
    step = max(1, (1 << 24) // v)
    for r0 in range(0, n, step):
        block = logits[r0:r0 + step]
        block.copy_(torch.randn(block.shape, generator=gen, device=device).mul_(2))
    # A distinct set shifted per row (mod V) stays distinct within every row.
    shift = torch.randint(0, v, (n, 1), generator=gen, device=device)
    ids = (shift + torch.randperm(v, generator=gen, device=device)[:k]) % v
    logprobs = torch.log_softmax(torch.randn(n, k, generator=gen, device=device) * 2, dim=1)
    logprobs += math.log(0.95)
    tail = torch.full((n,), math.log(0.05), device=device)
    return logits, ids, logprobs, tail


def dense_kl(logits, ids, logprobs, tail):
    q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    q.scatter_(1, ids, logprobs.exp())
    return F.kl_div(torch.log_softmax(logits.float(), dim=1), q, reduction="batchmean")


def loss_fn(impl: str):
    if impl == "dense":
        return dense_kl
    return lambda logits, ids, lp, tail: sparse_kl_loss(logits, ids, lp, tail, impl=impl)


def _current_rss() -> int:
    # The current resident set, not ru_maxrss: import and set-up peaks are over by now.
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def time_and_peak(step, device: str, warmup: int, repeats: int):
    """(median seconds of step(), peak bytes allocated above what was live before the
    warm-up, the last step's result). On CPU the peak is the growth of the peak resident
    set, so run it in a fresh process (see measure_isolated) for a number of its own."""
    # The baseline is taken before the warm-up: on CPU the peak RSS never comes down.
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss()
    for _ in range(warmup):
        step()
    times, result = [], None
    for _ in range(repeats):
        del result  # the previous step's gradients are not held while the next one runs
        sync(device)
        t0 = time.perf_counter()
        result = step()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return statistics.median(times), peak, result


def measure(impl, n, v, k, dtype, device, warmup, repeats) -> dict:
    """Median fwd+bwd seconds and peak extra bytes of one implementation at one size."""
    logits, ids, lp, tail = make_inputs(n, v, k, dtype, device)
    fn = loss_fn(impl)
    x = logits.requires_grad_()

    def step():
        loss = fn(x, ids, lp, tail)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.item(), grad

    seconds, peak, (loss, _) = time_and_peak(step, device, warmup, repeats)
    traffic = 2 * n * v * logits.element_size()
    return dict(impl=impl, tokens=n, vocab=v, k=k, dtype=str(dtype).removeprefix("torch."),
                device=device, loss=loss, time_ms=seconds * 1e3, peak_bytes=peak,
                eff_gbps=traffic / seconds / 1e9)


def measure_isolated(*args) -> dict:
    # A fresh process per CPU measurement: its peak RSS then belongs to this case alone.
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["vocab"], r["tokens"]) for r in rows}):
        by = {r["impl"]: r for r in rows if (r["vocab"], r["tokens"]) == key}
        entry = dict(vocab=key[0], tokens=key[1])
        for a, b in (("torch", "dense"), ("triton", "dense")):
            if a in by and b in by:
                entry[f"mem_{a}/{b}"] = by[a]["peak_bytes"] / max(by[b]["peak_bytes"], 1)
        for a, b in (("triton", "torch"), ("torch", "dense"), ("triton", "dense")):
            if a in by and b in by:
                entry[f"time_{a}/{b}"] = by[a]["time_ms"] / by[b]["time_ms"]
        if "triton" in by and "torch" in by:
            entry["loss_diff_triton_torch"] = abs(by["triton"]["loss"] - by["torch"]["loss"])
        out.append(entry)
    return out


def print_table(rows: list[dict], ratio_rows: list[dict]):
    head = (f"{'V':>7} {'N':>6} {'impl':>7} {'fwd+bwd ms':>11} {'peak MiB':>9} "
            f"{'eff GB/s':>9} {'loss':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['vocab']:>7} {r['tokens']:>6} {r['impl']:>7} {r['time_ms']:>11.3f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['eff_gbps']:>9.1f} {r['loss']:>10.5f}")
    print()
    for e in ratio_rows:
        parts = [f"{k}={v:.3g}" for k, v in e.items() if k not in ("vocab", "tokens")]
        print(f"V={e['vocab']} N={e['tokens']}: " + "  ".join(parts))


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m ddk.benchmarks.sparse_kl",
        description="Sparse KL forward+backward: dense torch vs chunked torch vs Triton.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--tokens", type=int, nargs="+",
                   help=f"rows N (default: {DEFAULT_TOKENS['cuda']} on CUDA, "
                        f"{DEFAULT_TOKENS['cpu']} on CPU)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="logits dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="triton is skipped on CPU")
    p.add_argument("--warmup", type=int, help="untimed runs (default: 2 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=int, help="timed runs (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = args.tokens or DEFAULT_TOKENS[device]
    dtype = DTYPES[args.dtype or DEFAULT_DTYPE[device]]
    repeats = args.repeats or (10 if device == "cuda" else 3)
    impls = [i for i in args.impls if device == "cuda" or i != "triton"]
    run = measure if device == "cuda" else measure_isolated
    warmup = args.warmup if args.warmup is not None else (2 if device == "cuda" else 1)

    rows = []
    for v in args.vocab:
        for n in tokens:
            for impl in impls:
                rows.append(run(impl, n, v, args.k, dtype, device, warmup, repeats))
                if device == "cuda":
                    torch.cuda.empty_cache()
    ratio_rows = ratios(rows)
    hw = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"device: {hw}, torch {torch.__version__}, dtype {dtype}, k={args.k}")
    print_table(rows, ratio_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=hw, torch=torch.__version__, results=rows,
                           ratios=ratio_rows), f, indent=2)


if __name__ == "__main__":
    main()
