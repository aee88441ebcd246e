"""Corpus -> token rows on disk, streaming: stage one's ingest, with memory independent of
the corpus size and a resume point every `corpus.ingest_checkpoint_mb` of text.

Per domain, in `<cache>/_work/ingest/<domain>/`, two passes:

1. **Tokenize.** A reader thread streams documents (pipeline/corpus.py: polars reads
   .jsonl in ~1 MiB runs of whole lines and Parquet / CSV / Arrow IPC in batches of rows;
   a .txt file is one document) into batches of `corpus.ingest_batch_mb` of text; each batch is encoded by the
   tokenizer's Rust core, which spreads a batch over all cores (limit it with
   RAYON_NUM_THREADS). Token ids append to `tokens.bin` (int32) and one (key, length)
   record per document to `docs.bin`. Every checkpoint the two files are flushed to disk
   and `state.json` records how far they are valid and where the corpus stream stands
   (file, byte offset or row): a killed run truncates the files to that point and reads on
   from there, so the result is the same as a run never killed.
2. **Pack.** From the two files alone: the held-out documents are chosen in one pass
   (`packing.HeldOutSelector`, memory bounded by the held-out rows), then the training
   documents are joined by EOS in corpus order and cut into rows of seq_len + 1 tokens,
   chunk by chunk, into `train.rows`; `val.rows` and `test.rows` hold the held-out rows.
   The rows are exactly what `packing.pack_domain` makes in memory from the same corpus
   (tested), so a cache's `tokens_sha256` does not depend on which path made it.

`rows.json` appears last and marks a domain done; the scratch files are then deleted.
The capture workers memory-map the `.rows` files.

Chat domains (pipeline/chat.py) take the same two passes: each conversation is rendered
with the chat template (one tokenizer call each, for its character offsets) and its token
flags go to `flags.bin` beside `tokens.bin`; packing puts whole conversations in rows
(packing.ConversationPacker) and writes `<split>.flags` ([rows, seq_len + 1] uint8) beside
each `.rows` file. What rendering dropped or truncated is counted in `rows.json`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import os
import queue
import shutil
import sys
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_json_atomic
from .config import ConfigError, CorpusConfig
from .builtin_corpus import builtin_domains
from .corpus import CorpusPosition, Document, iter_documents, source_files
from .chat import ChatStats
from .packing import SPLITS, ConversationPacker, HeldOutSelector, document_key, pack_conversations, pad_token_id
from .progress import progress

INGEST_DIR = "_work/ingest"
ROWS_FILE = "rows.json"
STATE_FILE = "state.json"
DOC_RECORD = np.dtype([("key", "<u4"), ("tokens", "<u4")])  # per document: split key, token count (no EOS)
MIB = 1 << 20  # the unit of corpus.ingest_batch_mb / ingest_checkpoint_mb (tests shrink it)
PACK_CHUNK_TOKENS = 1 << 22  # tokens of the corpus stream held at once while packing (16 MiB as int32)


class IngestError(ConfigError):
    """An ingest problem the user can fix (bad input, a full disk); the message says how."""


@dataclass
class IngestedDomain:
    """One domain's packed rows on disk (the `.rows` files) and what they hold."""

    name: str
    dir: Path
    seq_len: int
    train_rows: int
    val_rows: int
    test_rows: int
    tokens_sha256: str  # of train, val, test rows in that order (int32), then their flags (chat)
    documents: int
    chars: int
    chat: dict | None = None  # chat domains: what rendering did (chat.ChatStats), else None

    def rows_path(self, split: str) -> Path:
        return rows_path(self.dir.parent, self.name, split)

    def rows(self, split: str, start: int = 0, end: int | None = None) -> np.ndarray:
        """Rows [start, end) of a split as [n, seq_len + 1] int32 (read, not mapped)."""
        return read_rows(self.rows_path(split), self.seq_len, start, end)

    def row_flags(self, split: str, start: int = 0, end: int | None = None) -> np.ndarray | None:
        """Token flags [n, seq_len + 1] uint8 of rows [start, end) (chat domains), else None."""
        return read_flags(self.dir.parent, self.name, split, self.seq_len, start, end) if self.chat is not None else None

    def has_rows(self) -> bool:
        return all(self.rows_path(s).exists() for s in SPLITS)


