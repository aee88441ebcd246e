"""The kernel tests' shared parametrization: "torch" always, "triton" where it can run
(CUDA, or CPU under the Triton interpreter), with the reason it is skipped otherwise."""

import os
import sys

import torch

# Triton reads TRITON_INTERPRET when it is first imported (its own library functions are
# decorated then); torch does not import triton, so this comes in time unless something
# imported triton earlier in the session: export it (or set it in a conftest) in that case.
_TRITON_IMPORTED_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddk.kernels.sparse_kl import triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_skip_reason():
    if triton is None:
        return "triton is not importable"
    if DEVICE == "cpu" and os.environ["TRITON_INTERPRET"] != "1":
        return "no CUDA and TRITON_INTERPRET is not 1"
    if DEVICE == "cpu" and _TRITON_IMPORTED_EARLY:
        return "triton was imported before TRITON_INTERPRET=1 was set"
    return None


TRITON_SKIP = _triton_skip_reason()
IMPLS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))),
]
