"""What every benchmark here shares: the machine it ran on, arms timed side by side
(interleaved calls, ratios of neighbours), peak bytes of one step, tables and JSON reports.

Why interleaved: these machines are shared, and their speed swings several-fold within a
minute; only calls made moments apart compare fairly, so every ratio printed is a median
over neighbouring calls, never a ratio of two separately timed runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..pipeline.atomic import write_json_atomic


def sync(device: str) -> None:
    """CUDA work is asynchronous: wait for it before reading the clock."""
    if device == "cuda":
        torch.cuda.synchronize()


def describe_machine(device: str) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # a shared machine: how busy it was
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
    }


def interleaved(arms: dict[str, Callable[[int], float]], warmup: int, calls: int, device: str) -> dict[str, list[float]]:
    """Throughput (units per second) of each call of each arm.

    An arm is called with a running call index (to cycle through its inputs) and returns
    the units it processed. Calls alternate between the arms (A, B, C, A, B, C, ...), so
    call i of every arm ran within moments of the others: on this shared machine, whose
    speed can swing several-fold within a minute, only such neighbours compare fairly.
    """
    for i in range(warmup):
        for fn in arms.values():
            fn(i)
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(calls):
        for name, fn in arms.items():
            sync(device)  # CUDA work is asynchronous: wait before reading the clock
            t0 = time.perf_counter()
            units = fn(i)
            sync(device)
            rates[name].append(units / (time.perf_counter() - t0))
    return rates


def paired_ratio(rates: dict[str, list[float]], a: str, b: str) -> dict:
    """Median and quartiles of a / b over neighbouring calls (drift cancels in each pair)."""
    ratios = [x / y for x, y in zip(rates[a], rates[b])]
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3}


def print_table(title: str, header: list[str], rows: list[list], note: str = "") -> None:
    cells = [[c if isinstance(c, str) else _fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    print(f"\n{title}")
    print(line(header))
    print("-" * len(line(header)))
    for r in cells:
        print(line(r))
    if note:
        print(note)
    sys.stdout.flush()


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.01 or x == 0:
        return f"{x:.2f}"
    return f"{x:.1e}"


def matmul_params(model) -> int:
    """Weights of the Linear layers (LM head included): forward FLOPs/token ~ 2x this."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def step_peak_bytes(step: Callable[[int], float], device: str) -> int | None:
    """Peak bytes allocated during one whole training step, above what was live before it.
    CUDA: torch.cuda.max_memory_allocated; CPU: the allocator events (see cpu_peak_bytes)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(0)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(0)
    return replayed_peak(prof)


def replayed_peak(prof) -> int:
    """The peak of live bytes, replaying the profiler's allocation/free events in time order."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # frees carry negative sizes
        live += nbytes
        peak = max(peak, live)
    return peak


def write_report(path: Path, result: dict) -> None:
    """A benchmark's numbers as JSON (atomically: a killed run leaves no torn report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    print(f"results: {path}")
