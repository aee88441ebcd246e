"""Build a second, held-out multi-domain text corpus from the operating system's own files.

The built-in corpus (pipeline/builtin_corpus.py) is made from the Python installation: stdlib
sources, docstrings, pydoc topics and the unicodedata database. For issue "DDK beyond
the paper" we want a corpus from a different source, with clearly different registers,
that still needs no network: what a Debian-like system ships under /usr.

    c_headers       C header files          /usr/include/**/*.h
    man_pages       English manual pages    /usr/share/man/man[1-8]/*.gz   (roff source)
    changelogs      package changelogs      /usr/share/doc/*/changelog*.gz (not .html.gz)
    licenses        copyright files         /usr/share/doc/*/copyright
    man_translated  non-English man pages   /usr/share/man/<lang>/man[1-8]/*.gz
                    (optional: omitted, with a message, if it has < 200,000 characters)

Each domain becomes `<out>/<domain>.jsonl`, one `{"text": ...}` document per line: one
file is one document, cut at a line boundary to at most 20,000 characters. Files are
taken in the order of a stable hash of their path (a spread over the whole directory
tree: sorted order would fill a domain from the first few folders, e.g. only EGL/GL
headers) until the domain reaches --chars-per-domain characters (the last document is
cut at a line boundary to fit). Exact duplicate texts (symlinked doc
directories, packages sharing one copyright text) are kept once, by sha256; stubs under
100 characters (`.so` man page redirects) are dropped; files that are not valid UTF-8
are skipped and counted. `<out>/SOURCES.json` records, per domain, the glob, document
and character counts and what was skipped. Same machine, same bytes; every file is
written to a .tmp and renamed into place.

    python -m ddk.tools.system_corpus --out runs/system-corpus [--chars-per-domain 600000]

Then train and compare on it: make compare CONFIG=configs/system.toml
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import os
import zlib
import sys
from pathlib import Path

from .corpus_files import cut_at_line, write_corpus

DOC_CAP = 20_000       # characters per document
MIN_DOC = 100          # shorter documents (e.g. ".so man3/foo.3" redirects) are dropped
MIN_DOMAIN = 200_000   # a domain with fewer characters is an error (optional: omitted)
ENGLISH_MAN = {f"man{i}" for i in range(1, 9)}


def _headers() -> list[str]:
    return glob.glob("/usr/include/**/*.h", recursive=True)


def _man_english() -> list[str]:
    return glob.glob("/usr/share/man/man[1-8]/*.gz")


def _changelogs() -> list[str]:
    return [p for p in glob.glob("/usr/share/doc/*/changelog*.gz") if not p.endswith(".html.gz")]


def _licenses() -> list[str]:
    return glob.glob("/usr/share/doc/*/copyright")


def _man_translated() -> list[str]:
    return [p for p in glob.glob("/usr/share/man/*/man[1-8]/*.gz")
            if Path(p).parent.parent.name not in ENGLISH_MAN]


# name, glob (as recorded), source directory, file lister, optional
DOMAINS = [
    ("c_headers", "/usr/include/**/*.h", "/usr/include", _headers, False),
    ("man_pages", "/usr/share/man/man[1-8]/*.gz", "/usr/share/man", _man_english, False),
    ("changelogs", "/usr/share/doc/*/changelog*.gz", "/usr/share/doc", _changelogs, False),
    ("licenses", "/usr/share/doc/*/copyright", "/usr/share/doc", _licenses, False),
    ("man_translated", "/usr/share/man/<lang>/man[1-8]/*.gz", "/usr/share/man", _man_translated, True),
]


def _read(path: str) -> str:
    """The file's text (gunzipped for .gz); UnicodeDecodeError if not valid UTF-8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read().decode("utf-8")


def build_domain(paths: list[str], chars_cap: int) -> tuple[list[str], dict]:
    docs: list[str] = []
    seen: set[str] = set()
    stats = {"files_seen": 0, "skipped_invalid_utf8": 0, "skipped_duplicates": 0,
             "skipped_short": 0, "documents_truncated": 0}
    total = 0
    # Regular files only (os.path.isfile follows links, and drops broken ones).
    for path in sorted((p for p in paths if os.path.isfile(p)), key=lambda p: (zlib.crc32(p.encode()), p)):
        if total >= chars_cap:
            break
        stats["files_seen"] += 1
        try:
            text = _read(path)
        except UnicodeDecodeError:
            stats["skipped_invalid_utf8"] += 1
            continue
        if len(text.strip()) < MIN_DOC:
            stats["skipped_short"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in seen:
            stats["skipped_duplicates"] += 1
            continue
        seen.add(digest)
        doc = cut_at_line(text, min(DOC_CAP, chars_cap - total))
        if len(doc.strip()) < MIN_DOC:  # the budget left is too small for this one
            break
        if len(doc) < len(text):
            stats["documents_truncated"] += 1
        docs.append(doc)
        total += len(doc)
    stats["documents"] = len(docs)
    stats["chars"] = total
    return docs, stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddk.tools.system_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (e.g. runs/system-corpus)")
    p.add_argument("--chars-per-domain", type=int, default=600_000, help="cap on characters per domain (the built-in default takes 600,000)")
    a = p.parse_args(argv)
    if a.chars_per_domain < MIN_DOMAIN:
        p.error(f"--chars-per-domain {a.chars_per_domain}: must be >= {MIN_DOMAIN}")

    built: dict[str, list[str]] = {}
    sources: dict[str, dict] = {}
    for name, pattern, src_dir, lister, optional in DOMAINS:
        docs, stats = build_domain(lister(), a.chars_per_domain)
        if stats["chars"] < MIN_DOMAIN:
            if optional:
                print(f"{name}: omitted, only {stats['chars']:,} characters (< {MIN_DOMAIN:,}) under {src_dir}")
                continue
            sys.exit(f"error: domain {name} has only {stats['chars']:,} characters (< {MIN_DOMAIN:,}) from {src_dir}")
        built[name] = docs
        sources[name] = {"glob": pattern, "source_dir": src_dir, **stats}

    for name, docs in built.items():
        s = sources[name]
        print(f"{name}: {s['documents']} documents, {s['chars']:,} characters from {s['glob']} "
              f"(skipped: {s['skipped_invalid_utf8']} not UTF-8, {s['skipped_duplicates']} duplicates, "
              f"{s['skipped_short']} stubs)")
    write_corpus(Path(a.out), built, [name for name, *_ in DOMAINS],
                 {"chars_per_domain": a.chars_per_domain, "doc_cap_chars": DOC_CAP, "domains": sources})

if __name__ == "__main__":
    main()
