"""The real pipeline on a GPU in one command: `make bench-gpu`.

    python -m ddk.benchmarks.gpu_pipeline                        # 1.5B teacher, 0.5B student, seq 2048
    python -m ddk.benchmarks.gpu_pipeline --rows 256 --steps 200 --json runs/bench/gpu.json

CUDA only. Random-init Qwen2 models of the Qwen2.5-1.5B (teacher) and -0.5B (student)
shapes are written with save_pretrained (bf16) on Qwen's tokenizer, and the built-in
corpus is packed into rows of seq 2048 (at most --rows training rows per domain). Then
the real command line, each stage in its own process as a user runs it:

    ddk teacher-cache   (hf backend, the default sampled support)
    ddk distill --mode cpt, then --mode kd   (--steps steps each)
    ddk eval

Printed: stage one's tokens/s (its busy time, from the manifest; and its steady state, each
worker's first shard left out, since a short capture is dominated by one-time compiles and
warm-up that the bare forward's warm-up batch excludes) against the teacher's
bare forward `model(ids).logits` over the same rows and batch size, measured here after
the capture; stage two's cached-KD tokens/s against CPT's (medians over the steps after
the first 10); each stage's wall time and peak GPU memory (the most nvidia-smi saw in
use while it ran: the process's allocator reservation, not torch's allocated bytes);
the cache's bytes/token (a random-init teacher is near-uniform, so 64 draws hit ~64
distinct ids: the bytes of a worst case, not of a real teacher).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..pipeline.atomic import write_json_atomic
from .capture import SHAPES, build_teacher, parse_gpu_args

GOALS = {"stage_one_vs_bare": 0.9, "kd_vs_cpt": 0.95}  # the goals


def save_model(shape: str, vocab: int, out: Path, tokenizer, device: str) -> None:
    model = build_teacher(shape, 2048, device, vocab, bos_token_id=tokenizer.eos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model


class GpuMemoryWatch:
    """The most GPU memory nvidia-smi reports in use while the block runs (MiB; None
    without nvidia-smi)."""

    def __enter__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max(int(x) for x in out.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_stage(name: str, args: list[str], log: Path) -> dict:
    cmd = [sys.executable, "-m", "ddk.stages.cli", *args]
    print(f"\n$ ddk {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with GpuMemoryWatch() as mem, open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    tail = log.read_text()[-3000:]
    print(tail[-1500:], flush=True)
    if rc != 0:
        raise SystemExit(f"bench-gpu: `ddk {' '.join(args)}` failed with status {rc}; its log: {log}")
    return {"stage": name, "wall_s": wall, "peak_gpu_mib": mem.peak}


def train_rate(run_dir: Path, skip: int = 10) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r.get("kind") == "train"]
    return statistics.median(rates[skip:] if len(rates) > skip + 2 else rates)


def bare_forward_rate(teacher_dir: Path, cache_dir: Path, batch_rows: int, device: str) -> float:
    """tokens/s of model(ids).logits over the cache's rows, batch_rows at a time (as the
    capture batched them), the teacher in its checkpoint's dtype; one warm-up batch."""
    from transformers import AutoModelForCausalLM

    from ..pipeline.cache.reader import TopKCacheReader
    from ..pipeline.teachers.hf import DTYPES, checkpoint_dtype

    reader = TopKCacheReader(cache_dir)
    keys = [(d, s, i) for d in reader.domains for s in ("train", "val", "test")
            for i in range(reader.manifest["domains"][d][f"{s}_rows"])]
    ids = reader.token_rows(keys).to(device)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=DTYPES[checkpoint_dtype(teacher_dir)]).to(device).eval()
    with torch.no_grad():
        model(input_ids=ids[:batch_rows, :-1], use_cache=False)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for r in range(0, len(ids), batch_rows):
            model(input_ids=ids[r: r + batch_rows, :-1], use_cache=False).logits
        if device == "cuda":
            torch.cuda.synchronize()
    return len(ids) * (ids.shape[1] - 1) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddk.benchmarks.gpu_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="1.5b", choices=sorted(SHAPES))
    p.add_argument("--student", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--rows", type=int, default=256, help="training rows per domain at most (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=150, help="stage-two steps per mode (default: %(default)s)")
    p.add_argument("--batch-rows", type=int, default=8, help="stage two's micro-batch rows (default: %(default)s)")
    p.add_argument("--teacher-batch-rows", type=int, default=16, help="rows per teacher forward (default: %(default)s)")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    args, device = parse_gpu_args(p, argv, "bench-gpu needs a CUDA GPU (it trains a 0.5B student from a 1.5B teacher); "
                                           "on CPU, `make demo` runs the same pipeline on tiny models")
    from ..pipeline.qwen_tokenizer import QWEN2_EMBEDDING_SIZE, qwen_tokenizer
    from .harness import describe_machine

    with tempfile.TemporaryDirectory(prefix="ddk-bench-gpu-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {"machine": describe_machine(device), "args": vars(args), "stages": {}}
        print(f"ddk bench-gpu on {result['machine']['cuda_device'] or result['machine']['cpu']}: teacher "
              f"{args.teacher}, student {args.student}, seq {args.seq_len}, <= {args.rows} train rows per domain", flush=True)
        t0 = time.perf_counter()
        tokenizer = qwen_tokenizer(work / "tokenizer")
        for role, shape in (("teacher", args.teacher), ("student", args.student)):
            if not (work / role / "config.json").exists():
                save_model(shape, QWEN2_EMBEDDING_SIZE, work / role, tokenizer, device)
        result["models_s"] = time.perf_counter() - t0
        config = work / "bench-gpu.toml"
        config.write_text(f"""
[corpus]
source = "builtin"
builtin_chars_per_domain = {min(30_000_000, max(200_000, args.rows * args.seq_len * 5))}
seq_len = {args.seq_len}
val_rows = 4
test_rows = 4
max_train_rows = {args.rows}

[teacher]
path = "{work / 'teacher'}"
backend = "hf"
batch_rows = {args.teacher_batch_rows}

[cache]
out_dir = "{work / 'cache'}"
k = 64
rows_per_shard = 64

[distill]
student = "{work / 'student'}"
steps = {args.steps}
batch_rows = {args.batch_rows}
interval = {max(1, args.steps // 3)}
checkpoint_every = {args.steps}
keep_checkpoints = 1
""")
        c = ["--config", str(config)]
        stages = result["stages"]
        stages["teacher-cache"] = run_stage("teacher-cache", ["teacher-cache", *c], work / "teacher-cache.log")
        manifest = json.loads((work / "cache" / "manifest.json").read_text())
        capture = manifest.get("capture", {})
        for mode in ("cpt", "kd"):
            out = work / f"distill-{mode}"
            stages[f"distill-{mode}"] = run_stage(f"distill {mode}", ["distill", *c, "--mode", mode, "--set",
                                                  f"distill.out_dir={json.dumps(str(out))}"], work / f"distill-{mode}.log")
            stages[f"distill-{mode}"]["tokens_per_s"] = train_rate(out)
        stages["eval"] = run_stage("eval", ["eval", *c, "--set", f"distill.out_dir={json.dumps(str(work / 'distill-kd'))}"],
                                   work / "eval.log")
        bare = bare_forward_rate(work / "teacher", work / "cache", args.teacher_batch_rows, device)
        result.update(
            tokens=manifest["tokens"], bytes_per_token=manifest["bytes_per_token"], capture_tokens_per_s=capture.get("tokens_per_s"),
            bare_forward_tokens_per_s=bare,
            stage_one_vs_bare=(capture.get("tokens_per_s") or 0) / bare,
            # without each worker's first shard (Triton compiles, warm-up): what a long capture runs at
            capture_steady_tokens_per_s=capture.get("steady_tokens_per_s"),
            stage_one_steady_vs_bare=(capture["steady_tokens_per_s"] / bare) if capture.get("steady_tokens_per_s") else None,
            kd_vs_cpt=stages["distill-kd"]["tokens_per_s"] / stages["distill-cpt"]["tokens_per_s"])
    print(f"\nbench-gpu: {result['tokens']:,} cached tokens, {result['bytes_per_token']:.1f} bytes/token (random-init "
          f"teacher: a worst case); models written in {result['models_s']:.0f} s")
    print(f"{'stage':<16}{'wall s':>8}{'peak GPU MiB':>14}{'tokens/s':>12}")
    for name, s in stages.items():
        rate = capture.get("tokens_per_s") if name == "teacher-cache" else s.get("tokens_per_s")
        print(f"{name:<16}{s['wall_s']:>8.1f}{s['peak_gpu_mib'] or 0:>14,}{rate or 0:>12,.0f}")
    for key, goal in GOALS.items():
        got = result[key]
        print(f"{key.replace('_', ' ')}: {got:.3f} (goal >= {goal}: {'met' if got >= goal else 'NOT met'})")
    steady = result["stage_one_steady_vs_bare"]
    print("stage one steady state (each worker's first shard left out: compiles and warm-up): "
          + (f"{steady:.3f} of the bare forward" if steady is not None else "n/a (a worker wrote a single shard)"))
    print(f"(teacher bare forward {bare:,.0f} tokens/s over the same rows, batches of {args.teacher_batch_rows}, after a warm-up batch)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.json), json.loads(json.dumps(result, default=str)))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
