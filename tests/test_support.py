"""Ragged supports: top-p truncation, sampled supports (Sparse Logit Sampling), their codec
round trip, the distortion measure, unbiasedness against the dense expectation, and both
end to end through stage one on the tiny teacher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddk.pipeline.cache.codec import DEFAULT_LOGPROB_FLOOR, TopKCodec, measure_fidelity
from ddk.pipeline.cache.fidelity import kl_distortion, support_kl_distortion
from ddk.pipeline.cache.manifest import CacheError, load_manifest
from ddk.pipeline.cache.reader import TopKCacheReader
from ddk.pipeline.config import ConfigError, load_config
from ddk.pipeline.teachers.support import draws_to_support, row_seed, target_variance, truncate_top_p
from ddk.stages.cli import main as cli
from ddk.stages.teacher_cache import teacher_cache

QUIET = lambda *_: None  # noqa: E731


def _teacher(positions=64, vocab=300, k=32, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((positions, vocab)) * scale
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-lp, 1)[:, :k]
    top = np.take_along_axis(lp, ids, 1)
    tail = np.log1p(-np.exp(top).sum(1))
    return lp, ids, top, tail


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_moves_the_rest_into_the_tail():
    lp, ids, top, tail = _teacher()
    for p in (0.3, 0.9, 0.999):
        sid, slp, stail = truncate_top_p(ids, top, tail, p)
        used = sid >= 0
        n = used.sum(1)
        assert (n >= 1).all() and (n <= ids.shape[1]).all()
        probs = np.exp(np.sort(top, 1)[:, ::-1])
        csum = np.cumsum(probs, 1)
        for i in range(len(n)):
            # n is the smallest count whose mass reaches p (or all k when the top-k is short of p)
            want = min(int(np.searchsorted(csum[i], p)) + 1, ids.shape[1])
            assert n[i] == want
        # entries first, most likely first; the kept ids are the top ones
        assert not (~used[:, :-1] & used[:, 1:]).any()
        np.testing.assert_array_equal(np.where(used, sid, -1), np.where(used, ids, -1))
        # total mass is conserved: kept + new tail = top-k + old tail
        kept = np.where(used, np.exp(slp.astype(np.float64)), 0).sum(1)
        np.testing.assert_allclose(kept + np.exp(stail.astype(np.float64)), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="top_p"):
        truncate_top_p(ids, top, tail, 1.0)


def test_ragged_codec_round_trip_is_exact_on_ids_and_within_the_step_on_logprobs():
    lp, ids, top, tail = _teacher(vocab=1000, k=64)
    sid, slp, stail = truncate_top_p(ids, top, tail, 0.8)
    codec = TopKCodec(1000, 64, logprob_floor=DEFAULT_LOGPROB_FLOOR, ragged=True)
    ib, lb = codec.encode(sid, slp)
    out_ids, out_lp = codec.decode(ib, lb, len(sid))
    n = (sid >= 0).sum(1)
    for i in range(len(sid)):
        order = np.argsort(sid[i, : n[i]])
        np.testing.assert_array_equal(out_ids[i, : n[i]], sid[i, : n[i]][order])
        assert (out_ids[i, n[i]:] == -1).all() and np.isneginf(out_lp[i, n[i]:]).all()
        assert np.abs(out_lp[i, : n[i]] - slp[i, : n[i]][order]).max() <= codec.max_abs_error_bound()
    fid = measure_fidelity(codec, sid, slp, blobs=(ib, lb), tail_logmass=stail)
    assert fid["ids_exact"] and fid["within_bound"] and fid["values"] == n.sum()
    # no padding is stored: the ragged blob is smaller than the full top-k one
    full = TopKCodec(1000, 64, logprob_floor=DEFAULT_LOGPROB_FLOOR).encode(ids, top)
    assert len(ib) + len(lb) < 0.9 * (len(full[0]) + len(full[1]))


def test_ragged_and_dense_blobs_are_not_confused_and_bad_input_is_named():
    lp, ids, top, tail = _teacher(k=8)
    sid, slp, _ = truncate_top_p(ids, top, tail, 0.5)
    ragged = TopKCodec(300, 8, ragged=True)
    dense = TopKCodec(300, 8)
    with pytest.raises(ValueError, match="ragged=True"):
        dense.encode(sid, slp)
    ib, lb = ragged.encode(sid, slp)
    with pytest.raises(ValueError, match="wrong blob kind"):
        dense.decode(ib, lb, len(sid))
    dib, dlb = dense.encode(ids, top)
    with pytest.raises(ValueError, match="wrong blob kind"):
        ragged.decode(dib, dlb, len(ids))
    empty = sid.copy()
    empty[3] = -1
    with pytest.raises(ValueError, match="position 3 has no entries"):
        ragged.encode(empty, slp)
    dup = sid.copy()
    dup[0, :2] = 5
    with pytest.raises(ValueError, match="duplicate id 5 within position 0"):
        ragged.encode(dup, np.where(dup >= 0, -1.0, -np.inf))
    with pytest.raises(ValueError, match="corrupt|truncated|length"):
        ragged.decode(ib[:-3], lb, len(sid))


def test_support_distortion_equals_kl_distortion_on_the_same_support_and_grows_as_p_falls():
    lp, ids, top, tail = _teacher(vocab=500, k=64)
    np.testing.assert_allclose(support_kl_distortion(ids, top, tail, ids, top, tail, 500), 0, atol=1e-12)
    noisy = top + np.random.default_rng(1).normal(0, 0.01, top.shape)
    np.testing.assert_allclose(support_kl_distortion(ids, top, tail, ids[:, ::-1], noisy[:, ::-1], tail, 500),
                               kl_distortion(top, tail, noisy), rtol=1e-9, atol=1e-15)
    last = 0.0
    for p in (0.999, 0.99, 0.9, 0.5):
        sid, slp, stail = truncate_top_p(ids, top, tail, p)
        d = support_kl_distortion(ids, top, tail, sid, slp, stail, 500).mean()
        assert d > last
        last = d
    # A dropped token is charged against an even share of the stored tail: check one position by hand.
    sid, slp, stail = truncate_top_p(ids[:1], top[:1], tail[:1], 0.5)
    n = int((sid >= 0).sum())
    share = math.exp(stail[0]) / (500 - n)
    q = np.concatenate([np.exp(slp[0, :n]), np.full(64 - n, share), [share * (500 - 64)]])
    p_ = np.concatenate([np.exp(np.sort(top[0])[::-1]), [math.exp(tail[0])]])
    q /= q.sum()
    want = float((p_ * np.log(p_ / q)).sum())
    assert support_kl_distortion(ids[:1], top[:1], tail[:1], sid, slp, stail, 500)[0] == pytest.approx(want, rel=1e-5)


def test_draw_counts_are_exact_and_their_mean_is_the_teacher_distribution():
    rng = np.random.default_rng(0)
    vocab, k = 12, 8
    p = rng.dirichlet(np.ones(vocab) * 0.5)
    trials = 40000
    draws = rng.choice(vocab, size=(trials, k), p=p)
    ids, lq = draws_to_support(draws, k)
    used = ids >= 0
    q = np.where(used, np.exp(lq.astype(np.float64)), 0)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-6)
    for t in range(5):  # exact counts
        vals, counts = np.unique(draws[t], return_counts=True)
        np.testing.assert_array_equal(ids[t, : len(vals)], vals)
        np.testing.assert_allclose(np.exp(lq[t, : len(vals)]), counts / k, rtol=1e-6)
    dense = np.zeros((trials, vocab))
    np.add.at(dense, (np.nonzero(used)[0], ids[used]), q[used])
    se = dense.std(0) / math.sqrt(trials)
    assert (np.abs(dense.mean(0) - p) <= 5 * se + 1e-12).all()  # unbiased, within 5 standard errors
    var = ((dense - p) ** 2).sum(1).mean()
    assert var == pytest.approx(target_variance(p, k), rel=0.05)
    codec = TopKCodec(vocab, k, ragged=True, logprob_quantizer="counts")
    out_ids, out_lq = codec.decode(*codec.encode(ids[:100], lq[:100]), 100)
    np.testing.assert_array_equal(out_ids, ids[:100])
    np.testing.assert_array_equal(out_lq, lq[:100])
    with pytest.raises(ValueError, match="needs ragged=True"):
        TopKCodec(vocab, k, logprob_quantizer="counts")


@pytest.mark.parametrize("impl", ["torch"])
def test_the_sampled_loss_gradient_is_unbiased_for_the_full_distribution(impl):
    """E over draws of d(loss)/d(logits) with the sampled target = the dense gradient
    softmax(z) - p of KL(p || softmax(z)); the top-k target's (with its tail) is not."""
    from ddk.kernels.sparse_kl import sparse_kl_loss

    torch.manual_seed(0)
    vocab, k, trials = 16, 6, 4000
    p = torch.distributions.Dirichlet(torch.full((vocab,), 0.4)).sample().double()
    z = torch.randn(vocab, dtype=torch.float64)
    dense_grad = torch.softmax(z, 0) - p
    draws = torch.multinomial(p.float(), trials * k, replacement=True).reshape(trials, k).numpy()
    ids, lq = draws_to_support(draws, k)
    logits = z.repeat(trials, 1).requires_grad_(True)
    loss = sparse_kl_loss(logits, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lq).double(),
                          torch.full((trials,), -math.inf, dtype=torch.float64), reduction="sum", impl=impl)
    loss.backward()
    mean = logits.grad.mean(0)
    se = torch.sqrt(p * (1 - p) / (k * trials))  # of the mean draw frequency, exact (not estimated)
    assert (torch.abs(mean - dense_grad) <= 5 * se + 1e-9).all()
    # The top-k target with its exact tail bucket is biased (a reference point, not a bug):
    top = torch.topk(p, k)
    tail = torch.log1p(-top.values.sum())
    zt = z.clone().requires_grad_(True)
    sparse_kl_loss(zt[None], top.indices[None], top.values.log()[None], tail[None], reduction="sum", impl=impl).backward()
    assert (zt.grad - dense_grad).abs().max() > 10 * se.max()


