"""make bench-capture's script: refuses without CUDA, and its arms run end to end (a tiny
Qwen2 shape on CPU, --cpu-smoke) with a top-k and sampled capture per repeat."""

from __future__ import annotations

import json

import pytest
import torch

from ddk.benchmarks import capture as bench_capture


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_capture.main(["--shapes", "tiny"])


def test_cpu_smoke_runs_every_arm(tmp_path, capsys):
    out = tmp_path / "capture.json"
    bench_capture.main(["--cpu-smoke", "--shapes", "tiny", "--rows", "2", "--seq-len", "16", "--k", "8",
                        "--repeats", "1", "--json", str(out)])
    r = json.loads(out.read_text())["shapes"]["tiny"]
    assert set(r["arms"]) == {"bare", "decoder", "topk", "topk/torch", "sampled", "sampled/torch", "sampled+write"}
    assert r["chunked_head"] and all(a["tokens_per_s"] > 0 for a in r["arms"].values())
    printed = capsys.readouterr().out
    assert "goal topk >= 0.95x bare" in printed and "sampled with the shard write overlapped" in printed
