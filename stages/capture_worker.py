"""One capture worker: a teacher engine over a subset of the planned shards.

Run in-process for the hf backend, and as `python -m ddk.stages.capture_worker` (a child
process in its own session) for vLLM and for several workers. Each shard is written
atomically by TopKShardWriter, so workers never coordinate beyond the shard list.
"""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..pipeline.atomic import write_json_atomic
from ..pipeline.cache.codec import TopKCodec
from ..pipeline.cache.manifest import CacheError, CachePlan, shard_done
from ..pipeline.teachers.support import top_p_support
from ..pipeline.cache.writer import TopKShardWriter
from ..pipeline.chat import position_ids, text_flags
from ..pipeline.ingest import INGEST_DIR, read_flags, read_rows, rows_path
from ..pipeline.progress import progress
from ..pipeline.teachers.base import TeacherOutputError, TopK

WORK_DIR = "_work"  # scratch of a cache being made: the ingested rows, the capture settings, worker stats
CAPTURE_FILE = f"{WORK_DIR}/capture.json"


def make_backend(plan: CachePlan, capture: dict):
    """The plan's teacher under the configured engine, refused if the engine does not
    compute in the dtype the plan (and so the manifest) records."""
    backend = _start_engine(plan, capture)
    if backend.dtype != plan.teacher["dtype"]:
        backend.close()
        raise CacheError(f"the {backend.name} engine runs the teacher in {backend.dtype}, but the cache's plan records "
                         f"teacher.dtype = {plan.teacher['dtype']}; the manifest would misstate the capture: "
                         f"use a dtype the engine supports on this machine (teacher.dtype) and a new cache.out_dir")
    return backend


def _start_engine(plan: CachePlan, capture: dict):
    t = capture["teacher"]
    if capture["backend"] == "vllm":
        from ..pipeline.teachers.vllm import VLLMTeacher

        return VLLMTeacher(
            plan.teacher["path"], plan.k, plan.seq_len + 2,  # prompt of L + 1 tokens + 1 generated
            dtype=plan.teacher["dtype"], tensor_parallel_size=t["tensor_parallel_size"], gpu_memory_utilization=t["gpu_memory_utilization"],
            cpu_kvcache_gib=t["cpu_kvcache_gib"], enforce_eager=t["enforce_eager"], seed=capture["seed"],
            vocab_bound=plan.codec["vocab_size"] if plan.codec.get("fold_padded") else None,
        )
    from ..pipeline.teachers.hf import SAMPLER, HFTeacher

    c = plan.codec
    if c["support"] == "sampled" and c.get("sampler") != SAMPLER:
        raise CacheError(f"this cache's plan records the sampler {c.get('sampler', 'multinomial-per-row (ddk before 2026-12)')!r}, "
                         f"this ddk draws with {SAMPLER!r}: its shards are read as they are, but finishing it would mix two "
                         f"draw procedures; capture into a new cache.out_dir (or finish it with the ddk that began it)")
    return HFTeacher(plan.teacher["path"], plan.k, dtype=plan.teacher["dtype"], support=c["support"], sample_seed=c["sample_seed"],
                     vocab_bound=c["vocab_size"], chunk_tokens=t.get("chunk_tokens", 0))


