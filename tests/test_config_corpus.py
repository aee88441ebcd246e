"""Config loading/overrides, corpus readers and packing: the data path up to token rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddk.pipeline.config import ConfigError, CorpusConfig, DomainSource, load_config
from ddk.pipeline.builtin_corpus import builtin_domains
from ddk.pipeline.corpus import load_domain, load_domains
from ddk.pipeline.packing import pack_domain


def test_overrides_parse_toml_literals_and_bare_words(tmp_path):
    cfg = load_config(None, ["cache.k=16", "teacher.backend=hf", "models.student.domain_mix={ code = 1.0 }", "corpus.seq_len=64"])
    assert cfg.cache.k == 16 and cfg.teacher.backend == "hf" and cfg.corpus.seq_len == 64
    assert cfg.models.student.domain_mix == {"code": 1.0}


def test_default_config_file_loads():
    cfg = load_config("configs/default.toml")
    assert cfg.corpus.source == "builtin" and cfg.cache.k == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ("cache.kk=3", "unknown field 'kk'"),
        ("cache.k=0", "cache.k = 0"),
        ("cache.k=\"many\"", "expected int"),
        ("teacher.backend=onnx", "not one of auto, vllm, hf"),
        ("models.teacher.num_heads=16", "head_dim"),  # 192/16 = 12: vLLM CPU attention refuses it
        ("corpus.source=web", "not one of 'builtin', 'builtin-chat', 'files'"),
    ],
)
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Path(__file__).parents[1] / "configs" / "default.toml", [override])


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml not found"):
        load_config(tmp_path / "nope.toml")


def test_builtin_corpus_has_four_distinct_domains():
    domains = builtin_domains(20_000)
    assert [d.name for d in domains] == ["code", "reference", "docstrings", "unicode"]
    for d in domains:
        assert d.chars >= 20_000 or d.name == "reference", d.name
    code, ref, doc, uni = (d.documents[0].text for d in domains)
    assert "def " in code or "class " in code or "import " in code
    first_docstring = doc.split("\n\n")[1].split("\n")[0]
    assert all(first_docstring not in d.text for d in domains[0].documents)  # docstrings live in their own domain
    assert json.loads(uni.splitlines()[0])["cp"].startswith("U+")


def test_user_files_jsonl_parquet_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello world"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    pq.write_table(pa.table({"body": ["from parquet", None]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("plain text file")
    dom = load_domain(DomainSource("mixed", ["a.jsonl", "b.parquet", "*.txt"], text_field="body"), tmp_path)
    assert [d.text for d in dom.documents] == ["hello world", "second", "from parquet", "plain text file"]


def test_user_file_errors_name_file_field_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        load_domain(DomainSource("x", ["missing/*.jsonl"]), tmp_path)
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"a.jsonl:1: no field 'text' \(found \['content'\]\); set text_field"):
        load_domain(DomainSource("x", ["a.jsonl"]), tmp_path)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ConfigError, match="no non-empty text"):
        load_domain(DomainSource("x", ["empty.txt"]), tmp_path)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match="no column 'text'"):
        load_domain(DomainSource("x", ["p.parquet"]), tmp_path)
    with pytest.raises(ConfigError, match="no \\[\\[corpus.domains\\]\\]"):
        load_config(None, ["corpus.source=files"])


def test_files_corpus_resolves_relative_to_config(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.txt").write_text("abc " * 50)
    cfg = CorpusConfig(source="files", domains=[DomainSource("d", ["data/*.txt"])])
    assert load_domains(cfg, tmp_path)[0].documents[0].text.startswith("abc")


def test_packing_split_is_deterministic_by_document(tiny_models):
    from transformers import AutoTokenizer

    cfg, _ = tiny_models
    tok = AutoTokenizer.from_pretrained(cfg.teacher_path())
    dom = builtin_domains(30_000)[1]
    a = pack_domain(dom, tok, cfg.corpus)
    b = pack_domain(type(dom)(dom.name, list(reversed(dom.documents))), tok, cfg.corpus)
    assert a.val.shape == (cfg.corpus.val_rows, cfg.corpus.seq_len + 1)
    assert a.train.shape[1] == cfg.corpus.seq_len + 1 and len(a.train) > 10
    assert a.test.shape == (cfg.corpus.test_rows, cfg.corpus.seq_len + 1)
    np.testing.assert_array_equal(a.val, b.val)  # file order does not move the split
    np.testing.assert_array_equal(a.test, b.test)
    train_tokens = {tuple(r[i : i + 8]) for r in a.train for i in range(0, len(r) - 8, 8)}
    for held_out in (a.val, a.test):
        leaked = sum(tuple(r[i : i + 8]) in train_tokens for r in held_out for i in range(0, len(r) - 8, 8))
        assert leaked < 0.2 * held_out.size / 8  # only common short n-grams may repeat, not whole documents
    val_grams = {tuple(r[i : i + 8]) for r in a.val for i in range(0, len(r) - 8, 8)}
    assert sum(tuple(r[i : i + 8]) in val_grams for r in a.test for i in range(0, len(r) - 8, 8)) < 0.2 * a.test.size / 8


def test_test_split_is_disjoint_by_document(tiny_models):
    """Each document lands in exactly one split, and each split's rows are exactly its
    documents' tokens (joined by EOS, in split order)."""
    from transformers import AutoTokenizer

    from ddk.pipeline.packing import split_documents, tokenize_documents

    cfg, _ = tiny_models
    tok = AutoTokenizer.from_pretrained(cfg.teacher_path())
    for dom in builtin_domains(30_000):
        tokens = tokenize_documents(tok, [d.text for d in dom.documents])
        docs = split_documents([d.doc_id for d in dom.documents], [len(t) for t in tokens], cfg.corpus)
        assert sorted(docs["val"] + docs["test"] + docs["train"]) == list(range(len(tokens))), dom.name
        assert docs["val"] and docs["test"] and docs["train"], dom.name
        packed = pack_domain(dom, tok, cfg.corpus)
        for split in ("val", "test", "train"):
            stream = [t for i in docs[split] for t in (*tokens[i], tok.eos_token_id)]
            flat = packed.rows(split).reshape(-1).tolist()
            assert flat == stream[: len(flat)], (dom.name, split)
        # the split follows the document ids, not their order in the corpus
        shuffled = split_documents([d.doc_id for d in reversed(dom.documents)], [len(t) for t in reversed(tokens)], cfg.corpus)
        n = len(tokens) - 1
        assert {s: sorted(n - i for i in v) for s, v in shuffled.items()} == {s: sorted(v) for s, v in docs.items()}