def test_row_seed_depends_on_tokens_and_seed_only():
    row = np.arange(10)
    assert row_seed(row, 0) == row_seed(row.astype(np.int32), 0)
    assert row_seed(row, 0) != row_seed(row, 1) != row_seed(row[::-1], 1)


@pytest.fixture(scope="module")
def topp_cache(tiny_cache, tmp_path_factory):
    cfg, _ = tiny_cache
    cache = tmp_path_factory.mktemp("topp") / "cache"
    return cache, teacher_cache(load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(cache))}", "cache.top_p=0.15"]), log=QUIET)


SAMPLED = ['cache.support="sampled"', "cache.k=12", "teacher.backend=hf"]


@pytest.fixture(scope="module")
def sampled_cache(tiny_cache, tmp_path_factory):
    cfg, _ = tiny_cache
    cache = tmp_path_factory.mktemp("sampled") / "cache"
    return cache, teacher_cache(load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(cache))}", *SAMPLED]), log=QUIET)


def test_a_top_p_cache_end_to_end(tiny_cache, topp_cache):
    cfg, ref = tiny_cache
    cache, m = topp_cache
    assert m["format_version"] == 3 and m["codec"]["top_p"] == 0.15
    assert 1 <= m["fidelity"]["mean_support_size"] < ref["k"]
    assert ref["fidelity"]["mean_kl_distortion"] < m["fidelity"]["mean_kl_distortion"]
    assert m["bytes"] < ref["bytes"]
    reader, exact = TopKCacheReader(cache), TopKCacheReader(cfg.cache.out_dir)
    keys = [("code", "val", 0), ("code", "val", 1)]
    got, full = reader.batch(keys), exact.batch(keys)
    used = got.topk_ids >= 0
    assert got.topk_ids.shape[-1] <= full.topk_ids.shape[-1] and not used.all()
    # every kept id is one of the exact top-k, with its log-prob; the tail gained what was dropped
    for b in range(2):
        for pos in range(0, got.topk_ids.shape[1], 17):
            kept = got.topk_ids[b, pos][used[b, pos]].numpy()
            ref_ids = full.topk_ids[b, pos].numpy()
            assert np.isin(kept, ref_ids).all()
            lp_ref = full.topk_logprobs[b, pos].numpy()[np.searchsorted(ref_ids, kept)]
            np.testing.assert_allclose(got.topk_logprobs[b, pos][used[b, pos]].numpy(), lp_ref, atol=2**-10)
            mass = np.exp(got.topk_logprobs[b, pos][used[b, pos]].double().numpy()).sum() + math.exp(got.tail_logmass[b, pos])
            assert mass == pytest.approx(1.0, abs=1e-3)
    out = CliRunner().invoke(cli, ["cache", "inspect", str(cache)])
    assert "top-p 0.15" in out.output and "entries per position" in out.output, out.output


