"""Corpus -> domains: documents per domain, streamed from user files (.jsonl, .parquet,
.csv / .tsv, Arrow IPC, .txt) with resumable positions, or the built-in corpora
(pipeline/builtin_corpus.py, pipeline/chat_corpus.py)."""

from __future__ import annotations

import glob
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, CorpusConfig, DomainSource


@dataclass
class Document:
    doc_id: str  # stable identity (file path + index): drives the train/val split
    text: str  # chat documents: the messages' contents joined (sizes, tokenizer training)
    messages: list[dict] | None = None  # chat documents: [{role, content}], checked (pipeline/chat.py)


def chat_document(doc_id: str, messages: list[dict]) -> Document:
    return Document(doc_id, "\n".join(m["content"] for m in messages), messages)


@dataclass
class Domain:
    name: str
    documents: list[Document]
    chat: bool = False  # conversations (format = "chat"): rendered and masked, packed whole

    @property
    def chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


def load_domains(cfg: CorpusConfig, base_dir: str | Path = ".") -> list[Domain]:
    """Every domain in memory (the tiny models, `ddk corpus`, tests). Stage one streams
    through `pipeline/ingest.py` instead, which never holds the corpus."""
    if cfg.source == "builtin":
        from .builtin_corpus import builtin_domains

        return builtin_domains(cfg.builtin_chars_per_domain)
    if cfg.source == "builtin-chat":
        from .chat_corpus import builtin_chat_domains

        return builtin_chat_domains(cfg.builtin_chars_per_domain)
    return [load_domain(src, Path(base_dir), cfg.invalid_utf8) for src in cfg.domains]


# ---------------------------------------------------------------- user files


@dataclass
class CorpusPosition:
    """Where a document stream stands: the next file to read and where in it (a byte offset
    for .jsonl, a row index for .parquet, 0 for .txt). Resuming from a position yields
    exactly the documents that follow it."""

    file: int = 0
    offset: int = 0
    line: int = 0  # .jsonl: lines consumed so far (document ids count lines)


def source_files(src: DomainSource, base_dir: Path) -> list[Path]:
    """The domain's files in reading order, each checked up front (exists, readable, not
    empty), so a bad file deep in a large corpus stops the run before any work is done."""
    where = f"corpus.domains '{src.name}'"
    if not src.paths:
        raise ConfigError(f"{where}: no paths listed; add paths = [\"data/{src.name}/*.jsonl\"]")
    files: list[Path] = []
    for pattern in src.paths:
        full = pattern if Path(pattern).is_absolute() else str(base_dir / pattern)
        matched = sorted(glob.glob(full, recursive=True))
        if not matched:
            raise ConfigError(f"{where}: path '{pattern}' matches no file (looked for {full}); fix the path or the glob")
        files.extend(Path(m) for m in matched if Path(m).is_file())
    for f in files:
        if f.suffix.lower() not in READERS:
            raise ConfigError(f"{f}: unsupported file type '{f.suffix}' in {where}; use .jsonl (with a text field), .parquet, "
                              f".csv / .tsv, Arrow IPC (.arrow, .ipc, .feather) or .txt")
        try:
            size = f.stat().st_size
            with f.open("rb") as fh:
                fh.read(1)
        except OSError as e:
            raise ConfigError(f"{f}: cannot be read ({e.strerror}) in {where}; fix its permissions or remove it from the paths") from None
        if size == 0:
            raise ConfigError(f"{f}: empty file (0 bytes) in {where}; delete it or narrow the glob")
    return files


def iter_documents(src: DomainSource, base_dir: Path, invalid_utf8: str = "error", start: CorpusPosition | None = None):
    """Stream (document, position after it) over the domain's files, one document in memory
    at a time; whitespace-only documents are skipped. `start` resumes a stream."""
    files = source_files(src, base_dir)
    pos = start or CorpusPosition()
    for fi in range(pos.file, len(files)):
        reader = READERS[files[fi].suffix.lower()]
        if src.format == "chat" and reader is _read_text:
            raise ConfigError(f"{files[fi]}: a plain-text file in the chat domain '{src.name}'; chat domains read .jsonl or "
                              f".parquet rows with a '{src.messages_field}' list or '{src.prompt_field}' + '{src.completion_field}'")
        offset, line = (pos.offset, pos.line) if fi == pos.file else (0, 0)
        for doc, offset, line in reader(files[fi], src, invalid_utf8, offset, line):
            if doc.messages is not None or doc.text.strip():
                yield doc, CorpusPosition(fi, offset, line)
        yield None, CorpusPosition(fi + 1, 0, 0)  # a file boundary: a clean resume point


