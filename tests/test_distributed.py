"""Stage two under torchrun, DDP and FSDP2 on 2 ranks, against one process.

Two variants of the same 8-step DDK run:

* gloo (runs everywhere, GPU machines included): every process, the 2-rank torchrun
  launches and the single-process reference alike, starts with CUDA_VISIBLE_DEVICES=""
  so it computes on CPU in fp32 and the ranks join a gloo group.
* nccl (runs where `torch.cuda.device_count() >= 2`): 2 ranks on 2 GPUs, one each,
  against one process on one GPU, all with distill.precision = fp32.

Every run is a real `ddk distill` subprocess (`python -m ddk.stages.cli distill`, under
`torchrun` for the ranks), launched in the background so that they overlap (each spends
most of its ~10 s importing torch and transformers); a run that needs another's
checkpoint starts as soon as that one has finished.
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
from ddk.stages.distill import read_metrics

QUIET = lambda *_: None  # noqa: E731

# gloo: two ranks compute the same global-mean loss and averaged gradient as one process,
# in another fp32 summation order (per-rank CE/KL means then averaged, gradients averaged
# by DDP's all-reduce or FSDP2's reduce-scatter, validation sums split over ranks), and
# Adam carries those last-bit differences forward. Measured over 8 steps on CPU: 1.2e-7
# relative on the loss, 4.8e-7 absolute on a grad norm of ~1.
# nccl: on top of that, every GPU fp32 matmul and reduction (cuBLAS, the Triton KL kernel,
# the fused LM-head chunks) picks its blocking by shape, so 2 rows per rank reduce in
# another order than 4 rows in one process, and each of the 8 steps can add a few 1e-7
# that Adam carries on: 1e-4 leaves room for that and is still 10x under what a real fault
# moves. A real fault (a rank training on other rows, unsynchronised replicas, a wrong
# global mean) moves the loss by 1e-3 or more.
RTOL = {"gloo": 1e-5, "nccl": 1e-4}
STEPS = 8
LAUNCH_TIMEOUT_S = 300  # a hung collective must fail the test, not the CI job

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torch.cuda.device_count() >= 2 needed: 2 nccl ranks, one GPU each")
BACKENDS = [pytest.param("gloo", id="gloo"), pytest.param("nccl", id="nccl", marks=two_gpus)]


def _overrides(out, *extra):
    # Like tests/test_distill.py, plus 8 steps so that a resume from step 3 crosses two
    # interval boundaries (K = 2), and every checkpoint kept.
    return [f"distill.out_dir={json.dumps(str(out))}", f"distill.steps={STEPS}", "distill.batch_rows=4", "distill.interval=2",
            "distill.checkpoint_every=3", "distill.keep_checkpoints=3", "distill.warmup_steps=2", "distill.lr=3e-3",
            "distill.debug_rank_logs=true", *extra]


def _env(backend):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU in any process: CPU tensors, gloo, fp32
    else:
        # the real Triton kernel on the GPUs (conftest asks for the interpreter where it
        # finds no nvidia-smi; 2 visible GPUs do not need it)
        env.pop("TRITON_INTERPRET", None)
    return env


class Run:
    """One `ddk distill` launch in the background: one process, or 2 ranks under torchrun."""

    def __init__(self, tiny_cache, out, backend, parallel=None, *flags):
        cfg, _ = tiny_cache
        self.name, self.backend, self.ranks = out.name, backend, 1 if parallel is None else 2
        cli = ["-m", "ddk.stages.cli", "distill", "--config", str(cfg.source_path), *flags]
        if parallel is None:  # on nccl: one process on cuda:0, the GPU rank 0 has
            cmd, extra = [sys.executable, *cli], []
        else:
            cmd, extra = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cli], [f"distill.parallel={parallel}"]
        if backend == "nccl":
            extra.append("distill.precision=fp32")  # the same arithmetic as the single GPU process, not bf16 autocast
        for item in _overrides(out, *extra):
            cmd += ["--set", item]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(backend))

    def finish(self):
        try:
            output, _ = self.proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        finally:
            self.kill()
        what = "torchrun" if self.ranks > 1 else "single process"
        assert self.proc.returncode == 0, f"{what} {self.name} failed:\n{output}"
        assert output.count("results: ") == 1, output  # rank 0 alone reports
        device = "cpu" if self.backend == "gloo" else "cuda"
        assert (f"device {device}, 2 ranks" if self.ranks > 1 else f"device {device}, cache") in output, output

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _rewind_to_step_3(src, dst):
    # Step 3 is mid-interval (K = 2): the interval's rows and position come from the checkpoint.
    shutil.copytree(src, dst)
    for later in ("ckpt-0000006", "ckpt-0000008", "results.json"):
        shutil.rmtree(dst / later) if (dst / later).is_dir() else (dst / later).unlink()
    (dst / "latest").write_text("ckpt-0000003")


def _rank_log(out, rank, kind):
    path = out / "ranks" / f"rank-{rank}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def gloo_runs(tiny_cache, tmp_path_factory):
    """The run six ways, all on CPU: "single" (one process), "ddp" and "fsdp2" (2 ranks
    from step 0), all three launched together; then "single->fsdp2" (single rewound to
    its step-3 checkpoint, finished by 2 FSDP2 ranks) once single is done, and
    "ddp->single" (ddp rewound to step 3, finished by one process) once ddp is done."""
    root = tmp_path_factory.mktemp("gloo")
    runs = {}
    try:
        runs["single"] = Run(tiny_cache, root / "single", "gloo")
        for parallel in ("ddp", "fsdp2"):
            runs[parallel] = Run(tiny_cache, root / parallel, "gloo", parallel)
        runs["single"].finish()
        _rewind_to_step_3(root / "single", root / "single->fsdp2")
        runs["single->fsdp2"] = Run(tiny_cache, root / "single->fsdp2", "gloo", "fsdp2", "--resume")
        runs["ddp"].finish()
        _rewind_to_step_3(root / "ddp", root / "ddp->single")
        runs["ddp->single"] = Run(tiny_cache, root / "ddp->single", "gloo", None, "--resume")
        for name in ("fsdp2", "single->fsdp2", "ddp->single"):
            runs[name].finish()
    finally:
        for run in runs.values():
            run.kill()
    return {name: root / name for name in runs}


@pytest.fixture(scope="module")
def nccl_runs(tiny_cache, tmp_path_factory):
    """"single" (one process on one GPU), "ddp" and "fsdp2" (2 nccl ranks on 2 GPUs), all
    fp32 and launched together. Needs 2 GPUs: this machine (CI's) has none, so it was
    written without being run here; the tests that use it skip without them."""
    root = tmp_path_factory.mktemp("nccl")
    runs = {}
    try:
        runs["single"] = Run(tiny_cache, root / "single", "nccl")
        for parallel in ("ddp", "fsdp2"):
            runs[parallel] = Run(tiny_cache, root / parallel, "nccl", parallel)
        for run in runs.values():
            run.finish()
    finally:
        for run in runs.values():
            run.kill()
    return {name: root / name for name in runs}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_domain_weights_are_identical_on_every_rank(request, backend, parallel):
    runs, rtol = request.getfixturevalue(f"{backend}_runs"), RTOL[backend]
    out = runs[parallel]
    r0, r1 = _rank_log(out, 0, "eval"), _rank_log(out, 1, "eval")
    assert [e["step"] for e in r0] == [e["step"] for e in r1] == [0, 2, 4, 6]
    for a, b in zip(r0, r1):
        assert a["weights"] == b["weights"] and a["student_loss"] == b["student_loss"]  # bit for bit
    assert [e["weights"] for e in read_metrics(out, "eval")] == [e["weights"] for e in r0]
    # Against one process: the reduced losses to rtol; the weights, the shares of the rows
    # each domain gets, to rtol in absolute terms (a softmax of lS/lT turns a 1e-7 change in
    # a large ratio into a 1e-5 relative change of a weight of 1e-9, irrelevant to the counts).
    single = read_metrics(runs["single"], "eval")
    assert [e["step"] for e in single] == [0, 2, 4, 6]
    for a, b in zip(r0, single):
        np.testing.assert_allclose(list(a["student_loss"].values()), list(b["student_loss"].values()), rtol=rtol)
        np.testing.assert_allclose(list(a["weights"].values()), list(b["weights"].values()), rtol=0, atol=rtol)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_split_each_global_batch_disjointly(request, backend, parallel):
    runs = request.getfixturevalue(f"{backend}_runs")
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_curve_matches_one_process(request, backend, parallel):
    runs, rtol = request.getfixturevalue(f"{backend}_runs"), RTOL[backend]
    single, multi = read_metrics(runs["single"], "train"), read_metrics(runs[parallel], "train")
    assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
    for key in ("loss", "ce", "kl", "grad_norm", "lr"):
        np.testing.assert_allclose([r[key] for r in multi], [r[key] for r in single], rtol=rtol, err_msg=key)
    after = _results(runs[parallel])["student_after_loss"]
    expected = _results(runs["single"])["student_after_loss"]
    np.testing.assert_allclose(list(after.values()), list(expected.values()), rtol=rtol)


def test_two_rank_checkpoint_resumes_in_one_process(gloo_runs):
    # One process (launched by gloo_runs once ddp was done) loads the full state ddp's rank 0 saved.
    out = gloo_runs["ddp->single"]
    _assert_matches_single(gloo_runs, out, _results(out)["student_after_loss"])


def test_one_process_checkpoint_resumes_on_two_fsdp2_ranks(gloo_runs):
    # FSDP2 ranks load the full optimizer state of a single process into their shards.
    out = gloo_runs["single->fsdp2"]
    assert [e["step"] for e in _rank_log(out, 1, "eval")] == [4, 6]  # rank 1 joined at step 3
    _assert_matches_single(gloo_runs, out, _results(out)["student_after_loss"])


def _assert_matches_single(runs, out, after_loss):
    rtol = RTOL["gloo"]
    single, got = read_metrics(runs["single"], "train"), read_metrics(out, "train")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["step"] for r in read_metrics(out, "eval")] == [0, 2, 4, 6]  # nothing logged twice
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in single], rtol=rtol)
    np.testing.assert_allclose([r["grad_norm"] for r in got], [r["grad_norm"] for r in single], rtol=rtol)
    expected = _results(runs["single"])["student_after_loss"]
    np.testing.assert_allclose(list(after_loss.values()), list(expected.values()), rtol=rtol)


def test_checkpoints_hold_full_rank_independent_state(gloo_runs):
    from safetensors.torch import load_file

    runs = gloo_runs
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
