"""Process-group plumbing for multi-process stage two (torchrun): who this rank is, how
the student is wrapped, and the few collectives the training loop needs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous address; without them (a
plain `ddk distill`) the world has one rank, every function here is a no-op and the loop
runs exactly as it did before multi-process training existed.

Gradient synchronisation is PyTorch's own: DistributedDataParallel (`parallel = "ddp"`)
or FSDP2's `fully_shard` per decoder layer and then the root (`parallel = "fsdp2"`).
Nothing here averages gradients by hand. When stage two computes in bf16 (CUDA), FSDP2
runs torchtitan's mixed precision: bf16 parameters and all-gathers, gradients reduced in
fp32, fp32 master shards for the optimizer (`fsdp_mixed_precision`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .student import autocast_context

PARALLEL = ("ddp", "fsdp2")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init() -> DistEnv:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or none."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():  # a caller (a test, a notebook) already set one up
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistEnv()
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible on this node); "
                              f"launch at most {torch.cuda.device_count()} processes per node (torchrun --nproc_per_node)")
        # "cuda" then means this rank's GPU everywhere (tensors, autocast, the mesh)
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def close(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -----------------------------------------------------------------------------
# the model


def _fsdp2():
    """(fully_shard, MixedPrecisionPolicy): public since torch 2.6, under _composable before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def fsdp_mixed_precision(param_dtype: torch.dtype | None) -> tuple[dict, dict]:
    """fully_shard's keyword arguments for (each decoder layer, the root).

    param_dtype None (fp32 training): none, FSDP2 gathers and reduces the fp32 parameters.
    bf16 (as torchtitan): parameters cast to bf16 once per all-gather (half the traffic
    and the unsharded memory), gradients reduce-scattered in fp32 into the fp32 shards the
    optimizer steps. The root does not cast its forward inputs: they are the token ids and
    the teacher's CacheBatch, whose fp32 log-probs must reach the loss unrounded (each
    layer still casts its inputs, the hidden states, to bf16).
    """
    if param_dtype is None:
        return {}, {}
    _, policy = _fsdp2()
    return ({"mp_policy": policy(param_dtype=param_dtype, reduce_dtype=torch.float32)},
            {"mp_policy": policy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)})


def wrap_model(model: torch.nn.Module, parallel: str, env: DistEnv, device: str,
               param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """DDP or FSDP2 around the student; the model itself when the world has one rank.
    param_dtype: the dtype training computes in (bf16 under autocast, None for fp32);
    FSDP2 gathers parameters in it (`fsdp_mixed_precision`), DDP keeps fp32 replicas and
    leaves the casting to autocast."""
    if not env.enabled:
        return model
    if parallel == "ddp":
        # The only buffers (rotary frequencies) are constants, and a broadcast inside forward
        # would make every evaluation forward a collective. torch 2.13 renamed the switch.
        ddp = torch.nn.parallel.DistributedDataParallel
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
        return ddp(model, device_ids=[env.local_rank] if device == "cuda" else None, **{no_buffer_sync: False})
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (env.world_size,))
        return shard_model(model, mesh, param_dtype)
    raise ConfigError(f"distill.parallel: '{parallel}' is not one of {', '.join(PARALLEL)}")


def shard_model(model: torch.nn.Module, mesh, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 in place: fully_shard per decoder layer, then the root, over `mesh`."""
    fully_shard, _ = _fsdp2()
    layer_mp, root_mp = fsdp_mixed_precision(param_dtype)
    # HF names its decoder-layer classes in _no_split_modules; sharding each one lets FSDP
    # gather one layer's parameters at a time instead of the whole model
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ConfigError(f"{type(model).__name__} names no decoder-layer class in _no_split_modules; "
                          "FSDP2 needs them to shard per layer: use distill.parallel = \"ddp\"")
    for layer in layers:
        fully_shard(layer, mesh=mesh, **layer_mp)
    fully_shard(model, mesh=mesh, **root_mp)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside (DDP holds it as .module; FSDP2 changes the model in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with contextlib.nullcontext() if enabled else model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(enabled)
    yield


def scalar(x) -> float:
    """A float from a tensor that may be an FSDP2 DTensor (clip_grad_norm_ returns one)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x.item() if torch.is_tensor(x) else x)


