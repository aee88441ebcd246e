"""Stage two: the student trains from the teacher cache, domains re-weighted by DDK.

Read top to bottom: open the cache and the student (refusing mismatched tokenizers),
build the domain scheduler and interval sampler for the mode, then train. At the start
of every interval of K steps the student is evaluated per domain, the scheduler turns
student/teacher perplexities into weights (Eq. 1-2) and the sampler draws the interval's
rows (Algorithm 1). Each step minimises Eq. 3. Checkpoints make the run resumable; at
the end a per-domain table and plots are written.

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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..pipeline import distributed
from ..pipeline.atomic import write_json_atomic, write_text_atomic
from ..pipeline.cache.manifest import CacheError
from ..pipeline.cache.reader import CacheBatch, TopKCacheReader
from ..pipeline.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from ..pipeline.config import Config, ConfigError
from ..pipeline.distributed import DistEnv
from ..pipeline.evaluate import cache_teacher_losses, format_table, perplexity, val_keys
from ..pipeline.objective import distill_loss
from ..pipeline.progress import progress
from ..pipeline.scheduler import DomainScheduler, IntervalSampler
from ..pipeline.teachers.identity import tokenizer_sha256


class TrainingError(RuntimeError):
    """Training stopped; the message says at which step and which checkpoint is good."""


def scheduler_mode(cfg: Config) -> str:
    d = cfg.distill
    if d.mode == "ddk":
        return "uniform" if d.equal_sampling else ("ddk-no-smoothing" if d.no_smoothing else "ddk")
    if d.mode == "kd" and d.kd_domains == "uniform":
        return "uniform"
    return "proportional"


def run_label(cfg: Config) -> str:
    d = cfg.distill
    if d.mode == "ddk" and d.no_smoothing:
        return "ddk-no-smoothing"
    if d.mode == "ddk" and d.equal_sampling:
        return "ddk-equal-sampling"
    return f"kd-{d.kd_domains}" if d.mode == "kd" and d.kd_domains != "proportional" else d.mode


def load_student(cfg: Config, reader: TopKCacheReader, device: str):
    """The student via from_pretrained, checked against the cache's tokenizer and vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.student_path()
    if not (path / "config.json").exists():
        hint = "run `make teacher-cache` (it builds the tiny models)" if not cfg.distill.student else "point distill.student at a HF model directory"
        raise ConfigError(f"no student model at {path}; {hint}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer_sha256(tokenizer) != reader.manifest["tokenizer"]["sha256"]:
        raise CacheError(
            f"student {path} uses another tokenizer than the cache {reader.dir} was made with; "
            f"distill a student that shares the teacher's tokenizer, or rebuild the cache with a matching teacher"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if model.config.vocab_size < reader.vocab_size:
        raise CacheError(
            f"student {path} has vocab_size {model.config.vocab_size} but the teacher's ids go up to {reader.vocab_size - 1}; "
            f"resize the student's embeddings to at least {reader.vocab_size}"
        )
    return model, tokenizer


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to lr, then cosine to min_lr (the paper's shape, scaled to the run)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress_frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress_frac)))


def autocast_context(precision: str, device: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return torch.autocast(device_type=device, enabled=False)


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
    d = cfg.distill
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if d.batch_rows % env.world_size:
        raise ConfigError(f"distill.batch_rows = {d.batch_rows} is the global micro-batch, split evenly over {env.world_size} ranks; "
                          f"set it to a multiple of {env.world_size} or launch another number of ranks")
    torch.manual_seed(d.seed)
    reader = TopKCacheReader(cfg.cache_path())
    model, tokenizer = load_student(cfg, reader, device)
    out = Path(d.out_dir)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {out}; run without --resume to start")
    if not resume and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or set distill.out_dir to a new directory")
    out.mkdir(parents=True, exist_ok=True)

    domains = reader.domains
    rows = {dom: reader.num_rows(dom, "train") for dom in domains}
    interval = DomainScheduler.interval_steps(d.steps, d.interval or None, None if d.interval else d.interval_fraction)
    scheduler = DomainScheduler(domains, scheduler_mode(cfg), interval, d.alpha, rows)
    sampler = IntervalSampler(rows, seed=d.seed)
    gamma = 0.0 if d.mode == "cpt" else d.gamma
    keys = val_keys(reader, d.eval_rows)
    teacher_loss = cache_teacher_losses(reader, keys)
    teacher_ppl = np.array([perplexity(teacher_loss[dom]) for dom in domains])
    rows_per_interval = interval * d.batch_rows * d.grad_accum

    if ckpt is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32).to(device)
    # The optimizer must see the wrapped parameters (FSDP2 replaces them with shards).
    model = distributed.wrap_model(model, d.parallel, env, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=d.weight_decay, betas=(0.9, 0.95))
    state = {"step": 0, "interval_index": -1, "interval_keys": [], "interval_pos": 0, "before": None}
    if ckpt is not None:
        state = load_trainer_state(ckpt, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        log(f"resuming from {ckpt} at step {state['step']}")
    if state["before"] is None:
        state["before"] = distributed.domain_losses(model, reader, keys, env, device)
    metrics = MetricsLog(out / "metrics.jsonl", state["step"] if ckpt else None) if env.is_main else _NoLog()
    # distill.debug_rank_logs: what each rank computed and trained on (the distributed tests read it).
    ranks_log = (MetricsLog(out / "ranks" / f"rank-{env.rank}.jsonl", state["step"] if ckpt else None, tensorboard=False)
                 if d.debug_rank_logs else _NoLog())
    label = run_label(cfg)
    ranks = f", {env.world_size} ranks ({d.parallel})" if env.enabled else ""
    log(f"distill [{label}] {d.steps} steps x {d.batch_rows * d.grad_accum} rows of {reader.seq_len} tokens, "
        f"K={interval}, gamma={gamma}, T={d.temperature}, device {device}{ranks}, cache {reader.dir}")

    tokens_per_step = d.batch_rows * d.grad_accum * reader.seq_len
    bar = progress(total=d.steps, initial=state["step"], desc=f"distill {label}", unit="step", disable=not env.is_main)
    t_last, last_ckpt = time.perf_counter(), ckpt
    step = state["step"]
    while step < d.steps:
        if scheduler.needs_update(step) and state["interval_index"] < step // interval:
            # Start of an interval: measure lS, update r_t (Eq. 1/2), draw its rows (Alg. 1).
            # The losses are reduced over all ranks' validation shares, so every rank computes
            # the same weights and draws the same global interval list.
            student_loss = distributed.domain_losses(model, reader, keys, env, device)
            student_ppl = np.array([perplexity(student_loss[dom]) for dom in domains])
            weights = scheduler.update(step, student_ppl, teacher_ppl)
            distributed.check_identical(weights, env, f"domain weights at step {step}")
            state["interval_index"] = step // interval
            # The whole interval is kept (checkpoints stay independent of the world size);
            # each micro-batch below is split over the ranks.
            state["interval_keys"] = [list(k) for k in sampler.draw(state["interval_index"], weights, rows_per_interval)]
            state["interval_pos"] = 0
            record = {"kind": "eval", "step": step, "tokens": step * tokens_per_step,
                      "student_loss": student_loss, "teacher_loss": teacher_loss,
                      "ratio": dict(zip(domains, (student_ppl / teacher_ppl).tolist())),
                      "weights": dict(zip(domains, weights.tolist()))}
            metrics.write(record)
            ranks_log.write(record)
        lr = lr_at(step, d)
        for g in optimizer.param_groups:
            g["lr"] = lr
        model.train()
        ce_sum = kl_sum = 0.0
        for micro in range(d.grad_accum):
            pos = state["interval_pos"]
            # This rank's share of the global micro-batch: the rows IntervalSampler.draw(...,
            # rank, world_size) would give it; the ranks' shares are disjoint and make up the batch.
            my_keys = state["interval_keys"][pos : pos + d.batch_rows][env.rank :: env.world_size]
            batch_keys = [(dom, "train", row) for dom, row in my_keys]
            state["interval_pos"] = pos + d.batch_rows
            batch = reader.batch(batch_keys) if gamma > 0 else _tokens_only(reader, batch_keys)
            with distributed.grad_sync(model, micro == d.grad_accum - 1):
                with autocast_context(d.precision, device):
                    logits = model(input_ids=batch.input_ids[:, :-1].to(device)).logits
                parts = distill_loss(logits, batch, gamma, d.temperature, d.use_tail and d.temperature == 1.0, d.kl_impl)
                # The global mean (ranks hold equal row counts), and a NaN on one rank stops all of them.
                loss_all, ce_all, kl_all = distributed.all_reduce_mean([parts.loss.item(), parts.ce, parts.kl], env)
                if not math.isfinite(loss_all):
                    metrics.close()
                    good = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise TrainingError(f"loss became {loss_all} at step {step} (ce {ce_all}, kl {kl_all}); training stopped, {good}; lower distill.lr or check the cache with `ddk cache verify`")
                (parts.loss / d.grad_accum).backward()
            ce_sum += ce_all / d.grad_accum
            kl_sum += kl_all / d.grad_accum
            ranks_log.write({"kind": "micro", "step": step, "micro": micro, "rows": my_keys, "loss": parts.loss.item(), "global_loss": loss_all})
        grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        now = time.perf_counter()
        tok_s = tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        loss = ce_sum + gamma * kl_sum
        metrics.write({"kind": "train", "step": step, "loss": loss, "ce": ce_sum, "kl": kl_sum, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": tok_s})
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.3f} ce {ce_sum:.3f} kl {kl_sum:.3f} {tok_s:,.0f} tok/s r=[{_short_weights(domains, scheduler.weights)}]", refresh=False)
        if step % d.checkpoint_every == 0 or step == d.steps:
            state.update(step=step, scheduler=scheduler.state_dict(), sampler=sampler.state_dict())
            last_ckpt = save_checkpoint(out, step, model, tokenizer, optimizer, state, d.keep_checkpoints)
    bar.close()
    metrics.close()
    ranks_log.close()

    after = distributed.domain_losses(model, reader, keys, env, device)
    results = {
        "mode": label,
        "steps": d.steps,
        "tokens": d.steps * tokens_per_step,
        "interval": interval,
        "domains": domains,
        "teacher_loss": teacher_loss,
        "student_before_loss": state["before"],
        "student_after_loss": after,
        "final_weights": dict(zip(domains, scheduler.weights.tolist())),
        "config": asdict(d),
    }
    if not env.is_main:
        return results
    write_json_atomic(out / "results.json", results)  # `ddk compare` reuses a run by this file
    log(format_table({"teacher": teacher_loss, "student before": state["before"], "student after": after}, as_ppl=True))
    results["plots"] = [str(p) for p in write_plots(out, results)]
    log(f"results: {out / 'results.json'}; plots: {', '.join(results['plots'])}")
    return results


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0: one rank speaks for all."""


class _NoLog:
    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _tokens_only(reader: TopKCacheReader, keys) -> CacheBatch:
    """CPT reads only the token rows: no top-k decoding."""
    ids = reader.token_rows(keys)
    empty = torch.empty(0)
    return CacheBatch(ids, empty, empty, empty, empty)


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
