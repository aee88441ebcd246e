"""`make bench-step`: the training step of a real-shaped student, fused vs unfused LM head, CPT vs cached KD, with and without activation checkpointing.

    python -m ddk.benchmarks.student_step                          # CUDA if available, else CPU
    python -m ddk.benchmarks.student_step --preset qwen2-1.5b --rows 2 --json runs/bench/step.json

What it measures. One Qwen2-architecture student (`Qwen2ForCausalLM`, sdpa attention,
tied embeddings, V = 151936) and one optimizer, trained six ways in one process: CPT (CE
only, gamma 0) and cached KD (CE + 0.2 * sparse KL over the teacher's top-k and tail),
each with the fused LM head (the default, the [tokens, V] logits never exist) and with
the unfused reference (the model's full logits), and the two fused ones again with
per-layer activation checkpointing ("AC": distill.activation_checkpointing). Every arm
is a whole optimizer step as `Trainer.optimizer_step` runs it: the batch pinned in host
memory and copied asynchronously, `StudentLM` forward under the stage-two autocast (bf16
on CUDA with fp32 parameters, fp32 on CPU), backward, gradient clipping, one read of the
step's numbers (loss, CE, KL, gradient norm: the step's one host synchronisation), the
stage-two AdamW (`build_optimizer`: fused on CUDA, no decay on norms, biases and
embeddings), zero_grad, on teacher batches shaped like the cache's `CacheBatch` (token
rows [B, L + 1], sorted distinct top-k ids, normalised top-k log-probs and their tail).
The arms run interleaved step by step and every ratio is the median over neighbouring
steps (benchmarks/suite.py: `interleaved`, `paired_ratio`), so drift of a shared machine
cancels in each pair. Per arm it also reports the model FLOP utilisation (MFU, below),
the peak memory of one step above what was live before it and, on CUDA, the largest
micro-batch (rows of seq_len) whose whole step fits: doubling from --rows, then
bisection, catching out-of-memory errors, up to --max-rows (--max-rows-ac with AC; the
AC search stops within 1/32 of its answer, each of its tries being a large step). A
step's peak is its largest phase: with few tokens per step that is the AdamW phase
(gradients plus the optimizer's temporaries), the same in every arm, and the loss phase,
where the unfused head holds several [tokens, V] buffers, only shows above it once the
step has enough tokens.

MFU. Model FLOPs per token = 6 x the matmul parameters (the Linear weights, the tied LM
head once: forward 2, backward 4) + 12 x layers x hidden x seq_len (attention scores and
values, PaLM's convention: the causal half is not subtracted), over the device's dense
bf16 peak (--peak-tflops, or by name: 989 TFLOP/s for an H100 or H200 SXM, 312 for an
A100); an AC step's recomputed forward is not counted (model, not hardware, FLOPs).

Why random weights are fine. The step's work is fixed by the shapes alone: the matmuls,
attention, the loss kernels and the optimizer run the same operations on any values
(nothing here branches on the data except the sparse KL's exact re-sum of a tiny student
tail, which a near-uniform random student never takes; a trained student rarely does).
So tokens/s and memory of a random-init model are those of a trained one of its shape.

What the CPU run can and cannot tell. At the CPU size (the `tiny` preset: 2 layers,
hidden 128, but the real vocabulary) it exercises the whole path end to end and measures
exact allocator bytes, so the memory the fused head saves per step is real. Its speeds
are not the GPU's: the LM head dominates a 2-layer student's FLOPs far more than a
24-layer one's, the loss runs the torch reference instead of the Triton kernel, there is
no bf16 and no memory ceiling to find the largest micro-batch under. The goal this
answers ("cached KD / CPT tokens/s >= 0.95" with the fused head) is a GPU figure: read
the CPU verdict as a check of the harness, and run this on a CUDA machine for the number.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..pipeline.cache.reader import CacheBatch
from ..pipeline.config import DistillConfig
from ..pipeline.objective import Objective
from ..pipeline.student import StudentLM, autocast_context, build_optimizer, set_activation_checkpointing
from .harness import describe_machine, interleaved, matmul_params, paired_ratio, print_table, step_peak_bytes, write_report

QWEN_VOCAB = 151936  # Qwen2's padded embedding rows
# Decoder shapes of the Qwen2 family (their config.json); `tiny` keeps the real vocabulary
# so that the LM head costs what it costs, with a decoder small enough for 2 CPU cores.
PRESETS = {
    "qwen2-0.5b": dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864),
    "qwen2-1.5b": dict(num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960),
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512),
}
# Sizes by device: the CPU run finishes in under 2 minutes on 2 loaded cores.
DEFAULTS = {
    "cuda": dict(preset="qwen2-0.5b", seq_len=2048, rows=4, steps=10),
    "cpu": dict(preset="tiny", seq_len=128, rows=2, steps=3),
}
GOAL_KD_OVER_CPT = 0.95  # fused cached KD tokens/s over fused CPT tokens/s
# The largest fused cached-KD micro-batch with AC, at least 3x the 42 rows (seq 2048,
# Qwen2-0.5B shape) it reached without AC on an H200 (docs/DESIGN.md section 9).
GOAL_MAX_ROWS_AC = 3 * 42
BATCHES = 2  # distinct synthetic batches cycled by every arm (the same rows for all)
TRAIN = DistillConfig()  # stage two's defaults: lr, weight decay, clipping, gamma
# (name, gamma, loss_impl, activation checkpointing), in the order the steps interleave.
ARMS = [
    ("CPT, fused", 0.0, "fused", False),
    ("cached KD, fused", TRAIN.gamma, "fused", False),
    ("CPT, unfused", 0.0, "unfused", False),
    ("cached KD, unfused", TRAIN.gamma, "unfused", False),
    ("CPT, fused, AC", 0.0, "fused", True),
    ("cached KD, fused, AC", TRAIN.gamma, "fused", True),
]
# The arms whose largest micro-batch is searched on CUDA: each try is a whole step, and an
# AC arm's tries run to a few hundred rows, so one AC arm (the KD one, the bigger step).
MAX_ROWS_ARMS = ("CPT, fused", "cached KD, fused", "CPT, unfused", "cached KD, unfused", "cached KD, fused, AC")
# Dense bf16 peak FLOP/s by device name (SXM parts; a PCIe H100 peaks lower: pass --peak-tflops).
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def build_student(shape: dict, vocab: int, seq_len: int, device: str) -> nn.Module:
    """A random-init Qwen2ForCausalLM of this shape, fp32 parameters (stage two's master weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=max(32768, seq_len),
                         attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 1.5B model builds in seconds on a GPU
        model = Qwen2ForCausalLM(config)
    return model.float().train()


def synthetic_batch(rows: int, seq_len: int, vocab: int, k: int, gen: torch.Generator) -> CacheBatch:
    """A batch shaped and normalised like `TopKCacheReader.batch`'s, in host memory."""
    n = rows * seq_len
    input_ids = torch.randint(0, vocab, (rows, seq_len + 1), generator=gen)
    # One random k-subset shifted per position (mod V) stays distinct within every
    # position; sorted by id, as the cache stores a support.
    shift = torch.randint(0, vocab, (n, 1), generator=gen)
    ids = ((shift + torch.randperm(vocab, generator=gen)[:k]) % vocab).sort(dim=1).values
    # The teacher's distribution restricted to its support plus one bucket for the rest:
    # a log_softmax over k + 1 random logits, the last being the tail, so that
    # tail = log(1 - sum exp(top-k)) holds exactly, as in the cache.
    logprobs = torch.log_softmax(2 * torch.randn(n, k + 1, generator=gen), dim=1)
    topk, tail = logprobs[:, :k].contiguous(), logprobs[:, k]
    # The teacher's log-prob of the actual next token: its support entry, else a uniform share of the tail.
    hit = ids == input_ids[:, 1:].reshape(n, 1)
    target = torch.where(hit.any(1), topk.masked_fill(~hit, 0).sum(1), tail - math.log(vocab - k))
    return CacheBatch(input_ids, ids.reshape(rows, seq_len, k), topk.reshape(rows, seq_len, k),
                      target.reshape(rows, seq_len), tail.reshape(rows, seq_len))


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Model FLOPs of one trained token: 6 x matmul parameters + 12 x layers x hidden x seq_len."""
    c = model.config
    return 6 * matmul_params(model) + 12 * c.num_hidden_layers * c.hidden_size * seq_len


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: --peak-tflops, else by name (PEAK_BF16_FLOPS), else None."""
    if override_tflops:
        return override_tflops * 1e12
    for part, flops in PEAK_BF16_FLOPS:
        if device_name and part in device_name:
            return flops
    return None


def to_device(batch: CacheBatch, device: str) -> CacheBatch:
    """The loss's tensors on the device, as `Trainer._to_device`: asynchronous copies of pinned memory."""
    if device == "cpu":
        return batch
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return CacheBatch(move(batch.input_ids), move(batch.topk_ids), move(batch.topk_logprobs), batch.target_logprob,
                      move(batch.tail_logmass), move(batch.loss_mask), move(batch.position_ids))


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, gamma: float, loss_impl: str,
              device: str, activation_checkpointing: bool = False) -> Callable[[CacheBatch], int]:
    """One whole optimizer step of `Trainer.optimizer_step` (grad_accum 1, no logging) on a batch; returns its tokens."""
    student = StudentLM(model, Objective(gamma, 1.0, True, loss_impl, "auto"))
    max_norm = TRAIN.grad_clip if TRAIN.grad_clip > 0 else math.inf

    def step(batch: CacheBatch) -> int:
        set_activation_checkpointing(model, activation_checkpointing)  # the arms share one model
        batch = to_device(batch, device)
        with autocast_context(TRAIN.precision, device):
            parts = student(batch.input_ids[:, :-1], batch)
        parts.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # the trainer reads the step's numbers once, before AdamW (its NaN check): the step's one host sync
        torch.stack([parts.loss.detach(), parts.ce, parts.kl, norm]).tolist()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch.topk_ids.shape[0] * batch.topk_ids.shape[1]

    return step


