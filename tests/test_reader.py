"""TopKCacheReader at the row-group level: what it returns, its byte budget, per-chunk
checksums, caches from before row groups, thread safety; BatchPrefetcher; the trainer's
batches with and without prefetch."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddk.pipeline.cache.integrity import chunk_ranges, footer_range
from ddk.pipeline.cache.manifest import CacheError, CachePlan, check_compatible
from ddk.pipeline.cache.prefetch import BatchPrefetcher
from ddk.pipeline.cache.reader import TopKCacheReader, codec_from_manifest, verify_cache
from ddk.benchmarks.codec import write_synthetic_cache

SEQ, VOCAB, K = 32, 5000, 8
ROWS = {"a": 40, "b": 24}  # shards of 16 rows, row groups of 4: 4 + 4 + 2 and 4 + 2 groups


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "cache"
    write_synthetic_cache(path, ROWS, SEQ, VOCAB, K, rows_per_shard=16, rows_per_row_group=4)
    return path


def _copy(cache, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(cache, dst)
    return dst


def _all_keys():
    return [(d, "train", r) for d, n in ROWS.items() for r in range(n)]


def _expected(cache, key):
    """A row as read from its whole shard by plain pyarrow + the codec, no reader involved."""
    m = json.loads((cache / "manifest.json").read_text())
    domain, _, row = key
    shards = m["domains"][domain]["shards"]
    i, start = 0, 0
    while row >= start + shards[i]["rows"]:
        start += shards[i]["rows"]
        i += 1
    t = pq.read_table(cache / shards[i]["file"]).slice(row - start, 1).to_pylist()[0]
    ids, lps = codec_from_manifest(m).decode(t["topk_ids"], t["topk_logprobs"], SEQ)
    return t["input_ids"], ids, lps, t["target_logprob"], t["tail_logmass"]


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _chunk(path, group, column):
    """(offset, length) of one column chunk of a shard."""
    md = pq.read_metadata(path)
    names = [md.row_group(0).column(c).path_in_schema.split(".")[0] for c in range(md.num_columns)]
    return chunk_ranges(md)[group][names.index(column)]


def test_rows_come_back_as_written_across_shards_and_row_groups(cache):
    reader = TopKCacheReader(cache)
    assert pq.ParquetFile(cache / "a/train-00000.parquet").metadata.num_row_groups == 4
    rng = np.random.default_rng(0)
    keys = [_all_keys()[i] for i in rng.permutation(sum(ROWS.values()))[:24]]
    batch = reader.batch(keys)
    for j, key in enumerate(keys):
        tokens, ids, lps, target, tail = _expected(cache, key)
        np.testing.assert_array_equal(batch.input_ids[j].numpy(), tokens)
        np.testing.assert_array_equal(batch.topk_ids[j].numpy(), ids)
        np.testing.assert_array_equal(batch.topk_logprobs[j].numpy(), lps)
        np.testing.assert_array_equal(batch.target_logprob[j].numpy(), np.float32(target))
        np.testing.assert_array_equal(batch.tail_logmass[j].numpy(), np.float32(tail))
    np.testing.assert_array_equal(reader.token_rows(keys).numpy(), batch.input_ids.numpy())
    np.testing.assert_array_equal(reader.target_logprobs(keys).numpy(), batch.target_logprob.numpy())


def test_the_cache_stays_within_its_byte_budget(cache):
    """The reader's own count, and independently Arrow's allocator, never exceed the budget
    while random rows of a cache four times larger are read."""
    everything = TopKCacheReader(cache, max_cache_bytes=1 << 40)
    everything.batch(_all_keys())
    total = everything.cached_bytes
    del everything
    budget = total // 4
    reader = TopKCacheReader(cache, max_cache_bytes=budget)
    base = pa.total_allocated_bytes()
    rng = np.random.default_rng(1)
    keys, peak = _all_keys(), 0
    for _ in range(60):
        reader.batch([keys[i] for i in rng.choice(len(keys), 4, replace=False)])
        assert reader.cached_bytes <= budget
        # Arrow pads every buffer to 64 bytes: ~6 % above the buffer sizes counted, at these tiny rows.
        assert pa.total_allocated_bytes() - base <= budget * 1.1, "the reader keeps more than it counts"
        peak = max(peak, reader.cached_bytes)
    assert peak > budget / 2  # the cache was used, and evicted to stay within the bound
    assert reader.cached_bytes == sum(g.nbytes for g in reader._groups.values())


def test_a_group_larger_than_the_budget_is_read_but_not_kept(cache):
    reader = TopKCacheReader(cache, max_cache_bytes=0)
    assert reader.batch([("a", "train", 5)]).input_ids.shape == (1, SEQ + 1)
    assert reader.cached_bytes == 0 and not reader._groups


def test_a_row_reads_only_its_row_group_and_checks_its_chunks(cache, tmp_path):
    cache = _copy(cache, tmp_path)
    shard = cache / "a/train-00000.parquet"
    offset, length = _chunk(shard, 1, "topk_logprobs")
    _flip(shard, offset + length // 2)
    reader = TopKCacheReader(cache)
    reader.batch([("a", "train", 0), ("a", "train", 11)])  # row groups 0 and 2: intact, so they read fine
    with pytest.raises(CacheError, match=re.escape(f"{shard}: corrupted: row group 1, column topk_logprobs")):
        reader.batch([("a", "train", 5)])
    assert reader.token_rows([("a", "train", 5)]).shape == (1, SEQ + 1)  # its other columns are intact
    problems = verify_cache(cache)
    assert len(problems) == 1 and "sha256 mismatch" in problems[0] and "row group 1 column topk_logprobs" in problems[0]


def test_a_flip_in_a_float_column_is_caught(cache, tmp_path):
    cache = _copy(cache, tmp_path)
    shard = cache / "b/train-00001.parquet"
    offset, length = _chunk(shard, 0, "tail_logmass")
    _flip(shard, offset + length - 3)
    with pytest.raises(CacheError, match="row group 0, column tail_logmass"):
        TopKCacheReader(cache).batch([("b", "train", 17)])


def test_a_flip_in_the_footer_is_caught_when_the_shard_opens(cache, tmp_path):
    cache = _copy(cache, tmp_path)
    shard = cache / "b/train-00000.parquet"
    start, length = footer_range(shard.read_bytes())
    _flip(shard, start + length // 2)
    with pytest.raises(CacheError, match=re.escape(f"{shard}: missing, truncated or corrupted")):
        TopKCacheReader(cache).token_rows([("b", "train", 0)])
    assert any("b/train-00000.parquet" in p for p in verify_cache(cache))


def test_reads_and_verifies_a_cache_from_before_row_groups(tmp_path):
    """Shards of one row group each and a manifest without CRC-32s (what ddk wrote before):
    read as they are, each shard checked by its whole-file sha256 when first opened."""
    cache = tmp_path / "legacy"
    write_synthetic_cache(cache, {"a": 20}, SEQ, VOCAB, K, rows_per_shard=16, rows_per_row_group=None)
    m = json.loads((cache / "manifest.json").read_text())
    del m["integrity"]
    for s in m["domains"]["a"]["shards"]:
        del s["crc32"]
    (cache / "manifest.json").write_text(json.dumps(m))
    assert pq.ParquetFile(cache / "a/train-00000.parquet").metadata.num_row_groups == 1
    keys = [("a", "train", r) for r in (0, 7, 15, 16, 19)]
    batch = TopKCacheReader(cache).batch(keys)
    for j, key in enumerate(keys):
        np.testing.assert_array_equal(batch.topk_ids[j].numpy(), _expected(cache, key)[1])
    assert verify_cache(cache) == []
    shard = cache / "a/train-00001.parquet"
    offset, length = _chunk(shard, 0, "target_logprob")
    _flip(shard, offset + length // 2)
    with pytest.raises(CacheError, match=re.escape(f"{shard}: missing, truncated or corrupted")):
        TopKCacheReader(cache).target_logprobs([("a", "train", 17)])


def test_a_plan_from_before_row_groups_stays_resumable(cache, tmp_path):
    """Its workers keep writing one row group per shard (the plan on disk decides), so it
    is not refused; a row-group size chosen explicitly must match."""
    plan = CachePlan.load(cache)
    d = json.loads((cache / "plan.json").read_text())
    del d["codec"]["rows_per_row_group"]
    (tmp_path / "plan.json").write_text(json.dumps(d))
    legacy = CachePlan.load(tmp_path)
    assert legacy.codec["rows_per_row_group"] is None
    check_compatible(legacy, plan, tmp_path)
    other = CachePlan.load(cache)
    other.codec = {**other.codec, "rows_per_row_group": 16}
    with pytest.raises(CacheError, match=r"codec.rows_per_row_group: 4 vs 16"):
        check_compatible(plan, other, cache)


def test_concurrent_readers_get_the_same_rows(cache):
    keys = _all_keys()
    rng = np.random.default_rng(2)
    batches = [[keys[i] for i in rng.choice(len(keys), 6, replace=False)] for _ in range(24)]
    want = [TopKCacheReader(cache).batch(b) for b in batches]
    reader = TopKCacheReader(cache, max_cache_bytes=20_000)  # small: evictions race with reads
    got, errors = [None] * len(batches), []

    def work(i0):
        try:
            for i in range(i0, len(batches), 4):
                got[i] = reader.batch(batches[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for w, g in zip(want, got):
        for f in ("input_ids", "topk_ids", "topk_logprobs", "target_logprob", "tail_logmass"):
            assert getattr(w, f).equal(getattr(g, f)), f
    assert reader.cached_bytes <= 20_000


# ---------------------------------------------------------------- BatchPrefetcher


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("batch-prefetch")]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_returns_every_batch_in_order(depth):
    batches = [[i, i + 1] for i in range(7)]
    p = BatchPrefetcher(lambda keys: sum(keys), batches, depth)
    assert [p.next() for _ in batches] == [(b, sum(b)) for b in batches]
    assert not _prefetch_threads()  # the last batch closed it
    with pytest.raises(IndexError):
        p.next()


def test_prefetcher_loads_at_most_depth_batches_ahead():
    started = []
    p = BatchPrefetcher(lambda i: started.append(i) or i, list(range(10)), depth=2)
    time.sleep(0.2)  # ample time for the pool to run ahead, were it allowed to
    assert started == [0, 1]
    assert p.next() == (0, 0)
    time.sleep(0.2)
    assert sorted(started) == [0, 1, 2]
    p.close()
    assert not _prefetch_threads()


def test_prefetcher_reraises_a_load_error_in_the_consumer_and_stops():
    def load(i):
        if i == 2:
            raise ValueError("row 2 does not decode")
        return i

    p = BatchPrefetcher(load, list(range(6)), depth=2)
    assert p.next() == (0, 0) and p.next() == (1, 1)
    with pytest.raises(ValueError, match="row 2 does not decode"):
        p.next()
    assert not _prefetch_threads()


def test_training_batches_and_losses_do_not_depend_on_prefetch(tiny_cache, tmp_path, monkeypatch):
    """distill.prefetch_batches = 0 and 3: the same rows in the same order, the same tensors,
    the same loss curve."""
    import ddk.stages.distill as distill_mod
    from ddk.pipeline.config import load_config

    cfg, _ = tiny_cache
    seen: dict[int, list] = {0: [], 3: []}
    real = distill_mod.Trainer.micro_step
    for depth in seen:
        def record(self, batch, depth=depth):
            seen[depth].append(batch)
            return real(self, batch)

        monkeypatch.setattr(distill_mod.Trainer, "micro_step", record)
        out = tmp_path / f"prefetch-{depth}"
        run = load_config(cfg.source_path, [f"distill.out_dir={json.dumps(str(out))}", "distill.steps=6", "distill.interval=2",
                                            "distill.batch_rows=4", "distill.grad_accum=2", "distill.mode=kd",
                                            f"distill.prefetch_batches={depth}", "distill.checkpoint_every=6"])
        distill_mod.distill(run, log=lambda *_: None)
    assert len(seen[0]) == len(seen[3]) == 12
    for a, b in zip(seen[0], seen[3]):
        for f in ("input_ids", "topk_ids", "topk_logprobs", "target_logprob", "tail_logmass"):
            assert getattr(a, f).equal(getattr(b, f)), f
    curves = [[r["loss"] for r in distill_mod.read_metrics(tmp_path / f"prefetch-{d}", "train")] for d in seen]
    assert curves[0] == curves[1]
    assert not _prefetch_threads()


@pytest.mark.parametrize("field,value", [("cache.rows_per_row_group", -1), ("cache.encode_threads", 0),
                                         ("distill.reader_cache_mb", -1), ("distill.prefetch_batches", -1)])
def test_bad_reader_and_writer_settings_are_refused(field, value):
    from ddk.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(f"{field} = {value}: must be >= ")):
        load_config(None, [f"{field}={value}"])


def test_row_groups_default_to_a_token_budget():
    from ddk.pipeline.config import ROW_GROUP_TOKENS, CacheConfig

    auto = CacheConfig()
    assert auto.rows_per_row_group == 0 and ROW_GROUP_TOKENS == 16384
    assert [auto.row_group_rows(s) for s in (2048, 128, 64, 100_000)] == [8, 128, 256, 1]
    assert CacheConfig(rows_per_row_group=4).row_group_rows(2048) == 4


def test_ids_outside_the_vocabulary_are_refused_on_the_host(cache):
    """The reader checks every id against the cache's id space (so the loss kernels can skip
    their device-side check, a host sync per micro-step): a vocabulary smaller than the
    ids actually stored is refused, naming the rows and the fix."""
    reader = TopKCacheReader(cache)
    keys = _all_keys()[:3]
    batch = reader.batch(keys)
    largest = max(int(batch.input_ids.max()), int(batch.topk_ids.max()))
    reader.vocab_size = largest  # one short of holding the largest id
    with pytest.raises(CacheError, match=r"outside \[0, .*cache verify"):
        reader.batch(keys)


def test_a_plan_from_before_the_padded_id_fold_stays_resumable(cache, tmp_path):
    """A cache begun before the id space became the tokenizer's recorded the teacher's rows
    as its vocabulary (and no teacher.vocab_rows): this version's plan of the same teacher
    (rows > tokenizer ids, a vLLM fold) is accepted, since its workers keep capturing with
    the plan on disk; a real change of vocabulary is still refused."""
    import dataclasses

    old = CachePlan.load(cache)
    rows = old.codec["vocab_size"]
    new = dataclasses.replace(old, format_version=3, teacher={**old.teacher, "vocab_rows": rows},
                              tokenizer={**old.tokenizer, "vocab_size": rows - 5},
                              codec={**old.codec, "vocab_size": rows - 5, "fold_padded": True})
    check_compatible(old, new, tmp_path)
    other = dataclasses.replace(new, teacher={**new.teacher, "vocab_rows": rows + 64})
    with pytest.raises(CacheError, match="vocab_size"):
        check_compatible(old, other, tmp_path)
