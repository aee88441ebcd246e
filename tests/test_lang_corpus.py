"""tools/lang_corpus.py: the third corpus, translated gettext catalogs, one language a domain.

The first tests build from a fake locale tree of .mo files written here (any machine); the
last builds from this machine's /usr/share/locale with a small cap, skipped where the
translations are not installed.
"""

from __future__ import annotations

import json
import struct
import unicodedata
from pathlib import Path

import pytest

from ddk.pipeline.config import load_config
from ddk.tools import lang_corpus
from ddk.tools.lang_corpus import DOMAINS, CatalogError, build_domain, catalogs, read_mo

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "lang.toml"


def write_mo(path: Path, entries: list[tuple[str, str]], charset: str = "UTF-8", big_endian: bool = False) -> Path:
    """A binary gettext catalog (the GNU .mo layout, no hash table) with a header entry."""
    header = f"Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n != 1);\n"
    pairs = sorted([("", header)] + entries, key=lambda e: e[0].encode(charset))
    ids = [k.encode(charset) for k, _ in pairs]
    strs = [v.encode(charset) for _, v in pairs]
    order = ">" if big_endian else "<"
    n = len(pairs)
    orig_at = 28
    trans_at = orig_at + 8 * n
    data_at = trans_at + 8 * n
    blob, orig_tab, trans_tab = b"", [], []
    for s in ids:
        orig_tab.append((len(s), data_at + len(blob)))
        blob += s + b"\0"
    for s in strs:
        trans_tab.append((len(s), data_at + len(blob)))
        blob += s + b"\0"
    out = struct.pack(order + "7I", 0x950412DE, 0, n, orig_at, trans_at, 0, data_at)
    out += b"".join(struct.pack(order + "2I", *e) for e in orig_tab + trans_tab) + blob
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out)
    return path


def test_read_mo_decodes_charset_plurals_and_context(tmp_path):
    entries = [("File not found", "Datei nicht gefunden"),
               ("%d file\0%d files", "%d Datei\0%d Dateien"),
               ("menu\x04Open", "Öffnen")]
    for big in (False, True):
        mo = write_mo(tmp_path / f"{big}.mo", entries, charset="ISO-8859-1", big_endian=big)
        got = dict(read_mo(str(mo)))
        assert got == {"File not found": ["Datei nicht gefunden"], "%d file\0%d files": ["%d Datei", "%d Dateien"],
                       "menu\x04Open": ["Öffnen"]}
    (tmp_path / "bad.mo").write_bytes(b"not a catalog at all")
    with pytest.raises(CatalogError, match="not a gettext .mo file"):
        read_mo(str(tmp_path / "bad.mo"))
    bad = write_mo(tmp_path / "lies.mo", [("a", "b")], charset="UTF-8")
    bad.write_bytes(bad.read_bytes().replace(b"b\0", b"\xff\0"))
    with pytest.raises(CatalogError, match="does not decode"):
        read_mo(str(bad))


def test_build_domain_drops_untranslated_repeats_and_spreads_over_catalogs(tmp_path):
    root = tmp_path / "locale"
    for cat in ("alpha", "beta"):
        msgs = [(f"{cat} message {i:03d}", f"{cat} Nachricht Nummer {i:03d}, übersetzt") for i in range(100)]
        msgs += [("%s: %s", "%s: %s"),                        # untranslated (and no letters)
                 ("GNU", "GNU"),                              # untranslated
                 ("(none)", "(—)"),                           # no letters
                 ("memory exhausted", "Speicher erschöpft")]  # in both catalogs: kept once
        write_mo(root / "de" / "LC_MESSAGES" / f"{cat}.mo", msgs)
    (root / "de" / "LC_MESSAGES" / "broken.mo").write_bytes(b"\0" * 40)
    paths = catalogs("de", str(root))
    assert [Path(p).name for p in paths] == [Path(p).name for p in catalogs("de", str(root))]
    docs, stats = build_domain(paths, chars_cap=10_000_000)
    assert stats["messages"] == 201 and stats["dropped_duplicates"] == 1
    assert stats["dropped_untranslated"] == 4 and stats["dropped_no_letters"] == 2
    assert len(stats["skipped_catalogs"]) == 1 and stats["catalogs_used"] == 2
    text = "\n".join(docs)
    assert "GNU" not in text and text.count("Speicher erschöpft") == 1
    assert all(len(d.split("\n")) <= lang_corpus.DOC_MESSAGES for d in docs)
    # round-robin: a small cap takes the first document of each catalog, not two of one
    small, s = build_domain(paths, chars_cap=len(docs[0]) + len(docs[1]))
    assert {d.split(" ")[0] for d in small} == {"alpha", "beta"} and s["chars"] == sum(map(len, small))


@pytest.fixture(scope="module")
def machine_locales():
    missing = [loc for _, loc in DOMAINS if len(catalogs(loc)) < 5]
    if missing:
        pytest.skip(f"this machine lacks the gettext catalogs of {missing} under {lang_corpus.LOCALE_DIR} "
                    f"(the lang corpus is built from installed translations)")


def test_build_from_this_machine_small_cap(tmp_path, machine_locales, capsys):
    cap = 30_000
    args = ["--chars-per-domain", str(cap), "--min-domain", "10000"]
    lang_corpus.main(["--out", str(tmp_path / "a")] + args)
    lang_corpus.main(["--out", str(tmp_path / "b")] + args)
    names = [n for n, _ in DOMAINS]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([f"{n}.jsonl" for n in names] + ["SOURCES.json"])
    for f in (tmp_path / "a").iterdir():  # deterministic: the same bytes twice
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    meta = json.loads((tmp_path / "a" / "SOURCES.json").read_text())
    assert set(meta["domains"]) == set(names)
    scripts = {"russian": "CYRILLIC", "japanese": ("CJK", "HIRAGANA", "KATAKANA")}
    for name in names:
        docs = [json.loads(line)["text"] for line in (tmp_path / "a" / f"{name}.jsonl").read_text("utf-8").splitlines()]
        assert len(docs) >= 3 and all(d.strip() for d in docs)
        total = sum(map(len, docs))
        assert cap // 2 < total <= cap and total == meta["domains"][name]["chars"]
        if name in scripts:  # the domain is in its own script, not English
            letters = [c for c in "".join(docs) if c.isalpha()]
            ours = [c for c in letters if unicodedata.name(c, "").startswith(scripts[name])]
            assert len(ours) > 0.5 * len(letters), name
    assert "german:" in capsys.readouterr().out


def test_the_config_names_the_built_domains():
    cfg = load_config(CONFIG)
    assert [d.name for d in cfg.corpus.domains] == [n for n, _ in DOMAINS]
    assert all(list(map(str, d.paths)) == [f"../runs/lang-corpus/{d.name}.jsonl"] for d in cfg.corpus.domains)
    assert set(cfg.models.student.domain_mix) == {n for n, _ in DOMAINS}
