"""Stage one's streaming ingest (pipeline/ingest.py): the same rows as the in-memory
packing, resume after a kill at any checkpoint, and bad input stopped with one line."""

from __future__ import annotations

import errno
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddk.pipeline import ingest as ingest_mod
from ddk.pipeline.config import ConfigError, CorpusConfig, DomainSource
from ddk.pipeline.builtin_corpus import builtin_domains
from ddk.pipeline.corpus import load_domains
from ddk.pipeline.ingest import IngestError, ingest_corpus
from ddk.pipeline.packing import HeldOutSelector, pack_domain


@pytest.fixture(scope="module")
def tokenizer():
    from ddk.pipeline.tiny_models import train_tokenizer

    return train_tokenizer(builtin_domains(20_000), 300, 20_000)


def _write_corpus(root, docs_per_file=40, files=3):
    """Two domains over .jsonl, .parquet (several row groups) and .txt files."""
    rng = random.Random(0)
    words = [w for d in builtin_domains(8_000)[1].documents for w in d.text.split()][:3000]
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    for f in range(files):
        with open(root / "a" / f"part-{f}.jsonl", "w") as fh:
            for i in range(docs_per_file):
                fh.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 120)))}) + "\n")
                if i % 7 == 0:
                    fh.write("\n")  # blank lines still count for the document ids
        texts = [" ".join(rng.choices(words, k=rng.randint(5, 120))) for _ in range(docs_per_file)]
        pq.write_table(pa.table({"text": texts}), root / "b" / f"part-{f}.parquet", row_group_size=7)
    (root / "b" / "z-notes.txt").write_text("a text file is one document\r\nwith CRLF lines\n" * 20)
    return CorpusConfig(source="files", seq_len=16, val_rows=3, test_rows=4, seed=3, ingest_batch_mb=1, ingest_checkpoint_mb=1,
                        domains=[DomainSource("a", ["a/*.jsonl"]), DomainSource("b", ["b/*.parquet", "b/*.txt"])])


def _rows(d):
    return {s: np.array(d.rows(s)) for s in ("train", "val", "test")}


def _ingest(cfg, root, tokenizer, out, **kw):
    return ingest_corpus(cfg, root, tokenizer, out, "tok", log=lambda *_: None, **kw)


def test_streaming_ingest_equals_in_memory_packing(tmp_path, tokenizer):
    cfg = _write_corpus(tmp_path / "corpus")
    got = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    for dom, ing in zip(load_domains(cfg, tmp_path / "corpus"), got):
        ref = pack_domain(dom, tokenizer, cfg)
        for split, rows in _rows(ing).items():
            np.testing.assert_array_equal(rows, ref.rows(split), err_msg=f"{dom.name} {split}")
        assert ing.documents == len(dom.documents) and ing.chars == dom.chars
        assert ing.train_rows == len(ref.train) > 5
    assert not list((tmp_path / "ingest").rglob("*.bin"))  # scratch dropped once packed


def test_streaming_ingest_of_the_builtin_corpus_equals_in_memory_packing(tmp_path, tokenizer):
    cfg = CorpusConfig(builtin_chars_per_domain=60_000, seq_len=32, val_rows=2, test_rows=2, max_train_rows=7)
    got = _ingest(cfg, tmp_path, tokenizer, tmp_path / "ingest")
    for dom, ing in zip(builtin_domains(60_000), got):
        ref = pack_domain(dom, tokenizer, cfg)
        for split, rows in _rows(ing).items():
            np.testing.assert_array_equal(rows, ref.rows(split))
        assert ing.train_rows == 7  # the cap


@pytest.mark.parametrize("seed", range(6))
def test_held_out_selector_matches_sorting_the_whole_corpus(seed):
    """The bounded one-pass selection picks what sorting every document by key picks."""
    rng = random.Random(seed)
    n = rng.randint(1, 400)
    keys = [rng.randrange(50 if seed % 2 else 2**32) for _ in range(n)]  # odd seeds: many equal keys
    tokens = [rng.randint(1, 60) for _ in range(n)]
    need_val, need_test = rng.randint(1, 300), rng.randint(1, 300)
    sel, released = HeldOutSelector(need_val, need_test), []
    for i in range(n):
        released += sel.add(keys[i], i, tokens[i])
    order = sorted(range(n), key=lambda i: (keys[i], i))
    ref, taken = {}, 0
    for split, need in (("val", need_val), ("test", need_test)):
        got, ref[split] = 0, []
        while got < need and taken < n:
            ref[split].append(order[taken])
            got += tokens[order[taken]]
            taken += 1
    val, test = sel.splits()
    assert (val, test) == (ref["val"], ref["test"])
    assert sorted(released) == sorted(order[taken:])  # everything else was released, once
    assert len(sel.held) == taken


