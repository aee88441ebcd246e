"""Domains -> packed token rows: tokenize, split train/validation by document, pack.

Each row holds `seq_len + 1` tokens: the student reads tokens [0, seq_len) and predicts
[1, seq_len], and the teacher cache stores a distribution for each of those seq_len
positions (so the last position of every row is covered too). Documents are joined with
the tokenizer's EOS token and cut into rows without overlap; the remainder is dropped.

The split is by document: documents are ordered by a stable hash of their id and the
first ones go to validation until `val_rows` rows are filled, so no document straddles
the two splits and the split does not depend on file order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from .config import ConfigError, CorpusConfig
from .corpus import Domain

SPLITS = ("train", "val")


@dataclass
class PackedDomain:
    name: str
    train: np.ndarray  # [rows, seq_len + 1] int32
    val: np.ndarray  # [val_rows, seq_len + 1] int32
    documents: int
    chars: int

    def rows(self, split: str) -> np.ndarray:
        return self.train if split == "train" else self.val


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


def pack_domain(domain: Domain, tokenizer, cfg: CorpusConfig) -> PackedDomain:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token; set one (documents are joined with it when packing)")
    row_len = cfg.seq_len + 1
    order = sorted(range(len(domain.documents)), key=lambda i: zlib.crc32(f"{cfg.seed}:{domain.documents[i].doc_id}".encode()))
    tokens = tokenize_documents(tokenizer, [d.text for d in domain.documents])
    need = cfg.val_rows * row_len
    val_docs, got = [], 0
    for i in order:
        if got >= need:
            break
        val_docs.append(i)
        got += len(tokens[i]) + 1
    val_set = set(val_docs)
    train_docs = [i for i in range(len(tokens)) if i not in val_set]
    val = _pack([tokens[i] for i in val_docs], eos, row_len, cfg.val_rows)
    train = _pack([tokens[i] for i in train_docs], eos, row_len, cfg.max_train_rows)
    total = sum(len(t) + 1 for t in tokens)
    if val.shape[0] < cfg.val_rows or train.shape[0] < 1:
        raise ConfigError(
            f"domain '{domain.name}': {total} tokens in {len(tokens)} documents are too few for "
            f"{cfg.val_rows} validation rows of {row_len} tokens plus at least one training row; "
            f"add data, lower corpus.val_rows or corpus.seq_len"
        )
    return PackedDomain(domain.name, train, val, len(domain.documents), domain.chars)


def pack_domains(domains: list[Domain], tokenizer, cfg: CorpusConfig) -> list[PackedDomain]:
    return [pack_domain(d, tokenizer, cfg) for d in domains]
