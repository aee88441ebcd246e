"""The shard schema: one Parquet row per packed sequence, keyed by sample, never by batch.

A row of L + 1 tokens has L predicted positions. Per position the teacher support is
generic (ids + logprobs + tail): top-k today, an importance-sampled support later fits
the same columns, reader and kernel (pipeline/teachers/support.py).
"""

from __future__ import annotations

import pyarrow as pa

# 2: a held-out test split per domain beside train and val.
# Row groups of cache.rows_per_row_group rows and the manifest's CRC-32 per column chunk
# came without a new version: this reader still reads version-2 shards of one row group
# (verified by their whole-file sha256) and a ddk that predates them reads the new ones.
FORMAT_VERSION = 2
# 3: ragged supports (cache.top_p, cache.support = "sampled"): the same columns, with
# codec blobs of a variable number of entries per position. Full top-k caches are still
# written as version 2, so an older ddk keeps reading them; it refuses version 3 by name.
RAGGED_FORMAT_VERSION = 3
# 4: masked caches (chat domains, or corpus.document_mask): a `token_flags` column per row (pipeline/chat.py: which
# tokens are supervised, where conversations start), teacher supports stored only at the
# supervised positions, and target_logprob / tail_logmass 0 elsewhere.
MASKED_FORMAT_VERSION = 4
READABLE_VERSIONS = (FORMAT_VERSION, RAGGED_FORMAT_VERSION, MASKED_FORMAT_VERSION)


def format_version(support: str, top_p: float, fold_padded: bool = False, masked: bool = False) -> int:
    """The version a cache of this support is written as (ragged: a variable number of
    entries per position, as top-p, sampled, and vLLM's top-k with padded ids folded;
    masked: chat domains, distributions at supervised positions only)."""
    if masked:
        return MASKED_FORMAT_VERSION
    return RAGGED_FORMAT_VERSION if support != "topk" or top_p or fold_padded else FORMAT_VERSION

SHARD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # "<domain>/<split>/<row>": the sample's identity
        pa.field("row", pa.int64(), nullable=False),  # row index within (domain, split)
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # L + 1 token ids
        pa.field("topk_ids", pa.binary(), nullable=False),  # codec blob: [L, k] ids, sorted by id per position
        pa.field("topk_logprobs", pa.binary(), nullable=False),  # codec blob: [L, k] quantized logprobs
        pa.field("target_logprob", pa.list_(pa.float32()), nullable=False),  # [L] log p(actual next token)
        pa.field("tail_logmass", pa.list_(pa.float32()), nullable=False),  # [L] log(1 - sum_k p)
    ]
)

# A masked cache's shards: the same columns plus each row's L + 1 token flags (uint8 bytes).
MASKED_SHARD_SCHEMA = SHARD_SCHEMA.append(pa.field("token_flags", pa.binary(), nullable=False))

SPLITS = ("train", "val", "test")


def sample_key(domain: str, split: str, row: int) -> str:
    return f"{domain}/{split}/{row}"


def shard_name(domain: str, split: str, index: int) -> str:
    return f"{domain}/{split}-{index:05d}.parquet"
