"""The training objective, Eq. 3: CE(student, next token) + gamma * KL(teacher || student).

The KL runs over the cached teacher support (top-k) plus its tail bucket; with
temperature T it is scaled by T^2 so that gamma keeps its meaning. Two implementations
of the same numbers (`distill.loss_impl`):

- "fused" (default): the LM head is applied chunk by chunk inside the loss
  (kernels/fused_linear_kl.py), so the student's [tokens, V] logits never exist. At a
  real vocabulary (V = 151936) they are the memory wall of stage two: 8192 tokens hold
  2.5 GB of bf16 logits, 5 GB for an fp32 copy and as much again for their gradients.
- "unfused": the HF model's full logits, F.cross_entropy and the sparse-KL kernel on
  them: the reference the fused path is tested against, kept for comparison.

gamma = 0 (cpt) is the same path without teacher inputs: a fused cross-entropy.

Masked caches (chat domains): only the positions in batch.loss_mask are trained; both
terms are means over them (the others get target ignore_index, no CE and no KL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.fused_linear_kl import fused_linear_distill_loss
from ..kernels.sparse_kl import sparse_kl_loss
from .cache.reader import CacheBatch

LOSS_IMPLS = ("fused", "unfused")


@dataclass(frozen=True)
class Objective:
    gamma: float  # KL weight; 0 = CE only (cpt)
    temperature: float = 1.0
    # The teacher's tail bucket (only meaningful at T = 1). Stage two turns it off for a
    # sampled support, whose tail is -inf everywhere: the same numbers, without the tail terms.
    use_tail: bool = True
    loss_impl: str = "fused"  # "fused" | "unfused"
    kl_impl: str = "auto"  # "auto" | "triton" | "torch": the kernel inside either path
    chunk_tokens: int = 0  # tokens per chunk of the fused head; 0: its default for the device
    # The batches' ids were checked on the host (TopKCacheReader.batch, against the cache's
    # id space, which load_student checks the student's rows cover): the fused loss then
    # skips its own device-side check, a host synchronisation per micro-step.
    ids_checked: bool = False


@dataclass
class LossParts:
    """The loss and its two terms. ce and kl are detached fp32 scalars left on the device:
    reading them (.item()) is a host synchronisation, which the training loop does once
    per optimizer step for all its micro-batches together (stages/distill.py)."""

    loss: torch.Tensor  # what backward() sees
    ce: torch.Tensor
    kl: torch.Tensor  # 0 when the KL is off (cpt)


def _teacher_inputs(batch: CacheBatch, obj: Objective, device) -> tuple:
    """[N, k] support ids and log-probs and the [N] tail, flattened over (row, position).
    The tail is None when the objective leaves it out: at T != 1, and for a sampled
    support, whose tail is -inf everywhere (the kernels then skip the tail terms)."""
    if obj.gamma == 0.0:
        return None, None, None
    k = batch.topk_ids.shape[-1]
    tail = batch.tail_logmass.reshape(-1).to(device) if obj.use_tail and obj.temperature == 1.0 else None
    return batch.topk_ids.reshape(-1, k).to(device), batch.topk_logprobs.reshape(-1, k).to(device), tail


IGNORE_INDEX = -100


def _targets(batch: CacheBatch, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N] next-token ids, IGNORE_INDEX where a masked cache trains nothing, and the [N] mask."""
    targets = batch.input_ids[:, 1:].reshape(-1).to(device)
    if batch.loss_mask is None:
        return targets, None
    mask = batch.loss_mask.reshape(-1).to(device)
    return targets.masked_fill(~mask, IGNORE_INDEX), mask


def unfused_loss(logits: torch.Tensor, batch: CacheBatch, obj: Objective) -> LossParts:
    """logits [B, L, V] from the student on batch.input_ids[:, :-1]."""
    b, length, vocab = logits.shape
    flat = logits.reshape(b * length, vocab)
    targets, mask = _targets(batch, logits.device)
    ce = F.cross_entropy(flat.float(), targets, ignore_index=IGNORE_INDEX)
    if obj.gamma == 0.0:
        return LossParts(ce, ce.detach(), torch.zeros((), device=ce.device))
    ids, logprobs, tail = _teacher_inputs(batch, obj, logits.device)
    kl = sparse_kl_loss(flat, ids, logprobs, tail, mask=mask, temperature=obj.temperature, reduction="mean", impl=obj.kl_impl)
    return LossParts(ce + obj.gamma * kl, ce.detach(), kl.detach().float())


def fused_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: CacheBatch,
               obj: Objective) -> LossParts:
    """hidden [B, L, H]: the decoder's final hidden states on batch.input_ids[:, :-1]."""
    b, length, h = hidden.shape
    targets, _ = _targets(batch, hidden.device)
    ids, logprobs, tail = _teacher_inputs(batch, obj, hidden.device)
    loss, ce, kl = fused_linear_distill_loss(
        hidden.reshape(b * length, h), weight, targets, ids, logprobs, tail,
        gamma=obj.gamma, temperature=obj.temperature, bias=bias, impl=obj.kl_impl,
        chunk_tokens=obj.chunk_tokens or None, check_ids=not obj.ids_checked, ignore_index=IGNORE_INDEX,
    )
    return LossParts(loss, ce, kl)
