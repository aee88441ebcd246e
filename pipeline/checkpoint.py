"""Checkpoints written atomically: a resumed run continues exactly where the last one stopped.

A checkpoint is a directory `ckpt-<step>/` holding the student (`save_pretrained`, so
`ddk eval` and any HF tool can load it), `trainer.pt` (optimizer, RNG states) and
`state.json` (step, scheduler and sampler state, the current interval's rows, metrics
so far). It is assembled under a temporary name and renamed; `latest` names the newest
complete one and is itself replaced atomically.

Model and optimizer are saved as FULL, rank-independent state dicts (parameter names, not
shards or DDP-prefixed keys), gathered by `torch.distributed.checkpoint.state_dict`, so a
checkpoint written by N ranks, DDP or FSDP2, resumes on M ranks or in a single process.
With several ranks every rank calls `save_checkpoint` (the gather is collective) and
rank 0 alone writes; the out directory must be one every rank can read on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .atomic import write_text_atomic
from .distributed import barrier, is_main, unwrap
from .student import hf_model

LATEST = "latest"
# cpu_offload with full_state_dict: only rank 0 receives the gathered tensors (on the host),
# so N ranks do not each hold a full copy
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, optimizer, state: dict, keep: int = 2) -> Path:
    model_state = _share_tied_weights(model, get_model_state_dict(model, options=FULL))
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL)
    final = out_dir / f"ckpt-{step:07d}"
    barrier()
    if is_main():
        tmp = out_dir / f".tmp-ckpt-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # a complete HF model directory, whatever wrapper the model trains in
        hf_model(unwrap(model)).save_pretrained(tmp / "model", state_dict=model_state)
        tokenizer.save_pretrained(tmp / "model")
        torch.save({"optimizer": optim_state, "rng": rng_state()}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(out_dir / LATEST, final.name)
        for old in sorted(out_dir.glob("ckpt-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()  # no rank goes on (or reads `latest`) before the checkpoint is complete
    return final


def _share_tied_weights(model, state: dict) -> dict:
    """Names of one parameter (tied embeddings) point at one tensor again: gathered from FSDP2
    shards they arrive as separate copies, and save_pretrained would then store both."""
    first: dict[int, str] = {}
    for name, param in unwrap(model).named_parameters(remove_duplicate=False):
        if id(param) in first and name in state and first[id(param)] in state:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if not pointer.exists():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_trainer_state(ckpt: Path, model, optimizer) -> dict:
    """Optimizer state and RNG from `ckpt` into this run (any world size, any wrapper)."""
    # mmap: on a node with several ranks the full optimizer state is read once, via the page cache
    blob = torch.load(ckpt / "trainer.pt", weights_only=False, mmap=True)
    optim_state = blob["optimizer"]
    if isinstance(optim_state["param_groups"][0]["params"][0], int):
        optimizer.load_state_dict(optim_state)  # written before full state dicts: one process, plain model
    else:
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    set_rng_state(blob["rng"])
    return json.loads((ckpt / "state.json").read_text())
