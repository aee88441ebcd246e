"""TopKShardWriter: encode one shard's rows and write it atomically.

A shard is immutable once it has its final name: it is written to `<name>.tmp`, flushed
to disk and renamed, so a killed run leaves either a complete shard or a temp file that
the next run overwrites. Per-shard facts (rows, codec fidelity) go into the Parquet
key-value metadata so the manifest can be rebuilt from the shards alone.

Rows go into Parquet row groups of `rows_per_row_group` rows: a reader fetching one row
decompresses its row group, not the whole shard. Rows are encoded on `encode_threads`
threads (zstd and numpy's sorts release the GIL); each row's blobs depend on that row
alone and are stored in row order, so the file's bytes do not depend on the thread count.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..teachers.base import TopK
from .codec import TopKCodec, measure_fidelity
from .fidelity import support_kl_distortion
from ..chat import loss_mask
from .schema import FORMAT_VERSION, MASKED_FORMAT_VERSION, MASKED_SHARD_SCHEMA, RAGGED_FORMAT_VERSION, SHARD_SCHEMA, sample_key

META_KEY = b"ddk.shard"


class TopKShardWriter:
    def __init__(self, codec: TopKCodec, zstd_level: int = 3, rows_per_row_group: int | None = 8, encode_threads: int = 1):
        """rows_per_row_group None: the whole shard in one row group (caches written before
        row groups were configurable; a resumed one keeps its layout)."""
        self.codec = codec
        self.zstd_level = zstd_level
        self.rows_per_row_group = rows_per_row_group
        self.encode_threads = encode_threads

    def _encode_row(self, path: Path, row: int, ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray,
                    reference: tuple | None):
        ib, lb = self.codec.encode(ids, logprobs)
        # Decode what will be stored: the manifest's fidelity is measured, not assumed.
        sampled = self.codec.logprob_quantizer == "counts"
        # (A truncated support's distortion is measured against its reference below instead.)
        fid = measure_fidelity(self.codec, ids, logprobs, blobs=(ib, lb),
                               tail_logmass=None if sampled or reference is not None else tail)
        if not fid["ids_exact"]:
            raise RuntimeError(f"{path}: row {row} top-k ids do not survive the codec round trip (codec bug)")
        if sampled:  # a random target: its expectation is exact (0), its variance is the cost (fidelity.py)
            distortion = None
        elif reference is not None:  # a truncated support: measured against the exact top-k
            out_ids, out_lp = self.codec.decode(ib, lb, ids.shape[0])
            distortion = float(support_kl_distortion(*reference, out_ids, out_lp, tail, self.codec.vocab_size).sum())
        else:
            distortion = fid["kl_distortion_sum"]
        return ib, lb, float(fid["max_abs_error"]), int(fid["clamped"]), distortion

    def encode_rows(self, path: Path, row_start: int, topk: TopK, reference: TopK | None = None,
                    mask: np.ndarray | None = None) -> tuple[tuple[bytes, ...], tuple[bytes, ...], float, int, float | None]:
        """Every row's (ids blob, logprobs blob), in row order, with the max abs logprob error,
        the count of clamped logprobs and the summed KL distortion, measured on what was encoded
        (against `reference`, the exact top-k, when `topk` is a truncation of it; None for a
        sampled support). mask [n, L] bool (masked caches): only those positions are encoded."""
        n = topk.ids.shape[0]

        def encode(i: int):
            keep = slice(None) if mask is None else mask[i]
            ref = None if reference is None else (reference.ids[i][keep], reference.logprobs[i][keep], reference.tail_logmass[i][keep])
            if mask is not None and not mask[i].any():
                return b"", b"", 0.0, 0, 0.0  # nothing supervised in this row: nothing stored
            return self._encode_row(path, row_start + i, topk.ids[i][keep], topk.logprobs[i][keep], topk.tail_logmass[i][keep], ref)

        if self.encode_threads > 1 and n > 1:
            with ThreadPoolExecutor(max_workers=min(self.encode_threads, n), thread_name_prefix="shard-encode") as pool:
                encoded = list(pool.map(encode, range(n)))  # map keeps row order
        else:
            encoded = [encode(i) for i in range(n)]
        ids_blobs, lp_blobs, errors, clamps, distortion = zip(*encoded)
        return ids_blobs, lp_blobs, max(errors), sum(clamps), None if None in distortion else sum(distortion)

    def write(self, path: Path, domain: str, split: str, row_start: int, rows: np.ndarray, topk: TopK,
              reference: TopK | None = None, extra_info: dict | None = None, flags: np.ndarray | None = None) -> dict:
        """reference: the exact top-k `topk` was truncated from (cache.top_p), for the distortion;
        extra_info: more keys for the shard's metadata (the teacher's folded padded ids);
        flags: [n, L + 1] uint8 token flags of a masked cache (pipeline/chat.py): stored with
        the row, and the teacher's numbers kept only at the supervised positions."""
        n, width = rows.shape
        positions = width - 1
        mask = None if flags is None else loss_mask(flags)
        ids_blobs, lp_blobs, max_err, clamped, distortion = self.encode_rows(path, row_start, topk, reference, mask)
        target, tail = topk.target_logprob, topk.tail_logmass
        if mask is not None:  # 0 where nothing is supervised: compresses to almost nothing
            target, tail = np.where(mask, target, 0.0), np.where(mask, tail, 0.0)
        flat = lambda a: pa.array(np.ascontiguousarray(a).reshape(-1))  # noqa: E731
        offsets = lambda m: pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32))  # noqa: E731
        table = pa.Table.from_arrays(
            [
                pa.array([sample_key(domain, split, row_start + i) for i in range(n)], pa.string()),
                pa.array(np.arange(row_start, row_start + n, dtype=np.int64)),
                pa.ListArray.from_arrays(offsets(width), flat(rows.astype(np.int32))),
                pa.array(ids_blobs, pa.binary()),
                pa.array(lp_blobs, pa.binary()),
                pa.ListArray.from_arrays(offsets(positions), flat(target.astype(np.float32))),
                pa.ListArray.from_arrays(offsets(positions), flat(tail.astype(np.float32))),
                *([] if flags is None else [pa.array([f.astype(np.uint8).tobytes() for f in flags], pa.binary())]),
            ],
            schema=SHARD_SCHEMA if flags is None else MASKED_SHARD_SCHEMA,
        )
        info = {
            "format_version": MASKED_FORMAT_VERSION if flags is not None else RAGGED_FORMAT_VERSION if self.codec.ragged else FORMAT_VERSION,
            "domain": domain,
            "split": split,
            "row_start": row_start,
            "rows": n,
            "positions": positions,
            "max_abs_logprob_error": max_err,
            "clamped_logprobs": clamped,
            # nats, summed over rows x positions (pipeline/cache/fidelity.py); None: a sampled support
            "kl_distortion_sum": distortion,
            "support_entries": int((topk.ids >= 0).sum() if mask is None else (topk.ids >= 0)[mask].sum()),  # stored (id, value) pairs
            # masked caches: the positions that hold a teacher distribution (the loss's)
            **({} if mask is None else {"supervised_positions": int(mask.sum())}),
            **(extra_info or {}),
        }
        table = table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, row_group_size=self.rows_per_row_group, compression="zstd",
                           compression_level=self.zstd_level, use_dictionary=["key"])
        return info


def read_shard_info(path: Path) -> dict:
    """The writer's metadata of a finished shard (reads only the Parquet footer)."""
    meta = pq.read_schema(path).metadata or {}
    if META_KEY not in meta:
        raise ValueError(f"{path}: not a ddk shard (no '{META_KEY.decode()}' metadata); delete it and re-run to rewrite it")
    return json.loads(meta[META_KEY])
