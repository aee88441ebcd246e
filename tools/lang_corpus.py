"""Build a third multi-domain corpus, natural language in five languages and four scripts,
from the translated message catalogs this machine ships (binary gettext .mo files).

The built-in corpus (pipeline/builtin_corpus.py) is Python code and English documentation; the
system corpus (tools/system_corpus.py) is C headers, roff man pages, changelogs and
licenses. Both are mostly English and mostly technical markup. This one is short
natural-language UI text: the translations (msgstr) of the same programs' messages
(coreutils, apt, dpkg, gnupg, bash, tar, glib, ...), one domain per language, read from
/usr/share/locale/<locale>/LC_MESSAGES/*.mo. The English originals (msgid) are left out,
so a domain is one language only; the domains differ by language and script, not by
topic (they translate largely the same catalogs).

    german    de   Latin script, Germanic
    french    fr   Latin script, Romance
    spanish   es   Latin script, Romance (close to french: a domain in between)
    russian   ru   Cyrillic (2 bytes a character in UTF-8)
    japanese  ja   kana and kanji (3 bytes a character, thousands of distinct characters)

A message is one translated string (each plural form its own message). Dropped: the
catalog header, empty translations, translations identical to their English original
(format strings, program names left untranslated), ones with no letter at all, and exact
repeats within a domain (the same "memory exhausted" in many catalogs: kept once, where
first seen). A document is up to 40 consecutive messages of one catalog (in the catalog's
own msgid order), joined by newlines, at most 20,000 characters. Catalogs are taken in
the order of a stable hash of their file name (the same order in every language), and
their documents round-robin: the first document of every catalog, then the second of
every catalog, ... until the domain reaches --chars-per-domain characters (the last
document is cut at a line boundary to fit), so a domain spreads over all its catalogs
instead of filling up from the two largest (postgres, coreutils). Catalogs that are not
valid .mo files or whose messages do not decode in their declared charset are skipped
and counted. `<out>/SOURCES.json` records, per domain, the locale, catalog, message,
document and character counts and what was dropped. Same machine, same bytes; every file
is written to a .tmp and renamed into place.

    python -m ddk.tools.lang_corpus --out runs/lang-corpus [--chars-per-domain 800000]

Then train and compare on it: make compare CONFIG=configs/lang.toml
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import struct
import sys
import zlib
from pathlib import Path

from .corpus_files import cut_at_line, write_corpus

LOCALE_DIR = "/usr/share/locale"
DOC_CAP = 20_000       # characters per document
DOC_MESSAGES = 40      # messages per document
MIN_DOC = 100          # a shorter last document (the budget's remainder) is dropped
MIN_DOMAIN = 200_000   # a domain with fewer characters is an error
MO_MAGIC = {0x950412DE: "<", 0xDE120495: ">"}

# name, locale directory under /usr/share/locale
DOMAINS = [
    ("german", "de"),
    ("french", "fr"),
    ("spanish", "es"),
    ("russian", "ru"),
    ("japanese", "ja"),
]


class CatalogError(ValueError):
    """A file that is not a readable gettext catalog."""


def read_mo(path: str) -> list[tuple[str, list[str]]]:
    """The (msgid, [msgstr forms]) pairs of one binary gettext catalog, in file order,
    decoded in the charset its header declares (UTF-8 when it declares none); the header
    entry (empty msgid) is left out. CatalogError for a file that is not a .mo or does
    not decode."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        order = MO_MAGIC[struct.unpack_from("<I", data, 0)[0]]
        version, n, orig_at, trans_at = struct.unpack_from(order + "4I", data, 4)
        if version >> 16 > 1:
            raise CatalogError(f"{path}: .mo major version {version >> 16}, only 0 and 1 are known")
        raw = []
        for i in range(n):
            mlen, moff = struct.unpack_from(order + "2I", data, orig_at + 8 * i)
            tlen, toff = struct.unpack_from(order + "2I", data, trans_at + 8 * i)
            if moff + mlen > len(data) or toff + tlen > len(data):
                raise CatalogError(f"{path}: entry {i} points past the end of the file")
            raw.append((data[moff:moff + mlen], data[toff:toff + tlen]))
    except (KeyError, struct.error) as e:
        raise CatalogError(f"{path}: not a gettext .mo file ({type(e).__name__})") from e
    charset = "utf-8"
    for msgid, msgstr in raw:
        if msgid == b"":
            m = re.search(rb"charset=([A-Za-z0-9_.:-]+)", msgstr)
            if m and m.group(1).upper() != b"CHARSET":  # "CHARSET" is the .pot placeholder
                charset = m.group(1).decode("ascii")
    out = []
    try:
        for msgid, msgstr in raw:
            if msgid == b"":
                continue
            out.append((msgid.decode(charset), msgstr.decode(charset).split("\0")))
    except (UnicodeDecodeError, LookupError) as e:
        raise CatalogError(f"{path}: does not decode as its declared charset {charset!r} ({type(e).__name__})") from e
    return out


def _original_forms(msgid: str) -> set[str]:
    """The English singular and plural of an msgid (context "ctx\\x04" removed)."""
    return set(msgid.split("\x04", 1)[-1].split("\0"))


