"""`make bench-step` end to end at a toy size: every arm runs, and the fused head saves memory."""

from __future__ import annotations

import json

import pytest
import torch

from ddk.stages import bench_student_step


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
    assert set(arms) == {name for name, _, _ in bench_student_step.ARMS}
    for name, arm in arms.items():
        assert arm["tokens_per_s"] > 0, name
        assert arm["step_peak_bytes"] > 0, name
    # The unfused step holds the [tokens, V] logits, their log-softmax and their gradient
    # at once; the fused one never more than one chunk, overwritten by its gradient.
    assert arms["cached KD, unfused"]["step_peak_bytes"] > arms["cached KD, fused"]["step_peak_bytes"]
    assert result["machine"]["torch"] == torch.__version__