def load_domain(src: DomainSource, base_dir: Path, invalid_utf8: str = "error") -> Domain:
    """A whole domain in memory: for the tiny models and tests; stage one streams instead."""
    docs = [d for d, _ in iter_documents(src, base_dir, invalid_utf8) if d is not None]
    if not docs:
        raise ConfigError(f"corpus.domains '{src.name}': the files {[str(f) for f in source_files(src, base_dir)]} "
                          f"contain no non-empty text; add data or drop the domain")
    return Domain(src.name, docs, chat=src.format == "chat")


def _record_document(src: DomainSource, obj, doc_id: str, where: str) -> Document:
    """One .jsonl object / Parquet row as a document of the domain's format."""
    if src.format == "chat":
        from .chat import messages_from_record

        return chat_document(doc_id, messages_from_record(obj, where, src.messages_field, src.prompt_field, src.completion_field))
    if not isinstance(obj, dict) or src.text_field not in obj:
        keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{where}: no field '{src.text_field}' (found {keys}); set text_field in the domain's config")
    return Document(doc_id, str(obj[src.text_field]))


def _decode(raw: bytes, path: Path, where: str, invalid_utf8: str) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if invalid_utf8 == "replace":
            return raw.decode("utf-8", errors="replace")
        if invalid_utf8 == "skip":
            return None
        raise ConfigError(f"{path}:{where}: invalid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); fix the file, "
                          f"or set corpus.invalid_utf8 = 'replace' (U+FFFD) or 'skip' (drop such documents)") from None


JSONL_BATCH_BYTES = 1 << 20  # whole lines of a .jsonl file parsed per polars call (a longer line is read whole)
_JSON_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.strip() strips: a line of only these is blank


def _jsonl_line_document(raw: bytes, path: Path, src: DomainSource, invalid_utf8: str, line: int) -> Document | None:
    """One .jsonl line as a document, read by Python's json module: the reference the
    polars batches are held to, and the reader of every line they cannot take. None for
    a blank line or one dropped for invalid UTF-8 ('skip')."""
    if not raw.strip():
        return None
    text = _decode(raw, path, str(line), invalid_utf8)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{line}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    return _record_document(src, obj, f"{path}:{line}", f"{path}:{line}")


def _jsonl_batches(path: Path, offset: int):
    """(byte offset, bytes of whole lines) from `offset` to the end of the file, about
    JSONL_BATCH_BYTES at a time; a line longer than that is read whole, as part of one."""
    with path.open("rb") as fh:
        fh.seek(offset)
        while lines := fh.read(JSONL_BATCH_BYTES):
            if not lines.endswith(b"\n"):
                lines += fh.readline()  # the rest of the last line
            yield offset, lines
            offset += len(lines)


def _line_ends(lines: bytes) -> tuple[list[int], list[int]]:
    """The end offset (after its newline) of every line of a batch, and the indices of the
    lines that are not blank. A line whose first byte is not whitespace is not blank
    (nearly all of them); only the others are stripped to tell."""
    ends, records, start, size = [], [], 0, len(lines)
    while start < size:
        end = lines.find(b"\n", start) + 1 or size
        if lines[start] not in _JSON_WHITESPACE or lines[start:end].strip():
            records.append(len(ends))
        ends.append(end)
        start = end
    return ends, records


def _jsonl_schema(src: DomainSource) -> dict:
    """The fields a domain reads from each line, typed: every other field is skipped
    unparsed, so lines may carry any other fields, of any type."""
    import polars as pl

    if src.format != "chat":
        return {src.text_field: pl.String}
    message = pl.Struct({"role": pl.String, "content": pl.String})
    return {src.messages_field: pl.List(message), src.prompt_field: pl.String, src.completion_field: pl.String}