def test_packing_refuses_a_domain_too_small(tiny_models):
    from transformers import AutoTokenizer

    from ddk.pipeline.corpus import Document, Domain

    cfg, _ = tiny_models
    tok = AutoTokenizer.from_pretrained(cfg.teacher_path())
    with pytest.raises(ConfigError, match="domain 'small'.*too few"):
        pack_domain(Domain("small", [Document("d", "tiny text")]), tok, cfg.corpus)


@pytest.mark.parametrize("override, message", [
    ("distill.grad_clip=-1.0", "distill.grad_clip = -1.0: must be a finite number >= 0"),
    ("distill.checkpoint_every=0", "distill.checkpoint_every = 0: must be >= 1"),
    ("distill.gamma=-0.1", "distill.gamma = -0.1: must be a finite number >= 0"),
    ("distill.min_lr=0.01", "need 0 <= min_lr <= lr"),
    ("distill.eval_rows=-1", "distill.eval_rows = -1: must be >= 0"),
    ("distill.loss_impl=dense", "distill.loss_impl: 'dense' is not one of fused, unfused"),
    ("distill.interval_fraction=0.0", "interval_fraction"),
    ("cache.logprob_step=0.0", "cache.logprob_step = 0.0: logprob_step must be finite and > 0"),
    ("cache.logprob_step=200.0", "cache.logprob_step = 200.0: logprob_floor -63.0 is within half a step of 0"),
    ("corpus.test_rows=0", "corpus.test_rows = 0: must be >= 1"),
])
def test_bad_values_fail_at_load_time_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(Path(__file__).parents[1] / "configs" / "default.toml", [override])
