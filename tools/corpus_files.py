"""What the corpus builders share: cutting text at a line boundary, and writing a built
corpus as one `<domain>.jsonl` per domain (`{"text": ...}` per line) plus SOURCES.json,
each file atomically, with no stale domain file left behind."""

from __future__ import annotations

import json
from pathlib import Path

from ..pipeline.atomic import write_text_atomic


def cut_at_line(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at the last line boundary before it."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    nl = head.rfind("\n")
    return head[: nl + 1] if nl >= 0 else ""


def write_corpus(out: Path, built: dict[str, list[str]], all_domains: list[str], sources_meta: dict) -> None:
    """built: documents per domain written; all_domains: every domain the builder knows,
    so that a domain omitted this time loses the file an earlier build left."""
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in built.items():
        write_text_atomic(out / f"{name}.jsonl", "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    for name in all_domains:
        if name not in built:
            (out / f"{name}.jsonl").unlink(missing_ok=True)
    write_text_atomic(out / "SOURCES.json", json.dumps(sources_meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
