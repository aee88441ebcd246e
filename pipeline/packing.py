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

    def rows(self, split: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


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


def document_key(seed: int, doc_id: str) -> int:
    """The stable hash that orders documents for the held-out splits."""
    return zlib.crc32(f"{seed}:{doc_id}".encode())


class HeldOutSelector:
    """The validation and test documents, chosen in one pass with memory bounded by the
    held-out rows (not the corpus): documents in order of (key, corpus index), the first
    ones fill `val_rows` rows, the next ones `test_rows` rows.

    It keeps the shortest key-ordered prefix of the documents seen so far that fills both
    splits. A new document with a larger key than that prefix's last can never be held
    out: it is released to train at once. One with a smaller key joins the prefix, which
    may then release its largest documents. Released documents never come back (keys only
    get smaller in front of them), so `add` answers train/held-out-for-now, and `release`
    hands over the documents that left the prefix.
    """

    def __init__(self, val_tokens: int, test_tokens: int):
        self.need = (val_tokens, test_tokens)
        self.held: list[tuple[int, int, int]] = []  # (key, index, tokens + EOS), sorted
        self.full = False  # held fills both splits; once true it stays true

    def _fills(self, n: int) -> bool:
        """Whether the first n held documents fill validation, then test."""
        got, split = 0, 0
        for _, _, tokens in self.held[:n]:
            got += tokens
            if got >= self.need[split]:
                got, split = 0, split + 1
                if split == 2:
                    return True
        return False

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
        val, test, got = [], [], 0
        for _, index, tokens in self.held:
            if got < self.need[0]:
                val.append(index)
                got += tokens
            else:
                test.append(index)
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


def pack_domain(domain: Domain, tokenizer, cfg: CorpusConfig) -> PackedDomain:
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
        raise ConfigError(
            f"domain '{domain.name}': {total} tokens in {len(tokens)} documents are too few for "
            f"{cfg.val_rows} validation and {cfg.test_rows} test rows of {row_len} tokens plus at least one training row; "
            f"add data, lower corpus.val_rows / corpus.test_rows or corpus.seq_len"
        )
    return PackedDomain(domain.name, train, val, test, len(domain.documents), domain.chars)


def pack_domains(domains: list[Domain], tokenizer, cfg: CorpusConfig) -> list[PackedDomain]:
    return [pack_domain(d, tokenizer, cfg) for d in domains]
