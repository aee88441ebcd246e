"""`ddk cache stats` / `ddk cache export` (pipeline/cache/analysis.py) against the reader
and the manifest, on the shared tiny top-k cache."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from click.testing import CliRunner

from ddk.pipeline.cache.analysis import cache_stats, decoded_frame
from ddk.pipeline.cache.reader import TopKCacheReader
from ddk.stages.cli import main as cli


def test_stats_match_the_reader_and_the_manifest(tiny_cache):
    cfg, m = tiny_cache
    reader = TopKCacheReader(cfg.cache.out_dir)
    df = cache_stats(cfg.cache.out_dir, support_rows=10_000)  # every row decoded
    assert df.height == 3 * len(m["domains"]) and df["domain"].to_list()[:3] == [reader.domains[0]] * 3
    for r in df.to_dicts():
        keys = [(r["domain"], r["split"], i) for i in range(reader.num_rows(r["domain"], r["split"]))]
        b = reader.batch(keys)
        nll = -b.target_logprob.double().numpy().ravel()
        tail = np.exp(b.tail_logmass.double().numpy().ravel())
        sizes = (b.topk_ids >= 0).sum(-1).numpy().ravel()
        assert r["rows"] == len(keys) and r["positions"] == nll.size
        np.testing.assert_allclose(r["teacher_loss"], nll.mean(), rtol=1e-5)
        np.testing.assert_allclose(r["teacher_loss_q50"], np.quantile(nll, 0.5), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(r["tail_mass_q95"], np.quantile(tail, 0.95), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(r["support_mean"], sizes.mean(), rtol=1e-9)
        if r["split"] != "train":
            np.testing.assert_allclose(r["teacher_loss"], m["domains"][r["domain"]][f"teacher_{r['split']}_loss"], rtol=1e-5)


def test_export_decodes_what_the_reader_reads(tiny_cache, tmp_path):
    cfg, m = tiny_cache
    out = tmp_path / "rows.parquet"
    result = CliRunner().invoke(cli, ["cache", "export", str(cfg.cache.out_dir), "--rows", "3", "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pl.read_parquet(out)
    assert df.height == 3 * len(m["domains"]) and "loss_mask" not in df.columns
    reader = TopKCacheReader(cfg.cache.out_dir)
    first = df.row(0, named=True)
    b = reader.batch([(first["domain"], "val", first["row"])])
    assert first["input_ids"] == b.input_ids[0].tolist()
    assert first["support_ids"][5] == [i for i in b.topk_ids[0, 5].tolist() if i >= 0]
    np.testing.assert_allclose(first["support_logprobs"][5], b.topk_logprobs[0, 5, : len(first["support_ids"][5])].numpy())
    np.testing.assert_allclose(first["target_logprob"], b.target_logprob[0].numpy())
    # a query on the export: the teacher's mean support log-mass per domain
    mass = df.select("domain", pl.col("support_logprobs").list.eval(pl.element().list.eval(pl.element().exp()).list.sum()).alias("m"))
    assert mass.explode("m")["m"].max() <= 1.0 + 1e-5
    assert decoded_frame(cfg.cache.out_dir, [(first["domain"], "val", 0)]).height == 1


def test_stats_cli_table_and_json(tiny_cache):
    cfg, m = tiny_cache
    table = CliRunner().invoke(cli, ["cache", "stats", str(cfg.cache.out_dir), "--support-rows", "4"])
    assert table.exit_code == 0 and all(d in table.output for d in m["domains"]), table.output
    as_json = CliRunner().invoke(cli, ["cache", "stats", str(cfg.cache.out_dir), "--json", "--support-rows", "0"])
    records = json.loads(as_json.output)
    assert len(records) == 3 * len(m["domains"]) and "support_q50" not in records[0] or records[0]["support_q50"] is None
    missing = CliRunner().invoke(cli, ["cache", "stats", "/nonexistent/cache"])
    assert missing.exit_code != 0 and "manifest.json not found" in missing.output
