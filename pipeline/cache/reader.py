"""TopKCacheReader: (domain, split, row) keys in, dense-ready tensors out.

Shards are read whole on first touch (Parquet decompression is per column chunk) and
kept as Arrow tables in a small LRU; the codec blobs are decoded per requested row, so
random access across the cache costs one numpy unpack per row, not per shard.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .codec import TopKCodec
from .manifest import CacheError, load_manifest, sha256_file
from .schema import SHARD_SCHEMA, SPLITS
from .writer import read_shard_info


@dataclass
class CacheBatch:
    input_ids: torch.Tensor  # [B, L + 1] int64
    topk_ids: torch.Tensor  # [B, L, k] int64, sorted by id within a position
    topk_logprobs: torch.Tensor  # [B, L, k] float32
    target_logprob: torch.Tensor  # [B, L] float32
    tail_logmass: torch.Tensor  # [B, L] float32


def codec_from_manifest(m: dict) -> TopKCodec:
    c = m["codec"]
    return TopKCodec(vocab_size=c["vocab_size"], k=c["k"], logprob_step=c["logprob_step"], logprob_floor=c["logprob_floor"])


class TopKCacheReader:
    def __init__(self, cache_dir: str | Path, max_open_shards: int = 512):
        self.dir = Path(cache_dir)
        self.manifest = load_manifest(self.dir)
        self.codec = codec_from_manifest(self.manifest)
        self.k = self.manifest["k"]
        self.seq_len = self.manifest["seq_len"]
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]
        self.domains = list(self.manifest["domains"])
        # (domain, split) -> (sorted row starts, shard files)
        self._index: dict[tuple[str, str], tuple[list[int], list[str]]] = {}
        for name, d in self.manifest["domains"].items():
            for split in SPLITS:
                shards = [s for s in d["shards"] if s["split"] == split]
                starts = np.cumsum([0] + [s["rows"] for s in shards[:-1]]).tolist()
                self._index[(name, split)] = (starts, [s["file"] for s in shards])
        # Checked on a shard's first read: float columns decode without any error check,
        # so a flipped bit would otherwise reach training as a wrong teacher number.
        self._expected = {s["file"]: (s["bytes"], s["sha256"]) for d in self.manifest["domains"].values() for s in d["shards"]}
        self._tables: OrderedDict[str, dict] = OrderedDict()
        self._max_open = max_open_shards

    def num_rows(self, domain: str, split: str = "train") -> int:
        return self.manifest["domains"][domain][f"{split}_rows"]

    def teacher_val_loss(self) -> dict[str, float]:
        return {n: d["teacher_val_loss"] for n, d in self.manifest["domains"].items()}

    def _shard(self, file: str) -> dict:
        if file in self._tables:
            self._tables.move_to_end(file)
            return self._tables[file]
        path = self.dir / file
        size, digest = self._expected[file]
        if not path.exists() or path.stat().st_size != size or sha256_file(path) != digest:
            raise CacheError(f"{path}: missing, truncated or corrupted (size/sha256 differ from the manifest); run `ddk cache verify {self.dir}`, delete the shards it names and re-run `ddk teacher-cache`")
        try:
            table = pq.read_table(path, memory_map=True)
            if not table.schema.equals(SHARD_SCHEMA, check_metadata=False):
                raise ValueError("schema differs from this ddk's shard schema")
            n = table.num_rows
            cols = {
                "input_ids": table.column("input_ids").combine_chunks().values.to_numpy().reshape(n, -1),
                "target_logprob": table.column("target_logprob").combine_chunks().values.to_numpy().reshape(n, -1),
                "tail_logmass": table.column("tail_logmass").combine_chunks().values.to_numpy().reshape(n, -1),
                "topk_ids": table.column("topk_ids").to_pylist(),
                "topk_logprobs": table.column("topk_logprobs").to_pylist(),
            }
        except Exception as e:  # noqa: BLE001 - name the shard whatever broke in it
            raise CacheError(f"{path}: cannot read shard ({type(e).__name__}: {e}); run `ddk cache verify {self.dir}` and re-create it") from None
        self._tables[file] = cols
        if len(self._tables) > self._max_open:
            self._tables.popitem(last=False)
        return cols

    def _locate(self, domain: str, split: str, row: int) -> tuple[str, int]:
        try:
            starts, files = self._index[(domain, split)]
        except KeyError:
            raise CacheError(f"{self.dir}: no domain '{domain}' split '{split}' (domains: {self.domains})") from None
        if not 0 <= row < self.num_rows(domain, split):
            raise CacheError(f"{self.dir}: row {row} out of range for {domain}/{split} ({self.num_rows(domain, split)} rows)")
        i = bisect.bisect_right(starts, row) - 1
        return files[i], row - starts[i]

    def _column_rows(self, keys: list[tuple[str, str, int]], column: str, width: int, dtype) -> torch.Tensor:
        out = np.empty((len(keys), width), dtype=dtype)
        for b, (domain, split, row) in enumerate(keys):
            file, local = self._locate(domain, split, row)
            out[b] = self._shard(file)[column][local]
        return torch.from_numpy(out)

    def token_rows(self, keys: list[tuple[str, str, int]]) -> torch.Tensor:
        """Only the token rows [B, L + 1] (CPT and evaluation need no teacher columns)."""
        return self._column_rows(keys, "input_ids", self.seq_len + 1, np.int64)

    def target_logprobs(self, keys: list[tuple[str, str, int]]) -> torch.Tensor:
        """Only the teacher's logprob of each actual next token [B, L]: no top-k decoding."""
        return self._column_rows(keys, "target_logprob", self.seq_len, np.float32)

    def batch(self, keys: list[tuple[str, str, int]]) -> CacheBatch:
        b, length, k = len(keys), self.seq_len, self.k
        input_ids = np.empty((b, length + 1), dtype=np.int64)
        ids = np.empty((b, length, k), dtype=np.int64)
        lps = np.empty((b, length, k), dtype=np.float32)
        target = np.empty((b, length), dtype=np.float32)
        tail = np.empty((b, length), dtype=np.float32)
        for j, (domain, split, row) in enumerate(keys):
            file, local = self._locate(domain, split, row)
            s = self._shard(file)
            input_ids[j] = s["input_ids"][local]
            target[j] = s["target_logprob"][local]
            tail[j] = s["tail_logmass"][local]
            try:
                ids[j], lps[j] = self.codec.decode(s["topk_ids"][local], s["topk_logprobs"][local], length)
            except ValueError as e:
                raise CacheError(f"{self.dir / file}: row {local} does not decode ({e}); run `ddk cache verify {self.dir}`") from None
        return CacheBatch(*(torch.from_numpy(a) for a in (input_ids, ids, lps, target, tail)))


