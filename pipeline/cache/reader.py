"""TopKCacheReader: (domain, split, row) keys in, dense-ready tensors out, memory bounded by bytes.

A row is read from its Parquet row group alone (memory-mapped, only the columns asked
for), never from its whole shard. The first time this reader reads a column chunk it
checks the chunk's CRC-32 against the manifest (integrity.py): float columns decode
without any error check, so a flipped bit would otherwise reach training as a wrong
teacher number. Read row groups stay in an LRU bounded by `max_cache_bytes` (the bytes of
the Arrow buffers it keeps); the codec blobs are decoded per requested row.

Thread-safe: the prefetcher (prefetch.py) decodes batches on background threads.

Caches from before per-chunk checksums (their manifest has no `crc32` entries, their
shards one row group each) are read the same way, each shard verified by its whole-file
sha256 when first opened.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .codec import TopKCodec
from .integrity import crc32_hex, chunk_ranges, file_digests, footer_range
from .manifest import CacheError, load_manifest
from ..chat import loss_mask, position_ids
from .schema import MASKED_FORMAT_VERSION, MASKED_SHARD_SCHEMA, SHARD_SCHEMA, SPLITS
from .writer import read_shard_info

DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_OPEN_SHARDS = 128  # parsed footers and memory maps kept open (not counted in the byte budget)
BATCH_COLUMNS = ("input_ids", "topk_ids", "topk_logprobs", "target_logprob", "tail_logmass")
# A masked cache's schema is the plain one plus a last column: one index serves both.
_COLUMN_INDEX = {name: i for i, name in enumerate(MASKED_SHARD_SCHEMA.names)}


@dataclass
class CacheBatch:
    input_ids: torch.Tensor  # [B, L + 1] int64
    # [B, L, k] int64, sorted by id within a position. Ragged supports (cache.top_p,
    # sampled): a position's entries first, then id -1 (log-prob -inf) padding; k is the
    # batch's largest support, at most the cache's k.
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor  # [B, L, k] float32
    target_logprob: torch.Tensor  # [B, L] float32
    tail_logmass: torch.Tensor  # [B, L] float32
    # Masked caches (chat domains), else None: the positions that are trained (CE and KL;
    # elsewhere the support is padding: id -1, log-prob -inf) and the position ids of the
    # L input tokens, restarting at every packed conversation.
    loss_mask: torch.Tensor | None = None  # [B, L] bool
    position_ids: torch.Tensor | None = None  # [B, L] int64


def codec_from_manifest(m: dict) -> TopKCodec:
    # Caches from before the quantizer was selectable used the fixed step, from before
    # ragged supports the full top-k (TopKCodec.from_params fills both in).
    return TopKCodec.from_params(m["codec"])


class _Blobs:
    """A binary column of one row group: row i's blob as a zero-copy view."""

    def __init__(self, array: pa.BinaryArray):
        _, offsets, data = array.buffers()
        self.offsets = np.frombuffer(offsets, np.int32)[array.offset : array.offset + len(array) + 1]
        self.data = memoryview(data)

    def __getitem__(self, i: int) -> memoryview:
        return self.data[self.offsets[i] : self.offsets[i + 1]]


class _OpenShard:
    """A shard's verified memory map, its parsed footer and row-group boundaries."""

    def __init__(self, data: pa.Buffer):
        self.data = data
        self.file = pq.ParquetFile(pa.BufferReader(data))  # reads exactly the mapped bytes checked
        md = self.file.metadata
        self.starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)]).tolist()
        self.ranges = chunk_ranges(md)
        self.lock = threading.Lock()  # one Parquet reader: one row-group read at a time


@dataclass
class _Group:
    columns: dict  # column name -> 2-D numpy array (list columns) or _Blobs
    nbytes: int = 0


