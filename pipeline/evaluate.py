"""Per-domain validation loss and perplexity of a causal LM on packed rows."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .chat import loss_mask, position_ids


@torch.no_grad()
def token_loss_sum(model, rows: np.ndarray, device: str = "cpu", flags: np.ndarray | None = None) -> tuple[float, int]:
    """(summed next-token cross-entropy in nats, number of predicted tokens) of one batch of
    rows; with token flags (chat rows) over the trained positions, each conversation
    attending only to itself."""
    ids = torch.as_tensor(rows, dtype=torch.long, device=device)
    pos = None if flags is None else torch.as_tensor(position_ids(flags), device=device)
    logits = model(input_ids=ids[:, :-1], position_ids=pos, use_cache=False).logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    if flags is None:
        return nll.sum().item(), nll.numel()
    mask = torch.as_tensor(loss_mask(flags), device=device).reshape(-1)
    return (nll * mask).sum().item(), int(mask.sum())


def mean_token_loss(model, rows: np.ndarray, batch_rows: int = 32, device: str = "cpu", flags: np.ndarray | None = None) -> float:
    """Mean next-token cross-entropy (nats) over all positions of `rows` [n, seq_len + 1]
    (over the trained ones with token flags)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_rows):
        s, n = token_loss_sum(model, rows[i : i + batch_rows], device, None if flags is None else flags[i : i + batch_rows])
        total += s
        count += n
    return total / max(count, 1)


def domain_losses(model, packed, split: str = "val", batch_rows: int = 32, device: str = "cpu") -> dict[str, float]:
    return {p.name: mean_token_loss(model, p.rows(split), batch_rows, device, p.row_flags(split)) for p in packed}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def format_table(columns: dict[str, dict[str, float]], as_ppl: bool = False) -> str:
    """A plain-text table: one row per domain, one column per model."""
    names = list(next(iter(columns.values())).keys())
    width = max(12, *(len(c) + 2 for c in columns))
    head = f"{'domain':<12}" + "".join(f"{c:>{width}}" for c in columns)
    lines = [head, "-" * len(head)]
    for n in names:
        vals = [columns[c][n] for c in columns]
        lines.append(f"{n:<12}" + "".join(f"{(perplexity(v) if as_ppl else v):>{width}.3f}" for v in vals))
    return "\n".join(lines)


def split_keys(reader, split: str, rows_per_domain: int = 0) -> dict[str, list[tuple[str, str, int]]]:
    """Keys per domain of one held-out split of a cache (all rows, or the first `rows_per_domain`)."""
    out = {}
    for d in reader.domains:
        n = reader.num_rows(d, split)
        n = min(n, rows_per_domain) if rows_per_domain else n
        out[d] = [(d, split, i) for i in range(n)]
    return out


def row_weights(reader, keys: list) -> np.ndarray | None:
    """Trained positions per row of a masked cache (the weights of a token-weighted domain
    mean), or None where every row has all seq_len positions trained."""
    mask = reader.loss_masks(keys) if getattr(reader, "masked", False) else None
    return None if mask is None else mask.sum(1).numpy().astype(np.float64)


def token_mean(row_losses: np.ndarray, weights: np.ndarray | None) -> float:
    """A domain's mean per-token loss from its rows' mean losses (rows weighted by their
    trained positions; plain mean when they all have the same)."""
    if row_losses.size == 0:
        return 0.0
    if weights is None:
        return float(row_losses.mean())
    return float((row_losses * weights).sum() / max(weights.sum(), 1.0))


def cache_teacher_losses(reader, keys: dict) -> dict[str, float]:
    """Teacher mean CE per domain on the same rows, from the cached target logprobs (Eq. 1's lT);
    in a masked cache over the trained positions."""
    if not getattr(reader, "masked", False):
        return {d: -float(reader.target_logprobs(k).double().mean()) for d, k in keys.items()}
    return {d: token_mean(r, row_weights(reader, keys[d])) for d, r in cache_teacher_row_losses(reader, keys).items()}


def cache_teacher_row_losses(reader, keys: dict) -> dict[str, np.ndarray]:
    """Teacher mean CE of each row (key order) per domain, from the cached target logprobs;
    in a masked cache over each row's trained positions."""
    out = {}
    for d, k in keys.items():
        lp, mask = reader.target_logprobs(k).double(), reader.loss_masks(k)
        out[d] = (-lp.mean(1) if mask is None else -(lp * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()
    return out
