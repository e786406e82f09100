import shutil

import pytest

from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import _gpt2, get_tokenizer, gpt2_data_dir

HARD_CASES = [
    "",
    "Hello, world!",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\r\n\n\n   \n",
    "whitespace runs:" + " " * 17 + "end",
    "emoji 😀🎉👩‍👩‍👧‍👦 and flags 🇫🇷",
    "CJK 你好，世界。日本語のテキスト 한국어",
    "combining marks: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "numbers 1234567890 3.14159 1,000,000",
    "contractions: I'm you're he'll we've they'd it's",
    "code: def f(x):\n    return x**2  # comment",
    "special as text <|endoftext|> in the middle",
    "<|endoftext|>",
    "mixed <|endoftext|><|endoftext|>twice",
    "\u00a0nbsp\u2003em-space\u200bzero-width",
    "Ω≈ç√∫ µ≤≥÷ ÅÍÎÏ ˝ÓÔ",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' Rust BPE (the `tokenizers` library) over the same OpenAI files: an independent
    implementation to compare tiktoken's encoding with."""
    from transformers import GPT2TokenizerFast

    folder = tmp_path_factory.mktemp("hf_gpt2_tokenizer")
    shutil.copy(gpt2_data_dir() / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_data_dir() / "vocab.bpe", folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(folder)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    return tok


def test_basic_properties():
    tok = get_tokenizer()
    assert tok.name == "gpt2"
    assert tok.n_vocab == 50257
    assert tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert get_tokenizer() is tok  # built once per process


def test_shakespeare_matches_transformers_token_for_token(shakespeare_path, hf_tokenizer):
    text = shakespeare_path.read_text(encoding="utf-8")
    ours = get_tokenizer().encode(text)
    assert len(ours) == 338_025
    assert ours == hf_tokenizer(text, verbose=False)["input_ids"]
    assert get_tokenizer().decode(ours) == text


@pytest.mark.parametrize("text", HARD_CASES)
def test_hard_cases_match_transformers(text, hf_tokenizer):
    tok = get_tokenizer()
    # Special-token text allowed: <|endoftext|> becomes 50256, as transformers does by default.
    assert tok.encode(text, allowed_special="all") == hf_tokenizer(text)["input_ids"]
    # By default it is plain text, as transformers does with split_special_tokens=True.
    plain = tok.encode(text)
    assert plain == hf_tokenizer(text, split_special_tokens=True)["input_ids"]
    assert tok.eot_token not in plain
    assert tok.decode(plain) == text
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_endoftext_as_text_versus_special():
    tok = get_tokenizer()
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]


def test_encode_batch_equals_encode():
    tok = get_tokenizer()
    texts = [case * 3 for case in HARD_CASES] * 5
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_vocab_hash_is_stable():
    assert get_tokenizer().vocab_hash == "a9c356703afe2d0c6ecf520206cfd278da2ca42a5edfa592ce4fd39939bf7051"


def test_invalid_utf8_decodes_with_replacement():
    tok = get_tokenizer()
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids) == "😀".encode()


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_tampered_vocabulary_is_refused(tmp_path, monkeypatch, name):
    folder = tmp_path / "vocab"
    shutil.copytree(gpt2_data_dir(), folder)
    data = bytearray((folder / name).read_bytes())
    data[-2] ^= 1
    (folder / name).write_bytes(bytes(data))
    monkeypatch.setenv("GPT2LAB_GPT2_VOCAB_DIR", str(folder))
    _gpt2.cache_clear()
    try:
        with pytest.raises(GPT2LabError, match=f"{name} has sha256 .* not OpenAI's"):
            get_tokenizer()
    finally:
        _gpt2.cache_clear()


def test_unknown_tokenizer_name():
    with pytest.raises(GPT2LabError, match="unknown tokenizer 'bert'"):
        get_tokenizer("bert")
