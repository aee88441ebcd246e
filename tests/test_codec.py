"""TopKCodec: exact id round trip, logprob error within the stated bound, clamping,
edge shapes and vocab sizes, and loud failure on bad input or corrupt blobs."""

import json

import numpy as np
import pytest

from ddk.pipeline.cache.codec import _IDS_HEADER, _LP_HEADER, TopKCodec, measure_fidelity


def teacher_topk(V, k, P, seed=0):
    """Distinct ids biased to low values (like BPE frequency order) and logprobs <= 0."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(V) + 10.0)
    weights /= weights.sum()
    ids = np.stack([rng.choice(V, size=k, replace=False, p=weights) for _ in range(P)])
    logprobs = -rng.exponential(4.0, size=(P, k)).astype(np.float32)
    return ids, logprobs


def by_id(ids, logprobs):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def roundtrip(codec, ids, logprobs):
    ib, lb = codec.encode(ids, logprobs)
    return codec.decode(ib, lb, ids.shape[0])


@pytest.mark.parametrize(
    "V,k,P",
    [
        (4096, 16, 64),
        (32000, 64, 32),
        (151936, 128, 16),  # > 65536: gaps need a third byte plane
        (200, 7, 50),  # V < 256, k not a power of two
        (50257, 1, 40),  # k = 1: no gap stream at all
        (1000, 10, 1),  # a single position
    ],
)
def test_roundtrip_ids_exact_and_logprobs_within_bound(V, k, P):
    codec = TopKCodec(V, k)
    ids, lp = teacher_topk(V, k, P)
    out_ids, out_lp = roundtrip(codec, ids, lp)
    ref_ids, ref_lp = by_id(ids, lp)
    assert out_ids.dtype == np.int32 and out_lp.dtype == np.float32
    assert out_ids.shape == out_lp.shape == (P, k)
    np.testing.assert_array_equal(out_ids, ref_ids)  # sorted by id within each position
    assert np.abs(out_lp.astype(np.float64) - ref_lp).max() <= codec.max_abs_error_bound()


def test_order_within_position_is_by_id_not_rank():
    codec = TopKCodec(100, 3)
    ids = np.array([[50, 7, 90]])  # rank order as a teacher would give it
    lp = np.array([[-0.1, -2.0, -5.0]], np.float32)
    out_ids, out_lp = roundtrip(codec, ids, lp)
    assert out_ids.tolist() == [[7, 50, 90]]
    np.testing.assert_allclose(out_lp, [[-2.0, -0.1, -5.0]], atol=codec.max_abs_error_bound())


def test_extreme_gaps_and_ids():
    V = 151936
    codec = TopKCodec(V, 3)
    ids = np.array([[0, 1, V - 1], [V - 3, V - 2, V - 1], [0, 1, 2]])  # max gap, top ids, all-zero gaps
    lp = np.zeros((3, 3), np.float32)
    out_ids, _ = roundtrip(codec, ids, lp)
    np.testing.assert_array_equal(out_ids, ids)


def test_vocab_at_int32_limit_uses_wide_running_sum():
    V = 2**31 - 1  # k * V >= 2**31: decode must accumulate in int64
    codec = TopKCodec(V, 4)
    ids = np.array([[0, 2**30, 2**31 - 3, V - 1]])
    out_ids, _ = roundtrip(codec, ids, np.zeros((1, 4), np.float32))
    np.testing.assert_array_equal(out_ids, ids)


def test_clamping_neg_inf_and_very_negative():
    codec = TopKCodec(1000, 4)
    lp = np.array([[0.0, -1.5, -np.inf, -1e30]], np.float32)
    out_ids, out_lp = roundtrip(codec, np.array([[1, 2, 3, 4]]), lp)
    assert out_lp[0, 2] == out_lp[0, 3] == codec.min_logprob
    # Defaults: the uint16 code range, not the -64 floor, sets the lowest value.
    assert codec.min_logprob == -65535 * 2**-10
    assert np.isfinite(out_lp).all()


def test_clamping_at_configured_floor():
    codec = TopKCodec(1000, 3, logprob_step=2**-8, logprob_floor=-20.0)
    assert codec.min_logprob == -20.0
    lp = np.array([[-19.999, -20.0, -25.0]], np.float32)
    _, out_lp = roundtrip(codec, np.array([[1, 2, 3]]), lp)
    assert out_lp.tolist() == [[-20.0, -20.0, -20.0]]


def test_all_equal_logprobs_and_tiny_positive():
    codec = TopKCodec(5000, 8)
    ids, _ = teacher_topk(5000, 8, 20)
    for value in (-3.25, 0.0, 1e-7):  # 1e-7: fp rounding in a log-softmax
        _, out_lp = roundtrip(codec, ids, np.full(ids.shape, value, np.float32))
        assert (out_lp == np.float32(min(value, 0.0))).all()


def test_non_power_of_two_step_bound():
    codec = TopKCodec(1000, 16, logprob_step=0.003, logprob_floor=-30.0)
    ids, lp = teacher_topk(1000, 16, 100, seed=3)
    lp = np.maximum(lp, -29.0)
    assert codec.max_abs_error_bound() > 0.0015
    report = measure_fidelity(codec, ids, lp)
    assert report["within_bound"] and report["ids_exact"]


def test_measure_fidelity_reports_true_error_and_clamps():
    codec = TopKCodec(1000, 4)
    step = codec.logprob_step
    # -0.5*step is a round-half-to-even tie to code 0: exactly the bound; -0.25*step is below it.
    lp = np.array([[-0.5 * step, -0.25 * step, -np.inf, -100.0], [-1.0, -2.0, -3.0, -4.0]], np.float32)
    ids = np.array([[4, 3, 2, 1], [10, 20, 30, 40]])
    report = measure_fidelity(codec, ids, lp)
    assert report["max_abs_error"] == 0.5 * step == report["bound"]
    assert report["within_bound"] and report["ids_exact"]
    assert report["clamped"] == 2 and report["neg_inf"] == 1
    assert report["max_abs_error_finite"] == pytest.approx(100.0 + codec.min_logprob)
    assert report["bytes_per_position"] == (report["ids_bytes"] + report["logprobs_bytes"]) / 2


def test_describe_is_json_and_states_fidelity():
    d = TopKCodec(32000, 64).describe()
    assert json.loads(json.dumps(d)) == d
    assert d["max_abs_logprob_error"] == 2**-11
    assert d["min_logprob"] == -65535 * 2**-10
    assert d["order_within_position"].startswith("id ascending")


@pytest.mark.parametrize(
    "ids,lp,match",
    [
        (np.array([[1, 2, 3]]), np.zeros((1, 3)), r"shape \[positions, k=4\]"),
        (np.zeros((0, 4), int), np.zeros((0, 4)), "no positions"),
        (np.array([[1, 2, 3, 4]]), np.zeros((1, 3)), "logprobs shape"),
        (np.array([[1.0, 2, 3, 4]]), np.zeros((1, 4)), "integer"),
        (np.array([[1, 2, 3, 4]]), np.zeros((1, 4), int), "float"),
        (np.array([[1, 2, 3, 100]]), np.zeros((1, 4)), "id 100 out of range"),
        (np.array([[-1, 2, 3, 4]]), np.zeros((1, 4)), "id -1 out of range"),
        (np.array([[0, 1, 2, 3], [5, 9, 5, 6]]), np.zeros((2, 4)), "duplicate id 5 within position 1"),
        (np.array([[1, 2, 3, 4]]), np.array([[0, np.nan, 0, 0]]), "NaN"),
        (np.array([[1, 2, 3, 4]]), np.array([[0, 0.5, 0, 0]]), "<= 0"),
        (np.array([[1, 2, 3, 4]]), np.array([[0, np.inf, 0, 0]]), "<= 0"),
    ],
)
def test_encode_rejects_bad_input(ids, lp, match):
    with pytest.raises(ValueError, match=match):
        TopKCodec(100, 4).encode(ids, lp)


@pytest.mark.parametrize(
    "kwargs", [dict(vocab_size=0, k=1), dict(vocab_size=10, k=11), dict(vocab_size=10, k=0),
               dict(vocab_size=10, k=2, logprob_step=0.0), dict(vocab_size=10, k=2, logprob_floor=0.0)]
)
def test_bad_codec_params(kwargs):
    with pytest.raises(ValueError):
        TopKCodec(**kwargs)


@pytest.fixture
def blobs():
    codec = TopKCodec(1000, 4)
    ids, lp = teacher_topk(1000, 4, 3)
    return codec, *codec.encode(ids, lp)


def test_truncated_and_padded_blobs_raise(blobs):
    codec, ib, lb = blobs
    for cut in (0, 5, len(ib) - 1):
        with pytest.raises(ValueError, match="ids blob"):
            codec.decode(ib[:cut], lb, 3)
    with pytest.raises(ValueError, match="logprobs blob: length"):
        codec.decode(ib, lb[:-1], 3)
    with pytest.raises(ValueError, match="trailing"):
        codec.decode(ib + b"\0", lb, 3)


def test_every_single_byte_flip_raises_or_decodes_identically(blobs):
    # Never garbage: a flipped bit is either caught or (zstd's one ignored header bit)
    # provably harmless. Header flips must always be caught.
    codec, ib, lb = blobs
    good = codec.decode(ib, lb, 3)
    for which, blob in (("ids", ib), ("lp", lb)):
        header = (_IDS_HEADER if which == "ids" else _LP_HEADER).size
        for i in range(len(blob)):
            for mask in (0x01, 0x10, 0x80, 0xFF):
                bad = bytearray(blob)
                bad[i] ^= mask
                args = (bytes(bad), lb) if which == "ids" else (ib, bytes(bad))
                try:
                    out = codec.decode(*args, 3)
                except ValueError:
                    continue
                assert i >= header, f"{which} header byte {i} flip ({mask:#x}) went unnoticed"
                assert all(np.array_equal(a, b) for a, b in zip(out, good)), f"{which} byte {i} ^ {mask:#x}"


def test_decode_refuses_mismatched_codec_or_positions(blobs):
    codec, ib, lb = blobs
    with pytest.raises(ValueError, match="caller expects 4"):
        codec.decode(ib, lb, 4)
    with pytest.raises(ValueError, match="vocab_size=1000"):
        TopKCodec(2000, 4).decode(ib, lb, 3)
    with pytest.raises(ValueError, match="k=5"):
        TopKCodec(1000, 5).decode(ib, lb, 3)
    with pytest.raises(ValueError, match="step"):
        TopKCodec(1000, 4, logprob_step=2**-8).decode(ib, lb, 3)
    with pytest.raises(ValueError, match="swapped"):
        codec.decode(lb, ib, 3)


def test_decode_rejects_ids_beyond_vocab(blobs):
    # A blob from a bigger vocab, relabelled as ours: caught by the range check, not
    # returned as out-of-vocab ids.
    big = TopKCodec(70000, 2)
    ib, lb = big.encode(np.array([[10, 69999]]), np.zeros((1, 2), np.float32))
    small = TopKCodec(1000, 2)
    relabelled = ib[:12] + (1000).to_bytes(4, "little") + ib[16:]
    with pytest.raises(ValueError, match="vocab_size=1000"):
        small.decode(relabelled, small.encode(np.array([[1, 2]]), np.zeros((1, 2)))[1], 1)


def test_decode_accepts_any_buffer(blobs):
    codec, ib, lb = blobs
    out = codec.decode(bytearray(ib), memoryview(lb), 3)
    good = codec.decode(ib, lb, 3)
    assert all(np.array_equal(a, b) for a, b in zip(out, good))
    assert out[0].flags.writeable and out[1].flags.writeable


def test_zstd_checksum_flag_cannot_be_switched_off(blobs):
    # Without it a corrupt payload would decode unverified; the flag sits in the zstd
    # frame header descriptor, right after the 4-byte zstd magic.
    codec, ib, lb = blobs
    bad = bytearray(ib)
    bad[_IDS_HEADER.size + 4] ^= 0x04
    with pytest.raises(ValueError, match="checksum"):
        codec.decode(bytes(bad), lb, 3)


def test_shard_bytes_do_not_depend_on_encode_threads(tmp_path):
    """TopKShardWriter encodes rows on threads; the file is the same byte for byte, in row
    groups of rows_per_row_group rows."""
    import pyarrow.parquet as pq

    from ddk.pipeline.cache.writer import TopKShardWriter
    from ddk.benchmarks.codec import synthetic_capture

    tokens, topk = synthetic_capture(np.random.default_rng(0), 10, 64, 151936, 16)
    codec = TopKCodec(151936, 16)
    files = {}
    for threads in (1, 4):
        path = tmp_path / f"threads-{threads}.parquet"
        info = TopKShardWriter(codec, rows_per_row_group=4, encode_threads=threads).write(path, "d", "train", 0, tokens, topk)
        files[threads] = path.read_bytes()
        assert info["max_abs_logprob_error"] <= codec.max_abs_error_bound()
    assert files[1] == files[4]
    assert [pq.ParquetFile(tmp_path / "threads-1.parquet").metadata.row_group(g).num_rows for g in range(3)] == [4, 4, 2]