class _Killed(Exception):
    pass


def _count_encodes(monkeypatch, die_at: int = 0) -> dict:
    """Count tokenizer calls; raise _Killed at call `die_at` (a kill between checkpoints)."""
    calls, real = {"n": 0}, ingest_mod._batch_encoder

    def encoder(tok):
        enc = real(tok)

        def encode(texts):
            calls["n"] += 1
            if calls["n"] == die_at:
                raise _Killed()
            return enc(texts)
        return encode

    monkeypatch.setattr(ingest_mod, "_batch_encoder", encoder)
    return calls


def test_a_killed_ingest_resumes_to_the_same_rows(tmp_path, tokenizer, monkeypatch):
    cfg = _write_corpus(tmp_path / "corpus", docs_per_file=400)
    clean = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "clean")
    monkeypatch.setattr(ingest_mod, "MIB", 16 << 10)  # batches and checkpoints of 16 KiB of text
    cfg.ingest_checkpoint_mb = 3
    calls = _count_encodes(monkeypatch)
    _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "scratch")
    scratch = calls["n"]
    for die_at in (5, 11):  # killed twice, mid-interval, before and after a checkpoint
        calls = _count_encodes(monkeypatch, die_at)
        with pytest.raises(_Killed):
            _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "a" / "state.json").read_text())
    assert 0 < state["checkpoint_tokens"] and not state["tokenized"]
    calls = _count_encodes(monkeypatch)
    resumed = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "resumed")
    assert 0 < calls["n"] < scratch  # it resumed: fewer batches than from scratch
    for a, b in zip(clean, resumed):
        assert a.tokens_sha256 == b.tokens_sha256, a.name
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(a.rows(split), b.rows(split))
    calls = _count_encodes(monkeypatch)
    _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "resumed")
    assert calls["n"] == 0  # a finished ingest is reused


