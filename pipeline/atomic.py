"""Atomic file writes: a temp file beside the target, flushed to disk, renamed over it.

A reader (or a resumed run) sees either the old file or the complete new one, never a
torn write; a temp file left by a killed process is simply overwritten next time.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp"):
    """Yield the temp path `<path><suffix>` to write; when the block ends, fsync and rename it
    over `path`. If the block raises, the temp file is removed and `path` is left as it was."""
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))
