"""`make bench-step` end to end at a toy size: every arm runs (activation checkpointing
included), the fused head saves memory, and the report holds MFU's inputs."""

from __future__ import annotations

import json

import pytest
import torch

from ddk.benchmarks import student_step as bench_student_step


@pytest.mark.skipif(torch.cuda.is_available(), reason="sized for the CPU path (tiny preset, allocator-event peaks)")
def test_every_arm_measured_and_unfused_kd_holds_more_memory(tmp_path):
    out = tmp_path / "step.json"
    # A step's peak is its largest phase. Below ~100 tokens the AdamW phase (gradients and
    # foreach temporaries of the 19M-parameter embedding) sets it in every arm alike; at 128
    # tokens the unfused loss phase, several [128, V] fp32 buffers at once, overtakes it.
    bench_student_step.main(["--preset", "tiny", "--layers", "1", "--seq-len", "128", "--rows", "1", "--steps", "1",
                             "--warmup", "0", "--json", str(out)])
    result = json.loads(out.read_text())
    arms = result["arms"]
    assert set(arms) == {name for name, *_ in bench_student_step.ARMS}
    assert {name for name, a in arms.items() if a["activation_checkpointing"]} == {"CPT, fused, AC", "cached KD, fused, AC"}
    for name, arm in arms.items():
        assert arm["tokens_per_s"] > 0, name
        assert arm["step_peak_bytes"] > 0, name
        assert arm["mfu"] is None and arm["max_rows"] is None, name  # no bf16 peak and no memory ceiling on a CPU
    # 6 x the Linear weights (the tied head once) + 12 x layers x hidden x seq
    shape = bench_student_step.PRESETS["tiny"]
    linear = (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 512) + 151936 * 128
    assert result["flops_per_token"] == 6 * linear + 12 * 1 * shape["hidden_size"] * 128
    assert bench_student_step.peak_flops("NVIDIA H200") == bench_student_step.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_student_step.peak_flops("NVIDIA H200", 500) == 500e12 and bench_student_step.peak_flops("cpu") is None
    groups = result["optimizer"]["param_groups"]  # stage two's AdamW: norms, biases and embeddings not decayed
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and sum(g["params"] for g in groups) == result["params"]
    # The unfused step holds the [tokens, V] logits, their log-softmax and their gradient
    # at once; the fused one never more than one chunk, overwritten by its gradient.
    assert arms["cached KD, unfused"]["step_peak_bytes"] > arms["cached KD, fused"]["step_peak_bytes"]
    assert result["machine"]["torch"] == torch.__version__


@pytest.mark.parametrize("limit,cap,resolution,start", [(37, 64, 0.0, 4), (200, 256, 1 / 32, 4), (300, 256, 1 / 32, 4), (0, 64, 0.0, 0)])
def test_largest_micro_batch_search(limit, cap, resolution, start):
    """Doubling from the rows known to fit, then bisection (to within `resolution` of the
    answer): against a fake step that runs out of memory above `limit` rows."""
    tried = []

    def step(rows):
        tried.append(rows)
        if rows > limit:
            raise torch.OutOfMemoryError("fake")
        return rows

    found = bench_student_step.largest_micro_batch(step, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                                                   lambda rows: rows, cap, start=start, resolution=resolution)
    want = min(limit, cap)
    assert want - max(1, int(resolution * want)) < found <= want if resolution else found == want
    assert all(r <= cap for r in tried) and len(tried) <= 16