class TopKCacheReader:
    def __init__(self, cache_dir: str | Path, max_cache_bytes: int = DEFAULT_CACHE_BYTES, max_open_shards: int = DEFAULT_OPEN_SHARDS):
        self.dir = Path(cache_dir)
        self.manifest = load_manifest(self.dir)
        self.codec = codec_from_manifest(self.manifest)
        self.k = self.manifest["k"]
        self.seq_len = self.manifest["seq_len"]
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]
        self.domains = list(self.manifest["domains"])
        self.masked = self.manifest["format_version"] == MASKED_FORMAT_VERSION
        self._schema = MASKED_SHARD_SCHEMA if self.masked else SHARD_SCHEMA
        # (domain, split) -> (sorted row starts, shard files)
        self._index: dict[tuple[str, str], tuple[list[int], list[str]]] = {}
        for name, d in self.manifest["domains"].items():
            for split in SPLITS:
                shards = [s for s in d["shards"] if s["split"] == split]
                starts = np.cumsum([0] + [s["rows"] for s in shards[:-1]]).tolist()
                self._index[(name, split)] = (starts, [s["file"] for s in shards])
        self._entries = {s["file"]: s for d in self.manifest["domains"].values() for s in d["shards"]}
        self.max_cache_bytes = max_cache_bytes
        self.cached_bytes = 0  # Arrow buffer bytes of the row groups in self._groups
        self._groups: OrderedDict[tuple[str, int], _Group] = OrderedDict()
        self._shards: OrderedDict[str, _OpenShard] = OrderedDict()
        self._max_open = max_open_shards
        # file -> [row group, column] chunks checksummed by this reader; outlives _shards
        self._verified: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # guards the dicts above, never held during I/O

    def num_rows(self, domain: str, split: str = "train") -> int:
        return self.manifest["domains"][domain][f"{split}_rows"]

    def teacher_val_loss(self) -> dict[str, float]:
        return {n: d["teacher_val_loss"] for n, d in self.manifest["domains"].items()}

    # ------------------------------------------------------------------ shards
    def _shard(self, file: str) -> _OpenShard:
        with self._lock:
            if file in self._shards:
                self._shards.move_to_end(file)
                return self._shards[file]
        shard = self._open(file)
        with self._lock:
            shard = self._shards.setdefault(file, shard)  # another thread may have opened it meanwhile
            self._shards.move_to_end(file)
            if len(self._shards) > self._max_open:
                self._shards.popitem(last=False)  # a thread still reading it keeps its reference
            return shard

    def _open(self, file: str) -> _OpenShard:
        """Map the shard and check what the whole of it can be checked by cheaply: its size
        and its footer's CRC-32 (legacy caches: the whole file's sha256)."""
        path, entry = self.dir / file, self._entries[file]
        damaged = CacheError(f"{path}: missing, truncated or corrupted (size/checksum differ from the manifest); "
                             f"run `ddk cache verify {self.dir}`, delete the shards it names and re-run `ddk teacher-cache`")
        if not path.exists() or path.stat().st_size != entry["bytes"]:
            raise damaged
        with pa.memory_map(str(path)) as mm:
            data = mm.read_buffer()  # the buffer keeps the mapping alive after the file closes
        if "crc32" in entry:
            try:
                start, length = footer_range(data)
            except ValueError:
                raise damaged from None
            if crc32_hex(memoryview(data)[start : start + length]) != entry["crc32"]["footer"]:
                raise damaged
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise damaged
        try:
            shard = _OpenShard(data)
            if not shard.file.schema_arrow.equals(self._schema, check_metadata=False):
                raise ValueError("schema differs from this ddk's shard schema")
            if shard.starts[-1] != entry["rows"]:
                raise ValueError(f"{shard.starts[-1]} rows, the manifest says {entry['rows']}")
            if "crc32" in entry and len(entry["crc32"]["row_groups"]) != len(shard.ranges):
                raise ValueError(f"{len(shard.ranges)} row groups, the manifest has checksums of {len(entry['crc32']['row_groups'])}")
        except Exception as e:  # noqa: BLE001 - name the shard whatever broke in it
            raise CacheError(f"{path}: cannot read shard ({type(e).__name__}: {e}); run `ddk cache verify {self.dir}` and re-create it") from None
        with self._lock:
            # Legacy shards were verified whole just now; the others chunk by chunk on first read.
            self._verified.setdefault(file, np.full((len(shard.ranges), len(self._schema)), "crc32" not in entry))
        return shard

    # ------------------------------------------------------------------ row groups
    def _read(self, file: str, shard: _OpenShard, g: int, columns: list[str]) -> dict[str, tuple[object, int]]:
        """Columns of row group g: checksummed on this reader's first read of each chunk."""
        path, n = self.dir / file, shard.starts[g + 1] - shard.starts[g]
        with shard.lock:
            verified = self._verified[file]
            for c in columns:
                j = _COLUMN_INDEX[c]
                if verified[g, j]:
                    continue
                offset, length = shard.ranges[g][j]
                if crc32_hex(memoryview(shard.data)[offset : offset + length]) != self._entries[file]["crc32"]["row_groups"][g][j]:
                    raise CacheError(f"{path}: corrupted: row group {g}, column {c} differs from its checksum in the manifest; "
                                     f"run `ddk cache verify {self.dir}`, delete the shards it names and re-run `ddk teacher-cache`")
                verified[g, j] = True
            try:
                table = shard.file.read_row_group(g, columns=columns, use_threads=False)  # threads: the prefetcher's
            except Exception as e:  # noqa: BLE001
                raise CacheError(f"{path}: cannot read row group {g} ({type(e).__name__}: {e}); run `ddk cache verify {self.dir}`") from None
        out = {}
        for c in columns:
            col = table.column(c)
            array = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            if isinstance(array, pa.BinaryArray):
                out[c] = (_Blobs(array), array.get_total_buffer_size())
            else:
                width = self.seq_len + (c == "input_ids")  # L + 1 tokens, L positions
                try:
                    out[c] = (array.flatten().to_numpy().reshape(n, width), array.get_total_buffer_size())
                except ValueError as e:
                    raise CacheError(f"{path}: row group {g}, column {c} is ragged ({e}); run `ddk cache verify {self.dir}`") from None
        return out

    def _group(self, file: str, local: int, columns: tuple[str, ...]) -> tuple[dict, int]:
        """The columns of the row group holding shard row `local`, and the row's index in it."""
        shard = self._shard(file)
        g = bisect.bisect_right(shard.starts, local) - 1
        key = (file, g)
        with self._lock:
            entry = self._groups.get(key)
            have = dict(entry.columns) if entry is not None else {}
            if entry is not None:
                self._groups.move_to_end(key)
        missing = [c for c in columns if c not in have]
        if missing:
            new = self._read(file, shard, g, missing)
            have.update((c, array) for c, (array, _) in new.items())
            self._keep(key, new)
        return have, local - shard.starts[g]

    def _keep(self, key: tuple[str, int], new: dict[str, tuple[object, int]]) -> None:
        """Add columns to a row group's cache entry, then evict least recently used groups
        until the budget holds; a group larger than the whole budget is not kept at all."""
        with self._lock:
            entry = self._groups.pop(key, None) or _Group({})
            self.cached_bytes -= entry.nbytes
            for c, (array, nbytes) in new.items():
                if c not in entry.columns:  # another thread may have added it meanwhile
                    entry.columns[c] = array
                    entry.nbytes += nbytes
            if entry.nbytes <= self.max_cache_bytes:
                self._groups[key] = entry
                self.cached_bytes += entry.nbytes
            while self.cached_bytes > self.max_cache_bytes:
                _, evicted = self._groups.popitem(last=False)
                self.cached_bytes -= evicted.nbytes

    def _locate(self, domain: str, split: str, row: int) -> tuple[str, int]:
        try:
            starts, files = self._index[(domain, split)]
        except KeyError:
            raise CacheError(f"{self.dir}: no domain '{domain}' split '{split}' (domains: {self.domains})") from None
        if not 0 <= row < self.num_rows(domain, split):
            raise CacheError(f"{self.dir}: row {row} out of range for {domain}/{split} ({self.num_rows(domain, split)} rows)")
        i = bisect.bisect_right(starts, row) - 1
        return files[i], row - starts[i]

    # ------------------------------------------------------------------ public
    def _column_rows(self, keys: list[tuple[str, str, int]], column: str, width: int, dtype) -> torch.Tensor:
        out = np.empty((len(keys), width), dtype=dtype)
        for b, (domain, split, row) in enumerate(keys):
            cols, i = self._group(*self._locate(domain, split, row), (column,))
            out[b] = cols[column][i]
        return torch.from_numpy(out)

    def token_rows(self, keys: list[tuple[str, str, int]]) -> torch.Tensor:
        """Only the token rows [B, L + 1] (CPT and evaluation need no teacher columns),
        checked on the host against the cache's id space as `batch` checks its ids."""
        rows = self._column_rows(keys, "input_ids", self.seq_len + 1, np.int64)
        self._check_ids(keys, rows.numpy())
        return rows

    def _check_ids(self, keys, tokens: np.ndarray, support: np.ndarray | None = None) -> None:
        """Every token id in [0, V) and every support id in [-1, V) (-1: padding), V the
        cache's id space, on the host (numpy, no device sync): stage two's loss kernels then
        skip their own check (Objective.ids_checked)."""
        bad = int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size
        if support is not None:
            bad = bad or int(support.min()) < -1 or int(support.max()) >= self.vocab_size
        if bad:
            raise CacheError(f"{self.dir}: rows {keys[0]}..{keys[-1]} hold token ids outside [0, {self.vocab_size}) "
                             f"(the cache's vocabulary); run `ddk cache verify {self.dir}`")

    def target_logprobs(self, keys: list[tuple[str, str, int]]) -> torch.Tensor:
        """Only the teacher's logprob of each actual next token [B, L]: no top-k decoding
        (masked caches: 0 where no position is trained, see `loss_masks`)."""
        return self._column_rows(keys, "target_logprob", self.seq_len, np.float32)

    def token_flags(self, keys: list[tuple[str, str, int]]) -> np.ndarray | None:
        """[B, L + 1] uint8 token flags (pipeline/chat.py) of a masked cache's rows, else None."""
        if not self.masked:
            return None
        out = np.empty((len(keys), self.seq_len + 1), dtype=np.uint8)
        for b, (domain, split, row) in enumerate(keys):
            file, local = self._locate(domain, split, row)
            cols, i = self._group(file, local, ("token_flags",))
            out[b] = np.frombuffer(cols["token_flags"][i], dtype=np.uint8)
        return out

    def loss_masks(self, keys: list[tuple[str, str, int]]) -> torch.Tensor | None:
        """[B, L] bool: the trained positions of a masked cache's rows; None: all of them."""
        flags = self.token_flags(keys)
        return None if flags is None else torch.from_numpy(loss_mask(flags))

    def row_layout(self, keys: list[tuple[str, str, int]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(loss mask [B, L] bool, position ids [B, L] int64) of a masked cache's rows, else (None, None)."""
        flags = self.token_flags(keys)
        if flags is None:
            return None, None
        return torch.from_numpy(loss_mask(flags)), torch.from_numpy(position_ids(flags))

    def batch(self, keys: list[tuple[str, str, int]]) -> CacheBatch:
        b, length, k = len(keys), self.seq_len, self.k
        input_ids = np.empty((b, length + 1), dtype=np.int64)
        ids = np.empty((b, length, k), dtype=np.int64)
        lps = np.empty((b, length, k), dtype=np.float32)
        target = np.empty((b, length), dtype=np.float32)
        tail = np.empty((b, length), dtype=np.float32)
        flags = np.empty((b, length + 1), dtype=np.uint8) if self.masked else None
        columns = BATCH_COLUMNS + (("token_flags",) if self.masked else ())
        for j, (domain, split, row) in enumerate(keys):
            file, local = self._locate(domain, split, row)
            s, i = self._group(file, local, columns)
            input_ids[j] = s["input_ids"][i]
            target[j] = s["target_logprob"][i]
            tail[j] = s["tail_logmass"][i]
            try:
                if flags is None:
                    ids[j], lps[j] = self.codec.decode(s["topk_ids"][i], s["topk_logprobs"][i], length)
                else:  # supports stored at the trained positions only; padding elsewhere
                    flags[j] = np.frombuffer(s["token_flags"][i], dtype=np.uint8)
                    mask = loss_mask(flags[j])
                    ids[j], lps[j] = -1, -np.inf
                    if mask.any():
                        ids[j][mask], lps[j][mask] = self.codec.decode(s["topk_ids"][i], s["topk_logprobs"][i], int(mask.sum()))
            except ValueError as e:
                raise CacheError(f"{self.dir / file}: row {local} does not decode ({e}); run `ddk cache verify {self.dir}`") from None
        if self.codec.ragged or flags is not None:  # drop the columns that are padding everywhere in this batch
            width = max(int((ids >= 0).sum(axis=-1).max()), 1)
            ids, lps = ids[..., :width], lps[..., :width]
        self._check_ids(keys, input_ids, ids)
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (input_ids, ids, lps, target, tail)]
        if flags is not None:
            tensors += [torch.from_numpy(loss_mask(flags)), torch.from_numpy(position_ids(flags))]
        return CacheBatch(*tensors)


def _damaged_parts(expected: dict, actual: dict) -> list[str]:
    """The parts of a shard whose CRC-32 differs from the manifest's, by name."""
    parts = [] if expected["footer"] == actual["footer"] else ["footer"]
    if len(expected["row_groups"]) != len(actual["row_groups"]):
        return parts + [f"{len(actual['row_groups'])} row groups, the manifest has {len(expected['row_groups'])}"]
    for g, (want, got) in enumerate(zip(expected["row_groups"], actual["row_groups"])):
        parts += [f"row group {g} column {MASKED_SHARD_SCHEMA.names[j]}" for j, (a, b) in enumerate(zip(want, got)) if a != b]
    return parts


def verify_cache(cache_dir: str | Path, decode: bool = True) -> list[str]:
    """Check every shard against the manifest: presence, size, sha256, column-chunk and
    footer CRC-32s, schema, rows, decodability."""
    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    codec = codec_from_manifest(m)
    masked = m["format_version"] == MASKED_FORMAT_VERSION
    schema = MASKED_SHARD_SCHEMA if masked else SHARD_SCHEMA
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
            try:
                digests = file_digests(path)
            except Exception as e:  # noqa: BLE001 - an unparsable footer: the sha256 decides below
                digests = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "crc32": None, "error": e}
            parts = _damaged_parts(s["crc32"], digests["crc32"]) if "crc32" in s and digests["crc32"] else []
            if digests["sha256"] != s["sha256"]:
                where = f": {', '.join(parts)}" if parts else (f": unreadable footer ({digests['error']})" if "error" in digests else "")
                problems.append(f"{path}: sha256 mismatch (corrupted on disk{where})")
                continue
            if parts:  # the file is the one indexed, its checksums are not: the manifest is wrong
                problems.append(f"{path}: CRC-32 of {', '.join(parts)} differ from the manifest although the file matches its sha256; "
                                f"delete {cache_dir / 'manifest.json'} and re-run `ddk teacher-cache` to re-index the shards")
                continue
            try:
                info = read_shard_info(path)
                table = pq.read_table(path)
                if not table.schema.equals(schema, check_metadata=False):
                    problems.append(f"{path}: schema differs from this ddk's shard schema")
                    continue
                if table.num_rows != s["rows"] or info["rows"] != s["rows"]:
                    problems.append(f"{path}: {table.num_rows} rows, manifest says {s['rows']}")
                    continue
                if decode:
                    flags = table.column("token_flags").to_pylist() if masked else [None] * table.num_rows
                    for ib, lb, f in zip(table.column("topk_ids").to_pylist(), table.column("topk_logprobs").to_pylist(), flags):
                        positions = m["seq_len"] if f is None else int(loss_mask(np.frombuffer(f, dtype=np.uint8)).sum())
                        if positions:
                            codec.decode(ib, lb, positions)
            except Exception as e:  # noqa: BLE001 - report, keep checking the others
                problems.append(f"{path}: {type(e).__name__}: {e}")
    return problems