def _jsonl_coercion_guard(src: DomainSource):
    """A pattern for a read field holding something polars would turn into a string
    without a word (a number, an object, null): polars reads `5` as "5" where Python
    gives the int the field checks refuse. A batch where it matches is read by Python."""
    import re

    def key(name: str) -> bytes:
        return re.escape(json.dumps(name, ensure_ascii=False).encode("utf-8")) + rb"\s*:\s*"

    if src.format != "chat":
        return re.compile(key(src.text_field) + rb'[^"\s]')
    strings = b"|".join(key(n) for n in ("role", "content", src.prompt_field, src.completion_field))
    return re.compile(rb"(?:" + strings + rb')[^"\s]|' + key(src.messages_field) + rb"[^\[\s]")


def _jsonl_polars_batch(lines: bytes, schema: dict, guard, n_records: int):
    """A batch's records as a polars frame of the schema's fields, or None where Python
    must read the batch: polars refuses it (invalid JSON or UTF-8, a line that is not one
    object), a read field is not a string, or the rows do not match the lines one to one."""
    import polars as pl

    if guard.search(lines):
        return None
    try:
        frame = pl.read_ndjson(lines, schema=schema)
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException):
        return None
    return frame if frame.height == n_records else None


def _read_jsonl(path: Path, src: DomainSource, invalid_utf8: str, offset: int, line: int):
    """.jsonl / .json lines, JSONL_BATCH_BYTES of whole lines at a time parsed by polars
    (only the domain's fields). A position is (byte offset after the line, lines read) and
    a document's id `file:line`, as when Python read line by line, so checkpoints of older
    runs resume. Python's json module reads what polars would read differently: a batch
    polars refuses or where a read field is not a string, and any line whose record fails
    the checks (errors then name `file:line` and the fix as before) or whose text holds
    NUL (polars decodes an unpaired surrogate escape as NUL)."""
    schema, guard = _jsonl_schema(src), _jsonl_coercion_guard(src)
    for start, lines in _jsonl_batches(path, offset):
        ends, records = _line_ends(lines)
        frame = _jsonl_polars_batch(lines, schema, guard, len(records))
        if frame is None:
            documents = _jsonl_python_batch(lines, path, src, invalid_utf8, line)
        else:
            documents = _jsonl_frame_documents(frame, lines, ends, records, path, src, invalid_utf8, line)
        for doc, end, number in documents:
            yield doc, start + end, number
        line += len(ends)


def _jsonl_python_batch(lines: bytes, path: Path, src: DomainSource, invalid_utf8: str, line: int):
    end = 0
    for raw in io.BytesIO(lines):  # splits at b"\n" only, as reading the file did
        end += len(raw)
        line += 1
        doc = _jsonl_line_document(raw, path, src, invalid_utf8, line)
        if doc is not None:
            yield doc, end, line


def _jsonl_frame_documents(frame, lines: bytes, ends: list[int], records: list[int], path: Path, src: DomainSource,
                           invalid_utf8: str, line: int):
    """(document, end of its line in the batch, its line number) per record of a frame."""
    def by_python(i: int, number: int) -> Document | None:
        return _jsonl_line_document(lines[ends[i - 1] if i else 0:ends[i]], path, src, invalid_utf8, number)

    if src.format != "chat":
        for i, text in zip(records, frame.get_column(src.text_field).to_list()):
            number = line + i + 1
            # None: the field is missing (the guard sent nulls to Python), an error there.
            doc = Document(f"{path}:{number}", text) if text is not None and "\x00" not in text else by_python(i, number)
            if doc is not None:
                yield doc, ends[i], number
        return
    for i, record in zip(records, frame.iter_rows(named=True)):
        number = line + i + 1
        try:  # a null is a missing field here (the guard sent the lines with nulls to Python)
            doc = _record_document(src, {k: v for k, v in record.items() if v is not None}, f"{path}:{number}", f"{path}:{number}")
        except ConfigError:
            doc = None  # Python reads the line again, for the error it always gave
        if doc is None or "\x00" in doc.text:
            doc = by_python(i, number)
        if doc is not None:
            yield doc, ends[i], number


