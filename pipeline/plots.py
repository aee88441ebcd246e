"""The plots the paper shows (arXiv 2407.16154), plus the domain weights r_t over steps.

* `plot_domain_weights`: the sampling weights r_t per domain over training steps.
* `plot_domain_ppl`: grouped bars of perplexity per domain (the paper's Fig. 1), one bar
  per column (teacher, student, cpt, kd, ddk, ...), optionally with error bars (e.g. the
  standard deviation over seeds).
* `plot_ppl_ratio`: the student/teacher perplexity ratio lS/lT per domain over training
  (the paper's Fig. 3), one panel per run (e.g. "ddk" beside "ddk w/o FS").

Inputs are plain Python data (lists / dicts of floats). Each function writes one PNG
atomically (`pipeline/atomic.py`) and returns its Path.

Rendering uses `matplotlib.figure.Figure` with `FigureCanvasAgg` directly, never pyplot:
no global figure registry, and the backend a caller chose stays as it was.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from .atomic import atomic_path

__all__ = [
    "column_color",
    "domain_color",
    "format_value",
    "plot_domain_weights",
    "plot_domain_ppl",
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

# Column names the pipeline uses; each gets a fixed color (teacher always dark grey,
# the students / training modes distinct hues). Unknown names fall back to a stable hash.
_KNOWN_COLUMN_COLORS = {
    "teacher": "#4d4d4d",
    "student": "#1f77b4",
    "student before": "#aec7e8",
    "student after": "#1f77b4",
    "cpt": "#ff7f0e",
    "kd": "#2ca02c",
    "ddk": "#d62728",
    "ddk w/o fs": "#9467bd",
    "ddk-no-smoothing": "#9467bd",
    "uniform": "#8c564b",
    "proportional": "#e377c2",
}
_FALLBACK = _PALETTE + _EXTRA


def _stable_index(name: str, n: int) -> int:
    # zlib.crc32 rather than hash(): str hashes are salted per process.
    return zlib.crc32(name.encode("utf-8")) % n


def column_color(name: str) -> str:
    """The color of a bar column / run label; the same name always gets the same color.

    Known names (teacher, student, student before/after, cpt, kd, ddk, ...) have fixed
    colors, matched case-insensitively; any other name gets a palette entry by stable hash.
    """
    key = " ".join(str(name).strip().lower().split())
    if key in _KNOWN_COLUMN_COLORS:
        return _KNOWN_COLUMN_COLORS[key]
    return _FALLBACK[_stable_index(key, len(_FALLBACK))]


def domain_color(index: int) -> str:
    """The color of the index-th domain (the same in every panel and every plot)."""
    return _FALLBACK[index % len(_FALLBACK)]


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


def _legend_outside(ax, fig: Figure, handles=None, labels=None, title=None):
    """Legend to the right of the axes (bbox_inches='tight' keeps it in the image)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                     borderaxespad=0.0, fontsize="small", title=title, title_fontsize="small",
                     frameon=False)


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

    handles = []  # one legend entry per column, also for a column that is all n/a
    for k, (orig, cname) in enumerate(zip(columns, col_names)):
        color = column_color(cname)
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
        handles.append(Patch(facecolor=color, edgecolor="white", label=cname))
        if hs and any(es):
            below = [min(e, 0.95 * h) if log_scale else e for h, e in zip(hs, es)]
            ax.bar(xs, hs, width=bar_w * 0.92, color=color, edgecolor="white", linewidth=0.5,
                   yerr=[below, es], error_kw={"ecolor": "#222222", "elinewidth": 0.9, "capsize": 2.0})
            # bar_label would put the value on the error bar; put it above the bar's top.
            for x, h, e in zip(xs, hs, es):
                ax.annotate(format_value(h), (x, h + e), xytext=(0, 1.5), textcoords="offset points",
                            ha="center", va="bottom", fontsize=label_size, rotation=90 if n_col > 4 else 0)
        elif hs:
            bars = ax.bar(xs, hs, width=bar_w * 0.92, color=color, edgecolor="white", linewidth=0.5)
            ax.bar_label(bars, labels=[format_value(h) for h in hs], fontsize=label_size,
                         padding=1.5, rotation=90 if n_col > 4 else 0)
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
    _legend_outside(ax, fig, handles=handles, labels=[h.get_label() for h in handles])
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
            ax.plot(xs, ys, color=domain_color(j), lw=1.8, marker="o" if len(xs) <= 30 else None,
                    ms=3.5, label=dom)
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
