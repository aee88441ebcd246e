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
