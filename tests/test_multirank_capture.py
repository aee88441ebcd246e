"""Stage one as several ranks on one shared cache.out_dir (what torchrun / srun start on
several nodes), here as 2 and 3 real `ddk teacher-cache` processes on one machine.

Each rank is a real interpreter running the CLI entry point with `--rank/--world-size` or
RANK/WORLD_SIZE. To see who captured what, the rank program wraps the shard writer
(TopKShardWriter.write) to append "<rank> <shard>" to a log shared by all ranks (O_APPEND:
one line per write, never torn), and can pause after its N-th shard so that the test kills
it at a known moment. Everything else is the production code path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddk.pipeline.cache.manifest import CacheError, CachePlan, load_manifest
from ddk.pipeline.cache.reader import verify_cache
from ddk.pipeline.config import ConfigError, load_config
from ddk.stages import teacher_cache as tc
from ddk.stages.cli import main as cli

WAIT_S = 240  # per rank; generous for a loaded 2-core machine

# One rank: wrap the writer (log each shard write; maybe pause after the N-th), then `ddk <args>`.
RANK_PROGRAM = r"""
import os, sys, time
from ddk.pipeline.cache.writer import TopKShardWriter

real_write, count = TopKShardWriter.write, [0]
pause_after = int(os.environ.get("TEST_PAUSE_AFTER", "0"))

