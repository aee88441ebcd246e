"""What a stage-two run is made of, as hashes: the cache it reads and the student it starts from.

A finished run may be reused (by `ddk compare`) and a checkpoint resumed only when these
match the run that would be made now; a config alone does not say whether the cache was
rebuilt or the tiny student re-trained under the same paths.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .cache.manifest import MANIFEST_FILE
from .teachers.identity import weights_sha256


def cache_identity(cache_dir: str | Path) -> str:
    """sha256 of the cache's manifest.json bytes (the manifest pins every shard's sha256)."""
    return hashlib.sha256((Path(cache_dir) / MANIFEST_FILE).read_bytes()).hexdigest()


def student_identity(student_dir: str | Path) -> str:
    """sha256 of the initial student's weight files."""
    return weights_sha256(student_dir)
