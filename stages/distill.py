"""Stage two: the student trains from the teacher cache, domains re-weighted by DDK.

Read `_distill` first: it composes the named steps of `Trainer`. Building the trainer
opens the cache and the student (refusing mismatched tokenizers, and on --resume a
checkpoint made with another config, cache or student), and builds the domain scheduler
and interval sampler for the mode. At the start of every interval of K steps the student
is evaluated per domain on the VALIDATION rows, the scheduler turns student/teacher
perplexities into weights (Eq. 1-2) and the sampler draws the interval's rows
(Algorithm 1). Each optimizer step minimises Eq. 3 (the LM head fused into the loss by
default: pipeline/student.py). Checkpoints make the run resumable; at the end the
student is scored on the held-out TEST rows too (never seen by training or the
scheduler), and results.json, a per-domain table and plots are written.

The same function runs as one rank of a torchrun launch (pipeline/distributed.py holds
the plumbing): every rank evaluates a share of the validation rows and the sums are
reduced, so all ranks compute the same weights and draw the same interval; each rank
trains on its slice of every global micro-batch under DDP or FSDP2; rank 0 alone logs,
writes metrics, plots and checkpoints (full state dicts, resumable on any world size).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..pipeline import distributed
from ..pipeline.atomic import write_json_atomic, write_text_atomic
from ..pipeline.cache.manifest import CacheError
from ..pipeline.cache.prefetch import BatchPrefetcher
from ..pipeline.cache.reader import CacheBatch, TopKCacheReader
from ..pipeline.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from ..pipeline.config import Config, ConfigError
from ..pipeline.distributed import DistEnv
from ..pipeline.evaluate import (cache_teacher_losses, cache_teacher_row_losses, format_table, perplexity, row_weights, split_keys,
                                 token_mean)
from ..pipeline.objective import LossParts, Objective
from ..pipeline.progress import progress
from ..pipeline.run_identity import cache_identity, student_identity
from ..pipeline.scheduler import DomainScheduler, IntervalSampler
from ..pipeline.student import StudentLM, autocast_context, autocast_dtype, build_optimizer, set_activation_checkpointing
from ..pipeline.teachers.identity import tokenizer_difference


class TrainingError(RuntimeError):
    """Training stopped; the message says at which step and which checkpoint is good."""


def scheduler_mode(cfg: Config) -> str:
    d = cfg.distill
    if d.mode == "ddk":
        if d.equal_sampling or d.no_smoothing:
            return "uniform" if d.equal_sampling else "ddk-no-smoothing"
        return "ddk" if d.ddk_rule == "paper" else d.ddk_rule
    if d.mode == "kd" and d.kd_domains in ("uniform", "fixed"):
        return d.kd_domains
    return "proportional"


def run_label(cfg: Config) -> str:
    d = cfg.distill
    if d.mode == "ddk" and d.no_smoothing:
        return "ddk-no-smoothing"
    if d.mode == "ddk" and d.equal_sampling:
        return "ddk-equal-sampling"
    if d.mode == "ddk" and any(getattr(d, k) != v for k, v in ADDED_LATER.items()):
        return "ddk-variant"  # the options beyond the paper (compare names each variant)
    return f"kd-{d.kd_domains}" if d.mode == "kd" and d.kd_domains != "proportional" else d.mode


def load_student(cfg: Config, reader: TopKCacheReader, device: str):
    """The student via from_pretrained, checked against the cache's tokenizer and vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.student_path()
    if not (path / "config.json").exists():
        hint = "run `make teacher-cache` (it builds the tiny models)" if not cfg.distill.student else "point distill.student at a HF model directory"
        raise ConfigError(f"no student model at {path}; {hint}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Compared: what changes ids (pipeline/teachers/identity.py), so an Instruct teacher's
    # cache teaches its base sibling; special-token roles and chat templates may differ.
    recorded = reader.manifest["tokenizer"]
    differs = tokenizer_difference(recorded, tokenizer)
    if differs is not None and "parts" not in recorded:
        raise CacheError(
            f"student {path} may use another tokenizer than the cache {reader.dir}: the cache records its tokenizer the old "
            f"way (one hash of the vocabulary and the special-token map, which also differs between an Instruct and a base "
            f"checkpoint of one family and cannot say what differs); rebuild the cache with this version (ddk teacher-cache "
            f"into a new cache.out_dir) to compare what changes ids, or distill a student with the teacher's tokenizer files"
        )
    if differs is not None:
        raise CacheError(
            f"student {path} uses another tokenizer than the cache {reader.dir} was made with; it differs in: {differs}; "
            f"distill a student that shares the teacher's tokenizer, or rebuild the cache with a matching teacher"
        )
    if (reader.manifest.get("chat") or {}).get("template_sha256"):
        check_chat_template(reader, tokenizer, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if model.config.vocab_size < reader.vocab_size:
        raise CacheError(
            f"student {path} has vocab_size {model.config.vocab_size} but the teacher's ids go up to {reader.vocab_size - 1}; "
            f"resize the student's embeddings to at least {reader.vocab_size}"
        )
    return model, tokenizer


def check_chat_template(reader: TopKCacheReader, tokenizer, path: Path) -> None:
    """A masked (chat) cache teaches conversations as the teacher's template renders them: a
    student whose own template renders them otherwise would be trained on one format and
    prompted in another. Refused, naming where the renderings part. A student without a
    template (a base model) is accepted: it learns the teacher's format."""
    from ..pipeline.chat import template_sha256

    want = reader.manifest["chat"]["template_sha256"]
    have = template_sha256(tokenizer)
    if have is None or have == want:
        return
    teacher_tok = Path(reader.manifest["teacher"]["path"])
    probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    mine = tokenizer.apply_chat_template(probe, tokenize=False)
    try:
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(teacher_tok).apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - the teacher may live elsewhere now; the hashes still differ
        theirs = None
    if theirs == mine:
        return  # different template text, same rendering of the probe
    at = next((i for i, (a, b) in enumerate(zip(mine, theirs or "")) if a != b), min(len(mine), len(theirs or "")))
    detail = (f"at character {at}: student renders {mine[max(0, at - 10):at + 20]!r}, teacher {theirs[max(0, at - 10):at + 20]!r}"
              if theirs is not None else f"template sha256 {have[:12]} vs the cache's {want[:12]}")
    raise CacheError(f"student {path}: its chat template renders conversations differently from the teacher's the cache "
                     f"{reader.dir} was made with ({detail}); give the student the teacher's chat_template "
                     f"(tokenizer_config.json) or distill a base student without one")


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to lr, then cosine to min_lr (the paper's shape, scaled to the run)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress_frac)))


class MetricsLog:
    """JSONL metrics (one object per line), plus TensorBoard scalars when asked and installed."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool = True):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_redone(path, resume_step)
        self.fh = path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                pass

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _drop_redone(path: Path, resume_step: int | None) -> None:
    """Forget what was logged after the checkpoint we resume from: that work is redone.
    A train record's step counts finished steps; the others carry the step about to run
    (an eval at the checkpoint's own step comes after the checkpoint, so it is redone)."""
    if resume_step is None:
        path.unlink(missing_ok=True)
        return
    if path.exists():
        def done(r: dict) -> bool:
            return r.get("step", 0) <= resume_step if r.get("kind") == "train" else r.get("step", 0) < resume_step

        # A torn last line (killed mid-write) is redone work too.
        kept = [line for line in path.read_text().splitlines() if _parses(line) and done(json.loads(line))]
        write_text_atomic(path, "".join(line + "\n" for line in kept))  # a kill keeps the old file, never a truncated one


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def distill(cfg: Config, resume: bool = False, log=print) -> dict:
    """Stage two in this process, or as one rank of a torchrun launch (see pipeline/distributed.py)."""
    env = distributed.init()
    try:
        return _distill(cfg, resume, log if env.is_main else _quiet, env)
    finally:
        distributed.close(env)


def _distill(cfg: Config, resume: bool, log, env: DistEnv) -> dict:
    trainer = Trainer(cfg, resume, log, env)
    try:
        while trainer.step < cfg.distill.steps:
            if trainer.interval_due():
                trainer.start_interval()
            trainer.optimizer_step()
            if trainer.checkpoint_due():
                trainer.checkpoint()
        return trainer.finish()
    finally:
        trainer.close_prefetch()  # the decoding threads end with the run, also when it fails


# Fields of [distill] that choose how a run is computed, not what it computes: a run may
# be resumed with them changed (another machine, another kernel, more ranks, a moved
# cache or student: those two are checked by content hash instead). Every other field
# changes the run and must match the checkpoint's.
RESUMABLE_WITH_CHANGED = ("out_dir", "checkpoint_every", "keep_checkpoints", "debug_rank_logs", "precision",
                          "kl_impl", "loss_impl", "parallel", "cache_dir", "student", "reader_cache_mb", "prefetch_batches",
                          "activation_checkpointing", "chunk_tokens")


# [distill] fields added after runs were first recorded, with the value that reproduces
# what those runs did: a saved config without the field is read as having this value.
ADDED_LATER = {"discrepancy": "ppl-ratio", "discrepancy_temperature": 1.0, "smooth_initial": False,
               "weight_floor": 0.0, "weight_cap": 1.0, "ddk_rule": "paper", "progress_floor": 0.2, "progress_ema": 0.5,
               "domain_weights": {}}


def saved_config(config: dict) -> dict:
    """A recorded [distill] config with fields added since filled in (ADDED_LATER)."""
    return {**ADDED_LATER, **config}


def run_identity(cfg: Config, reader: TopKCacheReader) -> dict:
    """What the run is made of: its defining config, the cache and the initial student (hashes)."""
    return {"config": {k: v for k, v in json.loads(json.dumps(asdict(cfg.distill))).items() if k not in RESUMABLE_WITH_CHANGED},
            "cache_manifest_sha256": cache_identity(reader.dir),
            "student_sha256": student_identity(cfg.student_path())}


def check_resumable(saved: dict | None, now: dict, ckpt: Path) -> None:
    """Refuse to continue a checkpoint with a config, cache or student other than its own."""
    fix = "resume with the config, cache and student it was started with, or set distill.out_dir to a new directory"
    if saved is None:
        raise ConfigError(f"--resume: {ckpt} predates run identities (it records no config, cache or student); {fix}")
    old = saved_config(saved["config"])
    for key in sorted(set(old) | set(now["config"])):
        if old.get(key) != now["config"].get(key):
            raise ConfigError(f"--resume: {ckpt} was made with distill.{key} = {json.dumps(old.get(key))}, "
                              f"this config has {json.dumps(now['config'].get(key))}; {fix}")
    for key, what in (("cache_manifest_sha256", "another teacher cache (manifest sha256"), ("student_sha256", "another initial student (weights sha256")):
        if saved[key] != now[key]:
            raise ConfigError(f"--resume: {ckpt} was made from {what} {saved[key][:12]}, now {now[key][:12]}); {fix}")


class Trainer:
    """One stage-two run as named steps: build everything (here), start an interval, one
    optimizer step, a checkpoint, the final evaluation. `_distill` composes them."""

    def __init__(self, cfg: Config, resume: bool, log, env: DistEnv):
        d = self.d = cfg.distill
        self.cfg, self.log, self.env = cfg, log, env
        self.device = device = "cuda" if torch.cuda.is_available() else "cpu"
        if d.batch_rows % env.world_size:
            raise ConfigError(f"distill.batch_rows = {d.batch_rows} is the global micro-batch, split evenly over {env.world_size} ranks; "
                              f"set it to a multiple of {env.world_size} or launch another number of ranks")
        torch.manual_seed(d.seed)
        self.reader = reader = TopKCacheReader(cfg.cache_path(), max_cache_bytes=d.reader_cache_mb << 20)
        self.prefetch: BatchPrefetcher | None = None  # the current interval's micro-batches, decoded ahead
        model, self.tokenizer = load_student(cfg, reader, device)
        sampled = reader.manifest["codec"].get("support") == "sampled"
        if sampled and d.temperature != 1.0 and d.mode != "cpt":
            raise ConfigError(f"distill.temperature = {d.temperature}, but {reader.dir} holds a sampled support: its draw counts "
                              f"are unbiased for the teacher at T = 1 only (tempering them biases the target); use T = 1")
        self.out = out = Path(d.out_dir)
        ckpt = latest_checkpoint(out) if resume else None
        if resume and ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {out}; run without --resume to start")
        if not resume and latest_checkpoint(out) is not None:
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or set distill.out_dir to a new directory")
        self.identity = run_identity(cfg, reader)
        if ckpt is not None:
            check_resumable(json.loads((ckpt / "state.json").read_text()).get("identity"), self.identity, ckpt)
        out.mkdir(parents=True, exist_ok=True)

        self.domains = domains = reader.domains
        rows = {dom: reader.num_rows(dom, "train") for dom in domains}
        self.interval = DomainScheduler.interval_steps(d.steps, d.interval or None, None if d.interval else d.interval_fraction)
        if d.kd_domains == "fixed" and set(d.domain_weights) != set(domains):
            raise ConfigError(f"distill.domain_weights names {sorted(d.domain_weights)}, but the cache {reader.dir} holds the domains "
                              f"{domains}: give one weight for each of them")
        self.scheduler = DomainScheduler(domains, scheduler_mode(cfg), self.interval, d.alpha, rows, d.discrepancy,
                                         d.discrepancy_temperature, d.smooth_initial, d.weight_floor, d.weight_cap,
                                         d.progress_floor, d.progress_ema, d.domain_weights or None)
        self.sampler = IntervalSampler(rows, seed=d.seed)
        self.gamma = 0.0 if d.mode == "cpt" else d.gamma
        # A sampled support holds all of the teacher's mass (its tail is -inf everywhere): the
        # loss is the same without the tail bucket, so the kernels skip the tail terms.
        self.objective = Objective(self.gamma, d.temperature, d.use_tail and d.temperature == 1.0 and not sampled,
                                   d.loss_impl, d.kl_impl, d.chunk_tokens, ids_checked=True)
        # The scheduler steers by validation; results are reported on the held-out test rows.
        self.val_keys = split_keys(reader, "val", d.eval_rows)
        self.test_keys = split_keys(reader, "test")
        self.teacher_loss = cache_teacher_losses(reader, self.val_keys)
        self.teacher_ppl = np.array([perplexity(self.teacher_loss[dom]) for dom in domains])
        self.rows_per_interval = self.interval * d.batch_rows * d.grad_accum
        self.tokens_per_step = d.batch_rows * d.grad_accum * reader.seq_len

        if ckpt is not None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32).to(device)
        set_activation_checkpointing(model, d.activation_checkpointing)
        # The optimizer must see the wrapped parameters (FSDP2 replaces them with shards);
        # FSDP2 gathers them in the dtype training computes in (bf16 on CUDA).
        self.model = distributed.wrap_model(StudentLM(model, self.objective), d.parallel, env, device,
                                            param_dtype=autocast_dtype(d.precision, device))
        # AdamW without weight decay on norms, biases and embeddings; a run resumed from a
        # checkpoint of one group (trained before that split) keeps decaying them all.
        self.optimizer = build_optimizer(self.model, d.lr, d.weight_decay,
                                         decay_all=ckpt is not None and _one_param_group(ckpt))
        self.state = {"step": 0, "interval_index": -1, "interval_keys": [], "interval_pos": 0, "before": None,
                      "before_test": None, "identity": self.identity}
        if ckpt is not None:
            self.state = load_trainer_state(ckpt, self.model, self.optimizer)
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.sampler.load_state_dict(self.state["sampler"])
            log(f"resuming from {ckpt} at step {self.state['step']}")
        if self.state["before"] is None:
            self.state["before"] = distributed.domain_losses(self.model, reader, self.val_keys, env, device, precision=d.precision)
            self.state["before_test"] = distributed.domain_losses(self.model, reader, self.test_keys, env, device, precision=d.precision)
        resume_step = self.state["step"] if ckpt else None
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_step) if env.is_main else _NoLog()
        # distill.debug_rank_logs: what each rank computed and trained on (the distributed tests read it).
        self.ranks_log = (MetricsLog(out / "ranks" / f"rank-{env.rank}.jsonl", resume_step, tensorboard=False)
                          if d.debug_rank_logs else _NoLog())
        self.label = run_label(cfg)
        ranks = f", {env.world_size} ranks ({d.parallel})" if env.enabled else ""
        log(f"distill [{self.label}] {d.steps} steps x {d.batch_rows * d.grad_accum} rows of {reader.seq_len} tokens, "
            f"K={self.interval}, gamma={self.gamma}, T={d.temperature}, loss {d.loss_impl}, device {device}{ranks}, cache {reader.dir}")
        self.step = self.state["step"]
        self.bar = progress(total=d.steps, initial=self.step, desc=f"distill {self.label}", unit="step", disable=not env.is_main)
        self.t_last, self.last_ckpt = time.perf_counter(), ckpt

    # ------------------------------------------------------------------ intervals
    def interval_due(self) -> bool:
        return self.scheduler.needs_update(self.step) and self.state["interval_index"] < self.step // self.interval

    def start_interval(self) -> None:
        """Measure lS, update r_t (Eq. 1/2), draw the interval's rows (Algorithm 1).

        The losses are reduced over all ranks' validation shares, so every rank computes
        the same weights and draws the same global interval list; the whole interval is
        kept (checkpoints stay independent of the world size) and each micro-batch is
        split over the ranks.
        """
        step, state = self.step, self.state
        self.close_prefetch()  # the last interval's batches are all taken; its keys are replaced below
        student_loss = distributed.domain_losses(self.model, self.reader, self.val_keys, self.env, self.device,
                                                 precision=self.d.precision)
        student_ppl = np.array([perplexity(student_loss[dom]) for dom in self.domains])
        weights = self.scheduler.update(step, student_ppl, self.teacher_ppl)
        distributed.check_identical(weights, self.env, f"domain weights at step {step}")
        state["interval_index"] = step // self.interval
        state["interval_keys"] = [list(k) for k in self.sampler.draw(state["interval_index"], weights, self.rows_per_interval)]
        state["interval_pos"] = 0
        record = {"kind": "eval", "step": step, "tokens": step * self.tokens_per_step,
                  "student_loss": student_loss, "teacher_loss": self.teacher_loss,
                  "ratio": dict(zip(self.domains, (student_ppl / self.teacher_ppl).tolist())),
                  "weights": dict(zip(self.domains, weights.tolist()))}
        self.metrics.write(record)
        self.ranks_log.write(record)

    # ------------------------------------------------------------------ one optimizer step
    def next_micro_batch(self) -> tuple[list, CacheBatch]:
        """This rank's share of the next global micro-batch: the rows IntervalSampler.draw(...,
        rank, world_size) would give it; the ranks' shares are disjoint and make up the batch.
        Decoded ahead on background threads (distill.prefetch_batches), in this same order."""
        pos = self.state["interval_pos"]
        if self.prefetch is None:  # the interval's first micro-batch, or the first after a resume
            keys, b = self.state["interval_keys"], self.d.batch_rows
            shares = [keys[p : p + b][self.env.rank :: self.env.world_size] for p in range(pos, len(keys), b)]
            self.prefetch = BatchPrefetcher(self._load_batch, shares, self.d.prefetch_batches)
        self.state["interval_pos"] = pos + self.d.batch_rows
        return self.prefetch.next()

    def _load_batch(self, my_keys: list) -> CacheBatch:
        """One micro-batch decoded (on a prefetch thread); on CUDA also pinned there, so that
        its copy to the GPU (_to_device) is asynchronous."""
        batch_keys = [(dom, "train", row) for dom, row in my_keys]
        batch = self.reader.batch(batch_keys) if self.gamma > 0 else _tokens_only(self.reader, batch_keys)
        if self.device == "cuda":
            batch = CacheBatch(*(None if t is None else t.pin_memory() for t in _batch_tensors(batch)))
        return batch

    def _to_device(self, batch: CacheBatch) -> CacheBatch:
        """The micro-batch's tensors the loss reads, on the training device: copies queued
        behind the GPU's work without waiting for it (the host memory is pinned). The tail
        only when the objective uses it; the teacher's target log-prob never (evaluation's)."""
        if self.device == "cpu":
            return batch
        move = lambda t: None if t is None else t.to(self.device, non_blocking=True)  # noqa: E731
        return CacheBatch(move(batch.input_ids), move(batch.topk_ids), move(batch.topk_logprobs), batch.target_logprob,
                          move(batch.tail_logmass) if self.objective.use_tail else batch.tail_logmass,
                          move(batch.loss_mask), move(batch.position_ids))

    def close_prefetch(self) -> None:
        """Stop decoding ahead: at an interval's end, the run's end, or when the run fails."""
        if self.prefetch is not None:
            self.prefetch.close()
            self.prefetch = None

    def micro_step(self, batch: CacheBatch) -> LossParts:
        """Forward (the loss, fused with the LM head by default) of one micro-batch on the device."""
        with autocast_context(self.d.precision, self.device):
            return self.model(batch.input_ids[:, :-1], batch)

    def optimizer_step(self) -> None:
        """grad_accum micro-batches, forward and backward, then clipping and AdamW.

        Host synchronisations: reading a device value (.item(), .tolist(), bool(tensor))
        makes the host wait until the GPU has run everything queued, and the GPU then
        idles while the host queues the next kernels. So the step reads its numbers once:
        each micro-batch's [loss, ce, kl] is summed on the device, the sums are averaged
        over the ranks there, and read together with the gradient norm after the last
        backward, before AdamW (a NaN on any rank stops every rank, the weights not
        updated). Within a micro-batch nothing here reads the device: its tensors were
        pinned on a prefetch thread and are copied asynchronously (_to_device), and their
        ids were range-checked on the host by the reader (Objective.ids_checked, so the
        fused loss skips its device-side check). What the forward still reads, once per
        micro-batch: transformers' packed-sequence detection (masking_utils, at the
        decoder's start), which costs the GPU the time the host takes to queue the next
        few kernels.
        distill.debug_rank_logs (tests only) reads each micro-batch's loss as well.
        """
        d, env, step = self.d, self.env, self.step
        lr = lr_at(step, d)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # [loss, ce, kl] over the micro-batches
        for micro in range(d.grad_accum):
            my_keys, batch = self.next_micro_batch()
            with distributed.grad_sync(self.model, micro == d.grad_accum - 1):
                parts = self.micro_step(self._to_device(batch))
                (parts.loss / d.grad_accum).backward()
            sums += torch.stack([t.detach().to(torch.float64) for t in (parts.loss, parts.ce, parts.kl)])
            if d.debug_rank_logs:
                mine = parts.loss.item()
                self.ranks_log.write({"kind": "micro", "step": step, "micro": micro, "rows": my_keys, "loss": mine,
                                      "global_loss": distributed.all_reduce_mean([mine], env)[0]})
        # grad_clip = 0 turns clipping off (the norm is still measured and logged).
        max_norm = d.grad_clip if d.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        # The global means (ranks hold equal row counts) and the norm: the step's one read.
        means = distributed.all_reduce_mean_tensor(sums / d.grad_accum, env)
        loss_all, ce_sum, kl_sum, grad_norm = torch.cat([means, norm.detach().reshape(1).to(means)]).tolist()
        if not math.isfinite(loss_all):
            self.metrics.close()
            good = f"last good checkpoint: {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"
            raise TrainingError(f"loss became {loss_all} at step {step} (ce {ce_sum}, kl {kl_sum}); training stopped, {good}; "
                                f"lower distill.lr or check the cache with `ddk cache verify`")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step = step + 1
        now = time.perf_counter()
        tok_s = self.tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last = now
        loss = ce_sum + self.gamma * kl_sum
        self.metrics.write({"kind": "train", "step": step, "loss": loss, "ce": ce_sum, "kl": kl_sum, "lr": lr,
                            "grad_norm": grad_norm, "tokens_per_s": tok_s, "tokens": self.tokens_per_step})
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {loss:.3f} ce {ce_sum:.3f} kl {kl_sum:.3f} {tok_s:,.0f} tok/s "
                                 f"r=[{_short_weights(self.domains, self.scheduler.weights)}]", refresh=False)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_due(self) -> bool:
        return self.step % self.d.checkpoint_every == 0 or self.step == self.d.steps

    def checkpoint(self) -> None:
        self.state.update(step=self.step, scheduler=self.scheduler.state_dict(), sampler=self.sampler.state_dict())
        self.last_ckpt = save_checkpoint(self.out, self.step, self.model, self.tokenizer, self.optimizer, self.state,
                                         self.d.keep_checkpoints)

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """Validation and test evaluation, results.json, the per-domain table and plots."""
        self.close_prefetch()
        self.bar.close()
        self.metrics.close()
        self.ranks_log.close()
        d, state, domains = self.d, self.state, self.domains
        after = distributed.domain_losses(self.model, self.reader, self.val_keys, self.env, self.device, precision=d.precision)
        after_test_rows = distributed.domain_row_losses(self.model, self.reader, self.test_keys, self.env, self.device,
                                                        precision=d.precision)
        teacher_test_rows = cache_teacher_row_losses(self.reader, self.test_keys)
        # masked caches: rows weighted by their trained positions (None: all rows alike)
        test_weights = {dom: row_weights(self.reader, k) for dom, k in self.test_keys.items()}
        results = {
            "mode": self.label,
            "steps": d.steps,
            "tokens": d.steps * self.tokens_per_step,
            "interval": self.interval,
            "domains": domains,
            # validation: the rows the scheduler steers by
            "teacher_loss": self.teacher_loss,
            "student_before_loss": state["before"],
            "student_after_loss": after,
            # test: held out from training and the scheduler; what comparisons report
            "test": {
                "teacher_loss": {dom: token_mean(r, test_weights[dom]) for dom, r in teacher_test_rows.items()},
                "student_before_loss": state["before_test"],
                "student_after_loss": {dom: token_mean(r, test_weights[dom]) for dom, r in after_test_rows.items()},
                "teacher_row_loss": {dom: r.tolist() for dom, r in teacher_test_rows.items()},
                "student_after_row_loss": {dom: r.tolist() for dom, r in after_test_rows.items()},
                # masked caches: each test row's trained positions, the weights of its row loss
                **({"row_weight": {dom: w.tolist() for dom, w in test_weights.items()}}
                   if any(w is not None for w in test_weights.values()) else {}),
            },
            "final_weights": dict(zip(domains, self.scheduler.weights.tolist())),
            "config": asdict(d),
            "identity": {k: v for k, v in self.identity.items() if k != "config"},
        }
        if not self.env.is_main:
            return results
        write_json_atomic(self.out / "results.json", results)  # `ddk compare` reuses a run by this file
        test = results["test"]
        self.log("validation (the split DDK steers by):")
        self.log(format_table({"teacher": self.teacher_loss, "student before": state["before"], "student after": after}, as_ppl=True))
        self.log("test (held out; what results report):")
        self.log(format_table({"teacher": test["teacher_loss"], "student before": test["student_before_loss"],
                               "student after": test["student_after_loss"]}, as_ppl=True))
        results["plots"] = [str(p) for p in write_plots(self.out, results)]
        self.log(f"results: {self.out / 'results.json'}; plots: {', '.join(results['plots'])}")
        return results


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: one rank speaks for all."""


class _NoLog:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _one_param_group(ckpt: Path) -> bool:
    """Whether the checkpoint's AdamW had a single parameter group: a run started before
    norms, biases and embeddings were exempt from weight decay (it resumes as it began)."""
    blob = torch.load(ckpt / "trainer.pt", weights_only=False, mmap=True)  # mapped: only the group lists are read
    return len(blob["optimizer"]["param_groups"]) == 1


def _batch_tensors(batch: CacheBatch) -> tuple:
    """A CacheBatch's tensors in field order (dataclasses.astuple would deep-copy them)."""
    return tuple(getattr(batch, f.name) for f in fields(batch))


def _tokens_only(reader: TopKCacheReader, keys) -> CacheBatch:
    """CPT reads only the token rows (and a masked cache's flags): no top-k decoding."""
    ids = reader.token_rows(keys)
    empty = torch.empty(0)
    return CacheBatch(ids, empty, empty, empty, empty, *reader.row_layout(keys))


def _short_weights(domains, weights) -> str:
    return " ".join(f"{dom[:4]} {w:.2f}" for dom, w in zip(domains, weights))


def read_metrics(out: Path, kind: str) -> list[dict]:
    path = out / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind] if path.exists() else []


def write_plots(out: Path, results: dict) -> list[Path]:
    from ..pipeline import plots

    domains = results["domains"]
    evals = read_metrics(out, "eval")
    paths = [
        plots.plot_domain_ppl(
            {name: {dom: perplexity(v) for dom, v in results[key].items()} for name, key in
             (("teacher", "teacher_loss"), ("student before", "student_before_loss"), ("student after", "student_after_loss"))},
            out / "domain_ppl.png", title=f"Validation perplexity per domain ({results['mode']})",
        )
    ]
    if evals:
        paths.append(plots.plot_domain_weights([e["step"] for e in evals], [[e["weights"][dom] for dom in domains] for e in evals],
                                               domains, out / "domain_weights.png", title=f"Domain sampling weights r_t ({results['mode']})"))
        paths.append(plots.plot_ppl_ratio({results["mode"]: ([e["tokens"] for e in evals], [[e["ratio"][dom] for dom in domains] for e in evals])},
                                          domains, out / "ppl_ratio.png"))
    return paths