def run_capture(cache_dir: Path, shard_ids: list[int], worker: int = 0, capture_file: str = CAPTURE_FILE) -> None:
    """`capture_file`: the capture settings, relative to cache_dir (one per rank when
    several `ddk teacher-cache` ranks share the directory)."""
    cache_dir = Path(cache_dir)
    plan = CachePlan.load(cache_dir)
    capture = json.loads((cache_dir / capture_file).read_text())
    todo = [plan.shards[i] for i in shard_ids if not shard_done(cache_dir, plan.shards[i])]
    if not todo:
        return
    c = plan.codec
    codec = TopKCodec.from_params(c)
    writer = TopKShardWriter(codec, c["parquet_zstd_level"],
                             c["rows_per_row_group"], capture["encode_threads"])
    backend = make_backend(plan, capture)
    # vLLM schedules its own batches: hand it a whole shard. HF runs batch_rows at a time.
    batch_rows = max(s.rows for s in todo)
    if capture["backend"] == "hf":
        batch_rows = capture["teacher"]["batch_rows"]
        if batch_rows == "auto":
            batch_rows = backend.fit_batch_rows(plan.seq_len)
            print(f"teacher.batch_rows = auto: {batch_rows} rows of {plan.seq_len} tokens per forward", flush=True)
    tokens, t_start = 0, time.perf_counter()
    # The steady state: from the end of the first shard's teacher forwards (which carry the
    # one-time costs: Triton compiles, cuBLAS and allocator warm-up) to the end, over the
    # tokens of the other shards. A short capture is dominated by those costs; this says
    # what a long one runs at.
    first_forward_done, first_tokens = None, 0
    # The next shard's teacher forward overlaps this shard's encode + write (a second
    # thread, which encodes rows on cache.encode_threads threads of its own: zstd and most
    # numpy work release the GIL). On a GPU the CPU-side codec is otherwise the
    # bottleneck; on CPU the two share the cores. Output bytes are the same.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    pending: tuple[Future, object] | None = None
    try:
        bar = progress(total=sum(s.rows for s in todo) * plan.seq_len, desc=f"teacher top-k [{capture['backend']} w{worker}]",
                   unit="tok", unit_scale=True, position=worker)

        written_bytes = 0

        def finish(p: tuple[Future, object]) -> None:
            nonlocal tokens, written_bytes
            future, spec = p
            try:
                future.result()  # re-raises a writer error here
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                left = sum(s.rows for s in todo) * plan.seq_len - tokens
                per_token = written_bytes / tokens if tokens else 4.0 * plan.k  # a guess before any shard
                raise CacheError(
                    f"{cache_dir / spec.file}: no space left on the device ({shutil.disk_usage(cache_dir).free / 2**20:,.0f} MiB free); "
                    f"free about {left * per_token / 2**30:.1f} GiB there ({left:,} tokens to go at {per_token:.0f} bytes/token) and "
                    f"re-run `ddk teacher-cache`: the shards already written are kept and only the missing ones are made"
                ) from None
            written_bytes += (cache_dir / spec.file).stat().st_size
            tokens += spec.rows * plan.seq_len
            bar.update(spec.rows * plan.seq_len)
            bar.set_postfix(shard=spec.file, refresh=False)

        for spec in todo:
            rows = read_rows(rows_path(cache_dir / INGEST_DIR, spec.domain, spec.split), plan.seq_len, spec.row_start, spec.row_end)
            flags = None
            if plan.chat is not None:  # a masked cache: every row gets flags (raw-text domains: all supervised)
                flags = read_flags(cache_dir / INGEST_DIR, spec.domain, spec.split, plan.seq_len, spec.row_start, spec.row_end)
                if flags is None:  # corpus.document_mask: a segment per document (after each EOS)
                    flags = text_flags(*rows.shape, rows, plan.chat["eos"] if plan.chat.get("document_mask") else None)
            positions = None if flags is None else position_ids(flags)
            topk = _concat([_forward(backend, rows[i : i + batch_rows], batch_rows, spec.file,
                                     None if positions is None else positions[i : i + batch_rows])
                            for i in range(0, len(rows), batch_rows)])
            if first_forward_done is None:
                first_forward_done, first_tokens = time.perf_counter(), spec.rows * plan.seq_len
            # Padded teacher ids folded into the tail in this shard (hf backend, padded teachers only).
            fold = backend.take_folded() if hasattr(backend, "take_folded") else None
            # top-p: the exact top-k stays the reference the distortion is measured against.
            stored, reference = (top_p_support(topk, c["top_p"]), topk) if c["top_p"] else (topk, None)
            if pending is not None:
                finish(pending)
            pending = (pool.submit(writer.write, cache_dir / spec.file, spec.domain, spec.split, spec.row_start,
                                   np.asarray(rows), stored, reference, {"vocab_fold": fold} if fold else None, flags), spec)
        if pending is not None:
            finish(pending)
        bar.close()
    finally:
        pool.shutdown(wait=True)
        t_end = time.perf_counter()
        busy = t_end - t_start
        steady = ({"steady_tokens": tokens - first_tokens, "steady_seconds": t_end - first_forward_done}
                  if first_forward_done is not None and tokens > first_tokens else {})
        backend.close()
        stats = cache_dir / WORK_DIR / "stats" / f"worker-{worker}.json"
        try:
            stats.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(stats, {"tokens": tokens, "seconds": busy, "engine_dtype": backend.dtype, **steady})
        except OSError:  # a full disk: the throughput note is not worth masking the real error
            pass


def _forward(backend, rows: np.ndarray, batch_rows: int, shard: str, positions: np.ndarray | None = None) -> TopK:
    """One teacher forward; out of GPU memory, a one-line error naming the knob and a value
    that fits (half the rows; the shards written so far are complete and kept)."""
    try:
        return backend.topk(rows) if positions is None else backend.topk(rows, position_ids=positions)
    except TeacherOutputError as e:
        raise CacheError(f"{shard}: {e}; the shards already written are kept") from None
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(e).lower():
            raise
        raise CacheError(f"{shard}: the teacher ran out of GPU memory on {len(rows)} rows per forward; pass "
                         f"--set teacher.batch_rows={max(1, batch_rows // 2)} (or teacher.batch_rows=auto) and re-run: "
                         f"the shards already written are kept and only the missing ones are made") from None


def _concat(parts: list[TopK]) -> TopK:
    if len(parts) == 1:
        return parts[0]
    return TopK(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "target_logprob", "tail_logmass")))


def die_with_parent(parent_pid: int) -> None:
    """Exit, taking our process group (vLLM engine core, its workers) along, when the
    `ddk teacher-cache` that started us dies: a SIGKILLed parent runs no cleanup, and an
    orphaned worker would keep the GPU and race a resumed run for the same shards."""
    import ctypes
    import os
    import signal

    def stop(*_):
        os.killpg(os.getpgrp(), signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    try:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: only the start-up check below remains
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="ddk stage-one capture worker (started by `ddk teacher-cache`).")
    ap.add_argument("cache_dir")
    ap.add_argument("--shards", required=True, help="comma-separated shard indices of plan.json")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--capture", default=CAPTURE_FILE, help="capture settings file, relative to cache_dir")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    args = ap.parse_args()
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    run_capture(Path(args.cache_dir), [int(s) for s in args.shards.split(",") if s], args.worker, args.capture)


if __name__ == "__main__":
    main()
