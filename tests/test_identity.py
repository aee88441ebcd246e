"""Tokenizer identity: what changes ids pins a cache, not the special-token roles.

An Instruct checkpoint and its base model share vocabulary, merges and added tokens but
differ in eos, special-token map and chat template: the student check accepts one for the
other. A changed merge, vocabulary entry or added-token id is refused, the part named.
Old caches (one hash of vocabulary + special-token map) still load when that hash matches.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddk.pipeline.cache.manifest import CacheError
from ddk.pipeline.config import load_config
from ddk.pipeline.teachers.identity import legacy_tokenizer_sha256, tokenizer_identity
from ddk.stages.distill import load_student

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The project's tiny byte-level BPE (as `make tiny-models` trains it), saved."""
    from ddk.pipeline.builtin_corpus import builtin_domains
    from ddk.pipeline.tiny_models import train_tokenizer

    out = tmp_path_factory.mktemp("tiny-tok")
    train_tokenizer(builtin_domains(20_000), 320, 20_000).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """Qwen's real tokenizer (151,851 tokens), converted offline and saved."""
    from ddk.pipeline.qwen_tokenizer import qwen_tokenizer

    out = tmp_path_factory.mktemp("qwen-tok") / "tokenizer"
    qwen_tokenizer(out)
    return out


FAMILIES = {
    # (tokenizer fixture, an existing special token the Instruct-like variant makes eos)
    "tiny": ("tiny_dir", "<|pad|>"),
    "qwen": ("qwen_dir", "<|im_end|>"),
}


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=None)
def _recorded(teacher_dir: Path) -> tuple[dict, dict, int]:
    """(the identity stage one records, the old single hash, len) of a teacher's tokenizer."""
    tok = _tokenizer(teacher_dir)
    return tokenizer_identity(tok), {"sha256": legacy_tokenizer_sha256(tok)}, len(tok)


def _reader(teacher_dir: Path, tmp_path: Path, legacy: bool = False):
    """A stand-in for the cache reader: the manifest entry stage one records for this teacher."""
    identity, old, vocab = _recorded(teacher_dir)
    recorded = json.loads(json.dumps(old if legacy else identity))  # as read back from manifest.json
    return SimpleNamespace(manifest={"tokenizer": {**recorded, "vocab_size": vocab}}, dir=tmp_path / "cache", vocab_size=vocab)


