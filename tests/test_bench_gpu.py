"""make bench-gpu's script: refuses without CUDA, and runs the real command line end to
end at a tiny shape on CPU (--cpu-smoke): models written, teacher-cache, distill cpt and
kd, eval, each in its own process, with the numbers it prints."""

from __future__ import annotations

import json

import pytest
import torch

from ddk.benchmarks import gpu_pipeline as bench_gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_gpu.main([])


def test_cpu_smoke_runs_the_real_pipeline(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--cpu-smoke", "--teacher", "tiny", "--student", "tiny", "--rows", "2", "--seq-len", "32",
                    "--steps", "3", "--batch-rows", "2", "--teacher-batch-rows", "4", "--work", str(tmp_path / "w"),
                    "--json", str(out)])
    r = json.loads(out.read_text())
    assert set(r["stages"]) == {"teacher-cache", "distill-cpt", "distill-kd", "eval"}
    assert r["tokens"] > 0 and r["bytes_per_token"] > 0
    assert r["stage_one_vs_bare"] > 0 and r["kd_vs_cpt"] > 0
    assert "kd vs cpt" in capsys.readouterr().out
