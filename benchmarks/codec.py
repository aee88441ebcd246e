"""Stage one's codec at a real teacher's scale: encode tokens/s on 1 vs N threads, V = 151936.

    python -m ddk.benchmarks.codec                          # V=151936, k=64, seq 2048, threads 1 and min(4, cores)
    python -m ddk.benchmarks.codec --threads 1,2,4,8 --rows 32 --json runs/bench/codec.json

The input is synthetic but shaped like a teacher's top-k (`synthetic_capture`): per
position k distinct ids drawn from a Zipf(1) prior over the vocabulary (frequent ids
first, as BPE orders them), log-probs from a softmax of random logits (the prior's log
plus Gaussian noise) with a random tail mass, and the next token sampled from them. It
also feeds the real-scale decode benchmark (bench.py, P6b) and the reader tests through
`write_synthetic_cache`: real writer, real plan and manifest, synthetic teacher.

Two arms per thread count, interleaved (1, N, 1, N, ...) so the machine's drift cancels in
each pair: `encode` is TopKShardWriter.encode_rows (codec encode + the fidelity check the
writer runs on every row, on `encode_threads` threads), `write` the whole
TopKShardWriter.write (encode, Parquet, fsync, rename). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..pipeline.cache.codec import DEFAULT_LOGPROB_FLOOR, TopKCodec
from ..pipeline.cache.manifest import CachePlan, build_manifest, plan_shards
from ..pipeline.cache.schema import FORMAT_VERSION, SPLITS
from ..pipeline.cache.writer import TopKShardWriter
from ..pipeline.teachers.base import TopK

QWEN_VOCAB = 151936


def synthetic_capture(rng: np.random.Generator, rows: int, seq_len: int, vocab: int, k: int) -> tuple[np.ndarray, TopK]:
    """Token rows [rows, seq_len + 1] and their teacher-like top-k (ids in rank order)."""
    n = rows * seq_len
    # Zipf(1) ranks as floor(M^U) - 1, M = vocab - k + 2, sorted; then made distinct by
    # lifting each id to at least its left neighbour + 1 (ids stay < vocab).
    ids = np.exp(rng.random((n, k), dtype=np.float32) * np.float32(np.log(vocab - k + 2))).astype(np.int64) - 1
    ids.sort(axis=1)
    lift = np.arange(k)
    ids -= lift
    np.maximum.accumulate(ids, axis=1, out=ids)
    ids += lift
    logits = rng.standard_normal((n, k), dtype=np.float32) * np.float32(1.5) - np.float32(0.5) * np.log1p(ids.astype(np.float32))
    order = np.argsort(-logits, axis=1)  # rank order, as a teacher returns it
    ids, logits = np.take_along_axis(ids, order, 1), np.take_along_axis(logits, order, 1)
    tail = np.log(rng.uniform(0.02, 0.4, n)).astype(np.float32)  # log of the mass outside the top-k
    top = logits[:, :1]
    kept_lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    logprobs = logits - (kept_lse - np.log1p(-np.exp(tail)))[:, None]
    # The actual next token: sampled from the kept distribution (Gumbel-max).
    with np.errstate(divide="ignore"):  # an exponential draw of exactly 0 is a (valid) certain pick
        pick = np.argmax(logprobs - np.log(rng.standard_exponential((n, k), dtype=np.float32)), axis=1)
    nxt = ids[np.arange(n), pick].reshape(rows, seq_len)
    tokens = np.concatenate([rng.integers(0, vocab, (rows, 1)), nxt], axis=1).astype(np.int32)
    topk = TopK(ids.reshape(rows, seq_len, k).astype(np.int32), logprobs.reshape(rows, seq_len, k),
                logprobs[np.arange(n), pick].reshape(rows, seq_len), tail.reshape(rows, seq_len))
    return tokens, topk


def write_synthetic_cache(cache_dir: Path, train_rows: dict[str, int], seq_len: int, vocab: int, k: int,
                          rows_per_shard: int, rows_per_row_group: int, seed: int = 0, encode_threads: int = 1) -> dict:
    """A complete cache of synthetic teacher rows (train split only) written by the real
    TopKShardWriter and indexed by the real manifest; returns the manifest."""
    codec = TopKCodec(vocab, k, logprob_floor=DEFAULT_LOGPROB_FLOOR)
    splits = {d: {"train": n, "val": 0, "test": 0} for d, n in train_rows.items()}
    plan = CachePlan(
        format_version=FORMAT_VERSION,
        teacher={"path": "synthetic", "weights_sha256": "synthetic", "backend": "synthetic", "dtype": "float32"},
        tokenizer={"sha256": "synthetic", "vocab_size": vocab},
        k=k, seq_len=seq_len,
        codec={"vocab_size": vocab, "k": k, "logprob_step": codec.logprob_step, "logprob_floor": codec.logprob_floor,
               "parquet_zstd_level": 3, "rows_per_row_group": rows_per_row_group},
        domains={d: {**{f"{s}_rows": splits[d][s] for s in SPLITS}, "tokens_sha256": "synthetic"} for d in train_rows},
        shards=plan_shards(splits, rows_per_shard),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan.save(cache_dir)
    writer = TopKShardWriter(codec, 3, rows_per_row_group, encode_threads)
    rng = np.random.default_rng(seed)
    for spec in plan.shards:
        tokens, topk = synthetic_capture(rng, spec.rows, seq_len, vocab, k)
        writer.write(cache_dir / spec.file, spec.domain, spec.split, spec.row_start, tokens, topk)
    return build_manifest(cache_dir, plan)


def encode_throughput(threads: list[int], rows: int, seq_len: int, vocab: int, k: int, repeats: int, tmp: Path) -> dict:
    """tokens/s of TopKShardWriter.encode_rows and .write on one synthetic shard, per thread count, interleaved."""
    tokens, topk = synthetic_capture(np.random.default_rng(0), rows, seq_len, vocab, k)
    codec = TopKCodec(vocab, k, logprob_floor=DEFAULT_LOGPROB_FLOOR)
    writers = {t: TopKShardWriter(codec, 3, 8, t) for t in threads}
    n_tokens = rows * seq_len
    rates: dict[tuple[str, int], list[float]] = {(arm, t): [] for arm in ("encode", "write") for t in threads}
    files = {}
    for r in range(repeats + 1):  # the first round warms up (allocator, thread start-up)
        for t, w in writers.items():
            for arm in ("encode", "write"):
                t0 = time.perf_counter()
                if arm == "encode":
                    w.encode_rows(tmp / "x.parquet", 0, topk)
                else:
                    w.write(tmp / f"threads-{t}.parquet", "d", "train", 0, tokens, topk)
                if r:
                    rates[arm, t].append(n_tokens / (time.perf_counter() - t0))
        files = {t: (tmp / f"threads-{t}.parquet").read_bytes() for t in threads}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    base = threads[0]
    out = {"vocab": vocab, "k": k, "seq_len": seq_len, "rows": rows, "tokens": n_tokens, "repeats": repeats, "cores": cores,
           "load_average": [round(x, 2) for x in os.getloadavg()], "bytes_per_token": len(files[base]) / n_tokens,
           "same_bytes_for_every_thread_count": len({files[t] for t in threads}) == 1, "threads": {}}
    for t in threads:
        row = {}
        for arm in ("encode", "write"):
            xs = rates[arm, t]
            row[arm] = {"tokens_per_s": statistics.median(xs), "per_core_tokens_per_s": statistics.median(xs) / min(t, cores),
                        "speedup_vs_first": statistics.median(x / y for x, y in zip(xs, rates[arm, base]))}
        out["threads"][t] = row
    return out


def print_encode_table(r: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'threads':>7}  {'encode tok/s':>13}  {'per core':>10}  {'speed-up':>8}  {'write tok/s':>12}  {'per core':>10}  {'speed-up':>8}")
    for t, row in r["threads"].items():
        e, w = row["encode"], row["write"]
        print(f"{t:>7}  {e['tokens_per_s']:>13,.0f}  {e['per_core_tokens_per_s']:>10,.0f}  {e['speedup_vs_first']:>8.2f}  "
              f"{w['tokens_per_s']:>12,.0f}  {w['per_core_tokens_per_s']:>10,.0f}  {w['speedup_vs_first']:>8.2f}")
    print(f"V={r['vocab']}, k={r['k']}, {r['rows']} rows x {r['seq_len']} positions per call, median of {r['repeats']} interleaved "
          f"calls; per core = tok/s / min(threads, {r['cores']} cores); speed-up = median of paired ratios to "
          f"{next(iter(r['threads']))} thread(s). encode = codec encode + the writer's fidelity check (decode) per row; "
          f"write = encode + Parquet + fsync. {r['bytes_per_token']:.1f} B/token on disk; identical bytes for every "
          f"thread count: {'yes' if r['same_bytes_for_every_thread_count'] else 'NO'}. Load average "
          f"{r['load_average'][0]} at the end (a busy machine flattens the speed-up).")
    sys.stdout.flush()


def main(argv=None) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p = argparse.ArgumentParser(prog="python -m ddk.benchmarks.codec", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rows", type=int, default=16, help="rows per timed call (one shard)")
    p.add_argument("--threads", default=f"1,{min(4, cores)}", help="comma-separated thread counts (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    threads = sorted({int(t) for t in args.threads.split(",")})
    with tempfile.TemporaryDirectory(prefix="ddk-bench-codec-") as tmp:
        r = encode_throughput(threads, args.rows, args.seq_len, args.vocab, args.k, args.repeats, Path(tmp))
    print_encode_table(r, f"stage-one encode throughput, {cores} cores")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=2))
        print(f"results: {path}")


if __name__ == "__main__":
    main()