def _student(tok_dir: Path, out: Path, edit=None, config_edit=None, model: bool = True) -> Path:
    """A student directory: a copy of `tok_dir`'s tokenizer files (tokenizer.json edited by
    `edit`, tokenizer_config.json by `config_edit`) beside a 1-layer model (if `model`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(tok_dir, out)
    for name, fn in (("tokenizer.json", edit), ("tokenizer_config.json", config_edit)):
        if fn is not None:
            d = json.loads((out / name).read_text())
            fn(d)
            (out / name).write_text(json.dumps(d, ensure_ascii=False))
    if model:
        torch.manual_seed(0)
        rows = _recorded(tok_dir)[2]
        LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     num_key_value_heads=1, max_position_embeddings=64)).save_pretrained(out)
    else:
        (out / "config.json").write_text("{}")  # refused before the model is loaded
    return out


def _load(student: Path, reader):
    cfg = load_config(None, [f"distill.student={json.dumps(str(student))}"])
    return load_student(cfg, reader, "cpu")


def _instruct_like(eos: str):
    """What an Instruct checkpoint changes against its base: eos, special-token map, chat template."""
    def edit(c: dict) -> None:
        c.update(eos_token=eos, chat_template=CHAT_TEMPLATE, extra_special_tokens=[eos], model_max_length=32768)
    return edit


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_instruct_like_sibling_is_accepted(family, request, tmp_path):
    fixture, eos = FAMILIES[family]
    teacher = request.getfixturevalue(fixture)
    student = _student(teacher, tmp_path / "student", config_edit=_instruct_like(eos))
    tok = _tokenizer(student)
    assert tok.eos_token == eos and tok.chat_template == CHAT_TEMPLATE
    # the old identity (vocabulary + special-token map) refused exactly this pair
    assert legacy_tokenizer_sha256(tok) != legacy_tokenizer_sha256(_tokenizer(teacher))
    model, loaded = _load(student, _reader(teacher, tmp_path))
    assert loaded.eos_token == eos and model.config.vocab_size == len(tok)


def _swap_merges(d: dict) -> None:
    m = d["model"]["merges"]
    i, j = 0, len(m) // 2  # a frequent merge and a rare one trade priority: other ids for some texts
    m[i], m[j] = m[j], m[i]


def _swap_vocab_ids(d: dict) -> None:
    vocab = d["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[300 if len(vocab) > 1000 else 200], by_id[301 if len(vocab) > 1000 else 201]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _renumber_added_tokens(first: int, last: int):
    """Tokens first..last get other contents (as Qwen2.5's <|object_ref_start|>... against <|extra_N|>)."""
    def edit(d: dict) -> None:
        for t in d["added_tokens"]:
            if first <= t["id"] <= last:
                t["content"] = f"<|renamed_{t['id']}|>"
    return edit


def _swap_added_ids(d: dict) -> None:
    """The tiny BPE's added tokens <|endoftext|> (id 0) and <|pad|> (id 1) trade ids; they
    are in its vocabulary too, so that part changes with them."""
    by_content = {t["content"]: t for t in d["added_tokens"]}
    eos, pad = by_content["<|endoftext|>"], by_content["<|pad|>"]
    eos["id"], pad["id"] = pad["id"], eos["id"]
    vocab = d["model"]["vocab"]
    vocab["<|endoftext|>"], vocab["<|pad|>"] = vocab["<|pad|>"], vocab["<|endoftext|>"]


# (family, change) -> (edit of tokenizer.json, what the refusal names, what it must not name)
CHANGES = {
    ("tiny", "merge"): (_swap_merges, "merges", ["vocabulary", "added tokens"]),
    ("tiny", "vocab-entry"): (_swap_vocab_ids, "vocabulary", ["merges", "added tokens"]),
    ("tiny", "added-token-ids"): (_swap_added_ids, "vocabulary, added tokens (ids 0..1)", ["merges"]),
    ("qwen", "merge"): (_swap_merges, "merges", ["vocabulary", "added tokens"]),
    ("qwen", "vocab-entry"): (_swap_vocab_ids, "vocabulary", ["merges", "added tokens"]),
    ("qwen", "added-token-ids"): (_renumber_added_tokens(151_646, 151_650), "added tokens (ids 151646..151650)",
                                  ["vocabulary", "merges"]),
}


@pytest.mark.parametrize("family, change", sorted(CHANGES))
def test_a_change_that_changes_ids_is_refused_and_named(family, change, request, tmp_path):
    teacher = request.getfixturevalue(FAMILIES[family][0])
    edit, named, not_named = CHANGES[family, change]
    student = _student(teacher, tmp_path / "student", edit=edit, model=False)
    with pytest.raises(CacheError, match="uses another tokenizer") as e:
        _load(student, _reader(teacher, tmp_path))
    differs = str(e.value).split("differs in: ")[1].split("; ")[0]
    assert differs == named
    for other in not_named:
        assert other not in differs


def test_a_new_added_token_is_named_by_its_id(tiny_dir, tmp_path):
    from ddk.pipeline.teachers.identity import tokenizer_difference

    teacher = _tokenizer(tiny_dir)
    grown = _tokenizer(tiny_dir)
    grown.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    new_id = grown.convert_tokens_to_ids("<|im_start|>")
    assert new_id == len(teacher)
    assert tokenizer_difference(tokenizer_identity(teacher), grown) == f"added tokens (ids {new_id})"


def test_the_identity_records_each_part_and_ignores_roles(qwen_dir):
    tok = _tokenizer(qwen_dir)
    ident = tokenizer_identity(tok)
    assert set(ident["parts"]) == {"model", "vocab", "merges", "normalizer", "pre_tokenizer", "added_tokens"}
    assert ident["sizes"]["vocab"] == 151_643 and ident["sizes"]["added_tokens"] == 208
    assert ident["added_tokens"][0][:3] == [151_643, "<|endoftext|>", True]
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    assert tokenizer_identity(tok)["sha256"] == ident["sha256"]


def test_an_old_cache_loads_when_its_single_hash_matches(tiny_dir, tmp_path):
    """Caches recorded before the per-part identity: accepted on the old hash, else refused
    with the fix (rebuild) named."""
    same = _student(tiny_dir, tmp_path / "same")
    model, _ = _load(same, _reader(tiny_dir, tmp_path, legacy=True))
    assert model is not None
    sibling = _student(tiny_dir, tmp_path / "sibling", config_edit=_instruct_like("<|pad|>"))
    with pytest.raises(CacheError, match="rebuild the cache with this version"):
        _load(sibling, _reader(tiny_dir, tmp_path, legacy=True))


def test_an_old_cache_directory_keeps_its_entry_when_the_tokenizer_reproduces_it(tiny_dir):
    """Stage one on a cache begun before the per-part identity: the plan carries the old
    entry (so check_compatible and the ingest key see what they saw), only if it matches."""
    from ddk.pipeline.teachers.identity import carry_legacy_identity

    tok = _tokenizer(tiny_dir)
    current = {**tokenizer_identity(tok), "vocab_size": 320}
    old = {"sha256": legacy_tokenizer_sha256(tok), "vocab_size": 320}
    assert carry_legacy_identity(old, current, tok) == old
    assert carry_legacy_identity({"sha256": "0" * 64, "vocab_size": 320}, current, tok) == current
    assert carry_legacy_identity(current, current, tok) == current
