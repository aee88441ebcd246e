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


def split_documents(doc_ids: list[str], token_counts: list[int], cfg: CorpusConfig) -> dict[str, list[int]]:
    """Document indices per split: ordered by a stable hash of (seed, doc id), the first ones
    fill `val_rows` rows, the next ones `test_rows` rows, the rest (in corpus order) train."""
    row_len = cfg.seq_len + 1
    order = sorted(range(len(doc_ids)), key=lambda i: zlib.crc32(f"{cfg.seed}:{doc_ids[i]}".encode()))
    splits: dict[str, list[int]] = {}
    taken = 0
    for split, rows in (("val", cfg.val_rows), ("test", cfg.test_rows)):
        need, got, docs = rows * row_len, 0, []
        while got < need and taken < len(order):
            docs.append(order[taken])
            got += token_counts[order[taken]] + 1  # + the EOS that joins documents
            taken += 1
        splits[split] = docs
    splits["train"] = sorted(order[taken:])
    return splits


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
