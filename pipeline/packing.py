"""Domains -> packed token rows: tokenize, split train/validation/test by document, pack.

Each row holds `seq_len + 1` tokens: the student reads tokens [0, seq_len) and predicts
[1, seq_len], and the teacher cache stores a distribution for each of those seq_len
positions (so the last position of every row is covered too). Documents are joined with
the tokenizer's EOS token and cut into rows without overlap; the remainder is dropped.

The split is by document: documents are ordered by a stable hash of their id; the first
ones go to validation until `val_rows` rows are filled, the next ones to test until
`test_rows` rows are filled, the rest to train. No document straddles two splits and the
split does not depend on file order. Validation is what DDK's scheduler steers by; test
is held out from everything (tiny-model pre-training, training, the scheduler) and is
what results report.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass

import numpy as np

from .chat import SEGMENT_START
from .config import ConfigError, CorpusConfig
from .corpus import Domain

SPLITS = ("train", "val", "test")


@dataclass
class PackedDomain:
    name: str
    train: np.ndarray  # [rows, seq_len + 1] int32
    val: np.ndarray  # [val_rows, seq_len + 1] int32
    test: np.ndarray  # [test_rows, seq_len + 1] int32
    documents: int
    chars: int
    # Chat domains: per split, [rows, seq_len + 1] uint8 token flags (pipeline/chat.py);
    # None for raw text (every position trained, one segment per row).
    flags: dict[str, np.ndarray] | None = None

    def rows(self, split: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[split]

    def row_flags(self, split: str) -> np.ndarray | None:
        return None if self.flags is None else self.flags[split]


def tokenize_documents(tokenizer, texts: list[str], batch: int = 256) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]
        out.extend(enc)
    return out


def _pack(token_lists: list[list[int]], eos_id: int, row_len: int, max_rows: int = 0) -> np.ndarray:
    flat: list[int] = []
    for toks in token_lists:
        flat.extend(toks)
        flat.append(eos_id)
        if max_rows and len(flat) >= max_rows * row_len:
            break
    n = len(flat) // row_len
    if max_rows:
        n = min(n, max_rows)
    return np.asarray(flat[: n * row_len], dtype=np.int32).reshape(n, row_len)


class RowCounter:
    """The placement rule of ConversationPacker on conversation lengths alone: first fit over
    the last `window` open rows. The held-out selection counts rows with it, without the
    tokens, and the packer places its conversations with it, so the two always agree."""

    def __init__(self, row_len: int, window: int = 1):
        self.row_len, self.window = row_len, window
        self.open_used: list[int] = []
        self.opened = 0

    def place(self, n: int) -> tuple[int, bool]:
        """Place a conversation of n tokens: (the open row it joins, -1 for a new row;
        whether that closed the oldest open row)."""
        for j, used in enumerate(self.open_used):
            if used + n <= self.row_len:
                self.open_used[j] += n
                return j, False
        self.open_used.append(n)
        self.opened += 1
        if len(self.open_used) > self.window:
            self.open_used.pop(0)
            return -1, True
        return -1, False

    def add(self, n: int) -> int:
        """Place a conversation of n tokens; returns the rows opened so far."""
        self.place(n)
        return self.opened


class ConversationPacker:
    """Whole conversations into rows of `row_len` tokens, first fit over the last `window`
    open rows (RowCounter): a conversation goes to the first open row with room for it,
    else opens a new row; when more than `window` rows are open, the oldest is closed
    (padded with the pad id, its own segment, never supervised). window = 1 is plain
    greedy packing in order; window = 0 turns packing off (one conversation per row).
    Conversations are never cut (chat.ChatRenderer made each fit a row), so no answer is
    trained without its prompt, and memory holds `window` rows."""

    def __init__(self, row_len: int, pad_id: int, window: int = 1):
        self.row_len, self.pad_id = row_len, pad_id
        self.rows = RowCounter(row_len, window)
        self.open: list[tuple[list, list]] = []  # per open row: ids parts, flags parts

    def add(self, ids: np.ndarray, flags: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Add one conversation; returns the rows it closed (0 or 1)."""
        j, closed = self.rows.place(len(ids))
        if j < 0:
            self.open.append(([], []))
        self.open[j][0].append(ids)
        self.open[j][1].append(flags)
        return [self._close()] if closed else []

    def _close(self) -> tuple[np.ndarray, np.ndarray]:
        parts_ids, parts_flags = self.open.pop(0)
        used = sum(len(p) for p in parts_ids)
        pad = self.row_len - used
        ids = np.concatenate(parts_ids + [np.full(pad, self.pad_id, dtype=np.int32)])
        flags = np.concatenate(parts_flags + [np.zeros(pad, dtype=np.uint8)])
        if pad:
            flags[used] = SEGMENT_START
        return ids, flags

    def finish(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The rows still open, oldest first (padded)."""
        self.rows.open_used.clear()
        return [self._close() for _ in range(len(self.open))]


def pack_conversations(encoded: list[tuple[np.ndarray, np.ndarray]], row_len: int, pad_id: int,
                       max_rows: int = 0, window: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, row_len] int32 and their flags [n, row_len] uint8 (ConversationPacker)."""
    packer, rows = ConversationPacker(row_len, pad_id, window), []
    for ids, flags in encoded:
        rows.extend(packer.add(ids, flags))
        if max_rows and len(rows) >= max_rows:
            break
    else:
        rows.extend(packer.finish())
    rows = rows[:max_rows] if max_rows else rows
    if not rows:
        return np.zeros((0, row_len), dtype=np.int32), np.zeros((0, row_len), dtype=np.uint8)
    return np.stack([r for r, _ in rows]), np.stack([f for _, f in rows])


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad_token nor an eos_token; chat rows are padded with one: set a pad_token")
    return int(pad)


def document_key(seed: int, doc_id: str) -> int:
    """The stable hash that orders documents for the held-out splits."""
    return zlib.crc32(f"{seed}:{doc_id}".encode())


class HeldOutSelector:
    """The validation and test documents, chosen in one pass with memory bounded by the
    held-out rows (not the corpus): documents in order of (key, corpus index), the first
    ones fill `val_rows` rows, the next ones `test_rows` rows.

    Raw text (row_len None): the needs are tokens (rows x (seq_len + 1)), documents are
    counted with their EOS. Whole conversations (row_len given, chat domains): the needs
    are rows as ConversationPacker opens them (RowCounter); a split is full once its
    last row is opened, and the later conversations go to the next split.

    It keeps the shortest key-ordered prefix of the documents seen so far that fills both
    splits. A new document with a larger key than that prefix's last can never be held
    out: it is released to train at once. One with a smaller key joins the prefix, which
    may then release its largest documents. Released documents never come back (keys only
    get smaller in front of them), so `add` answers train/held-out-for-now, and `release`
    hands over the documents that left the prefix.
    """

    def __init__(self, val_need: int, test_need: int, row_len: int | None = None, window: int = 1):
        self.need = (val_need, test_need)
        self.row_len, self.window = row_len, window
        self.held: list[tuple[int, int, int]] = []  # (key, index, tokens (+ EOS for raw text)), sorted
        self.full = False  # held fills both splits; once true it stays true

    def _assign(self, items) -> tuple[list[int], bool]:
        """The split (0 validation, 1 test) of each item in order, and whether both fill."""
        out, split, got = [], 0, 0
        rows = RowCounter(self.row_len, self.window) if self.row_len is not None else None
        for _, _, tokens in items:
            if split == 2:
                break
            out.append(split)
            got = got + tokens if rows is None else rows.add(tokens)  # tokens, or rows this split's packer opened
            if got >= self.need[split]:
                split, got = split + 1, 0
                rows = RowCounter(self.row_len, self.window) if self.row_len is not None else None
        return out, split == 2

    def _fills(self, n: int) -> bool:
        """Whether the first n held documents fill validation, then test."""
        return self._assign(self.held[:n])[1]

    def add(self, key: int, index: int, tokens: int) -> list[int]:
        """Offer a document (tokens includes its EOS); returns the indices released to train
        (possibly this one), in the order they leave."""
        item = (key, index, tokens)
        if self.full and item > self.held[-1]:
            return [index]
        bisect.insort(self.held, item)
        self.full = self.full or self._fills(len(self.held))
        released = []
        while len(self.held) > 1 and self._fills(len(self.held) - 1):
            released.append(self.held.pop()[1])
        return released

    def splits(self) -> tuple[list[int], list[int]]:
        """(validation, test) document indices in key order; test may fall short if the
        corpus is too small (the caller reports it)."""
        val, test = [], []
        splits, _ = self._assign(self.held)
        for (_, index, _), split in zip(self.held, splits):
            (val if split == 0 else test).append(index)
        return val, test


def split_documents(doc_ids: list[str], token_counts: list[int], cfg: CorpusConfig) -> dict[str, list[int]]:
    """Document indices per split: ordered by a stable hash of (seed, doc id), the first ones
    fill `val_rows` rows, the next ones `test_rows` rows, the rest (in corpus order) train."""
    row_len = cfg.seq_len + 1
    selector = HeldOutSelector(cfg.val_rows * row_len, cfg.test_rows * row_len)
    train: set[int] = set()
    for i, (doc_id, n) in enumerate(zip(doc_ids, token_counts)):
        train.update(selector.add(document_key(cfg.seed, doc_id), i, n + 1))  # + the EOS that joins documents
    val, test = selector.splits()
    return {"val": val, "test": test, "train": sorted(train)}


def _too_few(name: str, tokens: int, documents: int, cfg: CorpusConfig) -> ConfigError:
    return ConfigError(
        f"domain '{name}': {tokens} tokens in {documents} documents are too few for "
        f"{cfg.val_rows} validation and {cfg.test_rows} test rows of {cfg.seq_len + 1} tokens plus at least one training row; "
        f"add data, lower corpus.val_rows / corpus.test_rows or corpus.seq_len"
    )


def pack_chat_domain(domain: Domain, tokenizer, cfg: CorpusConfig) -> PackedDomain:
    """A chat domain in memory: conversations rendered (chat.ChatRenderer), split by
    document hash as raw text is, packed whole per row (ConversationPacker)."""
    from .chat import ChatRenderer

    row_len, pad = cfg.seq_len + 1, pad_token_id(tokenizer)
    renderer = ChatRenderer(tokenizer, row_len, cfg.chat_loss, cfg.chat_overlong)
    kept, encoded = [], []
    for d in domain.documents:
        out = renderer.encode(d.messages, d.doc_id)
        if out is not None:
            kept.append(d.doc_id)
            encoded.append(out)
    window = cfg.chat_pack_window
    selector = HeldOutSelector(cfg.val_rows, cfg.test_rows, row_len=row_len, window=window)
    train: set[int] = set()
    for i, (doc_id, (ids, _)) in enumerate(zip(kept, encoded)):
        train.update(selector.add(document_key(cfg.seed, doc_id), i, len(ids)))
    val_docs, test_docs = selector.splits()
    val, val_f = pack_conversations([encoded[i] for i in val_docs], row_len, pad, cfg.val_rows, window)
    test, test_f = pack_conversations([encoded[i] for i in test_docs], row_len, pad, cfg.test_rows, window)
    train_rows, train_f = pack_conversations([encoded[i] for i in sorted(train)], row_len, pad, cfg.max_train_rows, window)
    if val.shape[0] < cfg.val_rows or test.shape[0] < cfg.test_rows or train_rows.shape[0] < 1:
        raise _too_few(domain.name, renderer.stats.tokens, len(kept), cfg)
    return PackedDomain(domain.name, train_rows, val, test, len(kept), domain.chars,
                        flags={"train": train_f, "val": val_f, "test": test_f})


def pack_domain(domain: Domain, tokenizer, cfg: CorpusConfig) -> PackedDomain:
    if domain.chat:
        return pack_chat_domain(domain, tokenizer, cfg)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token; set one (documents are joined with it when packing)")
    row_len = cfg.seq_len + 1
    tokens = tokenize_documents(tokenizer, [d.text for d in domain.documents])
    docs = split_documents([d.doc_id for d in domain.documents], [len(t) for t in tokens], cfg)
    val = _pack([tokens[i] for i in docs["val"]], eos, row_len, cfg.val_rows)
    test = _pack([tokens[i] for i in docs["test"]], eos, row_len, cfg.test_rows)
    train = _pack([tokens[i] for i in docs["train"]], eos, row_len, cfg.max_train_rows)
    total = sum(len(t) + 1 for t in tokens)
    if val.shape[0] < cfg.val_rows or test.shape[0] < cfg.test_rows or train.shape[0] < 1:
        raise _too_few(domain.name, total, len(tokens), cfg)
    return PackedDomain(domain.name, train, val, test, len(domain.documents), domain.chars)


def pack_domains(domains: list[Domain], tokenizer, cfg: CorpusConfig) -> list[PackedDomain]:
    return [pack_domain(d, tokenizer, cfg) for d in domains]
