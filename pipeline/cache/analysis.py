"""A cache as polars frames: statistics per domain and split (`ddk cache stats`) and decoded
rows to query in polars or DuckDB (`ddk cache export`, `decoded_frame`).

Statistics come from a lazy scan over every shard (`pl.scan_parquet`, only the columns
needed: key, target_logprob, tail_logmass and, in a masked cache, token_flags), run on
polars' streaming engine so memory follows a batch of rows, not the cache:

  rows, positions     rows and predicted positions (masked caches: supervised positions)
  teacher loss        -log p(actual next token): mean and quantiles over positions
  tail mass           1 - sum of the stored support's probabilities (0 for a sampled support)
  support size        entries stored per position: from the shards' metadata for the
                      mean, from decoding a sample of rows for the quantiles

`decoded_frame` decodes rows through the reader (checksums verified, codec applied) into
one row per cache row with list columns: the token ids, and per position the support's
ids and log-probs (list of lists), the target log-prob, the tail and, for a masked
cache, the loss mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ..chat import loss_mask
from .manifest import load_manifest
from .schema import MASKED_FORMAT_VERSION, SPLITS
from .writer import read_shard_info

QUANTILES = (0.05, 0.5, 0.95)


def _mask_udf(width: int):
    """token_flags (binary, L + 1 bytes per row) -> loss mask (list of L bools)."""

    def to_mask(flags: pl.Series) -> pl.Series:
        raw = np.frombuffer(b"".join(flags.to_list()), dtype=np.uint8).reshape(len(flags), width + 1)
        return pl.Series(loss_mask(raw)).reshape((len(flags), width)).arr.to_list()

    return to_mask


def shards_frame(cache_dir: str | Path) -> pl.LazyFrame:
    """Every shard's rows, lazily: domain, split, row, target_logprob, tail_logmass and
    (masked caches) the loss mask, as list columns of the L positions."""
    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    files = [str(cache_dir / s["file"]) for d in m["domains"].values() for s in d["shards"]]
    masked = m["format_version"] == MASKED_FORMAT_VERSION
    columns = ["key", "row", "target_logprob", "tail_logmass"] + (["token_flags"] if masked else [])
    frame = pl.scan_parquet(files).select(columns).with_columns(
        pl.col("key").str.split("/").list.get(0).alias("domain"), pl.col("key").str.split("/").list.get(1).alias("split"))
    if masked:
        frame = frame.with_columns(pl.col("token_flags").map_batches(_mask_udf(m["seq_len"]), return_dtype=pl.List(pl.Boolean))
                                   .alias("loss_mask")).drop("token_flags")
    return frame.drop("key")


def cache_stats(cache_dir: str | Path, support_rows: int = 64) -> pl.DataFrame:
    """One row per (domain, split): rows, positions, the teacher's loss (mean, quantiles),
    the tail mass's quantiles and the support size (mean over all positions, quantiles
    over `support_rows` decoded rows per domain and split; 0: no decoding)."""
    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    frame = shards_frame(cache_dir)
    rows = frame.group_by("domain", "split").agg(pl.len().alias("rows"))
    positions = frame.explode(*(["target_logprob", "tail_logmass"] + (["loss_mask"] if "loss_mask" in frame.collect_schema() else [])))
    if "loss_mask" in positions.collect_schema():
        positions = positions.filter(pl.col("loss_mask"))
    loss, tail = -pl.col("target_logprob"), pl.col("tail_logmass").exp()
    per_position = positions.group_by("domain", "split").agg(
        pl.len().alias("positions"), loss.mean().alias("teacher_loss"),
        *(loss.quantile(q, interpolation="linear").alias(f"teacher_loss_q{int(q * 100):02d}") for q in QUANTILES),
        *(tail.quantile(q, interpolation="linear").alias(f"tail_mass_q{int(q * 100):02d}") for q in QUANTILES))
    out = rows.join(per_position, on=["domain", "split"]).collect(engine="streaming")
    out = out.join(_support_sizes(cache_dir, m, support_rows), on=["domain", "split"], how="left")
    order = {d: i for i, d in enumerate(m["domains"])}
    return out.sort(pl.col("domain").replace_strict(order, return_dtype=pl.Int64), pl.col("split").replace_strict(
        {s: i for i, s in enumerate(SPLITS)}, return_dtype=pl.Int64))


def _support_sizes(cache_dir: Path, m: dict, sample_rows: int) -> pl.DataFrame:
    """Mean entries per position from the shards' metadata (exact), quantiles from decoding
    the first `sample_rows` rows of each (domain, split)."""
    from .reader import TopKCacheReader

    entries: dict[tuple[str, str], list[int]] = {}
    for name, d in m["domains"].items():
        for s in d["shards"]:
            info = read_shard_info(cache_dir / s["file"])
            got = entries.setdefault((name, s["split"]), [0, 0])
            got[0] += info.get("support_entries", 0)
            got[1] += info.get("supervised_positions", info["rows"] * info["positions"])
    records = []
    reader = TopKCacheReader(cache_dir) if sample_rows else None
    for (name, split), (n, pos) in entries.items():
        rec = {"domain": name, "split": split, "support_mean": n / max(pos, 1)}
        if reader is not None and reader.num_rows(name, split):
            b = reader.batch([(name, split, i) for i in range(min(sample_rows, reader.num_rows(name, split)))])
            sizes = (b.topk_ids >= 0).sum(-1)
            sizes = sizes[b.loss_mask] if b.loss_mask is not None else sizes.reshape(-1)
            rec.update({f"support_q{int(q * 100):02d}": float(np.quantile(sizes.numpy(), q)) for q in QUANTILES})
        records.append(rec)
    return pl.DataFrame(records)


def decoded_frame(cache_dir: str | Path, keys: list[tuple[str, str, int]]) -> pl.DataFrame:
    """Rows `keys` ((domain, split, row)) decoded: domain, split, row, input_ids (L + 1 ids),
    support_ids / support_logprobs (per position, the stored entries: lists of lists, id
    order), target_logprob and tail_logmass (L floats), and loss_mask in a masked cache."""
    from .reader import TopKCacheReader

    reader = TopKCacheReader(cache_dir)
    b = reader.batch(keys)
    ids, lps = b.topk_ids.numpy(), b.topk_logprobs.numpy()
    used = ids >= 0
    support_ids = [[p[u].tolist() for p, u in zip(r, ur)] for r, ur in zip(ids, used)]
    support_lps = [[p[u].tolist() for p, u in zip(r, ur)] for r, ur in zip(lps, used)]
    data = {"domain": [k[0] for k in keys], "split": [k[1] for k in keys], "row": [k[2] for k in keys],
            "input_ids": b.input_ids.numpy().tolist(), "support_ids": support_ids, "support_logprobs": support_lps,
            "target_logprob": b.target_logprob.numpy().tolist(), "tail_logmass": b.tail_logmass.numpy().tolist()}
    schema = {"domain": pl.String, "split": pl.String, "row": pl.Int64, "input_ids": pl.List(pl.Int32),
              "support_ids": pl.List(pl.List(pl.Int32)), "support_logprobs": pl.List(pl.List(pl.Float32)),
              "target_logprob": pl.List(pl.Float32), "tail_logmass": pl.List(pl.Float32)}
    if b.loss_mask is not None:
        data["loss_mask"], schema["loss_mask"] = b.loss_mask.numpy().tolist(), pl.List(pl.Boolean)
    return pl.DataFrame(data, schema=schema)


def export_rows(cache_dir: str | Path, out: str | Path, rows_per_domain: int, split: str = "train",
                batch_rows: int = 256) -> int:
    """The first `rows_per_domain` rows of `split` of every domain, decoded
    (`decoded_frame`), to one Parquet file, written a batch of rows at a time; returns the
    rows written."""
    import pyarrow.parquet as pq

    from ..atomic import atomic_path

    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    keys = [(d, split, i) for d, info in m["domains"].items() for i in range(min(rows_per_domain, info[f"{split}_rows"]))]
    with atomic_path(Path(out)) as tmp:
        writer = None
        for i in range(0, len(keys), batch_rows):
            table = decoded_frame(cache_dir, keys[i : i + batch_rows]).to_arrow()
            writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
        if writer is None:
            decoded_frame(cache_dir, []).write_parquet(tmp) if keys else pl.DataFrame().write_parquet(tmp)
        else:
            writer.close()
    return len(keys)
