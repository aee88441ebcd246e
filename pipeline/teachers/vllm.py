"""vLLM backend: teacher forcing through `prompt_logprobs`, no generation.

Each row of L + 1 tokens is one prompt; vLLM returns, for prompt positions 1..L, the
actual token's logprob followed by the top-k (`flat_logprobs` keeps this as flat lists:
no per-token Python objects, no detokenization, which is where the time goes on CPU).
Logprobs are `raw_logprobs` (never temperature-scaled). vLLM does not give the full
vocabulary logsumexp, so the tail mass is log1mexp(logsumexp(top-k)) of its fp32
logprobs: exact up to their rounding (relative error ~1e-7 / tail mass).

Run it in a child process (the caller does: `stages/teacher_cache.py`): vLLM spawns an
engine core and workers, and a parent that exits without shutting them down orphans
them (docs/DESIGN.md section 4).
"""

from __future__ import annotations

import os

import numpy as np

from .base import TeacherBackend, TopK, log1mexp
from .support import NO_FOLDS, add_folds, fold_padded_ids


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMTeacher(TeacherBackend):
    name = "vllm"

    def __init__(self, path: str, k: int, max_len: int, dtype: str = "float32", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, cpu_kvcache_gib: int = 2, enforce_eager: bool = True,
                 seed: int = 0, vocab_bound: int | None = None):
        # Without this the CPU worker reserves 92 % of a NUMA node's memory for KV cache.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
        from vllm import LLM, SamplingParams

        kwargs = dict(
            model=path,
            skip_tokenizer_init=True,
            dtype=dtype,
            max_model_len=max_len,
            max_logprobs=k,
            logprobs_mode="raw_logprobs",
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
        )
        import torch

        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.params = SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)
        self.k = k
        # Ids at or above the tokenizer's length (a padded embedding) are folded into the
        # tail (support.fold_padded_ids); None when the teacher has no padded rows.
        self.vocab_bound = vocab_bound
        self.folded = None

    def topk(self, rows: np.ndarray, position_ids: np.ndarray | None = None) -> TopK:
        """position_ids [B, L] restarting at each packed conversation (pipeline/chat.py): each
        segment then goes to the engine as a prompt of its own, so it attends only to itself.
        The last position of a segment that another follows (its target is the next
        segment's first token, never trained) gets a placeholder distribution."""
        from vllm.inputs import TokensPrompt

        rows = np.asarray(rows)
        b, n = rows.shape
        l, k = n - 1, self.k
        spans = [[(0, n)] for _ in range(b)] if position_ids is None else [_segments(p, n) for p in position_ids]
        prompts = [TokensPrompt(prompt_token_ids=rows[i, s:e].tolist()) for i in range(b) for s, e in spans[i]]
        outs = iter(self.llm.generate(prompts, self.params, use_tqdm=False))
        # placeholder: k distinct ids, uniform over them (no tail); overwritten wherever computed
        ids = np.broadcast_to(np.concatenate(([0], np.arange(k))).astype(np.int32), (b, l, k + 1)).copy()
        lps = np.broadcast_to(np.concatenate(([0.0], np.full(k, -np.log(k)))).astype(np.float32), (b, l, k + 1)).copy()
        for i in range(b):
            for s, e in spans[i]:
                flat = next(outs).prompt_logprobs
                # Entry 0 (the first token) is empty; each later position holds the actual
                # token first, then ranks 1..k (the actual token may appear twice).
                m = min(e, n) - s - 1  # positions s .. s + m - 1 predict tokens inside the prompt
                if m <= 0:
                    continue
                if len(flat.token_ids) != m * (k + 1):
                    raise RuntimeError(f"vLLM returned {len(flat.token_ids)} prompt logprobs for row {i} tokens [{s}, {e}), "
                                       f"expected {m * (k + 1)}")
                ids[i, s : s + m] = np.asarray(flat.token_ids, dtype=np.int32).reshape(m, k + 1)
                lps[i, s : s + m] = np.asarray(flat.logprobs, dtype=np.float32).reshape(m, k + 1)
        top_lp = lps[:, :, 1:]
        kept = np.logaddexp.reduce(top_lp.astype(np.float64), axis=-1)
        out = TopK(
            ids=ids[:, :, 1:].copy(),
            logprobs=top_lp.copy(),
            target_logprob=lps[:, :, 0].copy(),
            tail_logmass=log1mexp(kept).astype(np.float32),
        )
        if self.vocab_bound is None:
            return out
        out, stats = fold_padded_ids(out, self.vocab_bound, rows[:, 1:])
        self.folded = add_folds(self.folded or NO_FOLDS, stats)
        return out

    def take_folded(self) -> dict | None:
        """The padded-id counts since the last call (None without padded rows)."""
        out, self.folded = self.folded, None
        return out

    def close(self) -> None:
        # Shut the engine core and its workers down explicitly so nothing outlives us.
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm


def _segments(positions: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Token spans [s, e) of a row of n tokens whose first n - 1 have `positions` (0 at
    every segment start): each segment up to the next start, the last one to the row's end."""
    starts = np.flatnonzero(np.asarray(positions) == 0).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return list(zip(starts, starts[1:] + [n]))
