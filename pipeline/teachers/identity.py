"""Content identities of a teacher: what a cache is pinned to."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the weight files (name + bytes, sorted by name)."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)}); point teacher.path at a HF model directory")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


# What a tokenizer is pinned by: the parts of the fast tokenizer's own definition (its
# backend_tokenizer JSON) that decide which ids a text becomes and what an id means.
# Not the post-processor (BOS/EOS insertion: stages encode with add_special_tokens=False),
# the decoder, padding, truncation, the chat template or the special-token roles
# (eos/pad/bos names): an Instruct checkpoint and its base model differ there and still
# share every id, so a cache made with one teaches the other.
TOKENIZER_PARTS = ("model", "vocab", "merges", "normalizer", "pre_tokenizer", "added_tokens")
PART_NAMES = {"model": "model options", "vocab": "vocabulary", "merges": "merges", "normalizer": "normalizer",
              "pre_tokenizer": "pre-tokenizer", "added_tokens": "added tokens"}
# The flags of an added token that change how a text is split around it.
ADDED_TOKEN_FIELDS = ("id", "content", "special", "single_word", "lstrip", "rstrip", "normalized")


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _tokenizer_parts(tokenizer) -> tuple[dict, list[list]]:
    """(part -> its canonical JSON value, the added tokens as [id, content, flags...] rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        # A tokenizer without a `tokenizers` backend (a slow, e.g. sentencepiece, one) does
        # not expose its merges or normalizer: pin its class and what it does expose.
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        added = sorted([[i, str(t), bool(getattr(t, "special", True)), bool(getattr(t, "single_word", False)),
                         bool(getattr(t, "lstrip", False)), bool(getattr(t, "rstrip", False)), bool(getattr(t, "normalized", False))]
                        for i, t in tokenizer.added_tokens_decoder.items()])
        return {"model": {"slow_class": type(tokenizer).__name__}, "vocab": vocab, "merges": None, "normalizer": None,
                "pre_tokenizer": None, "added_tokens": added}, added
    d = json.loads(backend.to_str())
    model = dict(d["model"])
    vocab = model.pop("vocab", None)
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id, listed in id order
        vocab = sorted(vocab.items(), key=lambda kv: kv[1])
    merges = model.pop("merges", None)
    if merges and isinstance(merges[0], str):
        # tokenizers < 0.20 wrote a merge as "a b", later versions as ["a", "b"]: one form
        merges = [m.split(" ", 1) for m in merges]
    added = sorted([t.get(f, False) for f in ADDED_TOKEN_FIELDS] for t in d.get("added_tokens") or [])
    return {"model": model, "vocab": vocab, "merges": merges, "normalizer": d.get("normalizer"),
            "pre_tokenizer": d.get("pre_tokenizer"), "added_tokens": added}, added


def tokenizer_identity(tokenizer) -> dict:
    """What a cache records of its tokenizer: `sha256` over everything that changes ids, one
    hash per part (`parts`: to name what differs when refusing), the added tokens
    themselves (a few hundred at most: to name the ids that differ) and the part sizes."""
    parts, added = _tokenizer_parts(tokenizer)
    hashes = {name: _sha256(parts[name]) for name in TOKENIZER_PARTS}
    return {
        "sha256": _sha256(hashes),
        "parts": hashes,
        "sizes": {name: len(parts[name]) for name in ("vocab", "merges", "added_tokens") if parts[name] is not None},
        "added_tokens": added,
    }


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what changes ids (vocabulary, merges, normalizer, pre-tokenizer, added
    tokens): equal tokenizers turn text into the same ids with the same meaning. It
    compares definitions, not behaviour: one BPE written with another list of merges
    (e.g. converted from tiktoken ranks rather than saved by its authors) differs."""
    return tokenizer_identity(tokenizer)["sha256"]


def legacy_tokenizer_sha256(tokenizer) -> str:
    """The identity caches recorded before `tokenizer_identity`: the vocabulary and the
    special-token map, one hash (it refused an Instruct student for a base teacher)."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def tokenizer_difference(recorded: dict, tokenizer) -> str | None:
    """None when `tokenizer` turns text into the ids `recorded` (a plan's or manifest's
    `tokenizer` entry) was made with; else the parts that differ, named, e.g.
    "merges, added tokens (ids 151646..151650)"."""
    if "parts" not in recorded:
        # A cache recorded before the per-part identity holds only the old single hash
        # (vocabulary + special-token map). Recomputing that hash is the only comparison
        # it allows: equal means the same tokenizer as before, so the cache is as good as
        # ever. Unequal cannot be explained (the old hash also covered eos/pad names, so an
        # Instruct/base sibling lands here) and cannot be re-checked part by part: the
        # caller refuses and names the fix, rebuilding the cache with this version.
        if legacy_tokenizer_sha256(tokenizer) == recorded.get("sha256"):
            return None
        return "unknown (the cache records the old single hash of vocabulary + special-token map, which cannot name it)"
    mine = tokenizer_identity(tokenizer)
    if mine["sha256"] == recorded["sha256"]:
        return None
    named = []
    for name in TOKENIZER_PARTS:
        if mine["parts"][name] == recorded["parts"].get(name):
            continue
        label = PART_NAMES[name]
        if name == "added_tokens":
            ids = _differing_ids(recorded.get("added_tokens") or [], mine["added_tokens"])
            label += f" (ids {_ranges(ids)})" if ids else ""
        elif name in ("vocab", "merges"):
            theirs, ours = recorded.get("sizes", {}).get(name), mine["sizes"].get(name)
            label += f" ({theirs} entries in the cache, {ours} here)" if theirs != ours else ""
        named.append(label)
    return ", ".join(named) or "the combined hash (no single part)"


def carry_legacy_identity(existing: dict, current: dict, tokenizer) -> dict:
    """The tokenizer entry for a plan checked against `existing` (a cache directory's):
    an old cache's single-hash entry when `tokenizer` reproduces that hash, so a cache
    made before the per-part identity resumes (and its ingested rows, keyed by that hash,
    are reused) instead of being refused as made with another tokenizer; else `current`."""
    if "parts" not in existing and "parts" in current and legacy_tokenizer_sha256(tokenizer) == existing.get("sha256"):
        return existing  # its vocab_size is still compared with the teacher's by check_compatible
    return current


def _differing_ids(a: list[list], b: list[list]) -> list[int]:
    by_id_a, by_id_b = {t[0]: t for t in a}, {t[0]: t for t in b}
    return sorted(i for i in set(by_id_a) | set(by_id_b) if by_id_a.get(i) != by_id_b.get(i))


def _ranges(ids: list[int], most: int = 6) -> str:
    """[5, 6, 7, 9] -> "5..7, 9" (at most `most` runs, then how many more)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [f"{a}..{b}" if b > a else f"{a}" for a, b in runs[:most]]
    if len(runs) > most:
        text.append(f"and {len(runs) - most} more runs")
    return ", ".join(text)


def model_vocab_size(model_dir: str | Path) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    return int(text_cfg["vocab_size"])