def rows_path(ingest_dir: Path, domain: str, split: str) -> Path:
    return ingest_dir / domain / f"{split}.rows"


def read_rows(path: Path, seq_len: int, start: int = 0, end: int | None = None) -> np.ndarray:
    """Rows [start, end) of a `.rows` file. Read with plain file reads, not a memory map,
    so a process's resident memory holds the rows it asked for and no more."""
    return _BinFile(path, np.dtype((np.int32, (seq_len + 1,)))).read(start, end)


def flags_path(ingest_dir: Path, domain: str, split: str) -> Path:
    return ingest_dir / domain / f"{split}.flags"


def read_flags(ingest_dir: Path, domain: str, split: str, seq_len: int, start: int = 0, end: int | None = None) -> np.ndarray | None:
    """Token flags [n, seq_len + 1] uint8 of rows [start, end) of a chat domain's split;
    None where the domain is raw text (no `.flags` file)."""
    path = flags_path(ingest_dir, domain, split)
    return _BinFile(path, np.dtype((np.uint8, (seq_len + 1,)))).read(start, end) if path.exists() else None


# ---------------------------------------------------------------- the domains' streams


@dataclass
class DomainStream:
    name: str
    fingerprint: dict  # what the documents are made from; a change restarts the domain
    open: object  # (start: CorpusPosition) -> iterator of (Document | None, CorpusPosition)
    input_bytes: int  # size of the source files (an estimate for the builtin corpus)
    chat: bool = False  # conversations: rendered, masked, packed whole


def domain_streams(cfg: CorpusConfig, base_dir: Path) -> list[DomainStream]:
    if cfg.source in ("builtin", "builtin-chat"):
        if cfg.source == "builtin":
            domains, fingerprint = builtin_domains(cfg.builtin_chars_per_domain), {}
        else:
            from .chat_corpus import builtin_chat_domains

            domains, fingerprint = builtin_chat_domains(cfg.builtin_chars_per_domain), {"chat": True}
        streams = []
        for dom in domains:  # small, made in memory
            docs = dom.documents
            streams.append(DomainStream(
                dom.name, {"builtin": cfg.builtin_chars_per_domain, "python": sys.version, **fingerprint},
                lambda start, docs=docs: _list_stream(docs, start), dom.chars, chat=dom.chat))
        return streams
    streams = []
    for src in cfg.domains:
        files = source_files(src, base_dir)  # checks every file before any work
        stats = [f.stat() for f in files]
        streams.append(DomainStream(
            src.name,
            {"text_field": src.text_field, "files": [[str(f), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)],
             **({"chat": [src.messages_field, src.prompt_field, src.completion_field]} if src.format == "chat" else {})},
            lambda start, src=src: iter_documents(src, base_dir, cfg.invalid_utf8, start),
            sum(s.st_size for s in stats), chat=src.format == "chat"))
    return streams


def _list_stream(docs: list[Document], start: CorpusPosition):
    # Every document, empty ones included (an empty stdlib __init__.py is one EOS), as
    # the in-memory packing has always done for the builtin corpus.
    for i in range(start.offset, len(docs)):
        yield docs[i], CorpusPosition(0, i + 1, 0)


# ---------------------------------------------------------------- entry point


