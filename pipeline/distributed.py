"""Process-group plumbing for multi-process stage two (torchrun): who this rank is, how
the student is wrapped, and the few collectives the training loop needs.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous address; without them (a
plain `ddk distill`) the world has one rank, every function here is a no-op and the loop
runs exactly as it did before multi-process training existed.

Gradient synchronisation is PyTorch's own: DistributedDataParallel (`parallel = "ddp"`)
or FSDP2's `fully_shard` per decoder layer and then the root (`parallel = "fsdp2"`).
Nothing here averages gradients by hand.
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


def wrap_model(model: torch.nn.Module, parallel: str, env: DistEnv, device: str) -> torch.nn.Module:
    """DDP or FSDP2 around the student; the model itself when the world has one rank."""
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

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 kept FSDP2 under _composable
            from torch.distributed._composable.fsdp import fully_shard

        mesh = init_device_mesh(device, (env.world_size,))
        # HF names its decoder-layer classes in _no_split_modules; sharding each one lets FSDP
        # gather one layer's parameters at a time instead of the whole model
        layer_types = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise ConfigError(f"{type(model).__name__} names no decoder-layer class in _no_split_modules; "
                             "FSDP2 needs them to shard per layer: use distill.parallel = \"ddp\"")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ConfigError(f"distill.parallel: '{parallel}' is not one of {', '.join(PARALLEL)}")


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
def domain_row_losses(model, reader, keys: dict, env: DistEnv, device: str, batch_rows: int = 32) -> dict[str, np.ndarray]:
    """Mean next-token CE of every row of `keys`, per domain, in key order. Each rank
    evaluates keys[rank::world_size] and the per-row vectors are all-reduced, so every
    rank gets the same numbers. `model` is a StudentLM (or DDP / FSDP2 around one)."""
    net = unwrap(model)  # DDP's forward would be a collective; FSDP2's must be (it gathers weights)
    net.eval()
    out = {}
    for domain, domain_keys in keys.items():
        losses = np.zeros(len(domain_keys))
        mine = list(range(len(domain_keys)))[env.rank :: env.world_size]
        rows = reader.token_rows([domain_keys[j] for j in mine] or domain_keys[:1])
        # every rank runs as many forwards as the largest share needs: an FSDP2 forward
        # all-gathers parameters, so a rank that stopped early would leave the others waiting
        for b in range(math.ceil(math.ceil(len(domain_keys) / env.world_size) / batch_rows)):
            chunk = rows[b * batch_rows : (b + 1) * batch_rows]
            padding = not mine or len(chunk) == 0
            if padding:  # a forward for the others' sake, its loss not counted
                chunk = rows[:1]
            row_loss = net(chunk.to(device)).double().cpu().numpy()
            if not padding:
                losses[mine[b * batch_rows : b * batch_rows + len(chunk)]] = row_loss
        out[domain] = all_reduce_sum(losses, env)
    return out


def domain_losses(model, reader, keys: dict, env: DistEnv, device: str, batch_rows: int = 32) -> dict[str, float]:
    """Mean next-token CE per domain over `keys` (rows hold equal token counts, so the
    mean of the row means is the token-weighted mean)."""
    return {d: float(r.mean()) if r.size else 0.0 for d, r in domain_row_losses(model, reader, keys, env, device, batch_rows).items()}
