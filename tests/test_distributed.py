"""Stage two under torchrun: 2 CPU ranks (gloo), DDP and FSDP2, against one process.

The 2-rank runs are real `torchrun ... -m ddk.stages.cli distill` launches in the
background, overlapping the single-process reference that trains in this process (each
launch spends most of its ~10 s importing torch and transformers in three processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddk.stages.distill as distill_mod
from ddk.pipeline.config import ConfigError, load_config
from ddk.pipeline.distributed import DistEnv
from ddk.pipeline.scheduler import IntervalSampler
from ddk.stages.distill import distill, read_metrics

QUIET = lambda *_: None  # noqa: E731

# Two ranks compute the same global-mean loss and averaged gradient as one process, in
# another fp32 summation order (per-rank CE/KL means then averaged, gradients averaged by
# DDP's all-reduce or FSDP2's reduce-scatter, validation sums split over ranks), and Adam
# carries those last-bit differences forward. Measured over 8 steps: 1.2e-7 relative on
# the loss, 4.8e-7 absolute on a grad norm of ~1. A real fault (a rank training on other
# rows, unsynchronised replicas, a wrong global mean) moves the loss by 1e-3 or more.
RTOL = 1e-5
STEPS = 8
LAUNCH_TIMEOUT_S = 300  # a hung collective must fail the test, not the CI job

# With CUDA the ranks take nccl and one GPU each, and the reference trains under bf16
# autocast: another test (and another tolerance). This one is the CPU/gloo check CI runs.
cpu_ranks = pytest.mark.skipif(torch.cuda.is_available(), reason="2 gloo ranks on CPU against a CPU single process")


def _overrides(out, *extra):
    # Like tests/test_distill.py, plus 8 steps so that a resume from step 3 crosses two
    # interval boundaries (K = 2), and every checkpoint kept.
    return [f"distill.out_dir={json.dumps(str(out))}", f"distill.steps={STEPS}", "distill.batch_rows=4", "distill.interval=2",
            "distill.checkpoint_every=3", "distill.keep_checkpoints=3", "distill.warmup_steps=2", "distill.lr=3e-3",
            "distill.debug_rank_logs=true", *extra]


def _launch(tiny_cache, out, parallel, *flags):
    cfg, _ = tiny_cache
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ddk.stages.cli", "distill", "--config", cfg.source_path, *flags]
    for item in _overrides(out, f"distill.parallel={parallel}"):
        cmd += ["--set", item]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _rewind_to_step_3(src, dst):
    # Step 3 is mid-interval (K = 2): the interval's rows and position come from the checkpoint.
    shutil.copytree(src, dst)
    for later in ("ckpt-0000006", "ckpt-0000008", "results.json"):
        shutil.rmtree(dst / later) if (dst / later).is_dir() else (dst / later).unlink()
    (dst / "latest").write_text("ckpt-0000003")


def _rank_log(out, rank, kind):
    path = out / "ranks" / f"rank-{rank}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """The same 8-step DDK run four ways: "single" (this process), "ddp" and "fsdp2" (2 ranks
    from step 0, launched while the single run trains here) and "single->fsdp2" (the single
    run rewound to its step-3 checkpoint and finished by 2 FSDP2 ranks)."""
    root = tmp_path_factory.mktemp("dist")
    procs = {p: _launch(tiny_cache, root / p, p) for p in ("ddp", "fsdp2")}
    try:
        cfg, _ = tiny_cache
        distill(load_config(cfg.source_path, _overrides(root / "single")), log=QUIET)
        _rewind_to_step_3(root / "single", root / "single->fsdp2")
        procs["single->fsdp2"] = _launch(tiny_cache, root / "single->fsdp2", "fsdp2", "--resume")
        for name, proc in procs.items():
            _finish(proc, name)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {name: root / name for name in ("single", "ddp", "fsdp2", "single->fsdp2")}


def _finish(proc, name):
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"torchrun {name} failed:\n{output}"
    assert "2 ranks" in output and output.count("results: ") == 1, output  # rank 0 alone reports


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@cpu_ranks
def test_domain_weights_are_identical_on_every_rank(runs, parallel):
    out = runs[parallel]
    r0, r1 = _rank_log(out, 0, "eval"), _rank_log(out, 1, "eval")
    assert [e["step"] for e in r0] == [e["step"] for e in r1] == [0, 2, 4, 6]
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"] and a["student_loss"] == b["student_loss"]  # bit for bit
    assert [e["weights"] for e in read_metrics(out, "eval")] == [e["weights"] for e in r0]
    # Against one process: the reduced losses to RTOL; the weights, the shares of the rows
    # each domain gets, to RTOL in absolute terms (a softmax of lS/lT turns a 1e-7 change in
    # a large ratio into a 1e-5 relative change of a weight of 1e-9, irrelevant to the counts).
    single = read_metrics(runs["single"], "eval")
    for a, b in zip(r0, single):
        np.testing.assert_allclose(list(a["student_loss"].values()), list(b["student_loss"].values()), rtol=RTOL)
        np.testing.assert_allclose(list(a["weights"].values()), list(b["weights"].values()), rtol=0, atol=RTOL)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@cpu_ranks
def test_ranks_split_each_global_batch_disjointly(runs, parallel):
    r0, r1 = _rank_log(runs[parallel], 0, "micro"), _rank_log(runs[parallel], 1, "micro")
    single = _rank_log(runs["single"], 0, "micro")
    assert len(r0) == len(r1) == len(single) == STEPS
    for a, b, s in zip(r0, r1, single):
        assert len(a["rows"]) == len(b["rows"]) == 2  # batch_rows = 4 global, 2 per rank
        assert not {tuple(r) for r in a["rows"]} & {tuple(r) for r in b["rows"]}
        assert sorted(map(tuple, a["rows"] + b["rows"])) == sorted(map(tuple, s["rows"]))
        # the logged loss is the global mean, not rank 0's own
        assert a["global_loss"] == b["global_loss"] == pytest.approx((a["loss"] + b["loss"]) / 2, rel=1e-12)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@cpu_ranks
def test_loss_curve_matches_one_process(runs, parallel):
    single, multi = read_metrics(runs["single"], "train"), read_metrics(runs[parallel], "train")
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "kl", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in multi], [r[key] for r in single], rtol=RTOL, err_msg=key)
    after = json.loads((runs[parallel] / "results.json").read_text())["student_after_loss"]
    expected = json.loads((runs["single"] / "results.json").read_text())["student_after_loss"]
    np.testing.assert_allclose(list(after.values()), list(expected.values()), rtol=RTOL)


@cpu_ranks
def test_two_rank_checkpoint_resumes_in_one_process(runs, tiny_cache, tmp_path):
    out = tmp_path / "ddp->single"
    _rewind_to_step_3(runs["ddp"], out)
    cfg, _ = tiny_cache
    resumed = distill(load_config(cfg.source_path, _overrides(out)), resume=True, log=QUIET)
    _assert_matches_single(runs, out, resumed["student_after_loss"])


@cpu_ranks
def test_one_process_checkpoint_resumes_on_two_fsdp2_ranks(runs):
    # FSDP2 ranks load the full optimizer state of a single process into their shards.
    out = runs["single->fsdp2"]
    assert [e["step"] for e in _rank_log(out, 1, "eval")] == [4, 6]  # rank 1 joined at step 3
    _assert_matches_single(runs, out, json.loads((out / "results.json").read_text())["student_after_loss"])


def _assert_matches_single(runs, out, after_loss):
    single, got = read_metrics(runs["single"], "train"), read_metrics(out, "train")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["step"] for r in read_metrics(out, "eval")] == [0, 2, 4, 6]  # nothing logged twice
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in single], rtol=RTOL)
    np.testing.assert_allclose([r["grad_norm"] for r in got], [r["grad_norm"] for r in single], rtol=RTOL)
    expected = json.loads((runs["single"] / "results.json").read_text())["student_after_loss"]
    np.testing.assert_allclose(list(after_loss.values()), list(expected.values()), rtol=RTOL)


@cpu_ranks
def test_checkpoints_hold_full_rank_independent_state(runs):
    from safetensors.torch import load_file

    for parallel in ("ddp", "fsdp2"):
        ckpt = runs[parallel] / "ckpt-0000008"
        ref = runs["single"] / "ckpt-0000008"
        got, want = load_file(ckpt / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
        assert sorted(got) == sorted(want)  # full tensors under HF names, tied embeddings stored once
        for name in want:
            assert got[name].shape == want[name].shape, name
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
        optim = torch.load(ckpt / "trainer.pt", weights_only=False)["optimizer"]
        optim_ref = torch.load(ref / "trainer.pt", weights_only=False)["optimizer"]
        assert sorted(optim["state"]) == sorted(optim_ref["state"]) and all(isinstance(k, str) for k in optim["state"])
        for name, s in optim_ref["state"].items():
            assert optim["state"][name]["exp_avg_sq"].shape == s["exp_avg_sq"].shape, name


def test_batch_rows_must_split_evenly_over_the_ranks(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    config = load_config(cfg.source_path, _overrides(tmp_path / "x"))
    with pytest.raises(ConfigError, match="batch_rows = 4 is the global micro-batch.*multiple of 3"):
        distill_mod._distill(config, False, QUIET, DistEnv(rank=0, world_size=3))


def test_micro_batch_slices_are_what_the_sampler_gives_each_rank():
    # The loop keeps the whole interval (checkpoints must not depend on the world size) and
    # takes window[rank::world] of each global micro-batch: the same rows, in the same
    # order, that IntervalSampler.draw(..., rank, world_size) hands that rank.
    rows, weights, batch, world, micro_steps = {"a": 7, "b": 50, "c": 3}, [0.5, 0.3, 0.2], 6, 3, 5
    whole = IntervalSampler(rows, seed=1).draw(4, weights, batch * micro_steps)
    for rank in range(world):
        mine = IntervalSampler(rows, seed=1).draw(4, weights, batch * micro_steps, rank, world)
        assert [k for m in range(micro_steps) for k in whole[m * batch : (m + 1) * batch][rank::world]] == mine