def verify_cache(cache_dir: str | Path, decode: bool = True) -> list[str]:
    """Check every shard against the manifest: presence, size, sha256, schema, rows, decodability."""
    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    codec = codec_from_manifest(m)
    problems = []
    for name, d in m["domains"].items():
        for s in d["shards"]:
            path = cache_dir / s["file"]
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            if path.stat().st_size != s["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {s['bytes']} (truncated or replaced)")
                continue
            if sha256_file(path) != s["sha256"]:
                problems.append(f"{path}: sha256 mismatch (corrupted on disk)")
                continue
            try:
                info = read_shard_info(path)
                table = pq.read_table(path)
                if not table.schema.equals(SHARD_SCHEMA, check_metadata=False):
                    problems.append(f"{path}: schema differs from this ddk's shard schema")
                    continue
                if table.num_rows != s["rows"] or info["rows"] != s["rows"]:
                    problems.append(f"{path}: {table.num_rows} rows, manifest says {s['rows']}")
                    continue
                if decode:
                    for ib, lb in zip(table.column("topk_ids").to_pylist(), table.column("topk_logprobs").to_pylist()):
                        codec.decode(ib, lb, m["seq_len"])
            except Exception as e:  # noqa: BLE001 - report, keep checking the others
                problems.append(f"{path}: {type(e).__name__}: {e}")
    return problems
