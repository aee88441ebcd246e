"""`ddk compare`: five modes from one cache, one table, reruns reuse finished modes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ddk.stages.cli import main as cli


def test_compare_runs_every_mode_once_and_tabulates(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    out = tmp_path / "cmp"
    args = ["compare", "--config", cfg.source_path, "--out", str(out), "--set", "distill.steps=4",
            "--set", "distill.batch_rows=4", "--set", "distill.interval=2", "--set", f"distill.out_dir={json.dumps(str(tmp_path / 'unused'))}"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    s = json.loads((out / "compare.json").read_text())
    assert list(s["modes"]) == ["cpt", "kd", "ddk", "ddk-no-smoothing", "ddk-equal-sampling"]
    assert {r["tokens"] for r in s["modes"].values()} == {4 * 4 * 32}  # same token budget for every mode
    for mode in s["modes"].values():
        assert set(mode["ppl"]) == set(s["domains"]) and mode["worst_ppl_ratio"] >= min(
            mode["ppl"][d] / s["teacher_ppl"][d] for d in s["domains"])
    md = (out / "compare.md").read_text()
    assert "| teacher |" in md and "ddk-equal-sampling" in md and "Order by mean PPL" in md
    assert (out / "compare_ppl.png").exists() and (out / "compare_ratio.png").exists()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and again.output.count("reusing its results") == 5
    bad = CliRunner().invoke(cli, args[:5] + ["--modes", "cpt,online"])
    assert bad.exit_code == 1 and "unknown modes ['online']" in bad.output
