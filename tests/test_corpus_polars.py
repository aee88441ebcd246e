""".jsonl and .parquet corpora read through polars (pipeline/corpus.py): the same documents,
ids and resume positions as the Python readers they replaced (frozen below as the
reference), bad lines named by file and line, memory bounded by the batch size."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddk.pipeline import corpus as corpus_mod
from ddk.pipeline.config import ConfigError, DomainSource
from ddk.pipeline.corpus import CorpusPosition, Document, _decode, _parquet_columns, _record_document, iter_documents

# ---------------------------------------------------------------- the reference
# The readers as they were before polars read .jsonl and .parquet (pipeline/corpus.py at
# ae69fb9), copied verbatim: the polars readers must yield what these yield.


def _reference_read_jsonl(path: Path, src: DomainSource, invalid_utf8: str, offset: int, line: int):
    with path.open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            offset += len(raw)
            line += 1
            if not raw.strip():
                continue
            text = _decode(raw, path, str(line), invalid_utf8)
            if text is None:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            yield _record_document(src, obj, f"{path}:{line}", f"{path}:{line}"), offset, line


def _reference_read_parquet(path: Path, src: DomainSource, invalid_utf8: str, offset: int, line: int):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid for a file that is not Parquet
        raise ConfigError(f"{path}: not a readable Parquet file ({e}); fix or remove it") from None
    columns = _parquet_columns(path, src, pf.schema_arrow.names)
    row = 0
    for group in range(pf.metadata.num_row_groups):  # one row group in memory at a time
        n = pf.metadata.row_group(group).num_rows
        if row + n <= offset:  # resuming: skip whole groups without reading them
            row += n
            continue
        for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=columns):
            if src.format == "chat":
                for obj in batch.to_pylist():
                    row += 1
                    if row > offset:
                        where = f"{path}:row {row - 1}"
                        yield _record_document(src, obj, f"{path}:{row - 1}", where), row, 0
                continue
            for t in batch.column(0).to_pylist():
                row += 1
                if row <= offset or t is None:
                    continue
                if isinstance(t, bytes):
                    t = _decode(t, path, f"row {row - 1}", invalid_utf8)
                    if t is None:
                        continue
                yield Document(f"{path}:{row - 1}", str(t)), row, 0


# ---------------------------------------------------------------- helpers


def _stream(reader, path: Path, src: DomainSource, invalid_utf8: str = "error", offset: int = 0, line: int = 0) -> list[tuple]:
    return [(d.doc_id, d.text, d.messages, o, n) for d, o, n in reader(path, src, invalid_utf8, offset, line)]


def _error(reader, path: Path, src: DomainSource, invalid_utf8: str = "error") -> str:
    with pytest.raises(ConfigError) as e:
        _stream(reader, path, src, invalid_utf8)
    return str(e.value)


@pytest.fixture(params=[64, 1000, 4 << 20], ids=["64B-batches", "1KB-batches", "whole-file-batches"])
def jsonl_batch_bytes(request, monkeypatch):
    """Batches smaller than a line, of a few lines, and of the whole file."""
    monkeypatch.setattr(corpus_mod, "JSONL_BATCH_BYTES", request.param)
    return request.param


def _assert_same_as_reference(path: Path, src: DomainSource, invalid_utf8: str = "error", reference=_reference_read_jsonl,
                              reader=None) -> list[tuple]:
    """The same documents, ids and positions as the reference, from the start and resumed
    from every position the reference yields (what a checkpoint of an older run holds)."""
    reader = reader or corpus_mod.READERS[path.suffix]
    expected = _stream(reference, path, src, invalid_utf8)
    assert _stream(reader, path, src, invalid_utf8) == expected
    for k, (*_, offset, line) in enumerate(expected):
        assert _stream(reader, path, src, invalid_utf8, offset, line) == expected[k + 1:], (offset, line)
    return expected


# ---------------------------------------------------------------- .jsonl


def _text_lines() -> bytes:
    """Blank lines of every kind, unicode raw and escaped, CRLF, an empty and a NUL text,
    fields of changing types, a line longer than the small batches, no final newline
    (null and non-string texts: the test after)."""
    records = [
        {"text": "first", "meta": 1},
        {"text": "caf\u00e9 \u65e5\u672c \U0001F600 \u2028 tab\tquote\" backslash\\", "meta": {"nested": [1, None]}},
        {"meta": None, "text": "fields in another order"},
        {"text": "long " * 200, "extra": [{"a": 1}, "b"]},
        {"text": ""},
        {"text": "   \n  "},
        {"text": "a NUL \u0000 inside"},
    ]
    out = [json.dumps(r).encode() + b"\n" for r in records]
    out.insert(1, b"\n")
    out.insert(3, b"   \t \r\n")
    out.append(json.dumps({"text": "ensure_ascii=False \u00e9\U0001F600"}, ensure_ascii=False).encode() + b"\r\n")
    out.append(b"\r\n")
    out.append(b'{"text": "escaped surrogate pair \\ud83d\\ude00"}\n')
    out.append(b'  {"text": "leading and trailing spaces"}   \n')
    out.append(b'{"text":"compact"}\n')
    out.append(b'{"text": "no final newline"}')
    return b"".join(out)


def test_jsonl_text_documents_ids_and_positions_equal_the_python_reader(tmp_path, jsonl_batch_bytes):
    path = tmp_path / "a.jsonl"
    path.write_bytes(_text_lines())
    expected = _assert_same_as_reference(path, DomainSource("a", ["a.jsonl"]))
    assert len(expected) == 12 and expected[0][0] == f"{path}:1" and expected[-1][0] == f"{path}:15"


@pytest.mark.parametrize("value", ["null", "5", "1.5", "true", '{"q": "x\\\\y"}', "[1, 2]", '"lone \\ud800 surrogate"'])
def test_jsonl_text_that_polars_would_read_differently_is_read_by_python(tmp_path, jsonl_batch_bytes, value):
    """polars turns a null, a number, true or an object in a String field into text of its
    own (`true`, `{"q": "x\\y"}`) and an unpaired surrogate into NUL; those lines are read
    as Python read them, so the documents stay the same."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "before"}\n{"text": %s, "other": 1}\n{"text": "after"}\n' % value.encode())
    _assert_same_as_reference(path, DomainSource("a", ["a.jsonl"]))


