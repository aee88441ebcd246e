"""Stage one on a GPU: the hf capture (HFTeacher.topk) against the teacher's bare forward.

    python -m ddk.benchmarks.capture                      # 1.5B and 7B Qwen2 shapes, 8 x 2048 tokens
    python -m ddk.benchmarks.capture --shapes 1.5b --json runs/bench/capture.json

CUDA only. Random-init Qwen2ForCausalLM teachers of the Qwen2.5-1.5B and -7B shapes
(V = 151936, bf16, sdpa) are built in GPU memory; per shape, interleaved repeats of:
  bare      model(ids).logits: the forward a capture cannot avoid, logits included (the
            reference of the issue's goal; the earlier capture computed exactly this and
            then its top-k on an fp32 copy)
  decoder   the decoder to its final hidden states only (what the chunked head starts from)
  top-k     HFTeacher.topk, support "topk" (Triton stats pass), everything up to numpy
  top-k/torch  the same with the torch per-chunk path (the CPU path), for comparison
  sampled   HFTeacher.topk, support "sampled": the blocked inverse CDF (Triton: the sums
            of blocks of 64 logits in one read of the chunk, then each draw's block and
            its id within it), the draws' counts on the GPU
  sampled/torch  the same with the torch per-chunk path (the CPU path: an fp32 copy of
            each chunk), for comparison
  sampled+write  `sampled` while the previous call's result is encoded and written as a
            shard on a background thread (cache.encode_threads threads of its own), as the
            capture worker overlaps them; the call ends when both are done. Against
            `sampled` it shows what the worker's loop costs the GPU: the write's own time
            where the codec cannot keep up, and the GIL the encode threads take from the
            thread that launches the teacher's kernels
Each arm's peak is the allocator's peak above what was allocated before it (weights).
Then, for the 7B shape, `teacher.batch_rows = auto` at seq 4096 on an emulated 80 GB GPU
(a ballast tensor takes the rest): the rows it picks and one capture of that many rows.
Last, the CPU codec's encode tokens/s on one thread (benchmarks/codec.py). A random-init
teacher is near-uniform: bytes/token measured on it mean nothing, so none are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from concurrent.futures import ThreadPoolExecutor

from ..pipeline.atomic import write_json_atomic
from ..pipeline.cache.codec import DEFAULT_LOGPROB_FLOOR, TopKCodec
from ..pipeline.cache.writer import TopKShardWriter
from ..pipeline.config import CacheConfig
from ..pipeline.teachers.hf import HFTeacher
from .codec import encode_throughput
from .harness import describe_machine

VOCAB = 151936
# (hidden, intermediate, layers, heads, kv heads) of the Qwen2.5 checkpoints' config.json.
SHAPES = {
    "0.5b": (896, 4864, 24, 14, 2),
    "1.5b": (1536, 8960, 28, 12, 2),
    "7b": (3584, 18944, 28, 28, 4),
    "tiny": (64, 128, 2, 4, 2),  # the CPU smoke test of this script (tests/test_bench_capture.py)
}
GOALS = {"topk": 0.95, "sampled": 0.90}  # capture / bare forward (the goals)


def parse_gpu_args(parser: argparse.ArgumentParser, argv, refusal: str) -> tuple[argparse.Namespace, str]:
    """The GPU benchmarks' common ending: --json, the hidden --cpu-smoke (the test suite
    runs the script on CPU at a tiny shape), and a one-line refusal without CUDA.
    Returns (args, device)."""
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit(refusal)
    return args, "cpu" if args.cpu_smoke else "cuda"


def build_teacher(shape: str, seq_len: int, device: str, vocab: int = VOCAB, **config) -> torch.nn.Module:
    """A random-init Qwen2ForCausalLM of SHAPES[shape] in bf16 on `device` (config: more
    Qwen2Config fields, e.g. the tokenizer's eos id)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, inter, layers, heads, kv = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(seq_len + 1, 32768),
                      tie_word_embeddings=False, attn_implementation="sdpa", **config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _timed(fn, base: int) -> tuple[float, float]:
    """(seconds, peak GiB above `base`) of fn(), synchronised (peak 0 without CUDA)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, ((torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else 0.0)


class OverlappedWrite:
    """A capture call as the worker makes it: submit the previous result's shard write to a
    background thread, capture this batch, then wait for the write (the worker's one-shard-
    deep overlap). Shards go to a temporary folder, each call overwriting the last."""

    def __init__(self, teacher: HFTeacher, rows: np.ndarray, k: int, encode_threads: int, folder: Path):
        # the codec stage one writes a sampled cache with, at the config's defaults
        codec = TopKCodec.from_params({"vocab_size": teacher.vocab_bound, "k": k, "logprob_step": CacheConfig().logprob_step,
                                       "logprob_floor": DEFAULT_LOGPROB_FLOOR, "support": "sampled"})
        self.writer = TopKShardWriter(codec, 3, 8, encode_threads)
        self.teacher, self.rows, self.folder = teacher, rows, folder
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.previous = None

    def __call__(self):
        pending = None
        if self.previous is not None:
            pending = self.pool.submit(self.writer.write, self.folder / "shard.parquet", "d", "train", 0,
                                       self.rows, self.previous)
        self.previous = self.teacher.topk(self.rows)
        if pending is not None:
            pending.result()

    def close(self):
        self.pool.shutdown(wait=True)


def bench_shape(shape: str, rows: int, seq_len: int, k: int, repeats: int, device: str = "cuda",
                encode_threads: int = 4):
    model = build_teacher(shape, seq_len, device)
    params = sum(p.numel() for p in model.parameters())
    ids_np = np.random.default_rng(0).integers(0, 151643, (rows, seq_len + 1))
    ids = torch.as_tensor(ids_np, device=device)
    teachers = {"topk": HFTeacher.from_model(model, k, support="topk"),
                "topk/torch": HFTeacher.from_model(model, k, support="topk", impl="torch"),
                "sampled": HFTeacher.from_model(model, k, support="sampled"),
                "sampled/torch": HFTeacher.from_model(model, k, support="sampled", impl="torch")}
    folder = Path(tempfile.mkdtemp(prefix="ddk-capture-write-"))
    overlapped = OverlappedWrite(teachers["sampled"], ids_np, k, encode_threads, folder)
    with torch.no_grad():
        arms = {
            "bare": lambda: model(input_ids=ids[:, :-1], use_cache=False).logits,
            "decoder": lambda: model.get_decoder()(input_ids=ids[:, :-1], use_cache=False).last_hidden_state,
            **{name: (lambda t=t: t.topk(ids_np)) for name, t in teachers.items()},
            "sampled+write": overlapped,
        }
        base = _allocated()
        times: dict[str, list[float]] = {a: [] for a in arms}
        peaks: dict[str, float] = {}
        for r in range(repeats + 1):  # round 0 warms up (cuBLAS heuristics, Triton compile)
            for name, fn in arms.items():
                sec, peak = _timed(fn, base)
                if r:
                    times[name].append(sec)
                    peaks[name] = max(peaks.get(name, 0.0), peak)
    tokens = rows * seq_len
    out = {"shape": shape, "params_b": params / 1e9, "rows": rows, "seq_len": seq_len, "k": k, "repeats": repeats,
           "chunk_tokens": {n: t.chunk_tokens for n, t in teachers.items()}, "chunked_head": teachers["topk"].chunked,
           "arms": {}}
    for name in arms:
        sec = statistics.median(times[name])
        out["arms"][name] = {"seconds": sec, "tokens_per_s": tokens / sec, "peak_gib": peaks[name],
                             "vs_bare": statistics.median(b / x for b, x in zip(times["bare"], times[name]))}
    out["encode_threads"] = encode_threads
    overlapped.close()
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    del teachers, arms, overlapped
    return out, model


def auto_rows_on_80gb(model, seq_len: int, k: int) -> dict:
    """teacher.batch_rows = auto at seq_len with the GPU shrunk to 80 GB by a ballast."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    ballast_bytes = max(0, total - 80 * 10**9)
    ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device="cuda") if ballast_bytes else None
    teacher = HFTeacher.from_model(model, k, support="sampled")
    rows = teacher.fit_batch_rows(seq_len)
    ids = np.random.default_rng(1).integers(0, 151643, (rows, seq_len + 1))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        teacher.topk(ids)
        ok, err = True, None
    except torch.OutOfMemoryError as e:
        ok, err = False, str(e).splitlines()[0]
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    del ballast
    torch.cuda.empty_cache()
    return {"emulated_gpu_gb": 80, "seq_len": seq_len, "auto_rows": rows, "captured": ok, "error": err,
            "seconds": sec, "tokens_per_s": rows * seq_len / sec if ok else None, "peak_gib_incl_ballast": peak}