def test_a_sampled_cache_end_to_end(tiny_cache, sampled_cache, tmp_path):
    cfg, ref = tiny_cache
    cache, m = sampled_cache
    assert m["format_version"] == 3 and m["fidelity"]["unbiased"] and m["fidelity"]["mean_kl_distortion"] is None
    assert 1 <= m["fidelity"]["mean_support_size"] <= 12
    batch = TopKCacheReader(cache).batch([("code", "train", 0)])
    used = batch.topk_ids >= 0
    counts = torch.where(used, batch.topk_logprobs.double().exp() * 12, 0.0)
    np.testing.assert_allclose(counts.sum(-1).numpy(), 12, atol=1e-4)  # k draws per position
    np.testing.assert_allclose(counts[used].numpy(), np.round(counts[used].numpy()), atol=1e-4)
    assert torch.isneginf(batch.tail_logmass).all()
    # the teacher's own target log-prob is exact, as in a top-k cache
    exact = TopKCacheReader(cfg.cache.out_dir).target_logprobs([("code", "train", 0)])
    np.testing.assert_allclose(batch.target_logprob.numpy(), exact.numpy(), atol=1e-5)
    # deterministic: a second capture of the same rows draws the same tokens
    again = tmp_path / "again"
    teacher_cache(load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(again))}", *SAMPLED]), log=QUIET)
    assert sorted(p.read_bytes() for p in cache.rglob("*.parquet")) == sorted(p.read_bytes() for p in again.rglob("*.parquet"))
    out = CliRunner().invoke(cli, ["cache", "inspect", str(cache)])
    assert "sampled: 12 draws" in out.output and "unbiased" in out.output, out.output