def _documents(messages: list[str]) -> list[str]:
    """Consecutive messages grouped into documents of <= DOC_MESSAGES messages and
    <= DOC_CAP characters (a single longer message is cut at a line boundary)."""
    docs, cur, size = [], [], 0
    for msg in messages:
        msg = cut_at_line(msg, DOC_CAP)
        if not msg:
            continue
        if cur and (len(cur) == DOC_MESSAGES or size + 1 + len(msg) > DOC_CAP):
            docs.append("\n".join(cur))
            cur, size = [], 0
        cur.append(msg)
        size += len(msg) + (1 if size else 0)
    if cur:
        docs.append("\n".join(cur))
    return docs


def catalogs(locale: str, root: str = LOCALE_DIR) -> list[str]:
    """The locale's catalogs (regular files; links followed), in the stable-hash order of
    their file names (the same order in every locale)."""
    paths = [p for p in glob.glob(os.path.join(root, locale, "LC_MESSAGES", "*.mo")) if os.path.isfile(p)]
    return sorted(paths, key=lambda p: (zlib.crc32(os.path.basename(p).encode()), os.path.basename(p)))


def build_domain(paths: list[str], chars_cap: int) -> tuple[list[str], dict]:
    stats = {"catalogs_seen": 0, "catalogs_used": 0, "skipped_catalogs": [], "skipped_duplicate_catalogs": 0,
             "messages": 0, "dropped_empty": 0, "dropped_untranslated": 0, "dropped_no_letters": 0,
             "dropped_duplicates": 0, "documents_truncated": 0}
    seen_msgs: set[str] = set()
    seen_files: set[str] = set()
    per_catalog: list[list[str]] = []
    for path in paths:
        stats["catalogs_seen"] += 1
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        if digest in seen_files:
            stats["skipped_duplicate_catalogs"] += 1
            continue
        seen_files.add(digest)
        try:
            entries = read_mo(path)
        except CatalogError as e:
            stats["skipped_catalogs"].append(str(e))
            continue
        kept = []
        for msgid, forms in entries:
            originals = _original_forms(msgid)
            for form in forms:
                if not form.strip():
                    stats["dropped_empty"] += 1
                elif form in originals:
                    stats["dropped_untranslated"] += 1
                elif not any(c.isalpha() for c in form):
                    stats["dropped_no_letters"] += 1
                elif form in seen_msgs:
                    stats["dropped_duplicates"] += 1
                else:
                    seen_msgs.add(form)
                    kept.append(form)
        stats["messages"] += len(kept)
        docs = _documents(kept)
        if docs:
            per_catalog.append(docs)
            stats["catalogs_used"] += 1

    docs_out: list[str] = []
    total, full = 0, False
    for i in range(max((len(d) for d in per_catalog), default=0)):  # round-robin over catalogs
        for cat_docs in per_catalog:
            if full or i >= len(cat_docs):
                continue
            doc = cut_at_line(cat_docs[i], chars_cap - total)
            if len(doc) < len(cat_docs[i]):  # the last one, cut to the budget left
                full = True
                if len(doc.strip()) < MIN_DOC:
                    continue
                stats["documents_truncated"] += 1
            docs_out.append(doc)
            total += len(doc)
            full = total >= chars_cap
    stats["documents"] = len(docs_out)
    stats["chars"] = total
    stats["utf8_bytes"] = sum(len(d.encode("utf-8")) for d in docs_out)
    return docs_out, stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddk.tools.lang_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (e.g. runs/lang-corpus)")
    p.add_argument("--chars-per-domain", type=int, default=800_000, help="cap on characters per domain")
    p.add_argument("--locale-dir", default=LOCALE_DIR, help=argparse.SUPPRESS)  # tests: a fake tree
    p.add_argument("--min-domain", type=int, default=MIN_DOMAIN, help=argparse.SUPPRESS)  # tests: small caps
    a = p.parse_args(argv)
    if a.chars_per_domain < a.min_domain:
        p.error(f"--chars-per-domain {a.chars_per_domain}: must be >= {a.min_domain}")

    built: dict[str, list[str]] = {}
    sources: dict[str, dict] = {}
    for name, locale in DOMAINS:
        pattern = os.path.join(a.locale_dir, locale, "LC_MESSAGES", "*.mo")
        docs, stats = build_domain(catalogs(locale, a.locale_dir), a.chars_per_domain)
        if stats["chars"] < a.min_domain:
            sys.exit(f"error: domain {name} has only {stats['chars']:,} characters (< {a.min_domain:,}) "
                     f"from {pattern}; install the {locale} translations (e.g. apt-get install locales-all "
                     f"or the packages' -l10n data) or lower --chars-per-domain")
        built[name] = docs
        sources[name] = {"locale": locale, "glob": pattern, **stats}

    for name, docs in built.items():
        s = sources[name]
        print(f"{name}: {s['documents']} documents, {s['chars']:,} characters ({s['utf8_bytes']:,} bytes) "
              f"from {s['catalogs_used']} catalogs in {s['glob']} (dropped: {s['dropped_untranslated']} untranslated, "
              f"{s['dropped_duplicates']} repeats, {s['dropped_no_letters']} without letters; "
              f"{len(s['skipped_catalogs'])} catalogs unreadable)")
    write_corpus(Path(a.out), built, [name for name, _ in DOMAINS],
                 {"chars_per_domain": a.chars_per_domain, "doc_cap_chars": DOC_CAP, "doc_messages": DOC_MESSAGES,
                  "domains": sources})

if __name__ == "__main__":
    main()