def test_jsonl_fields_of_any_type_around_the_text_field_are_skipped(tmp_path):
    """Ragged lines: fields that come and go or change type (even to invalid-for-polars
    mixtures) are never parsed into columns; only the text field is."""
    path = tmp_path / "a.jsonl"
    rows = [{"text": f"t{i}", "x": v} for i, v in enumerate([1, "s", None, [1, "a"], {"k": [None, {"z": 2.5}]}, True, 1e300])]
    rows += [{"text": "no x"}, {"y": 1, "text": "only y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [t for _, t, *_ in _assert_same_as_reference(path, DomainSource("a", ["a.jsonl"]))] == [r["text"] for r in rows]


def _chat_lines() -> bytes:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "caf\u00e9 \\ \"q\"\n\U0001F600"},
            {"role": "assistant", "content": "ok", "name": "bot", "weight": 1}]
    records = [
        {"messages": msgs, "id": 1},
        {"messages": msgs[1:], "source": {"nested": True}},
        {"prompt": "Q?", "completion": "A.", "id": "x"},
        {"messages": json.dumps(msgs)},  # a string holding JSON
        {"messages": msgs, "prompt": "ignored when messages are there", "completion": "ignored"},
    ]
    lines = [json.dumps(r).encode() + b"\n" for r in records]
    lines.insert(2, b"\r\n")
    return b"".join(lines)


def test_jsonl_chat_documents_equal_the_python_reader(tmp_path, jsonl_batch_bytes):
    path = tmp_path / "c.jsonl"
    path.write_bytes(_chat_lines())
    src = DomainSource("c", ["c.jsonl"], format="chat")
    expected = _assert_same_as_reference(path, src)
    assert len(expected) == 5 and all(m is not None for *_, m, _, _ in expected)
    lines = [json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"a{i}"}]}) for i in range(50)]
    path.write_text("\n".join(lines) + "\n")  # one the polars batch reads whole
    _assert_same_as_reference(path, src)


