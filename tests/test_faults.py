"""Fault injection: `ddk` processes killed with SIGKILL, damaged shards, torn run directories.

Stage one and stage two run as child processes, each leading its own session, and are
killed with SIGKILL to the whole process group (as `kill -9` or the OOM killer would). The
moment of the kill is deterministic: the child runs the CLI entry point with one pause
hook (e.g. stop just before `manifest.json` is renamed into place, or in the middle of
step 7) that touches a marker file; the test polls for the marker, checks the directory
is in the state wanted, then kills. Polling the directory alone proved racy: on a loaded
2-core machine the whole stage-one run (35 shards) can finish between two polls.

Interpreter + torch + transformers start-up costs ~5 s of CPU per process, so the children
are forked from a forkserver that imported them once (`Child`); one resume runs the real
`ddk` console script, and the two-worker test starts real `capture_worker` interpreters.
They run on a small files corpus (three domains of stdlib source text, ~35 shards of 4
rows) with the session's tiny teacher/student, one thread each, two or three at a time.

Not repeated here (already in test_teacher_cache.py / test_distill.py): refusal of a cache
made with another config or another teacher tokenizer (also on resume: the tokenizer check
comes before the complete/resume decision), of a student with another tokenizer,
`verify`/reader naming a truncated shard, the in-process resume of stage two.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import ddk.stages.distill as distill_mod
from ddk.pipeline.cache.manifest import CacheError, load_manifest
from ddk.pipeline.cache.reader import TopKCacheReader, verify_cache
from ddk.pipeline.checkpoint import latest_checkpoint
from ddk.pipeline.config import load_config
from ddk.stages.cli import main as cli
from ddk.stages.distill import distill, read_metrics
from ddk.stages.teacher_cache import teacher_cache

QUIET = lambda *_: None  # noqa: E731
WAIT_S = 180  # per child; generous for a loaded 2-core machine

# The program of one child: `ddk <args>` through the console script's entry point, in its own
# session (so that os.killpg reaches everything it started), stdout+stderr to a log, after
# installing at most one pause hook:
#   {"replace": GLOB, "when": "before"|"after", "nth": N}: at the N-th os.replace whose
#       destination's basename matches GLOB (every atomic write in ddk ends in os.replace)
#   {"call": "module.attr", "nth": N}: at the N-th call of that function
# At the hook it writes the marker file and sleeps until it is killed.
CHILD = r"""
import fnmatch, importlib, os, sys, time

os.setsid()
fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.dup2(fd, 1)
os.dup2(fd, 2)
os.close(fd)
import torch

torch.set_num_threads(1)
hook = spec.get("hook") or {}

def pause():
    sys.stdout.flush()
    sys.stderr.flush()
    with open(spec["marker"], "w") as fh:
        fh.write(str(os.getpid()))
    while True:
        time.sleep(60)

if "replace" in hook:
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *a, **kw):
        hit = fnmatch.fnmatch(os.path.basename(os.fspath(dst)), hook["replace"])
        seen[0] += hit
        now = hit and seen[0] == hook.get("nth", 1)
        if now and hook.get("when", "before") == "before":
            pause()
        out = real_replace(src, dst, *a, **kw)
        if now and hook.get("when") == "after":
            pause()
        return out

    os.replace = replace

