"""The one definition of a cache's distortion (pipeline/cache/fidelity.py) and where it is recorded."""

from __future__ import annotations

import numpy as np
import pytest

from ddk.pipeline.cache.codec import DEFAULT_LOGPROB_FLOOR, TopKCodec, measure_fidelity
from ddk.pipeline.cache.fidelity import kl_distortion


def _topk(rng, n=50, v=500, k=16):
    logits = rng.normal(0, 3, size=(n, v))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-logp, 1)[:, :k]
    lp = np.take_along_axis(logp, ids, 1)
    tail = np.log1p(-np.exp(lp).sum(1))
    return ids, lp, tail


def test_kl_distortion_is_the_kl_of_the_k_plus_1_outcomes():
    rng = np.random.default_rng(0)
    ids, lp, tail = _topk(rng)
    noisy = lp + rng.normal(0, 0.05, size=lp.shape)
    got = kl_distortion(lp, tail, noisy)
    p = np.concatenate([np.exp(lp), np.exp(tail)[:, None]], 1)
    q = np.concatenate([np.exp(noisy), np.exp(tail)[:, None]], 1)
    q /= q.sum(1, keepdims=True)
    np.testing.assert_allclose(got, (p * np.log(p / q)).sum(1), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(kl_distortion(lp, tail, lp), 0.0, atol=1e-15)
    # second order: 1/2 sum p d^2 (d centred under p) for small errors
    d = noisy - lp
    p_top = np.exp(lp)
    dc = d - (p_top * d).sum(1, keepdims=True)  # the renormalization removes the mean shift
    approx = 0.5 * (p_top * dc**2).sum(1) + 0.5 * np.exp(tail) * ((p_top * d).sum(1)) ** 2
    np.testing.assert_allclose(got, approx, rtol=0.1)


def test_kl_distortion_edge_cases():
    lp = np.log(np.array([[0.5, 0.5]]))
    assert kl_distortion(lp, np.array([-np.inf]), lp)[0] == 0.0  # top-k holds all mass
    assert kl_distortion(lp, np.array([-np.inf]), np.log(np.array([[0.9, 0.1]])))[0] > 0
    with pytest.raises(ValueError, match="same shape"):
        kl_distortion(lp, np.array([-1.0]), lp[:, :1])


def test_the_codec_round_trip_reports_its_distortion():
    rng = np.random.default_rng(1)
    ids, lp, tail = _topk(rng, k=64)
    fine = measure_fidelity(TopKCodec(500, 64, 2**-10, DEFAULT_LOGPROB_FLOOR), ids, lp.astype(np.float32), tail_logmass=tail)
    coarse = measure_fidelity(TopKCodec(500, 64, 2**-5, DEFAULT_LOGPROB_FLOOR), ids, lp.astype(np.float32), tail_logmass=tail)
    assert 0 < fine["kl_distortion_sum"] < coarse["kl_distortion_sum"]
    # uniform rounding error of a step s: ~ s^2 / 24 per position (1/2 x s^2/12), times n positions
    assert coarse["kl_distortion_sum"] / len(ids) == pytest.approx((2**-5) ** 2 / 24, rel=0.5)


def test_sqrt_prob_quantizer_round_trip_and_its_header():
    rng = np.random.default_rng(2)
    ids, lp, tail = _topk(rng, n=40, k=64)
    codec = TopKCodec(500, 64, logprob_floor=DEFAULT_LOGPROB_FLOOR, logprob_quantizer="sqrt-prob", sqrt_prob_levels=255)
    ib, lb = codec.encode(ids, lp.astype(np.float32))
    out_ids, out_lp = codec.decode(ib, lb, len(ids))
    order = np.argsort(ids, 1)
    np.testing.assert_array_equal(out_ids, np.take_along_axis(ids, order, 1))
    ref = np.take_along_axis(lp, order, 1)
    u = np.exp(ref / 2)
    code = np.rint(u * 255)
    expected = 2 * np.log(np.maximum(code, 0.25) / 255)
    np.testing.assert_allclose(out_lp, expected, rtol=1e-6, atol=1e-6)
    # the error in sqrt(p) is at most half a level where a token has a code
    kept = code > 0
    assert np.abs(np.exp(out_lp[kept] / 2) - u[kept]).max() <= 0.5 / 255 + 1e-7
    # its distortion: ~ levels^-2 / 6 per position (each token ~ (1/2) p d^2 with d = 2 du / u)
    fid = measure_fidelity(codec, ids, lp.astype(np.float32), blobs=(ib, lb), tail_logmass=tail)
    assert fid["ids_exact"] and 0 < fid["kl_distortion_sum"] / len(ids) < 64 / 255**2
    assert fid["clamped"] == int((~kept).sum())
    fixed = TopKCodec(500, 64, logprob_floor=DEFAULT_LOGPROB_FLOOR)
    with pytest.raises(ValueError, match="wrong blob kind .* another logprob quantizer"):
        fixed.decode(ib, lb, len(ids))
    with pytest.raises(ValueError, match="encoded with step=255.0"):
        TopKCodec(500, 64, logprob_floor=DEFAULT_LOGPROB_FLOOR, logprob_quantizer="sqrt-prob", sqrt_prob_levels=127).decode(ib, lb, len(ids))
    with pytest.raises(ValueError, match="logprob_quantizer must be one of"):
        TopKCodec(500, 64, logprob_quantizer="log")


@pytest.mark.parametrize("levels", [127, 255, 1023])
def test_sqrt_prob_distortion_follows_its_equation(levels):
    """Each token costs ~ (1/2) p d^2 with d = 2 du / u, i.e. 2 du^2, and du is uniform in
    +-1/(2 levels): k / (6 levels^2) nats per position, whatever the probabilities."""
    rng = np.random.default_rng(3)
    ids, lp, tail = _topk(rng, n=200, v=2000, k=64)
    codec = TopKCodec(2000, 64, logprob_floor=DEFAULT_LOGPROB_FLOOR, logprob_quantizer="sqrt-prob", sqrt_prob_levels=levels)
    fid = measure_fidelity(codec, ids, lp.astype(np.float32), tail_logmass=tail)
    assert fid["kl_distortion_sum"] / len(ids) == pytest.approx(64 / (6 * levels**2), rel=0.3)
