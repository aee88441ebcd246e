"""ddk.pipeline.plots: each plot writes one valid, non-trivial PNG atomically, without pyplot."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

from ddk.pipeline.plots import (
    MODE_COLORS,
    column_color,
    format_value,
    mode_style,
    mode_styles,
    plot_domain_ppl,
    plot_domain_weights,
    plot_ppl_ratio,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOMAINS = ["web", "code", "math"]


def assert_png(path):
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    flat = img.reshape(-1, img.shape[-1])
    assert not np.all(flat == flat[0]), "image is a single flat color"
    leftovers = [p.name for p in path.parent.iterdir() if ".tmp" in p.name]
    assert not leftovers, leftovers


@pytest.fixture
def fignums():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def test_domain_weights(tmp_path, fignums):
    steps = [0, 10, 20, 30]
    weights = [[1 / 3] * 3, [0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]
    out = plot_domain_weights(steps, weights, DOMAINS, tmp_path / "w.png")
    assert out == tmp_path / "w.png"
    assert_png(out)


def test_domain_weights_single_step_single_domain_nan(tmp_path, fignums):
    assert_png(plot_domain_weights([5], [[1.0]], ["only"], tmp_path / "one.png"))
    out = plot_domain_weights([0, 1, 2], [[0.5, 0.5], [math.nan, 0.5], [0.4, math.inf]],
                              ["a", "b"], tmp_path / "nan.png")
    assert_png(out)


def test_domain_ppl(tmp_path, fignums):
    cols = {
        "teacher": {"web": 12.0, "code": 3.5, "math": 6.0},
        "student before": {"web": 30.0, "code": 15.0, "math": 40.0},
        "student after": {"web": 20.0, "code": 6.0, "math": 12.0},
    }
    assert_png(plot_domain_ppl(cols, tmp_path / "ppl.png"))
    # wide range (auto log); five training modes (forced log); forced linear is below
    wide = {"teacher": {"a": 2.0, "b": 3.0}, "student": {"a": 150.0, "b": 1200.0}}
    assert_png(plot_domain_ppl(wide, tmp_path / "log.png"))
    modes = {m: {d: 10.0 + i + j for j, d in enumerate(DOMAINS)}
             for i, m in enumerate(["teacher", "student", "cpt", "kd", "ddk"])}
    assert_png(plot_domain_ppl(modes, tmp_path / "modes.png", log_scale=True))


def test_domain_ppl_nan_and_missing(tmp_path, fignums):
    cols = {
        "teacher": {"web": 12.0, "code": math.nan, "math": 6.0},
        "kd": {"web": math.inf, "code": 9.0},  # "math" missing
        "ddk": {"web": math.nan, "code": math.nan, "math": math.nan},  # all n/a
    }
    assert_png(plot_domain_ppl(cols, tmp_path / "nan.png"))
    assert_png(plot_domain_ppl({"teacher": {"only": 5.0}}, tmp_path / "one.png"))


def test_ppl_ratio(tmp_path, fignums):
    x = [0.0, 1e6, 2e6, 3e6]
    ddk = [[3.0, 2.0, 1.5], [2.0, 1.6, 1.3], [1.5, 1.3, 1.1], [1.1, 1.05, 1.02]]
    nofs = [[3.0, 2.0, 1.5], [2.6, 1.9, 1.4], [math.nan, 1.8, 1.35], [2.0, math.inf, 1.3]]
    out = plot_ppl_ratio({"ddk": (x, ddk), "ddk w/o FS": (x, nofs)}, DOMAINS, tmp_path / "r.png")
    assert_png(out)
    assert_png(plot_ppl_ratio({"ddk": ([0.0], [[2.0]])}, ["only"], tmp_path / "one.png"))


def test_empty_inputs_raise(tmp_path, fignums):
    with pytest.raises(ValueError, match="empty"):
        plot_domain_weights([], [], DOMAINS, tmp_path / "a.png")
    with pytest.raises(ValueError, match="empty"):
        plot_domain_weights([0], [[]], [], tmp_path / "a.png")
    with pytest.raises(ValueError, match="empty"):
        plot_domain_ppl({}, tmp_path / "b.png")
    with pytest.raises(ValueError, match="empty"):
        plot_domain_ppl({"teacher": {}}, tmp_path / "b.png")
    with pytest.raises(ValueError, match="empty"):
        plot_ppl_ratio({}, DOMAINS, tmp_path / "c.png")
    with pytest.raises(ValueError, match="empty"):
        plot_ppl_ratio({"ddk": ([], [])}, DOMAINS, tmp_path / "c.png")
    with pytest.raises(ValueError, match="domains"):
        plot_domain_weights([0, 1], [[0.5, 0.5], [0.5]], ["a", "b"], tmp_path / "a.png")
    assert not list(tmp_path.iterdir())


def test_column_color_is_stable():
    assert column_color("teacher") == column_color("teacher") == column_color(" Teacher ")
    assert column_color("some-new-run") == column_color("some-new-run")
    known = ["teacher", "student", "cpt", "kd", "ddk"]
    assert len({column_color(c) for c in known}) == len(known)


def test_teacher_color_same_in_two_plots(tmp_path):
    """The teacher's bars get the same pixels' color whatever the other columns are."""
    a = plot_domain_ppl({"teacher": {"x": 5.0}, "kd": {"x": 6.0}}, tmp_path / "a.png", log_scale=False)
    b = plot_domain_ppl({"zzz": {"x": 6.0}, "teacher": {"x": 5.0}}, tmp_path / "b.png", log_scale=False)
    from matplotlib.colors import to_rgb

    target = np.array(to_rgb(column_color("teacher")))
    for p in (a, b):
        img = mpimg.imread(p)[..., :3]
        count = np.all(np.abs(img - target) < 1.5 / 255, axis=-1).sum()
        assert count > 200, f"{p.name}: only {count} teacher-colored pixels"


def test_format_value():
    assert format_value(math.nan) == "n/a"
    assert format_value(math.inf) == "n/a"
    assert format_value(12.345) == "12.3"
    assert format_value(1234.0) == "1234"
    assert format_value(25000.0) == "25k"


# compare's modes beside the teacher and the student before training (stages/compare.py)
COMPARE_MODES = ["cpt", "kd", "ddk", "ddk-no-smoothing", "ddk-equal-sampling", "ddk-log-ratio-t0.1",
                 "ddk-log-ratio-t0.3", "ddk-guarded", "ddk-prior-tilt", "ddk-progress", "ddk-gap-progress"]


def test_twelve_modes_get_distinct_colours_markers_and_hatches():
    for labels in (["student before"] + COMPARE_MODES,              # the pipeline's own 12
                   [f"mode-{i}" for i in range(12)],                # 12 unknown labels
                   COMPARE_MODES[:6] + [f"x{i}@vs-cache" for i in range(6)]):
        styles = mode_styles(["teacher"] + labels)
        got = [styles[m] for m in labels]
        assert len({s.color for s in got}) == 12, labels
        assert len({s.marker for s in got}) == 12, labels
        assert len({(s.color, s.marker) for s in got}) == 12
        assert len({(s.color, s.hatch) for s in got}) == 12
        assert styles["teacher"].color not in {s.color for s in got}
        assert {s.color for s in got} <= set(MODE_COLORS)
        # deterministic: the same labels in another order (or another process) get the same styles
        assert mode_styles(list(reversed(labels)) + ["teacher"]) == styles


def test_mode_styles_known_labels_fixed_and_many_labels_distinct():
    # a known mode looks the same whatever else is in the plot
    alone = mode_style("ddk-guarded")
    assert mode_styles(["kd", "ddk-guarded"])["ddk-guarded"] == alone
    assert mode_styles(["ddk-guarded"] + [f"m{i}" for i in range(8)])["ddk-guarded"] == alone
    assert column_color("DDK-Guarded") == alone.color
    # the modes that used to share a colour by hash (ES, guarded, progress; prior-tilt vs cpt)
    clash = ["cpt", "ddk-equal-sampling", "ddk-guarded", "ddk-prior-tilt", "ddk-progress"]
    assert len({column_color(m) for m in clash}) == len(clash)
    # two labels that share a slot (they never meet in the pipeline's plots) are told apart
    both = mode_styles(["ddk-log-ratio-t0.3", "student after"])
    assert both["ddk-log-ratio-t0.3"].color != both["student after"].color
    assert both["ddk-log-ratio-t0.3"] == mode_style("ddk-log-ratio-t0.3")
    # past 12 the colours repeat, the (colour, marker) pairs do not (up to 144)
    many = mode_styles([f"run {i}" for i in range(144)])
    assert len({(s.color, s.marker) for s in many.values()}) == 144
    assert len(mode_styles([f"run {i}" for i in range(200)])) == 200


def test_domain_ppl_twelve_modes_every_colour_drawn(tmp_path, fignums):
    """Every mode's colour is in the picture (its bars and its legend entry)."""
    from matplotlib.colors import to_rgb

    labels = ["teacher", "student before"] + COMPARE_MODES
    cols = {m: {d: 10.0 + i + j for j, d in enumerate(DOMAINS)} for i, m in enumerate(labels)}
    errs = {m: {d: 0.3 for d in DOMAINS} for m in COMPARE_MODES}
    out = plot_domain_ppl(cols, tmp_path / "twelve.png", errors=errs, log_scale=False)
    assert_png(out)
    img = mpimg.imread(out)[..., :3]
    styles = mode_styles(labels)
    for m in labels:
        target = np.array(to_rgb(styles[m].color))
        count = np.all(np.abs(img - target) < 1.5 / 255, axis=-1).sum()
        assert count > 100, f"{m}: only {count} pixels of {styles[m].color}"
