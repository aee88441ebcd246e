"""models.tokenizer = "qwen": Qwen's real vocabulary offline, tiny Qwen2 models, their identity."""

from __future__ import annotations

import dataclasses

import pytest

from ddk.pipeline.config import ConfigError, CorpusConfig, ModelsConfig, ModelSpec, load_config

# Code, whitespace runs (spaces, tabs, CRLF, blank lines), digit runs, CJK, Hangul,
# accents precomposed and decomposed (the package NFC-normalizes), emoji with ZWJ, and
# special tokens inside the text (the package encodes them as specials).
MIXED_TEXT = (
    "def f(x):\n    return x ** 2  # 1234567890\n\n\n\t\tif   y:\r\n        pass  \n"
    "日本語のテキスト、中文字符 한국어 Ünïcödé e\u0301 café naïve\n"
    "😀🎉👨\u200d👩\u200d👧 <|endoftext|> tail <|im_start|>user\nHi<|im_end|>   "
)

TINY = ModelSpec(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64, pretrain_steps=2, batch_rows=2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from ddk.pipeline.qwen_tokenizer import qwen_tokenizer

    return qwen_tokenizer(tmp_path_factory.mktemp("qwen") / "tokenizer")


def test_ids_equal_the_package_encoder(tokenizer):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-7b-instruct")  # Qwen 1/2/2.5 share this vocabulary
    assert tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"] == reference.encode(MIXED_TEXT)
    assert tokenizer("Hello", add_special_tokens=False)["input_ids"] == [9707]


def test_saved_tokenizer_round_trips_and_is_reused(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from ddk.pipeline.qwen_tokenizer import TOKENIZER_FILE, qwen_tokenizer

    out = tmp_path / "tok"
    first = qwen_tokenizer(out)
    built = (out / TOKENIZER_FILE).stat().st_mtime_ns
    again = qwen_tokenizer(out)
    assert (out / TOKENIZER_FILE).stat().st_mtime_ns == built, "a complete tokenizer directory must be reused, not rebuilt"
    loaded = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"]
    for t in (first, again, loaded):
        assert t(MIXED_TEXT, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(loaded("def f(x):\n\t日本 😀", add_special_tokens=False)["input_ids"]) == "def f(x):\n\t日本 😀"


def test_special_token_ids(tokenizer):
    from ddk.pipeline.qwen_tokenizer import QWEN_TOKENIZER_LEN

    assert len(tokenizer) == QWEN_TOKENIZER_LEN == 151_851
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151_643
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>"])
    assert ids == [151_644, 151_645, 151_646, 151_850]


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_qwen2_model_saves_and_loads(tokenizer, tmp_path, tie):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    from ddk.pipeline.tiny_models import build_model, embedding_size

    cfg = ModelsConfig(tokenizer="qwen", architecture="qwen2", tie_word_embeddings=tie)
    rows = embedding_size(cfg, tokenizer)
    assert rows == 151_936
    model = build_model(TINY, cfg, rows, 256, tokenizer, seed=0)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, Qwen2ForCausalLM)
    assert loaded.config.vocab_size == 151_936 and loaded.config.tie_word_embeddings is tie
    assert loaded.config.eos_token_id == loaded.config.pad_token_id == 151_643
    shared = loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert shared is tie
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_embedding_size_defaults():
    from ddk.pipeline.tiny_models import embedding_size

    bpe_vocab = list(range(300))  # only len() is used
    assert embedding_size(ModelsConfig(), bpe_vocab) == 300
    assert embedding_size(ModelsConfig(embedding_size=512), bpe_vocab) == 512
    assert embedding_size(ModelsConfig(tokenizer="qwen"), bpe_vocab) == 151_936


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["models.tokenizer=gpt2"], "models.tokenizer"),
        (["models.architecture=mistral"], "models.architecture"),
        (["models.tokenizer=qwen", "models.embedding_size=151000"], "models.embedding_size"),
        (["models.embedding_size=1000"], "models.embedding_size"),  # bpe: below vocab_size 2048
        (["models.tie_word_embeddings=1"], "models.tie_word_embeddings"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_config_accepts_qwen_sizes():
    cfg = load_config(None, ["models.tokenizer=qwen", "models.architecture=qwen2", "models.embedding_size=151851",
                             "models.tie_word_embeddings=false"])
    assert (cfg.models.tokenizer, cfg.models.architecture, cfg.models.embedding_size, cfg.models.tie_word_embeddings) == (
        "qwen", "qwen2", 151_851, False)
    default = load_config(None).models
    assert (default.tokenizer, default.architecture, default.embedding_size, default.tie_word_embeddings) == ("bpe", "llama", 0, True)


@pytest.fixture(scope="module")
def qwen_models(tmp_path_factory):
    """(models config, corpus config, report) of tiny Qwen2 models on the Qwen vocabulary."""
    from ddk.pipeline.corpus import load_domains
    from ddk.pipeline.tiny_models import make_tiny_models

    models = ModelsConfig(out_dir=str(tmp_path_factory.mktemp("qwen-models")), tokenizer="qwen", architecture="qwen2",
                          teacher=TINY, student=TINY)
    corpus = CorpusConfig(builtin_chars_per_domain=60_000, seq_len=32, val_rows=2, test_rows=2, max_train_rows=8)
    return models, corpus, make_tiny_models(models, load_domains(corpus), corpus)


def test_make_tiny_models_on_the_qwen_vocabulary(qwen_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models, _, report = qwen_models
    assert report["vocab_size"] == 151_936
    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(f"{models.out_dir}/{role}")
        assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == 151_936
        assert len(AutoTokenizer.from_pretrained(f"{models.out_dir}/{role}")) == 151_851


@pytest.mark.parametrize("change", [{"seed": 1}, {"val_rows": 3}, {"test_rows": 3}, {"seq_len": 48}, {"max_train_rows": 9},
                                    {"builtin_chars_per_domain": 80_000}, {"source": "files"}])
def test_models_are_refused_when_the_corpus_changes(qwen_models, change):
    from ddk.pipeline.tiny_models import make_tiny_models

    models, corpus, report = qwen_models
    assert make_tiny_models(models, [], corpus) == report  # same config: reused as is
    with pytest.raises(ConfigError, match="different config"):
        make_tiny_models(models, [], dataclasses.replace(corpus, **change))
