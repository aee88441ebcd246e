"""The paper's comparison from one cache: cpt, kd, ddk and DDK's two ablations.

Every mode trains the same student with the same seed, token budget and hyper-parameters
(the config's [distill] section); only the mode switches differ. Runs live in
`<out>/<mode>/` and are reused (or resumed) when `make compare` is re-run. The results
table (Markdown + JSON) lists per-domain validation PPL, the mean, the worst domain's
PPL ratio to the teacher and training tokens/s per mode; two PNGs show the modes per
domain (the paper's Fig. 1) and lS/lT over training for DDK vs w/o FS (its Fig. 3).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from ..pipeline.atomic import write_json_atomic, write_text_atomic
from ..pipeline.checkpoint import latest_checkpoint
from ..pipeline.config import ConfigError, load_config
from ..pipeline.evaluate import perplexity
from .distill import distill, read_metrics, run_label

# (label, config overrides): one tool, five switches.
MODES: list[tuple[str, list[str]]] = [
    ("cpt", ["distill.mode=cpt"]),
    ("kd", ["distill.mode=kd"]),
    ("ddk", ["distill.mode=ddk"]),
    ("ddk-no-smoothing", ["distill.mode=ddk", "distill.no_smoothing=true"]),
    ("ddk-equal-sampling", ["distill.mode=ddk", "distill.equal_sampling=true"]),
]


def _run_mode(config_path, overrides: list[str], label: str, extra: list[str], out: Path, log) -> dict:
    run_dir = out / label
    cfg = load_config(config_path, [*overrides, *extra, f"distill.out_dir={json.dumps(str(run_dir))}"])
    assert run_label(cfg) == label
    results_path = run_dir / "results.json"
    if results_path.exists():
        done = json.loads(results_path.read_text())
        if done["config"] == json.loads(json.dumps(asdict(cfg.distill))):  # as results.json stores it
            log(f"[{label}] finished earlier in {run_dir}; reusing its results")
            return done
        raise ConfigError(f"{run_dir} holds a finished run with another [distill] config; delete it or pass another --out")
    return distill(cfg, resume=latest_checkpoint(run_dir) is not None, log=log)


def compare(config_path, overrides: list[str], out: Path, modes: list[str] | None = None, log=print) -> dict:
    wanted = [m for m in MODES if modes is None or m[0] in modes]
    unknown = set(modes or []) - {m[0] for m in MODES}
    if unknown:
        raise ConfigError(f"unknown modes {sorted(unknown)}; choose from {[m[0] for m in MODES]}")
    out.mkdir(parents=True, exist_ok=True)
    runs = {label: _run_mode(config_path, list(overrides), label, extra, out, log) for label, extra in wanted}
    summary = summarize(runs, out)
    write_json_atomic(out / "compare.json", summary)
    write_text_atomic(out / "compare.md", markdown(summary))
    summary["plots"] = [str(p) for p in plot(summary, runs, out)]
    log(markdown(summary))
    log(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {', '.join(summary['plots'])}")
    return summary


def summarize(runs: dict[str, dict], out: Path) -> dict:
    first = next(iter(runs.values()))
    domains = first["domains"]
    teacher = {d: perplexity(first["teacher_loss"][d]) for d in domains}
    rows = {}
    for label, r in runs.items():
        ppl = {d: perplexity(r["student_after_loss"][d]) for d in domains}
        ratio = {d: ppl[d] / teacher[d] for d in domains}
        worst = max(ratio, key=ratio.get)
        speeds = [m["tokens_per_s"] for m in read_metrics(out / label, "train")][5:]  # skip warm-up steps
        rows[label] = {
            "ppl": ppl,
            "mean_ppl": statistics.fmean(ppl.values()),
            "worst_domain": worst,
            "worst_ppl_ratio": ratio[worst],
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "tokens": r["tokens"],
        }
    before = {d: perplexity(first["student_before_loss"][d]) for d in domains}
    return {"domains": domains, "teacher_ppl": teacher, "student_before_ppl": before, "modes": rows,
            "steps": first["steps"], "tokens": first["tokens"], "interval": first["interval"]}


def markdown(s: dict) -> str:
    domains = s["domains"]
    head = "| mode | " + " | ".join(domains) + " | mean PPL | worst PPL / teacher | train tokens/s |"
    lines = [f"Validation perplexity per domain after {s['steps']} steps ({s['tokens']:,} tokens, K = {s['interval']}).", "",
             head, "|" + "---|" * (len(domains) + 4)]

    def row(name, ppl, extra):
        return f"| {name} | " + " | ".join(f"{ppl[d]:.2f}" for d in domains) + f" | {statistics.fmean(ppl.values()):.2f} | {extra}"

    lines.append(row("teacher", s["teacher_ppl"], "1.00 | |"))
    lines.append(row("student before", s["student_before_ppl"], "| |"))
    best = min(s["modes"], key=lambda m: s["modes"][m]["mean_ppl"])
    for label, r in s["modes"].items():
        tok = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a"
        name = f"**{label}**" if label == best else label
        lines.append(row(name, r["ppl"], f"{r['worst_ppl_ratio']:.3f} ({r['worst_domain']}) | {tok} |"))
    lines.append("")
    lines.append(f"Lowest mean PPL: {best}. Order by mean PPL: " + " < ".join(sorted(s["modes"], key=lambda m: s["modes"][m]["mean_ppl"])) + ".")
    return "\n".join(lines)


def plot(summary: dict, runs: dict, out: Path) -> list[Path]:
    from ..pipeline import plots

    domains = summary["domains"]
    columns = {"teacher": summary["teacher_ppl"], **{label: r["ppl"] for label, r in summary["modes"].items()}}
    paths = [plots.plot_domain_ppl(columns, out / "compare_ppl.png", title="Validation perplexity per domain by mode")]
    series = {}
    for label in ("ddk", "ddk-no-smoothing"):
        evals = read_metrics(out / label, "eval") if label in runs else []
        if evals:
            series[label] = ([e["tokens"] for e in evals], [[e["ratio"][d] for d in domains] for e in evals])
    if series:
        paths.append(plots.plot_ppl_ratio(series, domains, out / "compare_ratio.png"))
    return paths
