"""`make bench-chat`: the training step on packed conversations against raw text, same tokens.

    python -m ddk.benchmarks.chat_step                     # CUDA if available, else CPU
    python -m ddk.benchmarks.chat_step --json runs/bench/chat.json

What it measures. One random-init Qwen2 student (the shapes of `benchmarks/student_step.py`) and
the fused cached-KD step of stage two, on the same token rows and teacher supports two
ways, interleaved step by step (benchmarks/harness.py: `interleaved`, `paired_ratio`):

  raw text      no mask, position ids 0..L-1, the plain causal mask
  packed chat   conversations of random lengths packed whole (packing.ConversationPacker,
                first fit over 16 open rows), position ids restarting per conversation
                (transformers builds the block-diagonal mask from them), the loss on the
                answer tokens only (about half of each conversation here)

The issue's goal is packed throughput >= 0.9x raw text on the same tokens (padding
included: the padding share is printed beside it, and tokens/s of real tokens). On CPU
it checks the harness (tiny preset, fp32); the number that answers the goal is a GPU's,
where the packed mask keeps sdpa off its causal fast path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..pipeline.cache.reader import CacheBatch
from ..pipeline.chat import SEGMENT_START, SUPERVISED, loss_mask, position_ids
from ..pipeline.packing import pack_conversations
from ..pipeline.student import build_optimizer
from .harness import describe_machine, interleaved, paired_ratio, print_table, write_report
from .student_step import DEFAULTS, PRESETS, QWEN_VOCAB, TRAIN, build_student, make_step, synthetic_batch

GOAL = 0.9  # packed chat tokens/s over raw text tokens/s


def chat_layout(rows: int, row_len: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Token flags [rows, row_len] of conversations of random lengths (a prompt, then an
    answer of about the same length) packed whole; and the padding share."""
    convs = []
    while sum(len(f) for f in convs) < 1.3 * rows * row_len:
        n = int(rng.integers(max(8, row_len // 16), max(9, row_len // 2)))
        flags = np.zeros(n, np.uint8)
        flags[0] = SEGMENT_START
        flags[n // 2 :] = SUPERVISED
        convs.append(flags)
    ids, flags = pack_conversations([(np.ones(len(f), np.int32), f) for f in convs], row_len, 0, rows, window=16)
    return flags, float((ids == 0).mean())


def run(args) -> dict:
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = DEFAULTS[device]
    preset, seq_len, rows = args.preset or d["preset"], args.seq_len or d["seq_len"], args.rows or d["rows"]
    machine = describe_machine(device)
    print(f"bench-chat: preset {preset}, V={QWEN_VOCAB}, {rows} rows x {seq_len} tokens, k={args.k}, device {device}\n"
          f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['cuda_device'] or 'no CUDA device'}, "
          f"load average {machine['load_average_at_start'][0]}")
    sys.stdout.flush()
    model = build_student(dict(PRESETS[preset]), QWEN_VOCAB, seq_len, device)
    optimizer = build_optimizer(model, TRAIN.lr, TRAIN.weight_decay)
    step = make_step(model, optimizer, TRAIN.gamma, "fused", device)
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    raw = synthetic_batch(rows, seq_len, QWEN_VOCAB, args.k, gen)
    flags, pad_share = chat_layout(rows, seq_len + 1, rng)
    mask = torch.from_numpy(loss_mask(flags))
    # the reader's padding where nothing is supervised: the same supports elsewhere
    chat = CacheBatch(raw.input_ids, raw.topk_ids.masked_fill(~mask[..., None], -1),
                      raw.topk_logprobs.masked_fill(~mask[..., None], float("-inf")), raw.target_logprob, raw.tail_logmass,
                      mask, torch.from_numpy(position_ids(flags)))
    if device == "cuda":
        raw, chat = (CacheBatch(*(None if t is None else t.pin_memory() for t in (getattr(b, f) for f in b.__dataclass_fields__)))
                     for b in (raw, chat))
    rates = interleaved({"raw text": lambda i: step(raw), "packed chat": lambda i: step(chat)}, args.warmup, args.steps, device)
    ratio = paired_ratio(rates, "packed chat", "raw text")
    tokens = {name: statistics.median(r) for name, r in rates.items()}
    result = {"machine": machine, "device": device, "preset": preset, "seq_len": seq_len, "rows": rows, "k": args.k,
              "padding_share": pad_share, "supervised_share": float(mask.float().mean()),
              "tokens_per_s": tokens, "real_tokens_per_s_packed": tokens["packed chat"] * (1 - pad_share),
              "packed_over_raw": ratio, "goal": {"at_least": GOAL, "met": ratio["median"] >= GOAL}}
    print_table("training step, fused cached KD, same tokens and supports", ["arm", "tokens/s", "real tokens/s"],
                [["raw text", f"{tokens['raw text']:,.0f}", f"{tokens['raw text']:,.0f}"],
                 ["packed chat", f"{tokens['packed chat']:,.0f}", f"{result['real_tokens_per_s_packed']:,.0f}"]])
    print(f"packed / raw tokens/s: {ratio['median']:.3f} (quartiles {ratio['q1']:.3f}-{ratio['q3']:.3f}); goal >= {GOAL}: "
          f"{'met' if result['goal']['met'] else 'NOT met'}{' (CPU: a harness check, the goal is a GPU figure)' if device == 'cpu' else ''}; "
          f"padding {pad_share:.1%} of the packed tokens, supervised {result['supervised_share']:.1%} of the positions")
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        write_report(Path(args.json), result)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="student shape (default: qwen2-0.5b on CUDA, tiny on CPU)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per arm (default: 10 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if torch.cuda.is_available() else 3
    run(args)


if __name__ == "__main__":
    main()
