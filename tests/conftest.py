"""Shared fixtures: one set of tiny local models per test session, built by the real code path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton reads TRITON_INTERPRET when it is first imported, and transformers/vllm import
# it early: set it here, before any test module, so the kernel tests run under the
# interpreter on machines without a GPU (on a GPU machine they run the real kernel).
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# Smaller than configs/ci.toml: a few seconds to build, still a real BPE tokenizer and
# two LlamaForCausalLM directories loaded through from_pretrained.
TINY_TOML = """
[corpus]
source = "builtin"
builtin_chars_per_domain = 30_000
seq_len = 32
val_rows = 4
test_rows = 4

[models]
out_dir = "{root}/models"
vocab_size = 320
tokenizer_chars_per_domain = 20_000

[models.teacher]
hidden_size = 64
num_layers = 1
num_heads = 1
intermediate_size = 128
pretrain_steps = 60
lr = 5e-3
batch_rows = 16

[models.student]
hidden_size = 32
num_layers = 1
num_heads = 1
intermediate_size = 64
pretrain_steps = 10
batch_rows = 8
domain_mix = {{ code = 0.5, reference = 0.5 }}

[teacher]
backend = "hf"
batch_rows = 16

[cache]
support = "topk"  # these tests check the top-k machinery; tests/test_support.py the sampled one
out_dir = "{root}/cache"
k = 8
rows_per_shard = 16
"""


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    path = root / "tiny.toml"
    path.write_text(TINY_TOML.format(root=root))
    return path


@pytest.fixture(scope="session")
def tiny_models(tiny_config_path):
    """(config, report): the tiny tokenizer/teacher/student, built once per session."""
    from ddk.pipeline.config import load_config
    from ddk.pipeline.corpus import load_domains
    from ddk.pipeline.tiny_models import make_tiny_models

    cfg = load_config(tiny_config_path)
    report = make_tiny_models(cfg.models, load_domains(cfg.corpus), cfg.corpus)
    return cfg, report


@pytest.fixture(scope="session")
def tiny_cache(tiny_models, tiny_config_path):
    """A complete hf-backend cache of the tiny teacher (shared, treat as read-only)."""
    from ddk.pipeline.config import load_config
    from ddk.stages.teacher_cache import teacher_cache

    cfg = load_config(tiny_config_path)
    manifest = teacher_cache(cfg, log=lambda *_: None)
    return cfg, manifest
