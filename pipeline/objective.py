"""The training objective, Eq. 3: CE(student, next token) + gamma * KL(teacher || student).

The KL runs over the cached teacher support (top-k) plus its tail bucket, through the
sparse-KL kernel (Triton on CUDA, the chunked torch path on CPU); with temperature T it
is scaled by T^2 inside the kernel so that gamma keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.sparse_kl import sparse_kl_loss
from .cache.reader import CacheBatch


@dataclass
class LossParts:
    loss: torch.Tensor  # what backward() sees
    ce: float
    kl: float  # 0.0 when the KL is off (cpt)


def distill_loss(logits: torch.Tensor, batch: CacheBatch, gamma: float, temperature: float = 1.0,
                 use_tail: bool = True, kl_impl: str = "auto") -> LossParts:
    """logits [B, L, V] from the student on batch.input_ids[:, :-1]; gamma = 0 -> CE only."""
    b, length, vocab = logits.shape
    flat = logits.reshape(b * length, vocab)
    targets = batch.input_ids[:, 1:].reshape(-1).to(logits.device)
    ce = F.cross_entropy(flat.float(), targets)
    if gamma == 0.0:
        return LossParts(ce, ce.item(), 0.0)
    dev = logits.device
    kl = sparse_kl_loss(
        flat,
        batch.topk_ids.reshape(b * length, -1).to(dev),
        batch.topk_logprobs.reshape(b * length, -1).to(dev),
        batch.tail_logmass.reshape(-1).to(dev) if use_tail else None,
        temperature=temperature,
        reduction="mean",
        impl=kl_impl,
    )
    return LossParts(ce + gamma * kl, ce.item(), kl.item())
