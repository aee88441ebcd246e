"""The fused LM head's checks on a lent GPU, in one run: facts, compiled tests, benchmark.

1. facts: device, torch and Triton versions, whether the GEMM accumulates dW in fp32
   itself (kernels/fused_linear_kl.py's probe), the default chunk at the real shapes;
2. the kernel tests compiled: tests/test_fused_linear_kl.py (its many-block and
   real-vocabulary cases run the kernel at 12..75 blocks per row) and tests/test_sparse_kl.py;
3. the benchmark (benchmarks/fused_linear_kl.py) with its JSON.

Everything lands in OUT (the --out folder, else $OUT, else ./gpu_check): facts.json,
tests.txt, bench.txt, kernel.json, summary.json. Each step has its own time limit, and a
failed step does not stop the next; the exit status is non-zero if any failed.

    python -m ddk.benchmarks.gpu_check_kernel                 # both test files whole, then the bench
    python -m ddk.benchmarks.gpu_check_kernel -k "many_block or real_vocab or accumulates \
        or temporary or sampled or many_blocks"          # the multi-block and dW cases only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_fused_linear_kl.py", "tests/test_sparse_kl.py"]


def facts() -> dict:
    import torch

    from ddk.kernels import fused_linear_kl as fk
    from ddk.kernels.sparse_kl import triton

    out = dict(python=sys.version.split()[0], torch=torch.__version__,
               triton=None if triton is None else triton.__version__,
               cuda=torch.cuda.is_available())
    if not torch.cuda.is_available():
        return out
    props = torch.cuda.get_device_properties(0)
    out.update(
        device=props.name, sms=props.multi_processor_count, memory_bytes=props.total_memory,
        gemm_fp32_out={str(dt): fk._gemm_has_fp32_out("cuda", dt)
                       for dt in (torch.bfloat16, torch.float16)},
        default_chunk_tokens={f"{v}_{str(dt).removeprefix('torch.')}":
                              fk.default_chunk_tokens(v, dt, "cuda")
                              for v in (128256, 151936) for dt in (torch.bfloat16, torch.float32)})
    return out


def run_step(name: str, cmd: list[str], log: Path, timeout: int) -> dict:
    """Runs one step to its log file; its status, never an exception."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = round(time.monotonic() - t0, 1)
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    print(f"{name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds} s: {tail[0]}",
          flush=True)
    return dict(step=name, returncode=rc, seconds=seconds, last_line=tail[0], log=log.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddk.benchmarks.gpu_check_kernel",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder (default: $OUT, else ./gpu_check)")
    p.add_argument("--tests-timeout", type=int, default=300)
    p.add_argument("--bench-timeout", type=int, default=240)
    p.add_argument("-k", dest="keyword", metavar="EXPR",
                   help="only the tests pytest -k EXPR selects (default: both files whole)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or "gpu_check")
    out.mkdir(parents=True, exist_ok=True)

    info = facts()
    (out / "facts.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    steps = []
    if not args.skip_tests:
        select = ["-k", args.keyword] if args.keyword else []
        steps.append(run_step("tests", [sys.executable, "-m", "pytest", "-q", "-p",
                                        "no:cacheprovider", "--durations=10", *select,
                                        *TEST_FILES],
                              out / "tests.txt", args.tests_timeout))
    if not args.skip_bench:
        steps.append(run_step("bench", [sys.executable, "-m", "ddk.benchmarks.fused_linear_kl",
                                        "--json", str((out / "kernel.json").resolve())],
                              out / "bench.txt", args.bench_timeout))
    (out / "summary.json").write_text(json.dumps(dict(facts=info, steps=steps), indent=2))
    return 0 if all(s["returncode"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