def test_jsonl_invalid_utf8_error_replace_and_skip_as_before(tmp_path, jsonl_batch_bytes):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "good"}\n\n{"text": "caf\xe9 latin-1"}\n{"text": "after"}\n{"x": "\xff elsewhere", "text": "t"}\n')
    src = DomainSource("a", ["a.jsonl"])
    message = _error(corpus_mod._read_jsonl, path, src)
    assert message == _error(_reference_read_jsonl, path, src)
    assert message.startswith(f"{path}:3: invalid UTF-8 (byte 13: b'\\xe9'); fix the file, or set corpus.invalid_utf8")
    assert [t for _, t, *_ in _assert_same_as_reference(path, src, "replace")] == ["good", "caf\ufffd latin-1", "after", "t"]
    assert [t for _, t, *_ in _assert_same_as_reference(path, src, "skip")] == ["good", "after"]


@pytest.mark.parametrize("line, fragment", [
    (b'{"text": "unterminated}', "not valid JSON"),
    (b'[1, 2]', "no field 'text' (found list)"),
    (b'"just a string"', "no field 'text' (found str)"),
    (b'{"body": "x"}', "no field 'text' (found ['body'])"),
    (b'{"text": "a"} {"text": "b"}', "not valid JSON (Extra data)"),
    (b'{"text": "a",}', "not valid JSON"),
    (b'\xef\xbb\xbf{"text": "BOM"}', "not valid JSON"),
    (b'\x0c', None),  # a form feed alone is a blank line to Python, an error to polars
    (b'{"text": NaN}', None),  # Python's json takes NaN; polars does not
])
def test_jsonl_bad_lines_name_file_and_line_as_before(tmp_path, jsonl_batch_bytes, line, fragment):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": f"fine {i}"}).encode() + b"\n" for i in range(30)) + line + b'\n{"text": "end"}\n')
    src = DomainSource("a", ["a.jsonl"])
    if fragment is None:
        _assert_same_as_reference(path, src)
        return
    message = _error(corpus_mod._read_jsonl, path, src)
    assert message == _error(_reference_read_jsonl, path, src)
    assert message.startswith(f"{path}:31: ") and fragment in message and "\n" not in message


@pytest.mark.parametrize("record, fragment", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["a"]}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "is not an object with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}, "assistant: yo"]}, "is not an object with 'role' and 'content'"),
    ({"messages": None, "prompt": "p", "completion": "c"}, "non-empty list"),
    ({"messages": []}, "non-empty list"),
    ({"messages": "not json"}, "is a string but not JSON"),
    ({"prompt": "p", "completion": 5}, "must be a string"),
    ({"prompt": "p"}, "no 'messages' field and no 'prompt' + 'completion' fields (found ['prompt'])"),
])
def test_jsonl_bad_conversations_name_file_and_line_as_before(tmp_path, jsonl_batch_bytes, record, fragment):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(good) + "\n" for _ in range(9)) + "\n" + json.dumps(record) + "\n")
    src = DomainSource("c", ["c.jsonl"], format="chat")
    message = _error(corpus_mod._read_jsonl, path, src)
    assert message == _error(_reference_read_jsonl, path, src)
    assert message.startswith(f"{path}:11: ") and fragment in message and "\n" not in message


def test_jsonl_resume_through_iter_documents_yields_exactly_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "JSONL_BATCH_BYTES", 256)
    for f in range(2):
        (tmp_path / f"p{f}.jsonl").write_text("".join(json.dumps({"text": f"file {f} doc {i}"}) + "\n" + "\n" * (i % 3) for i in range(40)))
    src = DomainSource("a", ["p*.jsonl"])
    stream = [(d, p) for d, p in iter_documents(src, tmp_path) if d is not None]
    assert [d.text for d, _ in stream] == [f"file {f} doc {i}" for f in range(2) for i in range(40)]
    for k in (0, 17, 39, 40, 63):
        rest = [d.text for d, _ in iter_documents(src, tmp_path, start=stream[k][1]) if d is not None]
        assert rest == [d.text for d, _ in stream[k + 1:]]
    assert stream[40][1] == CorpusPosition(1, len(json.dumps({"text": "file 1 doc 0"})) + 1, 1)


# ---------------------------------------------------------------- .parquet


def _parquet_reader(path, src, invalid_utf8, offset, line):
    return corpus_mod._read_polars(path, src, invalid_utf8, offset, line)


def test_parquet_text_documents_ids_and_positions_equal_the_pyarrow_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "POLARS_BATCH_ROWS", 3)
    texts = ["first", None, "caf\u00e9 \U0001F600", "", "  \n ", "crlf\r\nline", None, "last but one", "a NUL \u0000", "end"]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=4)
    src = DomainSource("a", ["a.parquet"])
    expected = _assert_same_as_reference(path, src, reference=_reference_read_parquet, reader=_parquet_reader)
    assert [i for i, *_ in expected] == [f"{path}:{r}" for r, t in enumerate(texts) if t is not None]