if "call" in hook:
    mod_name, attr = hook["call"].rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    real_fn, calls = getattr(mod, attr), [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == hook["nth"]:
            pause()
        return real_fn(*a, **kw)

    setattr(mod, attr, wrapped)

from ddk.stages.cli import main

main(args=spec["args"], prog_name="ddk")
"""

# Children are forked from a forkserver that imported these once (it only imports: no
# thread pool exists at the fork). Paid a dozen times, start-up would be most of the budget.
_PRELOAD = ["torch", "pyarrow.parquet", "transformers", "transformers.models.auto.modeling_auto",
            "transformers.models.auto.tokenization_auto", "transformers.models.llama.modeling_llama",
            "ddk.stages.cli", "ddk.stages.teacher_cache", "ddk.stages.capture_worker", "ddk.stages.distill",
            "ddk.pipeline.teachers.hf", "ddk.pipeline.plots"]
_CTX = multiprocessing.get_context("forkserver")
_LIVE: list = []
_SERVER = {"ours": None}  # did this module start the forkserver (and may stop it)?


@pytest.fixture(autouse=True)
def _no_orphans():
    """Whatever a failing test leaves running is killed (its own process group only)."""
    yield
    while _LIVE:
        _LIVE.pop().kill9(check=False)


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    """The preloaded server holds torch + transformers (~0.5 GB): stop it after this module."""
    yield
    from multiprocessing import forkserver

    if _SERVER["ours"]:
        try:
            forkserver._forkserver._stop()  # private, but stable since 3.8; best effort
        except (AttributeError, OSError):
            pass
        _SERVER["ours"] = None


class Child:
    """One `ddk` run in its own session: forked from the preloaded server, or the real binary (binary=True)."""

    def __init__(self, args: list[str], log: Path, hook: dict | None = None, binary: bool = False):
        self.log, self.marker = log, log.with_suffix(".paused")
        if binary:
            assert hook is None
            ddk_bin = Path(sys.executable).parent / "ddk"
            cmd = [str(ddk_bin)] if ddk_bin.exists() else [sys.executable, "-m", "ddk.stages.cli"]
            env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            with log.open("wb") as fh:
                self.popen = subprocess.Popen(cmd + args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.proc, self.pid = None, self.popen.pid
        else:
            if _SERVER["ours"] is None:
                from multiprocessing import forkserver

                _SERVER["ours"] = getattr(forkserver._forkserver, "_forkserver_pid", 0) is None
                _CTX.set_forkserver_preload(_PRELOAD)  # only read when the server starts (first child)
            spec = {"args": args, "log": str(log), "hook": hook, "marker": str(self.marker)}
            self.proc = _CTX.Process(target=exec, args=(CHILD, {"spec": spec, "__name__": "ddk_fault_child"}))
            self.proc.start()
            self.popen, self.pid = None, self.proc.pid
        _LIVE.append(self)

    def returncode(self, timeout: float | None = 0):
        if self.popen is not None:
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        self.proc.join(timeout)
        return self.proc.exitcode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_until(self, cond, what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.returncode() is not None:
                pytest.fail(f"{what}: the child exited ({self.returncode()}) first; its output:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill9(check=False)
                pytest.fail(f"{what}: not reached in {timeout} s; output:\n{self.output()[-3000:]}")
            time.sleep(0.005)

    def wait_paused(self, what: str) -> None:
        self.wait_until(self.marker.exists, what)

    def kill9(self, check: bool = True) -> None:
        """SIGKILL to the child's whole process group (it leads its own session)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # exited already, or killed before its setsid()
            if self.returncode() is None:
                os.kill(self.pid, signal.SIGKILL)
        rc = self.returncode(timeout=30)
        if check:
            assert rc == -signal.SIGKILL, rc

    def finish(self, timeout: float = WAIT_S) -> str:
        rc = self.returncode(timeout=timeout)
        if rc is None:
            self.kill9(check=False)
            pytest.fail(f"child did not finish in {timeout} s; output:\n{self.output()[-3000:]}")
        out = self.output()
        assert rc == 0, f"exit status {rc}; output:\n{out[-3000:]}"
        return out


# ---------------------------------------------------------------- shared set-up


DOMAINS = {"code": "argparse", "prose": "dataclasses", "api": "inspect"}


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    """A small files corpus, and a function writing a copy of the tiny config."""
    import importlib

    cfg, _ = tiny_models
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, module in DOMAINS.items():
        text = Path(importlib.import_module(module).__file__).read_text(encoding="utf-8")[:2400]
        with (corpus / f"{name}.jsonl").open("w") as fh:
            for i in range(0, len(text), 400):
                fh.write(json.dumps({"text": text[i : i + 400]}) + "\n")
    base = Path(cfg.source_path).read_text()

    def write_config(where: Path, cache_dir: Path) -> Path:
        """A copy of the session's tiny config: files corpus, its teacher, rows_per_shard = 4, its own cache dir."""
        text = base
        for old, new in [('source = "builtin"', 'source = "files"'),
                         ("[teacher]\n", f"[teacher]\npath = {json.dumps(str(cfg.teacher_path()))}\n"),
                         (f"out_dir = {json.dumps(cfg.cache.out_dir)}", f"out_dir = {json.dumps(str(cache_dir))}")]:
            assert text.count(old) == 1, f"the tiny config changed: {old!r} not found once"
            text = text.replace(old, new)
        text, n = re.subn(r"(?m)^rows_per_shard = \d+$", "rows_per_shard = 4", text)
        assert n == 1
        for name in DOMAINS:
            text += f'\n[[corpus.domains]]\nname = "{name}"\npaths = [{json.dumps(str(corpus / (name + ".jsonl")))}]\n'
        where.mkdir(parents=True, exist_ok=True)
        path = where / "tiny.toml"
        path.write_text(text)
        loaded = load_config(path)
        assert loaded.models.out_dir == cfg.models.out_dir  # the session's tiny models, reused
        return path

    return {"write_config": write_config, "root": root}


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted stage-one run (in process, one thread like the children): (config path, cache dir, manifest)."""
    cache = env["root"] / "ref-cache"
    path = env["write_config"](env["root"] / "ref", cache)
    warm = Child(["--help"], env["root"] / "warm-up.log")  # the forkserver imports while we compute
    manifest = teacher_cache(load_config(path), log=QUIET)
    warm.finish()
    assert len(_planned(cache)) >= 30  # many small shards: room to kill between them
    return path, cache, manifest


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """In-process runs use one thread, like the children: the same shard bytes, and no OpenMP
    workers spinning against the children on a 2-core machine (5x slower steps)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _planned(cache: Path) -> list[str]:
    return [s["file"] for s in json.loads((cache / "plan.json").read_text())["shards"]]


def _parquet(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*.parquet"))}


def _shard_hashes(m: dict) -> list[tuple[str, int, str]]:
    return [(s["file"], s["bytes"], s["sha256"]) for d in m["domains"].values() for s in d["shards"]]


def _stage_one_args(config: Path, cache: Path) -> list[str]:
    return ["teacher-cache", "--config", str(config), "--set", "teacher.backend=hf", "--set", f"cache.out_dir={json.dumps(str(cache))}"]


# ---------------------------------------------------------------- 1. stage one killed and resumed


def test_stage_one_killed_at_three_moments_resumes_byte_identical(env, reference, tmp_path):
    """kill -9 (1) right after plan.json is pinned, (2) once a few shards exist, (3) with every
    shard written but manifest.json not yet renamed into place; each re-run finishes the cache
    and it is byte-identical to the uninterrupted one, with no temp files and verify passing."""
    _, ref_cache, ref_manifest = reference
    total = len(_planned(ref_cache))
    runs = {}
    for name, hook in [("after-plan", {"replace": "plan.json", "when": "after"}),
                       # 4 shards renamed into place, the 5th written in full under its .tmp name
                       ("few-shards", {"replace": "*.parquet", "when": "before", "nth": 5}),
                       ("before-manifest", {"replace": "manifest.json", "when": "before"})]:
        config = env["write_config"](tmp_path / name, tmp_path / name / "cache")
        cache = tmp_path / name / "cache"
        runs[name] = (config, cache, Child(_stage_one_args(config, cache), tmp_path / f"{name}.log", hook))
    for name, (_, _, child) in runs.items():
        child.wait_paused(name)
        child.kill9()

    # What each kill left behind.
    written = {name: len(list(cache.glob("*/*.parquet"))) for name, (_, cache, _) in runs.items()}
    for name, (_, cache, _) in runs.items():
        assert (cache / "plan.json").exists() and not (cache / "manifest.json").exists(), name
    assert written["after-plan"] == 0
    assert written["few-shards"] == 4 and len(list(runs["few-shards"][1].glob("*/*.parquet.tmp"))) == 1
    assert written["before-manifest"] == total and (runs["before-manifest"][1] / "manifest.json.tmp").exists()
    incomplete = CliRunner().invoke(cli, ["cache", "verify", str(runs["few-shards"][1])])
    assert incomplete.exit_code == 1 and "incomplete: re-run `ddk teacher-cache`" in incomplete.output

    # Re-run each to completion (concurrently; one of them with the real `ddk` binary), then
    # compare with the uninterrupted run.
    resumed = {name: Child(_stage_one_args(config, cache), tmp_path / f"{name}.resume.log", binary=name == "few-shards")
               for name, (config, cache, _) in runs.items()}
    ref_files = _parquet(ref_cache)
    for name, child in resumed.items():
        out = child.finish()
        cache = runs[name][1]
        assert f"resuming, {total - written[name]} of {total} shards to write" in out, name
        files = _parquet(cache)
        assert sorted(files) == sorted(ref_files), name
        differ = [f for f in files if files[f] != ref_files[f]]
        assert not differ, f"{name}: shards differ from the uninterrupted run: {differ[:5]}"
        manifest = load_manifest(cache)
        assert _shard_hashes(manifest) == _shard_hashes(ref_manifest), name
        assert {d: m["teacher_val_loss"] for d, m in manifest["domains"].items()} == \
               {d: m["teacher_val_loss"] for d, m in ref_manifest["domains"].items()}
        leftovers = [p.relative_to(cache).as_posix() for p in cache.rglob("*") if ".tmp" in p.name]
        assert not leftovers, f"{name}: temp files left behind: {leftovers}"
        assert not list(cache.rglob("*.rows")), name  # ingested rows dropped once indexed
        ok = CliRunner().invoke(cli, ["cache", "verify", str(cache)])
        assert ok.exit_code == 0, f"{name}: {ok.output}"


def test_stage_one_killed_while_pinning_the_plan_can_be_rerun(env, reference, tmp_path):
    _, ref_cache, _ = reference
    cache = tmp_path / "cache"
    config = env["write_config"](tmp_path, cache)
    child = Child(_stage_one_args(config, cache), tmp_path / "pin.log", {"replace": "plan.json", "when": "before"})
    child.wait_paused("plan.json.tmp written, not renamed")
    child.kill9()
    assert sorted(p.name for p in cache.iterdir()) == ["_work", "plan.json.tmp"]  # the ingest ran before
    teacher_cache(load_config(config), log=QUIET)
    assert _parquet(cache) == _parquet(ref_cache)


def test_stage_one_killed_mid_ingest_resumes_it(env, reference, tmp_path):
    """kill -9 once the first domain's tokens are checkpointed but not yet packed: the re-run
    packs from the checkpoint and the cache equals the uninterrupted one."""
    _, ref_cache, _ = reference
    cache = tmp_path / "cache"
    config = env["write_config"](tmp_path, cache)
    child = Child(_stage_one_args(config, cache), tmp_path / "ingest.log", {"replace": "state.json", "when": "after"})
    child.wait_paused("the first ingest checkpoint")
    child.kill9()
    states = list((cache / "_work" / "ingest").glob("*/state.json"))
    assert len(states) == 1 and json.loads(states[0].read_text())["tokenized"]
    assert not (cache / "plan.json").exists()
    teacher_cache(load_config(config), log=QUIET)
    assert _parquet(cache) == _parquet(ref_cache)


def _workers_of(parent: int) -> list[int]:
    """Capture-worker processes whose parent is `parent` (read from /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent \
                    and b"capture_worker" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_stage_one_killed_with_two_workers_leaves_no_orphans(env, tmp_path):
    cache = tmp_path / "cache"
    config = env["write_config"](tmp_path, cache)
    # One row per shard (~70 per worker): the workers have seconds of work left when killed.
    child = Child(_stage_one_args(config, cache) + ["--set", "cache.workers=2", "--set", "cache.rows_per_shard=1"], tmp_path / "w2.log")
    workers: list[int] = []
    try:
        child.wait_until(lambda: len(_workers_of(child.pid)) == 2, "both capture workers started")
        workers = _workers_of(child.pid)
        child.kill9()
        deadline = time.monotonic() + 2
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.02)
        orphans = [w for w in workers if _alive(w)]
        assert not orphans, f"capture workers {orphans} outlived the killed `ddk teacher-cache` ({child.pid})"
    finally:
        for w in workers:  # started by this test (through ddk); each leads its own session
            try:
                os.killpg(w, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# ---------------------------------------------------------------- 2. stage two killed and resumed


def _stage_two_args(config: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"distill.out_dir={json.dumps(str(out))}", "distill.steps=12", "distill.checkpoint_every=4",
            "distill.batch_rows=4", "distill.interval=3", "distill.mode=kd"]
    return ["distill", "--config", str(config), *[a for s in sets for a in ("--set", s)], *extra]


def _curve(out: Path, kind: str = "train") -> list[dict]:
    return read_metrics(out, kind)


def test_stage_two_killed_mid_run_resumes_the_same_loss_curve(env, reference, tmp_path):
    """kill -9 (a) in the middle of step 7 (checkpoint 4 exists, metrics run to step 6) and (b) with
    checkpoint 8 fully written under its temp name but not renamed (metrics run to step 8); each
    `--resume` starts from checkpoint 4 and ends on the uninterrupted run's loss curve."""
    config, _, _ = reference
    ref = Child(_stage_two_args(config, tmp_path / "ref"), tmp_path / "ref.log")
    a = Child(_stage_two_args(config, tmp_path / "a"), tmp_path / "a.log", {"call": "torch.nn.utils.clip_grad_norm_", "nth": 7})
    b = Child(_stage_two_args(config, tmp_path / "b"), tmp_path / "b.log", {"replace": "ckpt-0000008", "when": "before"})
    for child, out, steps in ((a, tmp_path / "a", 6), (b, tmp_path / "b", 8)):
        child.wait_paused(f"{out.name}: stop point")
        # The condition to kill at: a checkpoint exists and the metrics went past it.
        assert (out / "latest").read_text().strip() == "ckpt-0000004"
        assert [r["step"] for r in _curve(out)] == list(range(1, steps + 1))
        child.kill9()
        assert latest_checkpoint(out) == out / "ckpt-0000004"  # `latest` is never left broken
    assert (tmp_path / "b" / ".tmp-ckpt-0000008" / "state.json").exists()
    assert not (tmp_path / "b" / "ckpt-0000008").exists()

    resumed = {name: Child(_stage_two_args(config, tmp_path / name, "--resume"), tmp_path / f"{name}.resume.log") for name in "ab"}
    ref.finish()
    ref_train, ref_eval = _curve(tmp_path / "ref"), _curve(tmp_path / "ref", "eval")
    assert [r["step"] for r in ref_train] == list(range(1, 13)) and [r["step"] for r in ref_eval] == [0, 3, 6, 9]
    ref_results = json.loads((tmp_path / "ref" / "results.json").read_text())
    for name, child in resumed.items():
        out = tmp_path / name
        assert f"resuming from {out / 'ckpt-0000004'} at step 4" in child.finish()
        train = _curve(out)
        assert [r["step"] for r in train] == list(range(1, 13)), name
        np.testing.assert_allclose([r["loss"] for r in train], [r["loss"] for r in ref_train], rtol=1e-6, err_msg=name)
        evals = _curve(out, "eval")
        assert [e["step"] for e in evals] == [0, 3, 6, 9], name
        for e, r in zip(evals, ref_eval):
            np.testing.assert_allclose(list(e["weights"].values()), list(r["weights"].values()), rtol=1e-6, err_msg=name)
        results = json.loads((out / "results.json").read_text())
        for dom, loss in ref_results["student_after_loss"].items():
            assert results["student_after_loss"][dom] == pytest.approx(loss, rel=1e-6), (name, dom)
        assert (out / "latest").read_text().strip() == "ckpt-0000012"
        assert not list(out.glob(".tmp-ckpt-*")), f"{name}: a temp checkpoint was left behind"


def _inproc_cfg(reference, out: Path, *extra: str):
    config, _, _ = reference
    base = [f"distill.out_dir={json.dumps(str(out))}", "distill.batch_rows=4", "distill.mode=kd"]
    return load_config(config, base + list(extra))


def _interrupt_at_call(monkeypatch, n: int) -> None:
    """A kill between checkpoints: the micro-step raises on its n-th call (= during step n)."""
    real, calls = distill_mod.Trainer.micro_step, {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod.Trainer, "micro_step", killed)


def test_resume_at_an_interval_boundary_logs_each_eval_once(reference, tmp_path, monkeypatch):
    """Checkpoint and interval start on the same step: the eval record written after the
    checkpoint is dropped on resume and written once by the resumed run (595b599/702b5a7 kept it
    and logged it twice; fixed in 5b91822 by _drop_redone, stages/distill.py)."""
    extra = ("distill.steps=6", "distill.interval=3", "distill.checkpoint_every=3")
    distill(_inproc_cfg(reference, tmp_path / "full", *extra), log=QUIET)
    cfg = _inproc_cfg(reference, tmp_path / "b", *extra)
    _interrupt_at_call(monkeypatch, 5)  # after checkpoint 3 and the eval at step 3 were written
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, log=QUIET)
    monkeypatch.undo()
    distill(cfg, resume=True, log=QUIET)
    assert [e["step"] for e in _curve(tmp_path / "full", "eval")] == [0, 3]
    assert [e["step"] for e in _curve(tmp_path / "b", "eval")] == [0, 3]  # before 5b91822: [0, 3, 3]


def test_resume_killed_while_trimming_metrics_keeps_the_curve(reference, tmp_path, monkeypatch):
    extra = ("distill.steps=8", "distill.interval=3", "distill.checkpoint_every=4")
    distill(_inproc_cfg(reference, tmp_path / "full", *extra), log=QUIET)
    cfg = _inproc_cfg(reference, tmp_path / "b", *extra)
    _interrupt_at_call(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, log=QUIET)
    monkeypatch.undo()
    real_write_text = Path.write_text

    def killed_after_truncate(self, *args, **kwargs):
        if self.name.startswith("metrics.jsonl"):  # the trimmed copy (or the log itself, if written in place)
            open(self, "w").close()  # what the disk holds if the process dies right after the open(O_TRUNC)
            raise KeyboardInterrupt
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_after_truncate)
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, resume=True, log=QUIET)
    monkeypatch.undo()
    distill(cfg, resume=True, log=QUIET)
    full, b = _curve(tmp_path / "full"), _curve(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in full], rtol=1e-6)