def test_a_changed_corpus_restarts_its_domain_only(tmp_path, tokenizer):
    cfg = _write_corpus(tmp_path / "corpus")
    first = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    with open(tmp_path / "corpus" / "a" / "part-1.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "one more document " * 30}) + "\n")
    logs = []
    second = ingest_corpus(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest", "tok", log=logs.append)
    assert second[0].documents == first[0].documents + 1
    assert second[1].tokens_sha256 == first[1].tokens_sha256


def test_empty_or_unreadable_file_stops_before_any_work(tmp_path, tokenizer):
    cfg = _write_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "b" / "part-1.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"part-1.parquet: empty file \(0 bytes\) in corpus.domains 'b'; delete it or narrow the glob"):
        _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    assert not (tmp_path / "ingest").exists()  # checked before domain 'a' was touched
    (tmp_path / "corpus" / "b" / "part-1.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="part-1.parquet: not a readable Parquet file"):
        _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    if os.geteuid() != 0:  # root reads anything
        (tmp_path / "corpus" / "a" / "part-2.jsonl").chmod(0)
        with pytest.raises(ConfigError, match=r"part-2.jsonl: cannot be read \(Permission denied\)"):
            _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest2")


def test_invalid_utf8_names_the_line_and_the_options(tmp_path, tokenizer):
    cfg = _write_corpus(tmp_path / "corpus")
    bad = tmp_path / "corpus" / "a" / "part-1.jsonl"
    lines = bad.read_bytes().split(b"\n")
    lines[4] = b'{"text": "caf\xe9 latin-1"}'
    bad.write_bytes(b"\n".join(lines))
    with pytest.raises(ConfigError, match=r"part-1.jsonl:5: invalid UTF-8 \(byte 13: b'\\xe9'\); fix the file, or set corpus.invalid_utf8"):
        _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    cfg.invalid_utf8 = "skip"
    skipped = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    cfg.invalid_utf8 = "replace"
    replaced = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    assert replaced[0].documents == skipped[0].documents + 1
    assert "caf\ufffd latin-1" in [d.text for d in load_domains(cfg, tmp_path / "corpus")[0].documents]


def test_a_full_disk_stops_with_what_to_free_and_loses_nothing(tmp_path, tokenizer, monkeypatch):
    cfg = _write_corpus(tmp_path / "corpus", docs_per_file=300)
    clean = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "clean")
    monkeypatch.setattr(ingest_mod, "MIB", 16 << 10)
    real_open, writes = open, {"n": 0}

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            writes["n"] += 1
            if writes["n"] == 12:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    def filling_open(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return FullDisk(fh) if str(path).endswith("tokens.bin") and "a" in mode else fh

    monkeypatch.setattr(ingest_mod, "open", filling_open, raising=False)
    with pytest.raises(IngestError, match=r"tokens.bin: no space left on the device .* free about .* GiB there .* re-run: the ingest "
                                          r"resumes from its last checkpoint \([\d,]+ tokens\), nothing written is lost"):
        _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "full")
    monkeypatch.setattr(ingest_mod, "open", real_open, raising=False)
    after = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "full")
    assert [d.tokens_sha256 for d in after] == [d.tokens_sha256 for d in clean]


def test_too_small_a_domain_is_refused_with_the_fix(tmp_path, tokenizer):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.txt").write_text("tiny text")
    cfg = CorpusConfig(source="files", seq_len=16, val_rows=3, test_rows=4, domains=[DomainSource("small", ["s/*.txt"])])
    with pytest.raises(ConfigError, match="domain 'small'.*too few.*lower corpus.val_rows"):
        _ingest(cfg, tmp_path, tokenizer, tmp_path / "ingest")


def test_ddk_corpus_streams_counts_and_shows_rows_once_ingested(tmp_path, tokenizer):
    from click.testing import CliRunner

    from ddk.stages.cli import main as cli

    cfg = _write_corpus(tmp_path / "corpus")
    config = tmp_path / "corpus" / "c.toml"
    config.write_text(
        f'[corpus]\nsource = "files"\nseq_len = 16\nval_rows = 3\ntest_rows = 4\nseed = 3\n'
        f'[[corpus.domains]]\nname = "a"\npaths = ["a/*.jsonl"]\n[[corpus.domains]]\nname = "b"\npaths = ["b/*.parquet", "b/*.txt"]\n'
        f'[cache]\nout_dir = "{tmp_path / "cache"}"\n')
    docs = {d.name: len(d.documents) for d in load_domains(cfg, tmp_path / "corpus")}
    out = CliRunner().invoke(cli, ["corpus", "--config", str(config)])
    assert out.exit_code == 0, out.output
    table = {line.split()[0]: line.split()[1:] for line in out.output.splitlines() if line.strip()}
    assert table["a"][0] == str(docs["a"]) and table["b"][0] == str(docs["b"])
    assert "rows and tokens appear once `ddk teacher-cache` has ingested" in out.output
    got = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "cache" / "_work" / "ingest")
    out = CliRunner().invoke(cli, ["corpus", "--config", str(config)])
    assert "appear once" not in out.output
    assert f"{got[0].train_rows:>12}{got[0].val_rows:>10}{got[0].test_rows:>11}" in out.output


