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

Also here, what a training step is made of besides the loss: the precision stage two
computes in (`autocast_context`: bf16 autocast over fp32 master weights on a CUDA device,
plain fp32 on CPU, for training and evaluation alike), per-layer activation
checkpointing (`set_activation_checkpointing`) and the optimizer (`build_optimizer`:
AdamW, fused on CUDA, no weight decay on norms, biases and embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache.reader import CacheBatch
from .config import ConfigError
from .objective import LossParts, Objective, fused_loss, unfused_loss
# Config attributes of HF models whose logits are not hidden @ W^T (+ b), named in the
# refusal so the user knows why (the numeric check below catches the unnamed ones).
from .teachers.base import named_head_transforms

# Tokens per chunk of the evaluation cross-entropy: fp32 logits of this many tokens at
# V = 151936 are ~300 MB, whatever the batch.
EVAL_CHUNK_TOKENS = 512


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The dtype stage two computes in under autocast (distill.precision), or None for
    plain fp32: "auto" is bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if precision == "bf16" or (precision == "auto" and device == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def autocast_context(precision: str, device: str):
    """The autocast stage two trains AND evaluates under (the same one: a 7B student
    evaluated in fp32 would take twice the time and memory of its training forward)."""
    dtype = autocast_dtype(precision, device)
    if dtype is not None:
        return torch.autocast(device_type=device, dtype=dtype)
    return torch.autocast(device_type=device, enabled=False)


def set_activation_checkpointing(lm: nn.Module, enabled: bool) -> None:
    """Per-decoder-layer activation checkpointing of a HF model, on or off.

    HF's own mechanism (transformers' GradientCheckpointingLayer): in training mode each
    decoder layer runs under torch.utils.checkpoint (non-reentrant), so its forward keeps
    only the layer's input for the backward and is recomputed there; evaluation (eval
    mode, no grad) runs as without. Parameter names, and so state dicts and checkpoints,
    are unchanged. Under FSDP2 the layer's unshard hooks run inside the checkpoint, which
    FSDP2 supports (it skips its pre-forward logic during the recompute).
    """
    if enabled == getattr(lm, "is_gradient_checkpointing", False):
        return  # already so (enabling twice would hook the embeddings twice)
    if enabled:
        if not getattr(lm, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(lm).__name__} does not support gradient checkpointing; set distill.activation_checkpointing = false")
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_disable()
        # enable also hooked the input embeddings (their output requires grad); one hook per
        # enable, so drop it: toggling (bench-step's arms share one model) must not pile them up
        if hasattr(lm, "disable_input_require_grads"):
            lm.disable_input_require_grads()


def no_decay(module: nn.Module, param: torch.Tensor) -> bool:
    """Parameters AdamW does not decay: norm weights and biases (every parameter of fewer
    than 2 dimensions) and embeddings (so also an LM head tied to them; an untied head is
    a linear map like the others and decays)."""
    return param.ndim < 2 or isinstance(module, nn.Embedding)


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """AdamW's two groups: [decayed, not decayed (`no_decay`)], each parameter once (tied
    ones by identity). decay_all: one group, everything decayed (how runs were trained
    before the split; a resumed run keeps the grouping it started with)."""
    params = list(dict.fromkeys(model.parameters()))
    if decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    exempt = {id(p) for m in model.modules() for p in m.parameters(recurse=False) if no_decay(m, p)}
    return [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, decay_all: bool = False) -> torch.optim.AdamW:
    """Stage two's AdamW (betas 0.9, 0.95) over the parameters the optimizer must see (the
    wrapped ones: FSDP2 replaces them with shards). Fused (one kernel for all parameters)
    when they all live on a CUDA device; elsewhere torch's default (foreach), as before."""
    groups = param_groups(model, weight_decay, decay_all)
    fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


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

    def forward(self, input_ids: torch.Tensor, batch: CacheBatch | None = None, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """batch given: the training loss (LossParts) on batch's rows; else per-row mean CE [B]
        (no grad) of rows input_ids [B, L + 1], over `loss_mask`'s positions when given.
        position_ids (or batch.position_ids): packed conversations, each attending only to itself."""
        if batch is None:
            return self._row_losses(input_ids, loss_mask, position_ids)
        pos = batch.position_ids
        if self.objective.loss_impl == "unfused":
            return unfused_loss(self.lm(input_ids=input_ids, position_ids=pos, use_cache=False).logits, batch, self.objective)
        hidden = self._decoder(input_ids=input_ids, position_ids=pos, use_cache=False).last_hidden_state
        return fused_loss(hidden, self._head.weight, self._head.bias, batch, self.objective)

    @torch.no_grad()
    def _row_losses(self, ids: torch.Tensor, loss_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token CE (nats) of each row of ids [B, L + 1], fp32, over the positions of
        loss_mask [B, L] (all when None): chunked over tokens with the fused objective (its
        head was checked to be plain linear), from the model's own full logits with the
        unfused one."""
        if self.objective.loss_impl == "unfused":
            logits = self.lm(input_ids=ids[:, :-1], position_ids=position_ids, use_cache=False).logits.float()
            return _masked_mean(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none"), loss_mask)
        # Under autocast (bf16 on CUDA) the head runs in its dtype, as the training loss's
        # fused head does, and the softmax in fp32; without it (CPU) all in fp32.
        device_type = ids.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
        hidden = self._decoder(input_ids=ids[:, :-1], position_ids=position_ids, use_cache=False).last_hidden_state.to(dtype)
        b, length, h = hidden.shape
        flat, targets = hidden.reshape(-1, h), ids[:, 1:].reshape(-1)
        weight = self._head.weight.to(dtype)
        bias = None if self._head.bias is None else self._head.bias.to(dtype)
        nll = torch.cat([F.cross_entropy(F.linear(flat[i : i + EVAL_CHUNK_TOKENS], weight, bias).float(),
                                         targets[i : i + EVAL_CHUNK_TOKENS], reduction="none")
                         for i in range(0, flat.shape[0], EVAL_CHUNK_TOKENS)])
        return _masked_mean(nll.reshape(b, length), loss_mask)

    @torch.no_grad()
    def _check_plain_linear_head(self) -> None:
        named = named_head_transforms(self.lm.config)
        if not named:
            ids = torch.arange(8, device=self._head.weight.device)[None] % self.lm.config.vocab_size
            was_training = self.training
            self.lm.eval()
            with torch.autocast(ids.device.type, enabled=False):  # in fp32, wherever the wrapper is built
                reference = self.lm(input_ids=ids, use_cache=False).logits.float()
                mine = F.linear(self._decoder(input_ids=ids, use_cache=False).last_hidden_state.float(), self._head.weight.float(),
                                None if self._head.bias is None else self._head.bias.float())
            self.lm.train(was_training)
            if torch.allclose(reference, mine, rtol=1e-4, atol=1e-4 * max(1.0, reference.abs().max().item())):
                return
            named = ["its logits differ from decoder(x) @ lm_head.weight^T"]
        raise ConfigError(f"{type(self.lm).__name__}: the LM head is not a plain linear map ({', '.join(named)}); "
                          f"the fused loss would be wrong for it: set distill.loss_impl = \"unfused\"")


def _masked_mean(nll: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Row means of nll [B, L] over mask's positions (all when None; 0 for a row with none)."""
    if mask is None:
        return nll.mean(1)
    mask = mask.to(nll.device)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def hf_model(module: nn.Module) -> nn.Module:
    """The HF model itself (for save_pretrained) from a StudentLM or a plain HF model."""
    return module.lm if isinstance(module, StudentLM) else module
