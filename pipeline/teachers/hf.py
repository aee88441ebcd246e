"""transformers backend: the teacher's decoder, then its LM head applied in chunks of
positions. Runs everywhere.

Why chunks: a batch of B rows of L tokens has [B, L, V] logits (at V = 151936, 8 x 2048
tokens: 5 GB in bf16, 10 GB as fp32, and the tail's scatter copied that again). Running
the decoder to its final hidden states [B*L, H] and then, per chunk of c positions,
logits = h_c W^T in the model's dtype -> top-k, exact tail, target log-prob (or the
sampled draws), keeps the capture's peak at the decoder's plus one chunk, whatever B is
(kernels/teacher_head.py has the per-chunk arithmetic and its precision).

Same bytes as the unchunked capture where the chunk's matmul rounds as the whole batch's
did (tests/test_teacher_head.py: the tiny config, chunks that split rows); in general a
GEMM's rounding depends on its shape, in the last bit of the logits, and so did the
unchunked capture's on teacher.batch_rows: neither was ever batch-invariant to the bit.

The chunked head is used when it reproduces the model's own logits: checked once at load
on a short probe row (a head with soft-capping or a logit scale, e.g. Gemma 2 or Cohere,
fails the check). Otherwise the model's full logits are computed per batch and a line
says so: correct, but with the [B, L, V] memory above.

support = "sampled" (pipeline/teachers/support.py): k draws with replacement from the full
softmax of each position by a blocked inverse CDF (kernels/teacher_head.py: the sums of
blocks of 64 logits in one read of the chunk, then the draw's block and its id within it;
a Triton kernel on CUDA, torch on CPU), with uniforms from one torch.Generator per row
seeded by its tokens and cache.sample_seed: the same draws for the same row whatever the
batching or chunking, on the same device type. The procedure's name, SAMPLER, is recorded
in the cache's plan. Returned as the distinct ids with log(count / k) and no tail (the
target sums to 1).

vocab_bound: the tokenizer's length when the teacher has more embedding rows than ids
(Qwen2.5-7B: 152,064 rows for 151,665 ids). Ids at or above it are folded into the tail
(top-k) or left out of the draws (sampled); `folded` counts how often and how much.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...kernels.teacher_head import SAMPLE_BLOCK, resolve_impl, sample_chunk, topk_chunk

from .base import TeacherBackend, TeacherOutputError, TopK, named_head_transforms
from .support import NO_FOLDS, add_folds, draws_to_support_torch, row_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The sampled support's draw procedure, recorded in the plan (codec.sampler): a cache is
# resumed only with the procedure it was begun with (the block size is part of it; the
# earlier "inverse-cdf" took one fp32 cumsum over the whole row).
SAMPLER = f"inverse-cdf-blocked-{SAMPLE_BLOCK}"
# Logit bytes one chunk may take (its logits in the model's dtype plus the fp32 work the
# chunk's arithmetic needs), and the bounds of the chunk in positions.
CHUNK_BYTES = 1 << 30
CHUNK_MIN, CHUNK_MAX = 64, 8192
# teacher.batch_rows = "auto" on a GPU: the share of free memory the batch may take
# (the rest absorbs fragmentation and the allocator's rounding), and the bounds.
AUTO_MEMORY_SHARE = 0.85
AUTO_ROWS_MAX = 256
AUTO_ROWS_CPU = 32


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The dtype a HF checkpoint is stored in (config.json's `torch_dtype`, or `dtype` in
    transformers 5), as one of DTYPES; float32 when the config names none."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    name = str(text_cfg.get("dtype") or text_cfg.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype")
               or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{model_dir}/config.json: dtype {name!r} is not one of {', '.join(DTYPES)}; set teacher.dtype")
    return name


def chunk_tokens_for(vocab: int, dtype: torch.dtype, support: str, fused_stats: bool, k: int = 64) -> int:
    """Positions per head chunk so that its logits and work fit CHUNK_BYTES: the logits in
    the model's dtype, plus per position
      top-k, torch    an fp32 copy and logsumexp temporaries (8 bytes a logit)
      top-k, Triton   nothing: the kernels read the logits
      sampled         the block arrays (max and sum in fp32, the block CDF in fp64: 16
                      bytes a block of SAMPLE_BLOCK logits) and ~48 bytes a draw ([c, k]
                      thresholds, blocks, fractions, ids); on the torch path (CPU) also
                      its fp32 copy of the logits (4 bytes a logit) and the gathered
                      blocks of the draws (their fp32 cumsum: 4 bytes a logit)
    The padded ids' slice (ids >= bound, a few hundred) is left out: < 1 % of the logits."""
    logit_bytes = torch.finfo(dtype).bits // 8
    if support == "sampled":
        work = 16 * -(-vocab // SAMPLE_BLOCK) + 48 * k + (0 if fused_stats else 4 * vocab + 4 * k * SAMPLE_BLOCK)
    else:
        work = 0 if fused_stats else 8 * vocab
    c = CHUNK_BYTES // (vocab * logit_bytes + work)
    return int(min(CHUNK_MAX, max(CHUNK_MIN, c // CHUNK_MIN * CHUNK_MIN)))


class HFTeacher(TeacherBackend):
    name = "hf"

    def __init__(self, path: str, k: int, dtype: str = "float32", device: str | None = None,
                 support: str = "topk", sample_seed: int = 0, vocab_bound: int | None = None,
                 chunk_tokens: int = 0, impl: str = "auto"):
        from transformers import AutoModelForCausalLM

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
        self._setup(model, k, support, sample_seed, vocab_bound, chunk_tokens, impl)

    @classmethod
    def from_model(cls, model, k: int, support: str = "topk", sample_seed: int = 0,
                   vocab_bound: int | None = None, chunk_tokens: int = 0, impl: str = "auto") -> "HFTeacher":
        """A teacher around a model already in memory (benchmarks build random-init ones)."""
        self = cls.__new__(cls)
        self._setup(model.eval(), k, support, sample_seed, vocab_bound, chunk_tokens, impl)
        return self

    def _setup(self, model, k, support, sample_seed, vocab_bound, chunk_tokens, impl):
        self.model = model
        self.device = str(next(model.parameters()).device)
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.k = k
        self.support = support
        self.sample_seed = sample_seed
        self.impl = impl
        head = model.get_output_embeddings()
        self.vocab = head.weight.shape[0]
        self.vocab_bound = self.vocab if vocab_bound is None else min(vocab_bound, self.vocab)
        fused = resolve_impl(impl, self.device.startswith("cuda")) == "triton"
        self.chunk_tokens = chunk_tokens or chunk_tokens_for(self.vocab, model.dtype, support, fused, k)
        self.folded = NO_FOLDS
        self.chunked = self._head_reproduces_logits()
        if not self.chunked:
            print(f"teacher: {type(model).__name__}'s LM head is not a plain linear map of its final hidden states "
                  f"(checked on a probe row); computing its full [rows, seq, {self.vocab}] logits per batch "
                  f"(more memory than the chunked head: lower teacher.batch_rows if it runs out)", flush=True)

    @torch.no_grad()
    def _head_reproduces_logits(self) -> bool:
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear) or not hasattr(self.model, "get_decoder"):
            return False
        # Transforms a config names (soft-capping, logit scales) are refused by name: near 0
        # a soft-cap is close to the identity and a probe row alone could miss it.
        if named_head_transforms(self.model.config):
            return False
        ids = torch.arange(1, 17, device=self.device)[None] % self.vocab_bound
        want = self.model(input_ids=ids, use_cache=False).logits[0].float()
        got = head(self._final_hidden(ids)[0]).float()
        # Rounding of a differently shaped matmul in the model's dtype: well below this.
        tol = 1e-3 if self.model.dtype == torch.float32 else 5e-2
        return got.shape == want.shape and bool(((got - want).abs() <= tol * (1 + want.abs())).all())

    def _final_hidden(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.get_decoder()(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state

    def _chunk_step(self, positions: int) -> int:
        """chunk_tokens, evened out over the batch so that no chunk is a small remainder
        (a GEMM of a few rows rounds differently and runs slowly)."""
        chunks = -(-positions // self.chunk_tokens)
        return -(-positions // chunks)

    def _chunks(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """(positions slice, logits [c, V] in the model's dtype) over all B*L positions.
        position_ids [B, L] restarting at each packed conversation: transformers' masking
        then makes the attention block-diagonal (each attends only to itself)."""
        if not self.chunked:
            logits = self.model(input_ids=ids, position_ids=position_ids, use_cache=False).logits
            flat = logits.reshape(-1, logits.shape[-1])
            step = self._chunk_step(flat.shape[0])
            for r0 in range(0, flat.shape[0], step):
                yield slice(r0, r0 + step), flat[r0: r0 + step]
            return
        hidden = self._final_hidden(ids, position_ids)
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        w, b = head.weight, head.bias
        step = self._chunk_step(flat.shape[0])
        buf = torch.empty(step, self.vocab, dtype=w.dtype, device=flat.device)
        for r0 in range(0, flat.shape[0], step):
            h = flat[r0: r0 + step]
            out = buf[: h.shape[0]]
            if b is None:
                torch.mm(h, w.t(), out=out)
            else:
                torch.addmm(b, h, w.t(), out=out)
            yield slice(r0, r0 + h.shape[0]), out

    @torch.no_grad()
    def topk(self, rows: np.ndarray, position_ids: np.ndarray | None = None) -> TopK:
        """position_ids [B, L] (packed conversations, pipeline/chat.py) or None (0..L-1)."""
        ids = torch.as_tensor(np.array(rows, dtype=np.int64), device=self.device)
        b, length = ids.shape[0], ids.shape[1] - 1
        targets = ids[:, 1:].reshape(-1)
        uniforms = self._uniforms(rows, length) if self.support == "sampled" else None
        pos = None if position_ids is None else torch.as_tensor(position_ids, dtype=torch.long, device=self.device)
        parts = []
        for r, logits in self._chunks(ids[:, :-1], pos):
            if uniforms is None:
                parts.append(topk_chunk(logits, targets[r], self.k, self.vocab_bound, self.impl))
            else:
                parts.append(sample_chunk(logits, targets[r], uniforms[r], self.vocab_bound, self.impl))
        out = [torch.cat(field) for field in zip(*parts)]
        return self._topk_batch(out, b, length) if uniforms is None else self._sampled_batch(out, b, length)

    def _uniforms(self, rows: np.ndarray, length: int) -> torch.Tensor:
        """[B * L, k] uniforms, each row's from its own generator (seeded by the row)."""
        per_row = []
        for row in rows:
            gen = torch.Generator(device=self.device).manual_seed(row_seed(row, self.sample_seed))
            per_row.append(torch.rand((length, self.k), generator=gen, device=self.device))
        return torch.cat(per_row)

    def _count_folded(self, folded_logmass: torch.Tensor, in_support: torch.Tensor | None) -> None:
        if self.vocab_bound == self.vocab:
            return
        mass = folded_logmass.double().exp()
        stats = torch.stack([(mass > 0).sum().double(), mass.sum(), mass.max(),
                             torch.zeros((), dtype=torch.float64, device=mass.device) if in_support is None
                             else in_support.sum().double()]).tolist()
        self.folded = add_folds(self.folded, {"positions": mass.numel(), "folded_positions": int(stats[0]),
                                              "mass_sum": stats[1], "mass_max": stats[2], "in_support": int(stats[3])})

    def take_folded(self) -> dict | None:
        """The folded-id counts since the last call (None for a teacher without padded ids):
        positions, positions with any folded mass, positions where a padded id would have
        been in the top-k, and the folded mass summed and at its largest."""
        if self.vocab_bound == self.vocab:
            return None
        out, self.folded = self.folded, NO_FOLDS
        return out

    def _check_targets(self, target: np.ndarray) -> np.ndarray:
        """The target log-probs of a batch, refused when NaN or +inf: the teacher's logits
        were NaN (or, sampled, -inf at every id below the tokenizer's length), which no
        support can represent. -inf is kept: a target the teacher rules out entirely."""
        bad = np.isnan(target) | np.isposinf(target)
        if bad.any():
            raise TeacherOutputError(
                f"the teacher's logits are not finite at {int(bad.sum())} of {target.size} positions of this batch "
                f"(NaN, or -inf at every id); check the checkpoint, and teacher.dtype (float16 can overflow: use "
                f"bfloat16 or float32)")
        return target

    def _topk_batch(self, out, b, length) -> TopK:
        ids, logprobs, target, tail, folded, in_topk = out
        self._count_folded(folded, in_topk)
        shape = (b, length)
        return TopK(
            ids=ids.to(torch.int32).cpu().numpy().reshape(*shape, -1),
            logprobs=logprobs.cpu().numpy().astype(np.float32).reshape(*shape, -1),
            target_logprob=self._check_targets(target.cpu().numpy().astype(np.float32).reshape(shape)),
            tail_logmass=tail.cpu().numpy().astype(np.float32).reshape(shape),
        )

    def _sampled_batch(self, out, b, length) -> TopK:
        draws, target, folded = out
        self._count_folded(folded, None)
        sup_ids, sup_lp = draws_to_support_torch(draws, self.k)
        return TopK(ids=sup_ids.cpu().numpy().reshape(b, length, -1), logprobs=sup_lp.cpu().numpy().reshape(b, length, -1),
                    target_logprob=self._check_targets(target.cpu().numpy().astype(np.float32).reshape(b, length)),
                    tail_logmass=np.full((b, length), -np.inf, np.float32))

    @torch.no_grad()
    def fit_batch_rows(self, seq_len: int) -> int:
        """teacher.batch_rows = "auto": on a GPU, the rows of seq_len tokens that fit
        AUTO_MEMORY_SHARE of the free memory. The decoder's activations grow linearly in
        rows: their growth per row is measured by two probe forwards of the decoder alone
        (1 and 3 rows; a whole capture of few rows peaks in the head's chunk instead, which
        hides that growth), and one probe capture of one row gives the rest (the chunk).
        On CPU, AUTO_ROWS_CPU."""
        if not self.device.startswith("cuda"):
            return AUTO_ROWS_CPU
        folded = self.folded  # the probes are not corpus positions (add_folds never mutates)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        base = torch.cuda.memory_allocated()

        def peak(fn) -> int:
            torch.cuda.reset_peak_memory_stats()
            fn()
            return torch.cuda.max_memory_allocated() - base

        probe = lambda rows: np.zeros((rows, seq_len + 1), dtype=np.int64)  # noqa: E731
        # A head that is not chunked computes its full logits with the decoder: probe both.
        forward = self._final_hidden if self.chunked else (lambda ids: self.model(input_ids=ids, use_cache=False).logits)
        decoder = [peak(lambda r=r: forward(torch.as_tensor(probe(r)[:, :-1], device=self.device))) for r in (1, 3)]
        per_row = max(1.0, (decoder[1] - decoder[0]) / 2)
        one_row = peak(lambda: self.topk(probe(1)))
        self.folded = folded
        torch.cuda.empty_cache()
        return int(max(1, min(AUTO_ROWS_MAX, (AUTO_MEMORY_SHARE * free - one_row) // per_row + 1)))

    def close(self) -> None:
        del self.model