def test_a_tokenizer_json_with_truncation_or_padding_does_not_cut_documents(tmp_path, tokenizer):
    """The Rust core keeps the truncation/padding a tokenizer.json may carry; the
    tokenizer's own __call__ (the in-memory packing) turns them off, and so does ingest."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.enable_truncation(max_length=5)
    tok.backend_tokenizer.enable_padding(length=7, pad_id=0)
    cfg = _write_corpus(tmp_path / "corpus")
    got = _ingest(cfg, tmp_path / "corpus", tok, tmp_path / "ingest")
    ref = pack_domain(load_domains(cfg, tmp_path / "corpus")[0], tokenizer, cfg)
    np.testing.assert_array_equal(got[0].rows("train"), ref.train)


def test_leftovers_of_a_kill_are_cleaned_or_refused(tmp_path, tokenizer):
    cfg = _write_corpus(tmp_path / "corpus")
    first = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    # killed after rows.json, before the scratch files were deleted: removed next time
    (tmp_path / "ingest" / "a" / "tokens.bin").write_bytes(b"\0" * 64)
    again = _ingest(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest")
    assert not (tmp_path / "ingest" / "a" / "tokens.bin").exists()
    assert again[0].tokens_sha256 == first[0].tokens_sha256
    # a state claiming more tokens than its files hold starts the domain over
    d = tmp_path / "ingest" / "a"
    key = json.loads((d / "rows.json").read_text())["key"]
    (d / "rows.json").unlink()
    (d / "docs.bin").write_bytes(b"")
    (d / "tokens.bin").write_bytes(b"")
    (d / "state.json").write_text(json.dumps({"key": key, "position": {"file": 1, "offset": 0, "line": 0}, "documents": 5,
                                              "tokens": 10**6, "chars": 0, "bytes_read": 0, "tokenized": False}))
    logs = []
    again = ingest_corpus(cfg, tmp_path / "corpus", tokenizer, tmp_path / "ingest", "tok", log=logs.append)
    assert any("starting this domain over" in line for line in logs)
    assert again[0].tokens_sha256 == first[0].tokens_sha256


def test_csv_tsv_and_arrow_ipc_read_through_polars_and_resume(tmp_path, tokenizer):
    """.csv / .tsv / Arrow IPC domains (polars lazy scans, bounded batches): the streaming
    ingest equals the in-memory packing, a resume position yields exactly the rest, and a
    missing column or bad UTF-8 is one line naming the file."""
    import polars as pl

    from ddk.pipeline import corpus as corpus_mod
    from ddk.pipeline.corpus import iter_documents

    rng = random.Random(1)
    words = [w for d in builtin_domains(8_000)[1].documents for w in d.text.split()][:2000]
    texts = [" ".join(rng.choices(words, k=rng.randint(5, 80))) + ', "quoted", and\nnew lines' for _ in range(120)]
    root = tmp_path / "corpus"
    root.mkdir()
    pl.DataFrame({"id": [str(i) for i in range(40)], "text": texts[:40]}).write_csv(root / "a.csv")
    pl.DataFrame({"text": texts[40:80]}).write_csv(root / "b.tsv", separator="\t")
    pl.DataFrame({"text": texts[80:]}).write_ipc(root / "c.arrow")
    cfg = CorpusConfig(source="files", seq_len=16, val_rows=3, test_rows=4, seed=3, ingest_batch_mb=1, ingest_checkpoint_mb=1,
                       domains=[DomainSource("tab", ["*.csv", "*.tsv", "*.arrow"])])
    [dom] = load_domains(cfg, root)
    assert [d.text for d in dom.documents] == texts
    [got] = _ingest(cfg, root, tokenizer, tmp_path / "ingest")
    ref = pack_domain(dom, tokenizer, cfg)
    for split, rows in _rows(got).items():
        np.testing.assert_array_equal(rows, ref.rows(split), err_msg=split)
    corpus_mod.POLARS_BATCH_ROWS, old = 7, corpus_mod.POLARS_BATCH_ROWS  # several batches per file
    try:
        stream = [(d, p) for d, p in iter_documents(cfg.domains[0], root) if d is not None]
        resumed = [d.text for d, _ in iter_documents(cfg.domains[0], root, start=stream[52][1]) if d is not None]
    finally:
        corpus_mod.POLARS_BATCH_ROWS = old
    assert [d.text for d, _ in stream] == texts and resumed == texts[53:]
    with pytest.raises(ConfigError, match=r"a\.csv: no column 'body' \(columns: \['id', 'text'\]\)"):
        load_domains(CorpusConfig(source="files", domains=[DomainSource("x", ["a.csv"], text_field="body")]), root)
    (root / "bad.csv").write_bytes(b"text\nok\nbad \xff byte\n")
    with pytest.raises(ConfigError, match=r"bad\.csv: cannot be read as \.csv .*invalid_utf8 = 'replace'"):
        load_domains(CorpusConfig(source="files", domains=[DomainSource("x", ["bad.csv"])]), root)
    fixed = load_domains(CorpusConfig(source="files", invalid_utf8="replace", domains=[DomainSource("x", ["bad.csv"])]), root)
    assert [d.text for d in fixed[0].documents] == ["ok", "bad \ufffd byte"]