# ---------------------------------------------------------------- 3. damaged shards


def _damaged_copy(reference, tmp_path):
    """A copy of the reference cache with one truncated shard and one bit-flipped shard."""
    _, ref_cache, _ = reference
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    truncated, flipped = "prose/train-00002.parquet", "api/train-00001.parquet"
    data = (cache / truncated).read_bytes()
    (cache / truncated).write_bytes(data[: len(data) // 2])
    return cache, truncated, flipped


def _flip_in_column(path: Path, column: str) -> None:
    """Flip one bit in the middle of a column chunk's compressed data."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == column)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _rows_of(cache: Path, file: str) -> list[tuple[str, str, int]]:
    m = load_manifest(cache)
    domain, name = file.split("/")
    split, index = name.split("-")[0], int(name.split("-")[1].split(".")[0])
    per = [s["rows"] for s in m["domains"][domain]["shards"] if s["split"] == split]
    start = sum(per[:index])
    return [(domain, split, start + i) for i in range(per[index])]


def test_teacher_cache_on_a_damaged_complete_cache_names_the_damage(env, reference, tmp_path):
    """verify and the reader name both damaged shards; `ddk teacher-cache` notices the truncation (a
    stat against the manifest, not a checksum), drops the stale manifest and refuses to resume until
    the unreadable shard is deleted; after deleting both named shards it rewrites them identically."""
    _, ref_cache, _ = reference
    cache, truncated, flipped = _damaged_copy(reference, tmp_path)
    _flip_in_column(cache / flipped, "topk_logprobs")

    result = CliRunner().invoke(cli, ["cache", "verify", str(cache)])
    assert result.exit_code == 1 and "2 problem(s)" in result.output
    assert f"{cache / truncated}: " in result.output and "truncated" in result.output
    assert f"{cache / flipped}: sha256 mismatch" in result.output
    # The reader checks each column chunk it reads against its CRC-32 in the manifest.
    with pytest.raises(CacheError, match=re.escape(f"{cache / flipped}: corrupted: row group 0, column topk_logprobs")):
        TopKCacheReader(cache).batch(_rows_of(cache, flipped))

    cfg = load_config(env["write_config"](tmp_path, cache))
    with pytest.raises(CacheError, match=re.escape(f"{cache / truncated}: unreadable shard")):
        teacher_cache(cfg, log=QUIET)
    assert not (cache / "manifest.json").exists()
    (cache / truncated).unlink()
    (cache / flipped).unlink()
    teacher_cache(cfg, log=QUIET)
    assert verify_cache(cache) == [] and _parquet(cache) == _parquet(ref_cache)


def test_resume_names_a_truncated_shard_and_rewrites_it_once_deleted(env, reference, tmp_path):
    """A run killed before its manifest, whose directory then lost the end of a shard: the resume
    refuses with the shard's name; deleting that file (as the message says) lets it finish."""
    _, ref_cache, _ = reference
    cache, truncated, _ = _damaged_copy(reference, tmp_path)
    (cache / "manifest.json").unlink()
    cfg = load_config(env["write_config"](tmp_path, cache))
    with pytest.raises(CacheError, match=re.escape(f"{cache / truncated}: unreadable shard") + ".*delete the file and re-run"):
        teacher_cache(cfg, log=QUIET)
    (cache / truncated).unlink()
    logs = []
    teacher_cache(cfg, log=logs.append)
    assert any("resuming, 1 of" in line for line in logs)
    assert _parquet(cache) == _parquet(ref_cache) and verify_cache(cache) == []


def test_following_verify_advice_repairs_the_cache(env, reference, tmp_path):
    _, ref_cache, _ = reference
    cache, truncated, _ = _damaged_copy(reference, tmp_path)
    problems = verify_cache(cache)
    assert len(problems) == 1 and truncated in problems[0]
    (cache / truncated).unlink()  # "delete the named shards ..."
    teacher_cache(load_config(env["write_config"](tmp_path, cache)), log=QUIET)  # "... and re-run"
    assert verify_cache(cache) == []
    assert _parquet(cache) == _parquet(ref_cache)


def test_reader_refuses_a_bit_flip_in_a_float_column(reference, tmp_path):
    _, ref_cache, _ = reference
    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    victim = "code/val-00000.parquet"
    keys = _rows_of(cache, victim)
    good = TopKCacheReader(cache).batch(keys).target_logprob.clone()
    _flip_in_column(cache / victim, "target_logprob.list.element")
    assert any("sha256 mismatch" in p for p in verify_cache(cache))  # verify sees it
    try:
        bad = TopKCacheReader(cache).batch(keys).target_logprob
    except CacheError as e:
        assert str(cache / victim) in str(e)
        return
    changed = int((bad != good).sum())
    pytest.fail(f"{victim}: the reader returned {changed} silently altered target logprob(s) without an error")
