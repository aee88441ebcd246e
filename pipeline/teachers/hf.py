"""transformers backend: a plain forward pass plus torch.topk. Runs everywhere.

The tail mass is exact: the logsumexp of the logits outside the top-k, in fp32, minus
the full-vocabulary logsumexp (no subtraction of probabilities near 1).

support = "sampled" (pipeline/teachers/support.py): instead of the top-k, k draws with
replacement from the full softmax of each position, on the device the logits are on,
from a generator seeded per row by its tokens and cache.sample_seed; returned as the
distinct ids with log(count / k) and no tail (the target sums to 1).
"""

from __future__ import annotations

import numpy as np
import torch

from .support import draws_to_support, row_seed
from .base import TeacherBackend, TopK

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher(TeacherBackend):
    name = "hf"

    def __init__(self, path: str, k: int, dtype: str = "float32", device: str | None = None,
                 support: str = "topk", sample_seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(self.device).eval()
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.k = k
        self.support = support
        self.sample_seed = sample_seed

    @torch.no_grad()
    def topk(self, rows: np.ndarray) -> TopK:
        ids = torch.as_tensor(np.array(rows, dtype=np.int64), device=self.device)
        logits = self.model(input_ids=ids[:, :-1], use_cache=False).logits.float()  # [B, L, V]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        target = torch.gather(logits, -1, ids[:, 1:, None]).squeeze(-1) - lse.squeeze(-1)
        if self.support == "sampled":
            return self._sampled(rows, logits, lse, target)
        top_vals, top_ids = torch.topk(logits, self.k, dim=-1)
        rest = logits.scatter(-1, top_ids, float("-inf"))
        tail = (torch.logsumexp(rest, dim=-1, keepdim=True) - lse).squeeze(-1)
        return TopK(
            ids=top_ids.to(torch.int32).cpu().numpy(),
            logprobs=(top_vals - lse).cpu().numpy().astype(np.float32),
            target_logprob=target.cpu().numpy().astype(np.float32),
            tail_logmass=tail.cpu().numpy().astype(np.float32),
        )

    def _sampled(self, rows, logits, lse, target) -> TopK:
        draws = []
        for b in range(logits.shape[0]):
            gen = torch.Generator(device=self.device).manual_seed(row_seed(rows[b], self.sample_seed))
            probs = (logits[b] - lse[b]).exp_()  # [L, V] fp32
            draws.append(torch.multinomial(probs, self.k, replacement=True, generator=gen).cpu().numpy())
        sup_ids, sup_lp = draws_to_support(np.stack(draws), self.k)
        b, length = target.shape
        return TopK(ids=sup_ids, logprobs=sup_lp, target_logprob=target.cpu().numpy().astype(np.float32),
                    tail_logmass=np.full((b, length), -np.inf, np.float32))

    def close(self) -> None:
        del self.model