def largest_micro_batch(step: Callable[[CacheBatch], int], optimizer: torch.optim.Optimizer,
                        batch_of: Callable[[int], CacheBatch], cap: int, start: int = 0, resolution: float = 0.0) -> int:
    """The most rows (<= cap) whose whole step fits in GPU memory: doubling from `start`
    (rows known to fit), then bisection until the gap is at most resolution x the rows
    that fit (0: exact); 0 if one row does not fit."""

    def fits(rows: int) -> bool:
        try:
            step(batch_of(rows))
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        # Out of the except block the traceback's frames are gone; what they held
        # (activations, partial gradients) is freed here, so the next try starts clean.
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        return ok

    good, bad = min(start, cap), cap + 1  # good fits (0 trivially), bad does not (or is past the cap)
    while good < cap:
        rows = min(2 * good, cap) if good else 1
        if not fits(rows):
            bad = rows
            break
        good = rows
    while bad - good > max(1, int(resolution * good)):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def run(args) -> dict:
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, value in DEFAULTS[device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    shape = dict(PRESETS[args.preset])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    machine = describe_machine(device)
    print(f"bench-step: preset {args.preset} {shape}, V={QWEN_VOCAB}, {args.rows} rows x {args.seq_len} tokens, k={args.k}, "
          f"device {device}\nmachine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
          f"{machine['cuda_device'] or 'no CUDA device'}, load average {machine['load_average_at_start'][0]}")
    sys.stdout.flush()

    model = build_student(shape, QWEN_VOCAB, args.seq_len, device)
    optimizer = build_optimizer(model, TRAIN.lr, TRAIN.weight_decay)
    steps = {name: make_step(model, optimizer, gamma, impl, device, ac) for name, gamma, impl, ac in ARMS}
    gen = torch.Generator().manual_seed(0)

    def batch_of(rows: int) -> CacheBatch:  # in pinned host memory on CUDA, as the trainer's prefetch threads leave it
        b = synthetic_batch(rows, args.seq_len, QWEN_VOCAB, args.k, gen)
        return b if device == "cpu" else CacheBatch(*(None if getattr(b, f.name) is None else getattr(b, f.name).pin_memory() for f in dataclasses.fields(b)))

    batches = [batch_of(args.rows) for _ in range(BATCHES)]
    arms = {name: (lambda i, s=s: s(batches[i % BATCHES])) for name, s in steps.items()}

    phase_s = {"setup": time.perf_counter() - t_start}
    t = time.perf_counter()
    rates = interleaved(arms, args.warmup, args.steps, device)
    peaks = {name: step_peak_bytes(arm, device) for name, arm in arms.items()}
    phase_s["timed_steps_and_peaks"], t = time.perf_counter() - t, time.perf_counter()
    max_rows = dict.fromkeys(steps)
    if device == "cuda":
        # One batch of the most rows tried, its first rows for every smaller try: drawing
        # (and pinning) a fresh one per try would cost more host time than the tries.
        largest = batch_of(max(args.max_rows, args.max_rows_ac))
        first_rows = lambda rows: CacheBatch(*(None if getattr(largest, f.name) is None else getattr(largest, f.name)[:rows] for f in dataclasses.fields(largest)))  # noqa: E731
        for name, _, _, ac in ARMS:
            if name in MAX_ROWS_ARMS:
                max_rows[name] = largest_micro_batch(steps[name], optimizer, first_rows, args.max_rows_ac if ac else args.max_rows,
                                                     start=args.rows, resolution=1 / 32 if ac else 0.0)
        del largest
    phase_s["max_rows"] = time.perf_counter() - t
    set_activation_checkpointing(model, False)
    fpt = flops_per_token(model, args.seq_len)
    peak = peak_flops(machine["cuda_device"], args.peak_tflops) if device == "cuda" else None

    kd_over_cpt = {"fused": paired_ratio(rates, "cached KD, fused", "CPT, fused"),
                   "unfused": paired_ratio(rates, "cached KD, unfused", "CPT, unfused"),
                   "fused, AC": paired_ratio(rates, "cached KD, fused, AC", "CPT, fused, AC")}
    fused_over_unfused = {"cached KD": paired_ratio(rates, "cached KD, fused", "cached KD, unfused"),
                          "CPT": paired_ratio(rates, "CPT, fused", "CPT, unfused")}
    ac_over_no_ac = {"cached KD": paired_ratio(rates, "cached KD, fused, AC", "cached KD, fused"),
                     "CPT": paired_ratio(rates, "CPT, fused, AC", "CPT, fused")}
    goal = kd_over_cpt["fused"]
    rows_ac, rows_no_ac = max_rows["cached KD, fused, AC"], max_rows["cached KD, fused"]
    result = {
        "machine": machine, "device": device, "preset": args.preset, "shape": shape, "vocab": QWEN_VOCAB,
        "params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul_params(model),
        "precision": "bf16 autocast, fp32 parameters" if device == "cuda" else "fp32",
        "seq_len": args.seq_len, "rows": args.rows, "tokens_per_step": args.rows * args.seq_len, "k": args.k,
        "gamma": TRAIN.gamma, "steps": args.steps, "warmup": args.warmup,
        "max_rows_cap": args.max_rows if device == "cuda" else None, "max_rows_cap_ac": args.max_rows_ac if device == "cuda" else None,
        "flops_per_token": fpt, "peak_flops": peak,
        "optimizer": {"fused": bool(optimizer.defaults.get("fused")), "param_groups": [
            {"params": sum(p.numel() for p in g["params"]), "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]},
        "arms": {name: {"gamma": gamma, "loss_impl": impl, "activation_checkpointing": ac,
                        "tokens_per_s": statistics.median(rates[name]), "per_step": rates[name],
                        "mfu": statistics.median(rates[name]) * fpt / peak if peak else None,
                        "step_peak_bytes": peaks[name], "max_rows": max_rows[name]} for name, gamma, impl, ac in ARMS},
        "kd_over_cpt": kd_over_cpt, "fused_over_unfused": fused_over_unfused, "ac_over_no_ac": ac_over_no_ac,
        "max_rows": {"cached KD, fused": rows_no_ac, "cached KD, fused, AC": rows_ac,
                     "ac_over_no_ac": rows_ac / rows_no_ac if rows_ac and rows_no_ac else None},
        "goal": {"kd_over_cpt_fused_at_least": GOAL_KD_OVER_CPT, "median": goal["median"], "met": goal["median"] >= GOAL_KD_OVER_CPT},
        "goal_max_rows_ac": {"at_least": GOAL_MAX_ROWS_AC, "max_rows": rows_ac,
                             "applies": args.preset == "qwen2-0.5b" and args.seq_len == 2048,
                             "met": None if rows_ac is None else rows_ac >= GOAL_MAX_ROWS_AC},
        "phase_seconds": phase_s,
    }
    report(result)
    result["seconds"] = time.perf_counter() - t_start
    print(f"\nbench-step done in {result['seconds']:.0f} s")
    return result


def report(r: dict) -> None:
    cuda = r["device"] == "cuda"

    def rows_cell(a: dict):
        if not cuda:
            return "needs CUDA"
        if a["max_rows"] is None:
            return "not searched"
        cap = r["max_rows_cap_ac"] if a["activation_checkpointing"] else r["max_rows_cap"]
        return f"{a['max_rows']}{' (the cap)' if a['max_rows'] >= cap else ''}"

    peak = f"{r['peak_flops'] / 1e12:.0f} TFLOP/s" if r["peak_flops"] else None
    print_table(
        f"training step, {r['preset']} ({r['params']:,} params, V={r['vocab']}), {r['rows']} rows x {r['seq_len']} tokens, "
        f"k={r['k']}, gamma={r['gamma']}, {r['precision']}, {r['steps']} interleaved steps per arm after {r['warmup']} warm-up, "
        f"device {r['device']}",
        ["arm", "tokens/s (median)", f"MFU (of {peak})" if peak else "MFU", "step peak MiB",
         f"max rows (cap {r['max_rows_cap']}, AC {r['max_rows_cap_ac']})" if cuda else "max rows"],
        [[name, a["tokens_per_s"], f"{100 * a['mfu']:.1f} %" if a["mfu"] is not None else "no peak known",
          a["step_peak_bytes"] / 2**20, rows_cell(a)] for name, a in r["arms"].items()],
        "step = StudentLM forward (stage two's precision) + backward + clip_grad_norm_ + one read of the step's numbers + "
        "AdamW step + zero_grad, as Trainer.optimizer_step; AC = per-layer activation checkpointing; "
        f"MFU = tokens/s x {r['flops_per_token'] / 1e9:.2f} GFLOP/token (6 x matmul params + 12 x layers x hidden x seq) "
        "over the device's dense bf16 peak; step peak = bytes allocated during one step above what was live before it, the "
        "largest of its phases (with few tokens the AdamW phase, the same in every arm)"
        + ("; max rows: doubling then bisection on out-of-memory (AC: to within 1/32)." if cuda else
           ", from the CPU allocator's events; max rows needs a CUDA device's memory ceiling."),
    )
    pairs = [("cached KD / CPT, fused", r["kd_over_cpt"]["fused"]), ("cached KD / CPT, unfused", r["kd_over_cpt"]["unfused"]),
             ("cached KD / CPT, fused, AC", r["kd_over_cpt"]["fused, AC"]),
             ("fused / unfused, cached KD", r["fused_over_unfused"]["cached KD"]), ("fused / unfused, CPT", r["fused_over_unfused"]["CPT"]),
             ("AC / no AC, cached KD fused", r["ac_over_no_ac"]["cached KD"]), ("AC / no AC, CPT fused", r["ac_over_no_ac"]["CPT"])]
    print_table("tokens/s ratios, paired over neighbouring steps", ["ratio", "median", "quartiles"],
                [[name, p["median"], f"{p['q1']:.2f}-{p['q3']:.2f}"] for name, p in pairs])
    g, p = r["goal"], r["kd_over_cpt"]["fused"]
    where = "on this GPU" if cuda else "on this CPU at the tiny size (the goal is a GPU figure; see the module docstring)"
    print(f"\nverdict: fused cached KD / CPT tokens/s measured {p['median']:.3f} (quartiles {p['q1']:.3f}-{p['q3']:.3f}, "
          f"{r['steps']} paired steps): {'meets' if g['met'] else 'misses'} the goal >= {g['kd_over_cpt_fused_at_least']} {where}")
    m = r["goal_max_rows_ac"]
    if m["max_rows"] is not None:
        rows = (f"largest fused cached-KD micro-batch {r['max_rows']['cached KD, fused']} rows of {r['seq_len']} without AC, "
                f"{m['max_rows']} with AC")
        print(f"verdict: {rows}: {'meets' if m['met'] else 'misses'} the goal >= {m['at_least']} rows with AC (3x the 42 of "
              f"docs/DESIGN.md section 9)" if m["applies"] else f"{rows} (the goal of >= {m['at_least']} is set at seq 2048, qwen2-0.5b)")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m ddk.benchmarks.student_step", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="student shape (default: qwen2-0.5b on CUDA, tiny on CPU)")
    p.add_argument("--layers", type=int, help="override the preset's number of decoder layers")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: 2048 on CUDA, 128 on CPU)")
    p.add_argument("--rows", type=int, help="rows per micro-batch (default: 4 on CUDA, 2 on CPU)")
    p.add_argument("--k", type=int, default=64, help="teacher top-k per position (default: %(default)s)")
    p.add_argument("--steps", type=int, help="timed steps per arm (default: 10 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=64, help="CUDA: largest micro-batch tried without AC (default: %(default)s)")
    p.add_argument("--max-rows-ac", type=int, default=256, help="CUDA: largest micro-batch tried with AC (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: by device name, "
                                                         "989 for H100/H200 SXM, 312 for A100)")
    p.add_argument("--json", metavar="PATH", help="write every number and the machine description here")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        write_report(Path(args.json), result)


if __name__ == "__main__":
    main()
