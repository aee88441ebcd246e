"""The plots the paper shows (arXiv 2407.16154), plus the domain weights r_t over steps.

* `plot_domain_weights`: the sampling weights r_t per domain over training steps.
* `plot_domain_ppl`: grouped bars of perplexity per domain (the paper's Fig. 1), one bar
  per column (teacher, student, cpt, kd, ddk, ...), optionally with error bars (e.g. the
  standard deviation over seeds).
* `plot_ppl_ratio`: the student/teacher perplexity ratio lS/lT per domain over training
  (the paper's Fig. 3), one panel per run (e.g. "ddk" beside "ddk w/o FS").

Every column / run label gets a `ModeStyle` (`mode_styles`): a colour from a fixed order
of 12 clearly distinct colours, a marker and a bar hatch, all three distinct among the
labels of one plot (any number of them: past 12 the colours repeat, the (colour, marker)
and (colour, hatch) pairs do not), and the same for a label in every plot: the pipeline's
own labels (teacher, student before/after, cpt, kd, ddk and every compare mode) have fixed
slots; any other label takes a slot by a stable hash of its name, the next free one on a
clash (labels taken in sorted order, so the result depends on the set of labels only).

Inputs are plain Python data (lists / dicts of floats). Each function writes one PNG
atomically (`pipeline/atomic.py`) and returns its Path.

Rendering uses `matplotlib.figure.Figure` with `FigureCanvasAgg` directly, never pyplot:
no global figure registry, and the backend a caller chose stays as it was.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from .atomic import atomic_path

__all__ = [
    "ModeStyle",
    "column_color",
    "domain_color",
    "domain_marker",
    "format_value",
    "mode_style",
    "mode_styles",
    "plot_domain_weights",
    "plot_domain_ppl",
    "plot_mix_fit",
    "plot_mix_frontier",
    "plot_ppl_ratio",
]

DPI = 120
PANEL_SIZE = (8.0, 4.5)  # inches, per panel

# Colors: the "tab10"/"tab20" hex values, fixed here so they never depend on rcParams.
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
_EXTRA = (
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)

_FALLBACK = _PALETTE + _EXTRA

# Modes / columns: 12 colours distinct at a glance (tab10 without its grey, then black,
# yellow and sky blue), one order for every plot; 12 markers and 12 bar hatches beside them.
MODE_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#bcbd22", "#17becf", "#000000", "#ffd92f", "#7fb2e6",
)
MODE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", "*", ">", "h", "p")
MODE_HATCHES = ("", "//", "\\\\", "xx", "..", "--", "||", "++", "oo", "**", "-\\\\", "|//")
MODE_LINESTYLES = ("-", "--", "-.", ":")
TEACHER_COLOR = "#4d4d4d"  # dark grey, outside the 12: the reference every mode is measured against

# The pipeline's own labels and their slots: each keeps its colour, marker and hatch in
# every plot (compare's modes: stages/compare.py MODES + VARIANTS; student before and the
# 11 modes are 12 slots). The student after training (distill's plot, beside teacher and
# student before only) shares ddk-log-ratio-t0.3's slot: blue, the student before sky blue.
_KNOWN_SLOTS = {
    "student after": 0, "student": 0, "ddk-log-ratio-t0.3": 0,
    "cpt": 1, "kd": 2, "ddk": 3, "ddk-no-smoothing": 4, "ddk w/o fs": 4, "ddk-equal-sampling": 5,
    "ddk-guarded": 6, "ddk-prior-tilt": 7, "ddk-progress": 8, "ddk-gap-progress": 9,
    "ddk-log-ratio-t0.1": 10, "student before": 11, "kd-fitted": 12, "kd-fitted-worst": 13,
}
_N_SLOTS = len(MODE_COLORS) * len(MODE_MARKERS)


@dataclass(frozen=True)
class ModeStyle:
    """How one column / run label is drawn: `color` (bars, lines), `marker` (points,
    the mark on a bar's top), `hatch` (bar fill pattern), `linestyle` (lines)."""

    color: str
    marker: str
    hatch: str
    linestyle: str


def _key(name) -> str:
    return " ".join(str(name).strip().lower().split())


def _stable_index(name: str, n: int) -> int:
    # zlib.crc32 rather than hash(): str hashes are salted per process.
    return zlib.crc32(name.encode("utf-8")) % n


def _slot_style(k: int) -> ModeStyle:
    """Slot k: colour k mod 12, marker and hatch shifted by one every round of 12, so
    (colour, marker) and (colour, hatch) stay distinct over all 144 slots."""
    c, m = len(MODE_COLORS), len(MODE_MARKERS)
    j = (k + k // c) % m
    return ModeStyle(MODE_COLORS[k % c], MODE_MARKERS[j], MODE_HATCHES[j % len(MODE_HATCHES)],
                     MODE_LINESTYLES[(k // c) % len(MODE_LINESTYLES)])


def _teacher_style() -> ModeStyle:
    return ModeStyle(TEACHER_COLOR, "d", "", "--")


def mode_styles(names) -> dict[str, ModeStyle]:
    """The style of each label in one plot (keys: the labels as given; "teacher" is always
    dark grey). Known labels (matched case-insensitively) first, in slot order, then the
    others in sorted order; each takes its slot (known: fixed; other: a stable hash of the
    name), or on a clash the next slot whose colour no label here has yet, or when all 12
    colours are taken the next free slot. So: distinct colours for up to 12 labels besides
    the teacher, distinct (colour, marker) and (colour, hatch) pairs for up to 144."""
    names = list(dict.fromkeys(str(n) for n in names))
    keys = {_key(n) for n in names} - {"teacher"}
    known = sorted((k for k in keys if k in _KNOWN_SLOTS), key=lambda k: (_KNOWN_SLOTS[k], k))
    other = sorted(keys - set(known))
    c = len(MODE_COLORS)
    slot: dict[str, int] = {}
    for key in known + other:
        want = _KNOWN_SLOTS[key] if key in _KNOWN_SLOTS else _stable_index(key, c)
        used_colors = {u % c for u in slot.values()}
        used = set(slot.values())
        # the first round (12 colours, 12 markers) from `want` on, then the other rounds
        ring = [(want + i) % c for i in range(c)] + [c + (want + i) % (_N_SLOTS - c) for i in range(_N_SLOTS - c)]
        fresh = [k for k in ring if k % c not in used_colors and k not in used]
        # past 144 labels the pairs repeat (slot k draws like slot k mod 144)
        slot[key] = fresh[0] if fresh else next(k for k in itertools.count(want) if k not in used)
    return {n: _teacher_style() if _key(n) == "teacher" else _slot_style(slot[_key(n)]) for n in names}


def mode_style(name) -> ModeStyle:
    """The style `name` gets when drawn alone (a known label: in every plot)."""
    return mode_styles([name])[str(name)]


def column_color(name: str) -> str:
    """The color of a bar column / run label; the same name always gets the same color.

    Known names (teacher, student before/after, cpt, kd, ddk and every compare mode) have
    fixed colors, matched case-insensitively; any other name gets one by stable hash
    (`mode_styles` keeps several of them apart within one plot).
    """
    return mode_style(name).color


def domain_color(index: int) -> str:
    """The color of the index-th domain (the same in every panel and every plot)."""
    return _FALLBACK[index % len(_FALLBACK)]


def domain_marker(index: int) -> str:
    """The marker of the index-th domain: with its colour, tells domains 10 apart (whose
    tab20 colours are the light twins of the first ten)."""
    return MODE_MARKERS[index % len(MODE_MARKERS)]


def _ink(color: str) -> str:
    """Black or white, whichever reads better on `color` (hatch lines, marker edges)."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return "#ffffff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "#222222"


def format_value(v: float) -> str:
    """A short label for a value: 3 significant digits, k/M suffixes, 'n/a' if not finite."""
    if v is None or not math.isfinite(v):
        return "n/a"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


# -----------------------------------------------------------------------------
# helpers


def _as_float(v) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _error_length(errors, column, domain) -> float:
    """The error bar half-length of one bar: 0 where none is given or it is not finite."""
    e = abs(_as_float(((errors or {}).get(column) or {}).get(domain, 0.0)))
    return e if math.isfinite(e) else 0.0


def _new_figure(n_panels: int = 1, sharey: bool = False, extra_width: float = 0.0):
    w, h = PANEL_SIZE
    fig = Figure(figsize=(w * n_panels + extra_width, h), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path) -> Path:
    """Write `fig` to `path` atomically; return the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".tmp.png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    return path


def _legend_outside(ax, fig: Figure, handles=None, labels=None, title=None, handler_map=None):
    """Legend to the right of the axes (bbox_inches='tight' keeps it in the image)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                     borderaxespad=0.0, fontsize="small", title=title, title_fontsize="small",
                     frameon=False, handler_map=handler_map)


# -----------------------------------------------------------------------------
# r_t over steps


def plot_domain_weights(steps: list[int], weights: list[list[float]], domains: list[str], path,
                        title: str = "Domain sampling weights $r_t$") -> Path:
    """Step plot of the sampling weight of each domain over training steps.

    `weights[i][j]` is the weight of domain j from `steps[i]` until the next step (weights
    are piecewise constant over an interval). A dashed line marks uniform 1/N.
    """
    steps = list(steps or [])
    weights = [list(w) for w in (weights or [])]
    domains = [str(d) for d in (domains or [])]
    if not steps or not weights:
        raise ValueError("plot_domain_weights: no steps/weights to plot (empty input)")
    if not domains:
        raise ValueError("plot_domain_weights: empty domain list")
    if len(steps) != len(weights):
        raise ValueError(f"plot_domain_weights: {len(steps)} steps but {len(weights)} weight rows")
    for i, row in enumerate(weights):
        if len(row) != len(domains):
            raise ValueError(f"plot_domain_weights: weights[{i}] has {len(row)} values for "
                             f"{len(domains)} domains")

    order = sorted(range(len(steps)), key=lambda i: steps[i])
    xs = [float(steps[i]) for i in order]
    rows = [[_as_float(v) for v in weights[i]] for i in order]
    # A step plot needs an end for the last interval: extend by the median interval (or 1).
    gaps = sorted(b - a for a, b in zip(xs, xs[1:]) if b > a)
    last_len = gaps[len(gaps) // 2] if gaps else 1.0
    xs_ext = xs + [xs[-1] + last_len]

    fig, (ax,) = _new_figure(1)
    n = len(domains)
    for j, dom in enumerate(domains):
        ys = [r[j] for r in rows]
        ys_ext = ys + [ys[-1]]
        # NaN/inf points break the line there (matplotlib skips non-finite values).
        ys_ext = [y if math.isfinite(y) else math.nan for y in ys_ext]
        ax.step(xs_ext, ys_ext, where="post", color=domain_color(j), lw=1.8, label=dom)
        if len(xs) == 1 and math.isfinite(ys[0]):
            ax.plot(xs[:1], ys[:1], "o", color=domain_color(j), ms=4)
    ax.axhline(1.0 / n, color="#555555", ls="--", lw=1.0, label=f"uniform 1/N = {1.0 / n:.3g}")
    # 0..1, with a sliver above so a weight of exactly 1.0 is not hidden by the frame.
    ax.set_ylim(0.0, 1.025)
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlim(xs_ext[0], xs_ext[-1])
    if all(float(x).is_integer() for x in xs_ext):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("sampling weight")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax, fig, title="domain")
    fig.tight_layout()
    return _save(fig, path)


# -----------------------------------------------------------------------------
# per-domain perplexity bars (Fig. 1)


def plot_domain_ppl(columns: dict[str, dict[str, float]], path,
                    title: str = "Validation perplexity per domain",
                    log_scale: bool | None = None,
                    errors: dict[str, dict[str, float]] | None = None) -> Path:
    """Grouped bars: one group per domain, one bar per column (teacher, student, cpt, ...).

    Domains are taken in first-seen order over the columns. Missing or non-finite values
    get no bar, only an "n/a" mark. The y axis is logarithmic when max/min > 20 (over
    positive finite values) unless `log_scale` says otherwise. `errors[column][domain]`,
    where given and finite, is drawn as a symmetric error bar of that half-length (its
    lower end kept above 0 on a log axis); the value label then sits above the bar's top.
    """
    if not columns:
        raise ValueError("plot_domain_ppl: no columns to plot (empty input)")
    col_names = [str(c) for c in columns]
    domains: list[str] = []
    for vals in columns.values():
        for d in (vals or {}):
            if d not in domains:
                domains.append(d)
    if not domains:
        raise ValueError("plot_domain_ppl: no domains in any column (empty input)")

    table = {c: {d: _as_float((columns[c] or {}).get(d)) for d in domains}
             for c in columns}
    spread = {c: {d: _error_length(errors, c, d) for d in domains} for c in columns}
    finite = [v for col in table.values() for v in col.values() if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    if log_scale is None:
        log_scale = bool(positive) and min(positive) > 0 and max(positive) / min(positive) > 20
    if log_scale and not positive:
        log_scale = False

    n_dom, n_col = len(domains), len(col_names)
    extra = max(0.0, 0.35 * n_dom * n_col - PANEL_SIZE[0] + 2.0)
    fig, (ax,) = _new_figure(1, extra_width=min(extra, 16.0))
    group_w = 0.8
    bar_w = group_w / n_col
    label_size = 8 if n_dom * n_col <= 24 else 6.5

    if log_scale:
        lo = min(positive)
        hi = max(v + spread[c][d] for c, col in table.items() for d, v in col.items() if math.isfinite(v) and v > 0)
        ymin = 10 ** math.floor(math.log10(lo) - 0.05)
        ymax = hi * 1.8
        na_y = ymin * (hi / ymin) ** 0.03 if hi > ymin else ymin * 1.1
    else:
        hi = max(v + spread[c][d] for c, col in table.items() for d, v in col.items() if math.isfinite(v)) if finite else 1.0
        lo = min(min(finite), 0.0) if finite else 0.0
        ymin = lo * 1.1 if lo < 0 else 0.0
        ymax = hi * 1.15 if hi > 0 else 1.0
        na_y = ymin + 0.02 * (ymax - ymin)

    handles, labels = [], []  # one legend entry per column, also for a column that is all n/a
    styles = mode_styles(col_names)
    for k, (orig, cname) in enumerate(zip(columns, col_names)):
        style = styles[cname]
        color = style.color
        bar_kw = {"width": bar_w * 0.92, "color": color, "edgecolor": "white", "linewidth": 0.5,
                  "hatch": style.hatch or None, "hatchcolor": _ink(color)}
        xs, hs, es, na_xs = [], [], [], []
        for i, d in enumerate(domains):
            x = i - group_w / 2 + bar_w * (k + 0.5)
            v = table[orig][d]
            if math.isfinite(v) and (v > 0 or not log_scale):
                xs.append(x)
                hs.append(v)
                es.append(spread[orig][d])
            else:
                na_xs.append(x)
        # the legend entry: the bar's colour and hatch with the column's marker on it
        handles.append((Patch(facecolor=color, edgecolor="white", hatch=style.hatch or None, hatchcolor=_ink(color)),
                        Line2D([], [], ls="none", marker=style.marker, ms=6, color=color, mec=_ink(color), mew=0.8)))
        labels.append(cname)
        if hs and any(es):
            below = [min(e, 0.95 * h) if log_scale else e for h, e in zip(hs, es)]
            ax.bar(xs, hs, yerr=[below, es], error_kw={"ecolor": "#222222", "elinewidth": 0.9, "capsize": 2.0}, **bar_kw)
            # bar_label would put the value on the error bar; put it above the bar's top.
            for x, h, e in zip(xs, hs, es):
                ax.annotate(format_value(h), (x, h + e), xytext=(0, 1.5), textcoords="offset points",
                            ha="center", va="bottom", fontsize=label_size, rotation=90 if n_col > 4 else 0)
        elif hs:
            bars = ax.bar(xs, hs, **bar_kw)
            ax.bar_label(bars, labels=[format_value(h) for h in hs], fontsize=label_size,
                         padding=5.0, rotation=90 if n_col > 4 else 0)
        if hs:  # the column's marker on each bar's top: tells columns apart beyond colour
            ax.plot(xs, hs, ls="none", marker=style.marker, ms=5, color=color, mec=_ink(color), mew=0.7, zorder=3)
        for x in na_xs:
            ax.text(x, na_y, "n/a", ha="center", va="bottom", fontsize=label_size,
                    color=color, rotation=90, fontweight="bold")

    if log_scale:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    # Room above the tallest bar for its (possibly rotated) value label.
    if n_col > 4:
        ymax = ymax * (1.8 if log_scale else 1.1)
    ax.set_ylim(ymin, ymax)
    ax.set_xticks(range(n_dom))
    ax.set_xticklabels(domains, rotation=0 if n_dom <= 8 else 30,
                       ha="center" if n_dom <= 8 else "right")
    ax.set_xlim(-0.6, n_dom - 0.4)
    ax.set_ylabel("perplexity" + (" (log scale)" if log_scale else ""))
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _legend_outside(ax, fig, handles=handles, labels=labels, handler_map={tuple: HandlerTuple(ndivide=None)})
    fig.tight_layout()
    return _save(fig, path)


# -----------------------------------------------------------------------------
# lS/lT per domain over training (Fig. 3)


def plot_ppl_ratio(series: dict[str, tuple[list[float], list[list[float]]]], domains: list[str], path,
                   x_label: str = "training tokens",
                   title: str = r"Student/teacher perplexity ratio $\ell_S/\ell_T$ per domain") -> Path:
    """One panel per run (side by side, shared y): the ratio lS/lT of each domain over x.

    `series[run] = (x, ratio)` with `ratio[i][j]` the ratio of domain j at x[i]. Each
    domain keeps its color in every panel; a horizontal line marks 1.0 (student = teacher).
    Non-finite ratios are skipped (the line breaks there).
    """
    if not series:
        raise ValueError("plot_ppl_ratio: no runs to plot (empty series)")
    domains = [str(d) for d in (domains or [])]
    if not domains:
        raise ValueError("plot_ppl_ratio: empty domain list")
    runs = []
    for label, item in series.items():
        try:
            xs, ratio = item
        except (TypeError, ValueError):
            raise ValueError(f"plot_ppl_ratio: series[{label!r}] must be (x values, ratio rows)") from None
        xs = [_as_float(x) for x in (xs or [])]
        ratio = [list(r) for r in (ratio or [])]
        if not xs or not ratio:
            raise ValueError(f"plot_ppl_ratio: series[{label!r}] is empty")
        if len(xs) != len(ratio):
            raise ValueError(f"plot_ppl_ratio: series[{label!r}] has {len(xs)} x values but "
                             f"{len(ratio)} ratio rows")
        for i, row in enumerate(ratio):
            if len(row) != len(domains):
                raise ValueError(f"plot_ppl_ratio: series[{label!r}] row {i} has {len(row)} values "
                                 f"for {len(domains)} domains")
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        runs.append((str(label), [xs[i] for i in order],
                     [[_as_float(v) for v in ratio[i]] for i in order]))

    n = len(runs)
    fig, axes = _new_figure(n, sharey=True)
    if n > 1:  # narrower panels when side by side, still readable
        fig.set_size_inches(max(PANEL_SIZE[0], 5.0 * n), PANEL_SIZE[1])
    all_vals = []
    for ax, (label, xs, rows) in zip(axes, runs):
        for j, dom in enumerate(domains):
            ys = [r[j] if math.isfinite(r[j]) else math.nan for r in rows]
            all_vals += [y for y in ys if math.isfinite(y)]
            ax.plot(xs, ys, color=domain_color(j), lw=1.8, marker=domain_marker(j) if len(xs) <= 30 else None,
                    ms=4, label=dom)
        ax.axhline(1.0, color="#555555", ls="--", lw=1.0, label=r"$\ell_S = \ell_T$")
        ax.set_title(label)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v)))
        # x range from all x values (also those whose ratios are all n/a).
        fx = [x for x in xs if math.isfinite(x)]
        if fx:
            x0, x1 = min(fx), max(fx)
            pad = 0.04 * (x1 - x0) if x1 > x0 else max(1.0, 0.1 * abs(x0))
            ax.set_xlim(x0 - pad, x1 + pad)
            if all(float(x).is_integer() for x in fx):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lo = min(all_vals + [1.0])
    hi = max(all_vals + [1.0])
    pad = 0.08 * (hi - lo) if hi > lo else 0.1
    axes[0].set_ylim(lo - pad, hi + pad)
    axes[0].set_ylabel(r"$\ell_S\,/\,\ell_T$")
    if n > 1:
        fig.suptitle(title)
    else:
        axes[0].set_title(f"{title}\n{runs[0][0]}" if runs[0][0] else title)
    _legend_outside(axes[-1], fig, title="domain")
    fig.tight_layout()
    return _save(fig, path)


# -----------------------------------------------------------------------------
# a domain's loss against its share of the data (ddk fit-mix)


def plot_mix_fit(domains: list[str], points: dict[str, tuple[list[list[float]], list[list[float]]]],
                 a: list[float], b: list[float], mix: list[float], path,
                 title: str = "Validation CE against the domain's mean share") -> Path:
    """One panel per domain: every run as a point (x: the domain's mean share, log axis;
    y: its final validation CE), marked by mode (`points[mode] = (shares [runs][N], ce
    [runs][N])`), the fitted line a_i - b_i log s, and the fitted mix's share (dotted)."""
    domains = [str(d) for d in domains]
    if not domains or not points:
        raise ValueError("plot_mix_fit: no domains or no runs to plot")
    styles = mode_styles(points)
    cols = min(3, len(domains))
    rows = math.ceil(len(domains) / cols)
    w, h = PANEL_SIZE
    fig = Figure(figsize=(w * 0.75 * cols + 1.8, h * 0.8 * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [grid[r][c] for r in range(rows) for c in range(cols)]
    for ax in axes[len(domains):]:
        ax.set_visible(False)
    for i, (ax, dom) in enumerate(zip(axes, domains)):
        seen = [s[i] for shares, _ in points.values() for s in shares]
        lo, hi = min(seen + [mix[i]]) / 1.1, max(seen + [mix[i]]) * 1.1
        xs = [lo * (hi / lo) ** (t / 40) for t in range(41)]
        ax.plot(xs, [a[i] - b[i] * math.log(x) for x in xs], color="#555555", lw=1.2,
                label="fit $a - b \\log s$" if i == 0 else None)
        for mode, (shares, ce) in points.items():
            st = styles[mode]
            ax.plot([s[i] for s in shares], [c[i] for c in ce], st.marker, color=st.color, ms=5, ls="none",
                    label=mode if i == 0 else None)
        ax.axvline(mix[i], color="#555555", ls=":", lw=1.2, label="fitted mix" if i == 0 else None)
        ax.set_xscale("log")
        ax.set_xticks([lo * (hi / lo) ** t for t in (0.1, 0.5, 0.9)])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{dom}: b = {b[i]:.2f}", fontsize="medium")
        ax.set_xlabel("mean share of rows", fontsize="small")
        if i % cols == 0:
            ax.set_ylabel("validation CE (nats)", fontsize="small")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    _legend_outside(axes[cols - 1], fig, *axes[0].get_legend_handles_labels(), title="run")
    fig.tight_layout()
    return _save(fig, path)


def plot_mix_frontier(curve: list[tuple[float, float]], observed: dict[str, tuple[float, float]],
                      mix: tuple[float, float], path, bound: float | None = None,
                      title: str = "What the worst domain costs the mean (the fit, validation)") -> Path:
    """The fitted domain-mean CE of the best mix under a bound on the worst domain's
    student/teacher PPL ratio (`curve`: (ratio, mean CE) pairs, mix_fit.frontier), each
    mode's runs where they ended (`observed[mode] = (worst ratio, mean CE)`, mean over
    seeds), the mix that was written (`mix`), and the bound asked for (dashed). The line
    and the star are the fit's predictions, the mode markers measurements: a run off the
    line is the fit's residual (docs/evidence.md has them per mode)."""
    if not curve:
        raise ValueError("plot_mix_frontier: no frontier points")
    fig, (ax,) = _new_figure(extra_width=1.8)
    styles = mode_styles(observed)
    xs, ys = zip(*sorted(curve))
    ax.plot(xs, ys, color="#555555", lw=1.5, label="best mix under the bound\n(the fit's prediction)")
    for mode, (x, y) in observed.items():
        st = styles[mode]
        ax.plot([x], [y], st.marker, color=st.color, ms=8, ls="none", label=f"{mode} (runs, measured)")
    ax.plot([mix[0]], [mix[1]], "*", color="black", ms=13, ls="none", label="the mix written (predicted)")
    if bound is not None:
        ax.axvline(bound, color="#555555", ls="--", lw=1.0, label=f"bound {bound:.3f}")
    ax.set_xlabel("worst domain's student/teacher PPL ratio (validation)")
    ax.set_ylabel("domain-mean validation CE (nats)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    _legend_outside(ax, fig)
    fig.tight_layout()
    return _save(fig, path)
