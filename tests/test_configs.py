"""Every shipped configs/*.toml loads and passes the project's own validation.

Loading is `load_config` (unknown fields, wrong types, impossible values are refused
there); the cross-checks stage one and torchrun make later are repeated here where they
need no model, corpus or GPU. A new config file is picked up by the glob.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ddk.pipeline.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.toml"))


def test_the_known_configs_are_found():
    names = {p.name for p in SHIPPED}
    assert {"default.toml", "ci.toml", "qwen-vocab.toml", "system.toml", "qwen2.5-7b-to-0.5b.toml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    # what stage one refuses at run time (stages/teacher_cache.py make_plan, resolve_backend)
    if cfg.cache.support == "sampled":
        assert cfg.teacher.backend in ("auto", "hf"), "a sampled support needs the hf backend (vLLM returns top-k only)"
    # distill.interval = 0 means a fraction of the steps; an explicit K must fit the run
    assert cfg.distill.interval <= cfg.distill.steps
    assert cfg.distill.warmup_steps < cfg.distill.steps
    # a config's own domains: the student's mix names only those
    if cfg.corpus.source == "files":
        names = {d.name for d in cfg.corpus.domains}
        for role in ("teacher", "student"):
            assert set(getattr(cfg.models, role).domain_mix) <= names


def test_the_real_scale_config_is_the_papers_setting():
    from ddk.stages.distill import lr_at

    cfg = load_config(CONFIGS / "qwen2.5-7b-to-0.5b.toml")
    d = cfg.distill
    assert (d.parallel, cfg.corpus.seq_len, d.interval, cfg.teacher.dtype) == ("fsdp2", 2048, 1000, "bfloat16")
    assert d.batch_rows % 8 == 0, "batch_rows is the global micro-batch: a multiple of the 8 ranks"
    assert cfg.cache.workers == 8 and cfg.teacher.tensor_parallel_size == 1
    # warm-up 0 -> 3e-5 over 1,000 steps, then cosine to 3e-6
    assert lr_at(0, d) == pytest.approx(3e-8)
    assert lr_at(999, d) == pytest.approx(3e-5)
    assert lr_at(d.steps, d) == pytest.approx(3e-6)
    assert 3e-6 < lr_at((d.steps + 1000) // 2, d) < 3e-5
    # ~15B tokens over ~30,000 steps, as the paper
    tokens = d.steps * d.batch_rows * d.grad_accum * cfg.corpus.seq_len
    assert 14e9 < tokens < 17e9
    # the paths are placeholders to override, never "" (which would build the tiny models)
    assert cfg.teacher.path and cfg.distill.student
    over = load_config(CONFIGS / "qwen2.5-7b-to-0.5b.toml", ["teacher.path=/m/t", "distill.student=/m/s"])
    assert (str(over.teacher_path()), str(over.student_path())) == ("/m/t", "/m/s")
