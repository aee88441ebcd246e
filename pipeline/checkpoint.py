"""Checkpoints written atomically: a resumed run continues exactly where the last one stopped.

A checkpoint is a directory `ckpt-<step>/` holding the student (`save_pretrained`, so
`ddk eval` and any HF tool can load it), `trainer.pt` (optimizer, RNG states) and
`state.json` (step, scheduler and sampler state, the current interval's rows, metrics
so far). It is assembled under a temporary name and renamed; `latest` names the newest
complete one and is itself replaced atomically.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


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
    final = out_dir / f"ckpt-{step:07d}"
    tmp = out_dir / f".tmp-ckpt-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")  # a checkpoint is a complete HF model directory
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = out_dir / (LATEST + ".tmp")
    pointer.write_text(final.name)
    os.replace(pointer, out_dir / LATEST)
    for old in sorted(out_dir.glob("ckpt-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if not pointer.exists():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_trainer_state(ckpt: Path, optimizer) -> dict:
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return json.loads((ckpt / "state.json").read_text())