# -----------------------------------------------------------------------------
# collectives on small host values


def all_reduce_mean(values, env: DistEnv) -> list[float]:
    """Mean over ranks of a few floats (the logged loss: each rank's loss is the mean over
    its own equally sized share of the rows, so the mean of the means is the global mean)."""
    if not env.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return (t / env.world_size).tolist()


def all_reduce_mean_tensor(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks of a small device tensor, left on the device: no host
    synchronisation (the training step reads its metrics once, after this)."""
    if not env.enabled:
        return t
    comm = t.to(_comm_device(), torch.float64)
    dist.all_reduce(comm)
    return (comm / env.world_size).to(t.device)


def all_reduce_sum(array: np.ndarray, env: DistEnv) -> np.ndarray:
    if not env.enabled:
        return array
    t = torch.as_tensor(array, dtype=torch.float64).to(_comm_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def check_identical(array: np.ndarray, env: DistEnv, what: str) -> None:
    """Rank 0's value, broadcast and compared exactly: ranks that disagree would draw
    different interval datasets and silently train on a mix nobody chose."""
    if not env.enabled:
        return
    ref = torch.as_tensor(np.asarray(array, dtype=np.float64)).to(_comm_device())
    mine = ref.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(ref, mine):
        raise RuntimeError(f"rank {env.rank}: {what} {mine.tolist()} differ from rank 0's {ref.tolist()}")


# -----------------------------------------------------------------------------
# evaluation over a disjoint share of the held-out rows


@torch.no_grad()
def domain_row_losses(model, reader, keys: dict, env: DistEnv, device: str, batch_rows: int = 32,
                      precision: str = "fp32") -> dict[str, np.ndarray]:
    """Mean next-token CE of every row of `keys`, per domain, in key order. Each rank
    evaluates keys[rank::world_size] and the per-row vectors are all-reduced, so every
    rank gets the same numbers. `model` is a StudentLM (or DDP / FSDP2 around one).
    precision: distill.precision, so that evaluation runs under training's autocast
    (bf16 on CUDA with "auto"; fp32 on CPU, as before)."""
    net = unwrap(model)  # DDP's forward would be a collective; FSDP2's must be (it gathers weights)
    net.eval()
    out = {}
    for domain, domain_keys in keys.items():
        losses = np.zeros(len(domain_keys))
        mine = list(range(len(domain_keys)))[env.rank :: env.world_size]
        rows = reader.token_rows([domain_keys[j] for j in mine] or domain_keys[:1])
        mask, positions = reader.row_layout([domain_keys[j] for j in mine] or domain_keys[:1])  # masked caches, else None
        counted = []  # per-row losses left on the device, read once per domain
        # every rank runs as many forwards as the largest share needs: an FSDP2 forward
        # all-gathers parameters, so a rank that stopped early would leave the others waiting
        for b in range(math.ceil(math.ceil(len(domain_keys) / env.world_size) / batch_rows)):
            part = slice(b * batch_rows, (b + 1) * batch_rows)
            padding = not mine or len(rows[part]) == 0
            if padding:  # a forward for the others' sake, its loss not counted
                part = slice(0, 1)
            on = lambda t: None if t is None else t[part].to(device)  # noqa: E731
            with autocast_context(precision, device):
                row_loss = net(rows[part].to(device), loss_mask=on(mask), position_ids=on(positions))
            if not padding:
                counted.append(row_loss)
        if counted:
            losses[mine[: sum(len(r) for r in counted)]] = torch.cat(counted).double().cpu().numpy()
        out[domain] = all_reduce_sum(losses, env)
    return out


def domain_losses(model, reader, keys: dict, env: DistEnv, device: str, batch_rows: int = 32,
                  precision: str = "fp32") -> dict[str, float]:
    """Mean next-token CE per domain over `keys`, token-weighted: rows hold equal token
    counts (the mean of the row means), or in a masked cache their trained positions."""
    from .evaluate import row_weights, token_mean

    return {d: token_mean(r, row_weights(reader, keys[d]))
            for d, r in domain_row_losses(model, reader, keys, env, device, batch_rows, precision=precision).items()}