def write(self, path, *a, **k):
    out = real_write(self, path, *a, **k)
    fd = os.open(os.environ["TEST_WRITE_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, f"{os.environ['TEST_RANK']} {path}\n".encode())
    os.close(fd)
    count[0] += 1
    if count[0] == pause_after:
        open(os.environ["TEST_PAUSED"], "w").close()
        while True:
            time.sleep(60)
    return out

TopKShardWriter.write = write
from ddk.stages.cli import main
main(args=sys.argv[1:], prog_name="ddk")
"""


def _files(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*.parquet"))}


def _mtimes(cache: Path) -> dict[str, int]:
    return {p.relative_to(cache).as_posix(): p.stat().st_mtime_ns for p in cache.rglob("*.parquet")}


def _comparable(m: dict) -> dict:
    """The manifest without its timestamp and throughput fields."""
    m = {k: v for k, v in m.items() if k != "created"}
    cap = m.pop("capture", None)
    if cap is not None:
        m["capture"] = {k: cap[k] for k in ("backend", "tokens", "engine_dtype")}
    return m


class Rank:
    """One `ddk teacher-cache` rank as a child process (its own session)."""

    def __init__(self, config: Path, cache: Path, rank: int, world: int, log_dir: Path, write_log: Path,
                 via_env: bool = False, pause_after: int = 0, plain: bool = False):
        self.out = log_dir / f"rank-{rank}-of-{world}.{time.monotonic_ns()}.log"
        self.paused = self.out.with_suffix(".paused")
        args = ["teacher-cache", "--config", str(config), "--set", f"cache.out_dir={json.dumps(str(cache))}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TEST_RANK=str(rank),
                   TEST_WRITE_LOG=str(write_log), TEST_PAUSE_AFTER=str(pause_after), TEST_PAUSED=str(self.paused))
        for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"):
            env.pop(var, None)
        if via_env:
            env.update(RANK=str(rank), WORLD_SIZE=str(world))
        else:
            args += ["--rank", str(rank), "--world-size", str(world)]
        # plain: the real module entry point, no write log (the rank's shards are then seen on disk only)
        cmd = [sys.executable, "-m", "ddk.stages.cli", *args] if plain else [sys.executable, "-c", RANK_PROGRAM, *args]
        with self.out.open("wb") as fh:
            # own session: the test kills the rank's process group and nothing else
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _LIVE.append(self)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def finish(self) -> str:
        try:
            rc = self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"rank did not finish in {WAIT_S} s; output:\n{self.output()[-3000:]}")
        assert rc == 0, f"exit status {rc}; output:\n{self.output()[-3000:]}"
        return self.output()

    def wait_paused(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.paused.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the rank exited ({self.proc.returncode}) before pausing; output:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the rank did not pause in {WAIT_S} s; output:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL to the rank's own process group (it leads its session)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


_LIVE: list[Rank] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    yield
    while _LIVE:
        r = _LIVE.pop()
        if r.proc.poll() is None:
            r.kill()


def _writes(write_log: Path) -> list[tuple[int, str]]:
    """(rank, shard relative to the cache) per write, in order."""
    if not write_log.exists():
        return []
    out = []
    for line in write_log.read_text().splitlines():
        rank, path = line.split(" ", 1)
        out.append((int(rank), Path(path).relative_to(Path(path).parents[1]).as_posix()))
    return out


def _launch(cfg, cache: Path, world: int, tmp_path: Path, write_log: Path, via_env: bool = False) -> list[Rank]:
    # Highest rank first: the others are up before rank 0 has pinned anything and must wait.
    return [Rank(Path(cfg.source_path), cache, r, world, tmp_path, write_log, via_env=via_env) for r in reversed(range(world))]


def _planned(cache: Path) -> list[str]:
    return [s.file for s in CachePlan.load(cache).shards]


@pytest.mark.parametrize("world, via_env", [(2, False), (3, True)], ids=["2-ranks-cli", "3-ranks-env"])
def test_ranks_write_the_one_process_cache_each_shard_once(tiny_cache, tmp_path, world, via_env):
    cfg, ref_manifest = tiny_cache
    cache, write_log = tmp_path / "cache", tmp_path / "writes.log"
    outputs = {r.proc.pid: r.finish() for r in _launch(cfg, cache, world, tmp_path, write_log, via_env)}

    reference = _files(Path(cfg.cache.out_dir))
    assert _files(cache) == reference  # byte-identical shards
    planned = _planned(cache)
    writes = _writes(write_log)
    # Every planned shard written exactly once, by the rank that owns it (i % world).
    assert sorted(f for _, f in writes) == sorted(planned), "a shard was captured twice, or not at all"
    owner = {f: i % world for i, f in enumerate(planned)}
    assert all(rank == owner[f] for rank, f in writes), [(r, f) for r, f in writes if r != owner[f]][:5]
    assert {rank for rank, _ in writes} == set(range(world))
    # One manifest, built once, equal to the one-process run's but for time and throughput.
    m = load_manifest(cache)
    assert _comparable(m) == _comparable(ref_manifest)
    assert m["capture"]["ranks"] == world
    per_rank = [sum(1 for rank, _ in writes if rank == r) for r in range(world)]
    # the steady rate (each worker's first shard left out) when every rank's worker wrote more than one
    assert (m["capture"].get("steady_tokens_per_s", 0) > 0) == all(n > 1 for n in per_rank), (per_rank, m["capture"])
    assert sum("every rank is done; building" in out for out in outputs.values()) == 1
    assert sum("waiting for rank 0" in out for out in outputs.values()) >= 1  # the others waited for the ingest
    # Nothing left behind: no temp files, no ingested rows, no markers, no lock.
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name or p.suffix == ".rows"]
    assert not list((cache / tc.RANKS_DIR).iterdir())
    assert verify_cache(cache) == []

    if world == 3:
        # Shards lost after completion: every rank re-run, only the missing ones are redone.
        victims = [planned[1], planned[5]]  # ranks 1 and 2
        for v in victims:
            (cache / v).unlink()
        before = _mtimes(cache)
        write_log.unlink()
        for r in _launch(cfg, cache, world, tmp_path, write_log, via_env):
            r.finish()
        assert sorted(f for _, f in _writes(write_log)) == sorted(victims)
        after = _mtimes(cache)
        assert {f: after[f] for f in before} == before  # the others untouched
        m = load_manifest(cache)
        rows = {s.file: s.rows for s in CachePlan.load(cache).shards}
        assert m["capture"]["tokens"] == sum(rows[v] for v in victims) * m["seq_len"]  # this run's capture only
        assert "steady_tokens_per_s" not in m["capture"]  # one shard per rank at most: no steady state to measure
        assert _files(cache) == reference and _comparable(m) | {"capture": None} == _comparable(ref_manifest) | {"capture": None}


def test_a_killed_rank_is_redone_by_rerunning_it_alone(tiny_cache, tmp_path):
    cfg, ref_manifest = tiny_cache
    cache, write_log = tmp_path / "cache", tmp_path / "writes.log"
    config = Path(cfg.source_path)
    victim = Rank(config, cache, 1, 2, tmp_path, write_log, pause_after=2)
    rank0 = Rank(config, cache, 0, 2, tmp_path, write_log)
    victim.wait_paused()
    victim.kill()  # kill -9 after its second shard
    out0 = rank0.finish()
    assert "the last rank to finish builds" in out0 and "ranks 1 not finished" in out0
    assert not (cache / "manifest.json").exists()

    planned = _planned(cache)
    mine1 = {f for i, f in enumerate(planned) if i % 2 == 1}
    present = _mtimes(cache)
    missing = sorted(set(planned) - set(present))
    assert missing and set(missing) <= mine1 and len(mine1 - set(missing)) == 2
    # `ddk cache merge` names what is missing and writes nothing.
    res = CliRunner().invoke(cli, ["cache", "merge", str(cache)])
    assert res.exit_code == 1 and f"{len(missing)} of {len(planned)} planned shards are missing" in res.output
    assert all(f in res.output for f in [f for f in planned if f in missing][:20]) and not (cache / "manifest.json").exists()

    # Re-run rank 1 alone (through RANK/WORLD_SIZE): only its missing shards are written,
    # and as the last rank to finish it builds the manifest.
    write_log.unlink()
    out1 = Rank(config, cache, 1, 2, tmp_path, write_log, via_env=True).finish()
    assert "every rank is done; building" in out1
    assert sorted(f for _, f in _writes(write_log)) == missing
    after = _mtimes(cache)
    assert {f: after[f] for f in present} == present  # rank 0's shards and rank 1's first two untouched
    assert _files(cache) == _files(Path(cfg.cache.out_dir))
    # (its capture note counts what the runs behind the ranks' done-markers captured: not
    # the two shards the killed run wrote)
    assert _comparable(load_manifest(cache)) | {"capture": None} == _comparable(ref_manifest) | {"capture": None}
    assert verify_cache(cache) == []
    # A further run (the real entry point, nothing wrapped) finds the cache complete.
    assert "nothing to do" in Rank(config, cache, 1, 2, tmp_path, write_log, plain=True).finish() and _mtimes(cache) == after


def test_cache_merge_builds_the_manifest_when_all_shards_exist(tiny_cache, tmp_path):
    import shutil

    cfg, ref_manifest = tiny_cache
    cache = tmp_path / "cache"
    shutil.copytree(cfg.cache.out_dir, cache)
    (cache / "manifest.json").unlink()
    res = CliRunner().invoke(cli, ["cache", "merge", str(cache)])
    assert res.exit_code == 0, res.output
    m = load_manifest(cache)
    assert "capture" not in m  # no rank left a throughput note
    assert _comparable(m) == {k: v for k, v in _comparable(ref_manifest).items() if k != "capture"}
    # A lock held by a live process (here: this one, "on another host") is not broken.
    (cache / "manifest.json").unlink()
    lock = cache / tc.MERGE_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": os.getpid(), "who": "rank 1 of 2", "since": "now"}))
    res = CliRunner().invoke(cli, ["cache", "merge", str(cache)])
    assert res.exit_code == 1 and "merge.lock is held by rank 1 of 2 (host elsewhere" in res.output
    # One left by a dead process of this host is.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid, "who": "rank 1 of 2", "since": "then"}))
    assert CliRunner().invoke(cli, ["cache", "merge", str(cache)]).exit_code == 0
    assert load_manifest(cache) and not lock.exists()
    assert "not a ddk cache" in CliRunner().invoke(cli, ["cache", "merge", str(tmp_path / "nothing")]).output


def test_a_waiting_rank_times_out_naming_what_it_waited_for(tiny_models, tiny_config_path, tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "POLL_SECONDS", 0.05)
    cache = tmp_path / "cache"
    cfg = load_config(tiny_config_path, [f"cache.out_dir={json.dumps(str(cache))}", "cache.rank_wait_seconds=0.3"])
    t0 = time.monotonic()
    with pytest.raises(CacheError, match=r"rank 1 of 2: waited 0.3 s \(cache.rank_wait_seconds\) for rank 0 to ingest the corpus "
                                         r"and pin the cache's plan, .*cache/plan.json; is rank 0 running"):
        tc.teacher_cache(cfg, log=lambda *_: None, rank=1, world_size=2)
    assert time.monotonic() - t0 < 10 and not (cache / "plan.json").exists()


def test_rank_and_world_size_come_from_the_options_then_torchrun_then_srun():
    r = tc.resolve_rank
    torchrun = {"RANK": "3", "WORLD_SIZE": "4"}
    srun = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    assert (r(None, None, {}).rank, r(None, None, {}).world) == (0, 1)
    assert (r(1, 2, {**torchrun, **srun}).rank, r(1, 2, torchrun).world) == (1, 2)  # the options win
    assert (r(None, None, {**torchrun, **srun}).rank, r(None, None, {**torchrun, **srun}).world) == (3, 4)
    assert (r(None, None, srun).rank, r(None, None, srun).world) == (1, 2)
    # a batch script's own shell (no job step) is one process, not rank 0 of n
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert r(None, None, batch).world == 1
    assert r(None, None, {**batch, "SLURM_STEP_ID": str(0xFFFFFFFB)}).world == 1
    for bad in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ConfigError, match="must be in 0..world size - 1"):
            r(*bad, {})
    with pytest.raises(ConfigError, match="go together"):
        r(1, None, {})
    with pytest.raises(ConfigError, match="RANK and WORLD_SIZE must be set together"):
        r(None, None, {"RANK": "1"})
    res = CliRunner().invoke(cli, ["teacher-cache", "--rank", "2", "--world-size", "2"])
    assert res.exit_code == 1 and "rank 2 of world size 2" in res.output


def test_throughput_of_processes_side_by_side():
    two = [{"tokens": 100, "seconds": 2.0, "steady_tokens": 60, "steady_seconds": 1.0},
           {"tokens": 300, "seconds": 4.0, "steady_tokens": 200, "steady_seconds": 2.5}]
    assert tc.combine_throughput(two) == {"tokens": 400, "seconds": 4.0, "steady_tokens": 260, "steady_seconds": 2.5}
    # one process without a steady state (a single shard): no steady state for the whole
    assert tc.combine_throughput([two[0], {"tokens": 50, "seconds": 1.0}]) == {"tokens": 150, "seconds": 2.0}
    assert tc.combine_throughput([]) == {"tokens": 0, "seconds": 0.0}