def _parquet_columns(path: Path, src: DomainSource, names: list[str]) -> list[str]:
    """The columns a domain reads from a Parquet, CSV or IPC file, checked against its schema."""
    if src.format != "chat":
        if src.text_field not in names:
            raise ConfigError(f"{path}: no column '{src.text_field}' (columns: {names}); set text_field in the domain's config")
        return [src.text_field]
    if src.messages_field in names:
        return [src.messages_field]
    if src.prompt_field in names and src.completion_field in names:
        return [src.prompt_field, src.completion_field]
    raise ConfigError(f"{path}: no column '{src.messages_field}' and no '{src.prompt_field}' + '{src.completion_field}' "
                      f"(columns: {names}); set messages_field (or prompt_field / completion_field) in the domain's config")


def _read_text(path: Path, src: DomainSource, invalid_utf8: str, offset: int, line: int):
    if offset:
        return
    text = _decode(path.read_bytes(), path, "", invalid_utf8)
    if text is not None:  # universal newlines, as text-mode reading gives
        yield Document(str(path), text.replace("\r\n", "\n").replace("\r", "\n")), 1, 0


POLARS_BATCH_ROWS = 4096  # rows of a .parquet, .csv / .tsv or Arrow IPC file in memory at a time


def _polars_scan(path: Path, invalid_utf8: str):
    """A lazy polars scan of a Parquet, delimited or Arrow IPC file (every column read as
    it is typed; CSV columns as strings, no type inference, so ids stay text)."""
    import polars as pl

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pl.scan_parquet(path, glob=False)  # a file name, not a pattern: '[' or '*' in it is literal
    if suffix in (".arrow", ".ipc", ".feather"):
        return pl.scan_ipc(path, glob=False)
    if invalid_utf8 == "skip":
        raise ConfigError(f"{path}: corpus.invalid_utf8 = 'skip' is not available for {suffix} files (polars decodes whole "
                          f"batches, not rows); use 'replace' (U+FFFD for bad bytes) or 'error', or fix the file")
    return pl.scan_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False, quote_char='"', glob=False,
                       encoding="utf8-lossy" if invalid_utf8 == "replace" else "utf8")


def _read_polars(path: Path, src: DomainSource, invalid_utf8: str, offset: int, line: int):
    """.parquet, .csv, .tsv and Arrow IPC (.arrow / .ipc / .feather) through a polars lazy
    scan: only the domain's columns, from row `offset` on, POLARS_BATCH_ROWS rows at a
    time. A row's position is its index (the header is not a row): ids are `file:N`,
    errors name `file:row N`. A binary text column is decoded row by row, so
    corpus.invalid_utf8 applies to each row ('skip' drops the row)."""
    import polars as pl

    scan = _polars_scan(path, invalid_utf8)
    try:
        columns = _parquet_columns(path, src, scan.collect_schema().names())
        batches = scan.select(columns).slice(offset).collect_batches(chunk_size=POLARS_BATCH_ROWS)
        row = offset
        for batch in batches:
            if src.format == "chat":
                for obj in batch.iter_rows(named=True):
                    yield _record_document(src, obj, f"{path}:{row}", f"{path}:row {row}"), row + 1, 0
                    row += 1
                continue
            for text in batch.get_column(src.text_field).to_list():
                row += 1
                if isinstance(text, bytes):
                    text = _decode(text, path, f"row {row - 1}", invalid_utf8)
                if text is not None:
                    yield Document(f"{path}:{row - 1}", str(text)), row, 0
    except pl.exceptions.PolarsError as e:  # not Parquet / IPC, malformed CSV, invalid UTF-8
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if path.suffix.lower() == ".parquet":
            raise ConfigError(f"{path}: not a readable Parquet file ({first}); fix or remove it") from None
        hint = " (or set corpus.invalid_utf8 = 'replace')" if "utf" in first.lower() else ""
        raise ConfigError(f"{path}: cannot be read as {path.suffix} ({first}); fix the file{hint}") from None


READERS = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_polars, ".txt": _read_text, ".md": _read_text, ".text": _read_text,
           ".csv": _read_polars, ".tsv": _read_polars, ".arrow": _read_polars, ".ipc": _read_polars, ".feather": _read_polars}
