"""Progress bars that stay readable in logs: live on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, **kwargs):
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
