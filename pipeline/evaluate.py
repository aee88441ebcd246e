"""Per-domain validation loss and perplexity of a causal LM on packed rows."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def token_loss_sum(model, rows: np.ndarray, device: str = "cpu") -> tuple[float, int]:
    """(summed next-token cross-entropy in nats, number of predicted tokens) of one batch of rows."""
    ids = torch.as_tensor(rows, dtype=torch.long, device=device)
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return loss.item(), ids[:, 1:].numel()


def mean_token_loss(model, rows: np.ndarray, batch_rows: int = 32, device: str = "cpu") -> float:
    """Mean next-token cross-entropy (nats) over all positions of `rows` [n, seq_len + 1]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_rows):
        s, n = token_loss_sum(model, rows[i : i + batch_rows], device)
        total += s
        count += n
    return total / max(count, 1)


def domain_losses(model, packed, split: str = "val", batch_rows: int = 32, device: str = "cpu") -> dict[str, float]:
    return {p.name: mean_token_loss(model, p.rows(split), batch_rows, device) for p in packed}


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


def cache_teacher_losses(reader, keys: dict) -> dict[str, float]:
    """Teacher mean CE per domain on the same rows, from the cached target logprobs (Eq. 1's lT)."""
    return {d: -float(reader.target_logprobs(k).double().mean()) for d, k in keys.items()}


def cache_teacher_row_losses(reader, keys: dict) -> dict[str, np.ndarray]:
    """Teacher mean CE of each row (key order) per domain, from the cached target logprobs."""
    return {d: -reader.target_logprobs(k).double().mean(1).numpy() for d, k in keys.items()}