def print_shape(r: dict) -> None:
    print(f"\n{r['shape']} shape ({r['params_b']:.2f}B params), {r['rows']} x {r['seq_len']} tokens, k={r['k']}, bf16, "
          f"median of {r['repeats']} interleaved repeats; chunked head: {r['chunked_head']}, chunk positions "
          f"{r['chunk_tokens']}")
    print(f"{'arm':<14} {'tok/s':>10} {'vs bare':>8} {'peak GiB':>9}")
    for name, a in r["arms"].items():
        print(f"{name:<14} {a['tokens_per_s']:>10,.0f} {a['vs_bare']:>8.3f} {a['peak_gib']:>9.2f}")
    for arm, goal in GOALS.items():
        got = r["arms"][arm]["vs_bare"]
        print(f"goal {arm} >= {goal}x bare: {got:.3f} ({'met' if got >= goal else 'NOT met'})")
    write = r["arms"]["sampled+write"]["tokens_per_s"] / r["arms"]["sampled"]["tokens_per_s"]
    print(f"sampled with the shard write overlapped ({r['encode_threads']} encode threads) / sampled alone: {write:.3f}")
    extra = r["arms"]["topk"]["peak_gib"] - r["arms"]["bare"]["peak_gib"]
    print(f"capture peak - bare peak: top-k {extra:+.2f} GiB, sampled "
          f"{r['arms']['sampled']['peak_gib'] - r['arms']['bare']['peak_gib']:+.2f} GiB (goal <= +2 GiB)")
    sys.stdout.flush()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddk.benchmarks.capture", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1.5b,7b", help=f"comma-separated, of {', '.join(SHAPES)} (default: %(default)s)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--encode-threads", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads encoding a shard in the sampled+write arm (cache.encode_threads' default: %(default)s)")
    p.add_argument("--auto-seq-len", type=int, default=4096, help="seq_len of the 80 GB batch_rows=auto check (0: skip)")
    args, device = parse_gpu_args(p, argv, "bench-capture needs a CUDA GPU (it builds 1.5B and 7B teachers in GPU memory); "
                                           "on CPU, `make bench` (P5) measures the capture on the tiny teacher")
    result = {"machine": describe_machine(device), "shapes": {}}
    print(f"ddk bench-capture on {result['machine']['cuda_device'] or result['machine']['cpu']}, torch {torch.__version__}")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for shape in shapes:
        r, model = bench_shape(shape, args.rows, args.seq_len, args.k, args.repeats, device, args.encode_threads)
        print_shape(r)
        if shape == shapes[-1] and args.auto_seq_len and device == "cuda":
            r["auto_rows_80gb"] = a = auto_rows_on_80gb(model, args.auto_seq_len, args.k)
            print(f"teacher.batch_rows = auto, seq {a['seq_len']}, GPU emulated at 80 GB: {a['auto_rows']} rows; one capture "
                  f"of them: {'ok' if a['captured'] else 'OUT OF MEMORY: ' + str(a['error'])}, "
                  f"{(a['tokens_per_s'] or 0):,.0f} tok/s, peak {a['peak_gib_incl_ballast']:.1f} GiB incl. ballast")
        result["shapes"][shape] = r
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        codec = encode_throughput([1], args.rows, args.seq_len, VOCAB, args.k, 2, Path(tmp))
    result["codec"] = codec
    rate = codec["threads"][1]["encode"]["tokens_per_s"]
    print(f"\ncodec (top-k, CPU, one thread): {rate:,.0f} tokens/s encode at V={VOCAB}, k={args.k}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), result)
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