def test_sampled_support_refusals(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    with pytest.raises(ConfigError, match="sampled. .the default. draws from the teacher.s full distribution.*cache.support=topk"):
        teacher_cache(load_config(cfg.source_path, [f"cache.out_dir={json.dumps(str(tmp_path / 'c'))}", 'cache.support="sampled"',
                                                    "teacher.backend=vllm"]), log=QUIET)
    with pytest.raises(ConfigError, match="top_p"):
        load_config(cfg.source_path, ['cache.support="sampled"', "cache.top_p=0.9"])
    with pytest.raises(ConfigError, match="cache.support"):
        load_config(cfg.source_path, ['cache.support="topp"'])


def test_a_cache_of_an_unknown_format_version_is_refused_by_name(tiny_cache, tmp_path):
    import shutil

    cfg, _ = tiny_cache
    shutil.copytree(cfg.cache.out_dir, tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    m = json.loads(path.read_text())
    assert m["format_version"] == 2  # a full top-k cache is still written as version 2
    m["format_version"] = 5
    path.write_text(json.dumps(m))
    with pytest.raises(CacheError, match="format version 5, this ddk reads versions 2, 3, 4"):
        load_manifest(tmp_path / "c")


DISTILL = ["distill.steps=4", "distill.batch_rows=4", "distill.interval=2", "distill.eval_rows=4"]


@pytest.mark.parametrize("which", ["topp", "sampled"])
def test_distill_trains_from_a_ragged_cache(tiny_cache, topp_cache, sampled_cache, tmp_path, which):
    """Stage two end to end from each ragged support (fused head, torch path on CPU)."""
    from ddk.stages.distill import distill

    cfg, _ = tiny_cache
    cache, _ = topp_cache if which == "topp" else sampled_cache
    over = [f"distill.cache_dir={json.dumps(str(cache))}", f"distill.out_dir={json.dumps(str(tmp_path / 'run'))}",
            "distill.mode=kd", *DISTILL]
    results = distill(load_config(cfg.source_path, over), log=QUIET)
    assert all(math.isfinite(v) for v in results["test"]["student_after_loss"].values())
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kls = [m["kl"] for m in metrics if m.get("kind") == "train"]
    assert kls and all(math.isfinite(k) and k >= -1e-6 for k in kls)
    if which == "sampled":
        with pytest.raises(ConfigError, match="sampled support"):
            distill(load_config(cfg.source_path, over[:1] + [f"distill.out_dir={json.dumps(str(tmp_path / 't2'))}",
                                                          "distill.mode=kd", "distill.temperature=2.0", *DISTILL]), log=QUIET)


def test_compare_pairs_a_second_cache(tiny_cache, topp_cache, tmp_path):
    cfg, _ = tiny_cache
    cache, _ = topp_cache
    args = ["compare", "--config", cfg.source_path, "--out", str(tmp_path / "cmp"), "--modes", "kd", "--seeds", "1",
            "--vs-cache", str(cache), *sum((["--set", o] for o in DISTILL), [])]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert list(s["vs_cache"]) == ["kd@vs-cache − kd"]
    assert s["caches"]["kd@vs-cache"]["cache_dir"] == str(cache)
    assert "kd@vs-cache − kd" in (tmp_path / "cmp" / "compare.md").read_text()
    bad = CliRunner().invoke(cli, args[:-len(DISTILL) * 2 - 2] + ["--vs-cache", str(tmp_path)])
    assert bad.exit_code != 0 and "no manifest.json" in bad.output


def test_auto_backend_picks_hf_for_a_sampled_support():
    from ddk.stages.teacher_cache import resolve_backend

    assert resolve_backend("auto", "sampled") == "hf"
    assert resolve_backend("hf", "topk") == "hf"