def test_parquet_binary_text_honours_invalid_utf8(tmp_path):
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9", None, "\u00e9".encode()], type=pa.binary())}), path, row_group_size=2)
    src = DomainSource("b", ["b.parquet"])
    message = _error(_parquet_reader, path, src)
    assert message == _error(_reference_read_parquet, path, src) and message.startswith(f"{path}:row 1: invalid UTF-8")
    for mode in ("replace", "skip"):
        _assert_same_as_reference(path, src, mode, reference=_reference_read_parquet, reader=_parquet_reader)


def test_parquet_chat_rows_equal_the_pyarrow_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "POLARS_BATCH_ROWS", 2)
    msgs = [[{"role": "user", "content": f"q{i} caf\u00e9"}, {"role": "assistant", "content": f"a{i}"}] for i in range(7)]
    src = DomainSource("c", ["*.parquet"], format="chat")
    pq.write_table(pa.table({"messages": msgs, "n": list(range(7))}), tmp_path / "list.parquet", row_group_size=3)
    pq.write_table(pa.table({"messages": [json.dumps(m) for m in msgs]}), tmp_path / "json.parquet", row_group_size=3)
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(7)], "completion": [f"a{i}" for i in range(7)]}),
                   tmp_path / "pc.parquet", row_group_size=3)
    for name in ("list", "json", "pc"):
        path = tmp_path / f"{name}.parquet"
        assert len(_assert_same_as_reference(path, src, reference=_reference_read_parquet, reader=_parquet_reader)) == 7
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"messages": msgs[:4] + [[{"role": "user", "content": "no answer"}]]}), bad, row_group_size=2)
    message = _error(_parquet_reader, bad, src)
    assert message == _error(_reference_read_parquet, bad, src) and message.startswith(f"{bad}:row 4: ")


def test_parquet_errors_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 not parquet at all PAR1")
    assert _error(_parquet_reader, path, DomainSource("a", ["p.parquet"])).startswith(f"{path}: not a readable Parquet file (")
    pq.write_table(pa.table({"body": ["x"]}), path)
    assert _error(_parquet_reader, path, DomainSource("a", ["p.parquet"])) == (
        f"{path}: no column 'text' (columns: ['body']); set text_field in the domain's config")


def test_polars_parses_the_batches_and_python_reads_only_the_odd_lines(tmp_path, monkeypatch):
    """The fallback is for what polars would get wrong, not the common path: a clean file
    never reaches Python's json, and one odd line costs one line (or one batch)."""
    by_python = []
    line_document = corpus_mod._jsonl_line_document
    monkeypatch.setattr(corpus_mod, "_jsonl_line_document", lambda raw, *a: by_python.append(raw) or line_document(raw, *a))
    path = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": f"doc {i} caf\u00e9", "n": i}) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    src = DomainSource("a", ["a.jsonl"])
    assert len(_stream(corpus_mod._read_jsonl, path, src)) == 200 and by_python == []
    lines[50] = json.dumps({"text": "unpaired \ud800 surrogate"})  # polars would read NUL
    path.write_text("\n".join(lines) + "\n")
    assert len(_stream(corpus_mod._read_jsonl, path, src)) == 200 and len(by_python) == 1
    chat = tmp_path / "c.jsonl"
    chat.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(100)))
    by_python.clear()
    assert len(_stream(corpus_mod._read_jsonl, chat, DomainSource("c", ["c.jsonl"], format="chat"))) == 100 and by_python == []


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow"])
def test_file_names_with_glob_characters_are_read_as_names(tmp_path, suffix):
    """A file named `a[1]*?.parquet` (found by the domain's own glob) is opened as that
    name: the polars scans do not expand it as a pattern."""
    import polars as pl

    path = tmp_path / f"a[1]*?{suffix}"
    frame = pl.DataFrame({"text": ["one", "two"]})
    {".parquet": frame.write_parquet, ".csv": frame.write_csv, ".arrow": frame.write_ipc}[suffix](path)
    src = DomainSource("g", [str(tmp_path / f"*{suffix}")])
    docs = [d.text for d, _ in iter_documents(src, tmp_path) if d is not None]
    assert docs == ["one", "two"]