def ingest_corpus(cfg: CorpusConfig, base_dir: Path, tokenizer, out_dir: Path, tokenizer_sha256: str,
                  need_rows: bool = True, log=print) -> list[IngestedDomain]:
    """Every domain's rows, ingesting what is not on disk yet (resuming a killed ingest).
    need_rows=False accepts a finished domain whose `.rows` were already deleted (its
    rows.json still describes them): enough to check a complete cache."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token; set one (documents are joined with it when packing)")
    out = []
    for stream in domain_streams(cfg, base_dir):
        key = {"format": 1, "seq_len": cfg.seq_len, "val_rows": cfg.val_rows, "test_rows": cfg.test_rows,
               "max_train_rows": cfg.max_train_rows, "seed": cfg.seed, "invalid_utf8": cfg.invalid_utf8,
               "tokenizer_sha256": tokenizer_sha256, "eos": int(eos), "source": stream.fingerprint}
        if stream.chat:
            from .chat import template_sha256

            key["chat"] = {"loss": cfg.chat_loss, "overlong": cfg.chat_overlong, "template_sha256": template_sha256(tokenizer),
                           "pad": pad_token_id(tokenizer), "pack_window": cfg.chat_pack_window}
        out.append(DomainIngest(stream, key, tokenizer, cfg, Path(out_dir), log).run(need_rows))
    return out


class DomainIngest:
    def __init__(self, stream: DomainStream, key: dict, tokenizer, cfg: CorpusConfig, ingest_dir: Path, log):
        self.stream, self.key, self.tokenizer, self.cfg, self.log = stream, key, tokenizer, cfg, log
        self.dir = ingest_dir / stream.name
        self.eos = int(key["eos"])
        self.chat = stream.chat
        # Raw text: documents joined by an EOS each. Chat: whole conversations, no joiner.
        self.joiner = 0 if self.chat else 1

    def run(self, need_rows: bool) -> IngestedDomain:
        done = self._finished()
        if done is not None and (done.has_rows() or not need_rows):
            self._drop_scratch()  # left by a kill between rows.json and the clean-up
            return done
        state = self._load_state()
        if not state.get("tokenized"):
            state = self._tokenize(state)
        return self._pack(state)

    # -------------------------------------------------------- bookkeeping

    def _finished(self) -> IngestedDomain | None:
        f = self.dir / ROWS_FILE
        if not f.exists():
            return None
        d = json.loads(f.read_text())
        if d.pop("key") != self.key:
            return None
        return IngestedDomain(name=self.stream.name, dir=self.dir, seq_len=self.cfg.seq_len, **d)

    def _drop_scratch(self) -> None:
        """The rows hold the same tokens. state.json goes first: a kill midway must not
        leave a state saying 'tokenized' without its token files."""
        for scratch in (STATE_FILE, "docs.bin", "tokens.bin", "flags.bin"):
            (self.dir / scratch).unlink(missing_ok=True)

    def _load_state(self) -> dict:
        f = self.dir / STATE_FILE
        if f.exists():
            state = json.loads(f.read_text())
            if state["key"] == self.key and self._scratch_covers(state):
                return state
            self.log(f"ingest {self.stream.name}: the corpus, its config or the scratch files changed since the last run; starting this domain over")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        return {"key": self.key, "position": dataclasses.asdict(CorpusPosition()), "documents": 0, "tokens": 0, "chars": 0,
                "bytes_read": 0, "tokenized": False, **({"chat": dataclasses.asdict(ChatStats())} if self.chat else {})}

    def _scratch_sizes(self, state: dict) -> dict[Path, int]:
        """The scratch files and the bytes of each that the state's counts cover."""
        sizes = {self.dir / "docs.bin": state["documents"] * DOC_RECORD.itemsize, self.dir / "tokens.bin": state["tokens"] * 4}
        if self.chat:
            sizes[self.dir / "flags.bin"] = state["tokens"]
        return sizes

    def _scratch_covers(self, state: dict) -> bool:
        """The token files hold at least what the state says (a shorter file would be
        padded with zeros by truncate, read back as token id 0)."""
        return all(f.exists() and f.stat().st_size >= n for f, n in self._scratch_sizes(state).items())

    def _checkpoint(self, state: dict, files) -> None:
        """Make everything so far durable, then record how far it reaches."""
        for fh in files:
            fh.flush()
            os.fsync(fh.fileno())
        write_json_atomic(self.dir / STATE_FILE, {**state, "checkpoint_tokens": state["tokens"]})
        state["checkpoint_tokens"] = state["tokens"]

    @contextmanager
    def _disk_guard(self, path: Path, state: dict):
        """A full disk becomes one line saying what to free; the last checkpoint stays valid."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            free = shutil.disk_usage(self.dir).free
            left = max(self.stream.input_bytes - state["bytes_read"], 0)
            raise IngestError(
                f"{path}: no space left on the device ({free / 2**20:,.0f} MiB free) while ingesting domain '{self.stream.name}'; "
                f"free about {_gib(left * 2 + 2**28)} there (token rows take ~1 byte per byte of text, twice while packing) "
                f"and re-run: the ingest resumes from its last checkpoint ({state.get('checkpoint_tokens', 0):,} tokens), nothing written is lost"
            ) from None

    # -------------------------------------------------------- pass 1: tokenize

    def _tokenize(self, state: dict) -> dict:
        docs_path, tokens_path = self.dir / "docs.bin", self.dir / "tokens.bin"
        for path, valid in self._scratch_sizes(state).items():
            with open(path, "ab") as fh:  # create if missing, then cut what the last checkpoint did not cover
                fh.truncate(valid)
        if state["tokens"]:
            self.log(f"ingest {self.stream.name}: resuming after {state['documents']:,} documents ({state['tokens']:,} tokens)")
        self._warn_if_disk_short(state)
        encode = self._chat_encoder(state) if self.chat else _batch_encoder(self.tokenizer)
        seed = self.cfg.seed
        bar = progress(total=self.stream.input_bytes, initial=state["bytes_read"], desc=f"ingest {self.stream.name}", unit="B",
                       unit_scale=True)
        since_checkpoint = 0
        with self._disk_guard(tokens_path, state), ExitStack() as files:
            docs_f, tokens_f = files.enter_context(open(docs_path, "ab")), files.enter_context(open(tokens_path, "ab"))
            flags_f = files.enter_context(open(self.dir / "flags.bin", "ab")) if self.chat else None
            scratch = [f for f in (tokens_f, docs_f, flags_f) if f is not None]
            batches = _Prefetch(_batches(self.stream.open(CorpusPosition(**state["position"])), self.cfg.ingest_batch_mb * MIB))
            try:
                for docs, position, nbytes in batches:
                    if self.chat:  # (ids, flags) per kept conversation; the dropped ones are counted
                        encoded = encode(docs)
                        docs = [d for d, e in zip(docs, encoded) if e is not None]
                        encoded = [e for e in encoded if e is not None]
                    if docs:
                        ids = [e[0] for e in encoded] if self.chat else encode([d.text for d in docs])
                        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
                        record = np.empty(len(docs), dtype=DOC_RECORD)
                        record["key"] = [document_key(seed, d.doc_id) for d in docs]
                        record["tokens"] = lengths
                        tokens_f.write(flat.tobytes())
                        if self.chat:
                            flags_f.write(np.concatenate([e[1] for e in encoded]).tobytes())
                        docs_f.write(record.tobytes())
                        state["documents"] += len(docs)
                        state["tokens"] += int(lengths.sum())
                        state["chars"] += sum(len(d.text) for d in docs)
                    state["position"] = dataclasses.asdict(position)
                    state["bytes_read"] += nbytes
                    since_checkpoint += nbytes
                    bar.update(nbytes)
                    if since_checkpoint >= self.cfg.ingest_checkpoint_mb * MIB:
                        self._checkpoint(state, scratch)
                        since_checkpoint = 0
                state["tokenized"] = True
                self._checkpoint(state, scratch)
                bar.update(max(bar.total - bar.n, 0))  # the bar counts text, its total is file bytes
            finally:
                batches.close()
                bar.close()
        if state["documents"] == 0:
            raise IngestError(f"corpus domain '{self.stream.name}': its files contain no non-empty text; add data or drop the domain")
        return state

    def _chat_encoder(self, state: dict):
        """docs -> per conversation (ids, flags), or None where rendering dropped it; the
        counts accumulate in state["chat"], so they survive a resume."""
        from .chat import ChatRenderer, ChatStats

        renderer = ChatRenderer(self.tokenizer, self.cfg.seq_len + 1, self.cfg.chat_loss, self.cfg.chat_overlong)

        def encode(docs):
            renderer.stats = ChatStats(**state["chat"])
            out = [renderer.encode(d.messages, d.doc_id) for d in docs]
            state["chat"] = dataclasses.asdict(renderer.stats)
            return out

        return encode

    def _warn_if_disk_short(self, state: dict) -> None:
        need = max(self.stream.input_bytes - state["bytes_read"], 0) * 2
        free = shutil.disk_usage(self.dir).free
        if need > free:
            self.log(f"warning: ingest {self.stream.name}: about {_gib(need)} of token rows to write but {_gib(free)} free on "
                     f"{self.dir}; it will stop with a message when the disk fills, and resume after space is freed")

    # -------------------------------------------------------- pass 2: pack

    def _pack(self, state: dict) -> IngestedDomain:
        cfg, row_len = self.cfg, self.cfg.seq_len + 1
        docs = _BinFile(self.dir / "docs.bin", DOC_RECORD)
        tokens = _BinFile(self.dir / "tokens.bin", np.dtype(np.int32))
        held, starts = self._select_held_out(docs)
        val_docs, test_docs = held.splits()
        held_out = np.zeros(len(docs), dtype=bool)  # one byte per document
        held_out[val_docs + test_docs] = True
        sha = hashlib.sha256()
        if self.chat:
            return self._pack_chat(state, docs, tokens, starts, val_docs, test_docs, held_out, sha)
        val = self._held_out_rows(val_docs, starts, docs, tokens, cfg.val_rows)
        test = self._held_out_rows(test_docs, starts, docs, tokens, cfg.test_rows)
        with self._disk_guard(self.dir, state):
            train_rows = self._write_train(docs, tokens, held_out, sha)
        total = int(state["tokens"]) + int(state["documents"])
        if len(val) < cfg.val_rows or len(test) < cfg.test_rows or train_rows < 1:
            raise IngestError(
                f"domain '{self.stream.name}': {total} tokens in {state['documents']} documents are too few for "
                f"{cfg.val_rows} validation and {cfg.test_rows} test rows of {row_len} tokens plus at least one training row; "
                f"add data, lower corpus.val_rows / corpus.test_rows or corpus.seq_len"
            )
        for split, rows in (("val", val), ("test", test)):
            sha.update(rows.tobytes())
            with self._disk_guard(self.dir, state), atomic_path(rows_path(self.dir.parent, self.stream.name, split)) as tmp:
                tmp.write_bytes(rows.tobytes())
        summary = {"train_rows": train_rows, "val_rows": len(val), "test_rows": len(test), "tokens_sha256": sha.hexdigest(),
                   "documents": int(state["documents"]), "chars": int(state["chars"])}
        write_json_atomic(self.dir / ROWS_FILE, {"key": self.key, **summary})
        self._drop_scratch()
        return IngestedDomain(name=self.stream.name, dir=self.dir, seq_len=cfg.seq_len, **summary)

    def _pack_chat(self, state, docs, tokens, starts, val_docs, test_docs, held_out, sha) -> IngestedDomain:
        """Pass 2 for a chat domain: whole conversations per row with their flags."""
        cfg, row_len = self.cfg, self.cfg.seq_len + 1
        flags = _BinFile(self.dir / "flags.bin", np.dtype(np.uint8))
        pad = int(self.key["chat"]["pad"])
        held = {}  # split -> (rows [n, row_len] int32, flags [n, row_len] uint8)
        for split, indices, cap in (("val", val_docs, cfg.val_rows), ("test", test_docs, cfg.test_rows)):
            convs = []
            for i in indices:
                n = int(docs.read(i, i + 1)["tokens"][0])
                convs.append((tokens.read(starts[i], starts[i] + n), flags.read(starts[i], starts[i] + n)))
            held[split] = pack_conversations(convs, row_len, pad, cap, cfg.chat_pack_window)
        with self._disk_guard(self.dir, state):
            train_rows = self._write_train_chat(docs, tokens, flags, held_out, sha, pad)
        if len(held["val"][0]) < cfg.val_rows or len(held["test"][0]) < cfg.test_rows or train_rows < 1:
            raise IngestError(
                f"domain '{self.stream.name}': {state['tokens']} tokens in {state['documents']} conversations are too few for "
                f"{cfg.val_rows} validation and {cfg.test_rows} test rows of {row_len} tokens plus at least one training row; "
                f"add data, lower corpus.val_rows / corpus.test_rows or corpus.seq_len")
        for split in ("val", "test"):
            ids = held[split][0]
            sha.update(ids.tobytes())
            with self._disk_guard(self.dir, state), atomic_path(rows_path(self.dir.parent, self.stream.name, split)) as tmp:
                tmp.write_bytes(ids.tobytes())
        for split in ("val", "test"):
            f = held[split][1]
            sha.update(f.tobytes())
            with self._disk_guard(self.dir, state), atomic_path(flags_path(self.dir.parent, self.stream.name, split)) as tmp:
                tmp.write_bytes(f.tobytes())
        summary = {"train_rows": train_rows, "val_rows": len(held["val"][0]), "test_rows": len(held["test"][0]),
                   "tokens_sha256": sha.hexdigest(), "documents": int(state["documents"]), "chars": int(state["chars"]),
                   "chat": state["chat"]}
        write_json_atomic(self.dir / ROWS_FILE, {"key": self.key, **summary})
        self._drop_scratch()
        return IngestedDomain(name=self.stream.name, dir=self.dir, seq_len=cfg.seq_len, **summary)

    def _write_train_chat(self, docs, tokens, flags, held_out: np.ndarray, sha, pad: int) -> int:
        """Training conversations in corpus order, packed whole (ConversationPacker): rows
        to `train.rows`, their flags to `train.flags` (hashed after the rows, as a whole)."""
        row_len, cap = self.cfg.seq_len + 1, self.cfg.max_train_rows
        packer, rows, offset = ConversationPacker(row_len, pad, self.cfg.chat_pack_window), 0, 0
        flags_sha = hashlib.sha256()
        paths = rows_path(self.dir.parent, self.stream.name, "train"), flags_path(self.dir.parent, self.stream.name, "train")
        with atomic_path(paths[0]) as tmp_rows, atomic_path(paths[1]) as tmp_flags, \
                open(tmp_rows, "wb") as rows_f, open(tmp_flags, "wb") as flags_f:
            def emit(done):
                nonlocal rows
                for ids, f in done:
                    if cap and rows >= cap:
                        return
                    rows_f.write(ids.astype(np.int32).tobytes())
                    flags_f.write(f.astype(np.uint8).tobytes())
                    sha.update(ids.astype(np.int32).tobytes())
                    flags_sha.update(f.astype(np.uint8).tobytes())
                    rows += 1

            for a in range(0, len(docs), 1 << 16):
                lengths = docs.read(a, a + (1 << 16))["tokens"].astype(np.int64)
                chunk_tokens = tokens.read(offset, offset + int(lengths.sum()))
                chunk_flags = flags.read(offset, offset + int(lengths.sum()))
                bounds = np.concatenate(([0], np.cumsum(lengths)))
                for j in range(len(lengths)):
                    if not held_out[a + j]:
                        emit(packer.add(chunk_tokens[bounds[j] : bounds[j + 1]], chunk_flags[bounds[j] : bounds[j + 1]]))
                offset += int(lengths.sum())
                if cap and rows >= cap:
                    break
            else:
                emit(packer.finish())
        sha.update(flags_sha.digest())
        return rows

    def _select_held_out(self, docs: np.ndarray) -> tuple[HeldOutSelector, dict[int, int]]:
        """The held-out documents (one pass over the records) and the token offset of every
        document that was ever a candidate."""
        row_len = self.cfg.seq_len + 1
        held = (HeldOutSelector(self.cfg.val_rows, self.cfg.test_rows, row_len=row_len, window=self.cfg.chat_pack_window) if self.chat
                else HeldOutSelector(self.cfg.val_rows * row_len, self.cfg.test_rows * row_len))
        starts: dict[int, int] = {}
        offset = 0
        for a in range(0, len(docs), 1 << 20):
            chunk = docs.read(a, a + (1 << 20))
            lengths = chunk["tokens"].astype(np.int64)
            chunk_starts = offset + np.concatenate(([0], np.cumsum(lengths)[:-1]))
            keys = chunk["key"]
            # Once the selector is full, only keys at or below its largest can enter (that
            # bound only falls), so most documents are skipped without a Python call.
            candidates = np.nonzero(keys <= held.held[-1][0])[0] if held.full else range(len(chunk))
            for i in candidates:
                index = a + int(i)
                if held.full and (int(keys[i]), index) > held.held[-1][:2]:
                    continue
                held.add(int(keys[i]), index, int(lengths[i]) + self.joiner)
                starts[index] = int(chunk_starts[i])
            offset += int(lengths.sum())
        kept = {i for _, i, _ in held.held}
        return held, {i: s for i, s in starts.items() if i in kept}

    def _held_out_rows(self, doc_indices: list[int], starts: dict[int, int], docs, tokens, max_rows: int) -> np.ndarray:
        row_len, stream = self.cfg.seq_len + 1, []
        for i in doc_indices:
            n = int(docs.read(i, i + 1)["tokens"][0])
            stream.append(tokens.read(starts[i], starts[i] + n))
            stream.append(np.array([self.eos], dtype=np.int32))
        flat = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int32)
        n = min(len(flat) // row_len, max_rows)
        return np.ascontiguousarray(flat[: n * row_len].reshape(n, row_len), dtype=np.int32)

    def _write_train(self, docs, tokens, held_out: np.ndarray, sha) -> int:
        """Training documents in corpus order, joined by EOS, cut into rows; returns the row count."""
        row_len, cap = self.cfg.seq_len + 1, self.cfg.max_train_rows
        path = rows_path(self.dir.parent, self.stream.name, "train")
        rows, carry, a, offset = 0, np.zeros(0, dtype=np.int32), 0, 0
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            while a < len(docs) and not (cap and rows >= cap):
                lengths = docs.read(a, a + (1 << 20))["tokens"].astype(np.int64)
                # Documents up to PACK_CHUNK_TOKENS tokens (at least one): memory stays bounded.
                b = a + max(1, int(np.searchsorted(np.cumsum(lengths), PACK_CHUNK_TOKENS, side="right")))
                lengths = lengths[: b - a]
                n_tok = int(lengths.sum())
                chunk = tokens.read(offset, offset + n_tok)
                # Each document followed by EOS, then the held-out documents dropped.
                joined = np.insert(chunk, np.cumsum(lengths), np.int32(self.eos))
                joined = joined[np.repeat(~held_out[a:b], lengths + 1)]
                stream = np.concatenate((carry, joined))
                full = len(stream) // row_len
                if cap:
                    full = min(full, cap - rows)
                out = stream[: full * row_len]
                fh.write(out.tobytes())
                sha.update(out.tobytes())
                rows += full
                carry = stream[full * row_len :]
                a, offset = b, offset + n_tok
        return rows


# ---------------------------------------------------------------- helpers


class _BinFile:
    """A flat binary file of fixed-size records, read by ranges."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.n = path.stat().st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self.n

    def read(self, start: int = 0, end: int | None = None) -> np.ndarray:
        end = self.n if end is None else min(end, self.n)
        count = max(end - start, 0)
        if count == 0:
            return np.zeros((0, *self.dtype.shape), dtype=self.dtype.base)
        with open(self.path, "rb") as fh:
            return np.fromfile(fh, dtype=self.dtype, count=count, offset=start * self.dtype.itemsize)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _batch_encoder(tokenizer):
    """texts -> lists of ids, the same ids as `tokenizer(texts, add_special_tokens=False)`.
    A fast tokenizer's Rust core encodes the batch on all cores and releases the GIL (so
    the reader thread keeps reading); `encode_batch_fast` skips the offsets we never use."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # A copy without the truncation / padding a tokenizer.json may carry: the
        # tokenizer's own __call__ turns both off before encoding, and so must we.
        backend = type(backend).from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batches(stream, batch_bytes: int):
    """(documents, position after them, bytes of text) per batch of about batch_bytes; a
    file boundary ends a batch, so checkpoints can fall between files."""
    docs, nbytes = [], 0
    position = None
    for doc, position in stream:
        if doc is None:
            yield docs, position, nbytes
            docs, nbytes = [], 0
            continue
        docs.append(doc)
        nbytes += len(doc.text)
        if nbytes >= batch_bytes:
            yield docs, position, nbytes
            docs, nbytes = [], 0
    if docs or position is not None:
        yield docs, position, nbytes


class _Prefetch:
    """Run an iterator on a background thread, at most `depth` items ahead; its exceptions
    re-raise in the consumer. close() stops the thread."""

    _END = object()

    def __init__(self, iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="ingest-reader")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
