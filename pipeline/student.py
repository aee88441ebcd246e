"""The student as stage two trains it: an HF causal LM whose forward returns losses, not logits.

`StudentLM` wraps a `*ForCausalLM` so that the training step can run the decoder alone
and hand its final hidden states to the fused LM-head loss (pipeline/objective.py):
the [tokens, V] logits are never built. Evaluation goes through the same module and
also never builds them (the cross-entropy is taken chunk by chunk over tokens).

The wrapper registers the HF model's own children (`model`, `lm_head`) as its children,
not the HF model itself, so parameter names are exactly the HF model's
(`model.layers.0...`, `lm_head.weight`): full state dicts, optimizer state and
checkpoints stay plain HF, and DDP / FSDP2 wrap this module like they wrapped the HF
model. Its forward is the one DDP and FSDP2 hook into, so gradient sync and FSDP2's
parameter gathering happen as with the HF model's own forward.

Heads that are not a plain linear map of the decoder's output (final-logit soft-capping,
scaled logits, ...) would make the fused loss silently wrong: `StudentLM` checks, once,
that `decoder(x) @ W^T (+ b)` reproduces the model's own logits, and refuses otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache.reader import CacheBatch
from .config import ConfigError
from .objective import LossParts, Objective, fused_loss, unfused_loss

# Tokens per chunk of the evaluation cross-entropy: fp32 logits of this many tokens at
# V = 151936 are ~300 MB, whatever the batch.
EVAL_CHUNK_TOKENS = 512

# Config attributes of HF models whose logits are not hidden @ W^T (+ b); named in the
# refusal so the user knows why (the numeric check below catches the unnamed ones).
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class StudentLM(nn.Module):
    # Every forward passes use_cache=False: HF configs default to use_cache=True, which
    # makes a training forward build a key/value cache and copy each layer's K/V into it.

    def __init__(self, lm: nn.Module, objective: Objective):
        super().__init__()
        decoder, head = lm.get_decoder(), lm.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"{type(lm).__name__}: the LM head is a {type(head).__name__}, not nn.Linear; "
                              f"set distill.loss_impl = \"unfused\"")
        for name, child in lm.named_children():
            self.add_module(name, child)
        # Not registered as submodules: they are the HF model's children, already ours
        # under their own names (see the module docstring).
        for name, module in (("lm", lm), ("_decoder", decoder), ("_head", head)):
            object.__setattr__(self, name, module)
        self.objective = objective
        self._no_split_modules = getattr(lm, "_no_split_modules", None)  # FSDP2 shards per decoder layer by these
        if objective.loss_impl == "fused":
            self._check_plain_linear_head()

    @property
    def config(self):
        return self.lm.config

    def train(self, mode: bool = True):
        self.lm.training = mode
        return super().train(mode)

    def forward(self, input_ids: torch.Tensor, batch: CacheBatch | None = None):
        """batch given: the training loss (LossParts) on batch's rows; else per-row mean CE [B] (no grad)."""
        if batch is None:
            return self._row_losses(input_ids)
        if self.objective.loss_impl == "unfused":
            return unfused_loss(self.lm(input_ids=input_ids, use_cache=False).logits, batch, self.objective)
        hidden = self._decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        return fused_loss(hidden, self._head.weight, self._head.bias, batch, self.objective)

    @torch.no_grad()
    def _row_losses(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE (nats) of each row of ids [B, L + 1], fp32: chunked over tokens
        with the fused objective (its head was checked to be plain linear), from the
        model's own full logits with the unfused one."""
        if self.objective.loss_impl == "unfused":
            logits = self.lm(input_ids=ids[:, :-1], use_cache=False).logits.float()
            return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
        hidden = self._decoder(input_ids=ids[:, :-1], use_cache=False).last_hidden_state.float()
        b, length, h = hidden.shape
        flat, targets = hidden.reshape(-1, h), ids[:, 1:].reshape(-1)
        weight = self._head.weight.float()
        bias = None if self._head.bias is None else self._head.bias.float()
        nll = torch.cat([F.cross_entropy(F.linear(flat[i : i + EVAL_CHUNK_TOKENS], weight, bias),
                                         targets[i : i + EVAL_CHUNK_TOKENS], reduction="none")
                         for i in range(0, flat.shape[0], EVAL_CHUNK_TOKENS)])
        return nll.reshape(b, length).mean(1)

    @torch.no_grad()
    def _check_plain_linear_head(self) -> None:
        named = [a for a in HEAD_TRANSFORMS if getattr(self.lm.config, a, None) not in (None, 1, 1.0)]
        if not named:
            ids = torch.arange(8, device=self._head.weight.device)[None] % self.lm.config.vocab_size
            was_training = self.training
            self.lm.eval()
            reference = self.lm(input_ids=ids, use_cache=False).logits.float()
            mine = F.linear(self._decoder(input_ids=ids, use_cache=False).last_hidden_state.float(), self._head.weight.float(),
                            None if self._head.bias is None else self._head.bias.float())
            self.lm.train(was_training)
            if torch.allclose(reference, mine, rtol=1e-4, atol=1e-4 * max(1.0, reference.abs().max().item())):
                return
            named = ["its logits differ from decoder(x) @ lm_head.weight^T"]
        raise ConfigError(f"{type(self.lm).__name__}: the LM head is not a plain linear map ({', '.join(named)}); "
                          f"the fused loss would be wrong for it: set distill.loss_impl = \"unfused\"")


def hf_model(module: nn.Module) -> nn.Module:
    """The HF model itself (for save_pretrained) from a StudentLM or a plain HF model."""
    return module.lm if isinstance(module, StudentLM) else module
