import random

import pytest
import torch

from gpt2lab.checkpoint import load_model_and_tokenizer, save_model
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.hf import export_hf
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer, load_tokenizer_dir
from gpt2lab.tokenizer_train import corpus_stats, save_trained, train_bpe

UNSEEN = [
    "emoji 😀🎉👩‍👩‍👧‍👦 never seen",
    "CJK 你好，世界。日本語のテキスト 한국어",
    "control bytes \x00\x01\x7f and \u00ff\u0100",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937",
    "  whitespace\t\truns \n\n\n  ",
    "<|endoftext|> as text",
    "",
]


@pytest.fixture(scope="module")
def docs(shakespeare_path):
    return shakespeare_path.read_text().split("\n\n")


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trained(request, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tok_{request.param}") / "tok"
    result = train_bpe(docs[:3000], vocab_size=1500, pattern=request.param, progress=False)
    return save_trained(result, out, name=f"shakespeare-{request.param}")


def test_vocab_size_is_honoured(trained):
    assert trained.n_vocab == 1500
    assert trained.eot_token == 1499
    assert trained.encode("<|endoftext|>", allowed_special="all") == [1499]
    assert trained.name.startswith("shakespeare-")


def test_lossless_on_unseen_text(trained, docs):
    for text in UNSEEN + docs[3000:3200]:
        assert trained.decode(trained.encode(text)) == text
    rng = random.Random(0)
    for _ in range(50):
        raw = bytes(rng.randrange(256) for _ in range(40)).decode("utf-8", errors="replace")
        assert trained.decode(trained.encode(raw)) == raw


def test_tiktoken_ranks_reproduce_the_tokenizers_library(trained, docs):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(trained.path / "tokenizer.json"))
    for text in UNSEEN + docs[3000:]:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert trained.encode(text, allowed_special="all") == expected, text[:80]


def test_reload_from_directory_is_identical(trained):
    again = get_tokenizer(trained.path)
    assert again.vocab_hash == trained.vocab_hash
    assert again.encode("To be, or not to be") == trained.encode("To be, or not to be")


def test_corpus_too_small_for_the_vocabulary(tmp_path):
    with pytest.raises(GPT2LabError, match="only supports .* tokens, not 5000"):
        train_bpe(["tiny corpus"], vocab_size=5000, progress=False)
    with pytest.raises(GPT2LabError, match="at least 257"):
        train_bpe(["x"], vocab_size=100, progress=False)
    with pytest.raises(GPT2LabError, match="no text"):
        train_bpe([], vocab_size=300, progress=False)


def test_max_chars_bounds_the_sample(docs):
    result = train_bpe(docs, vocab_size=400, max_chars=20_000, progress=False)
    assert result.chars == 20_000


def test_tampered_ranks_are_refused(trained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained.path, copy)
    data = bytearray((copy / "tokenizer.tiktoken").read_bytes())
    data[5] ^= 1
    (copy / "tokenizer.tiktoken").write_bytes(bytes(data))
    with pytest.raises(GPT2LabError, match="tokenizer.tiktoken has sha256 .* expects"):
        load_tokenizer_dir(copy)
    with pytest.raises(GPT2LabError, match="not a tokenizer directory"):
        load_tokenizer_dir(tmp_path)


def test_stats_compare_with_gpt2(trained, docs):
    gpt2, mine = corpus_stats(docs[3000:3500], [get_tokenizer(), trained])
    assert gpt2.bytes == mine.bytes and gpt2.chars == mine.chars
    assert gpt2.tokens == sum(len(get_tokenizer().encode(d)) for d in docs[3000:3500])
    assert mine.tokens == sum(len(trained.encode(d)) for d in docs[3000:3500])
    assert 0 < mine.vocab_use <= 1 and mine.vocab_used <= 1500


def test_checkpoint_carries_the_tokenizer_and_exports_to_hf(trained, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=trained.n_vocab, pad_vocab_multiple=64)
    ).eval()
    save_model(model, tmp_path / "ckpt", trained)
    loaded, tok = load_model_and_tokenizer(tmp_path / "ckpt")
    assert tok.vocab_hash == trained.vocab_hash
    assert tok.path == (tmp_path / "ckpt" / "tokenizer").resolve()

    export_hf(loaded, tmp_path / "hf", tok)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "ROMEO: But soft! 😀 你好 <|endoftext|>"
    assert hf_tok(text)["input_ids"] == trained.encode(text, allowed_special="all")
    assert hf_tok.eos_token_id == trained.eot_token
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, trained.n_vocab, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, loaded(idx)[0], rtol=0, atol=1e-5)


def test_vocab_mismatch_between_model_and_tokenizer(trained, tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=50257))
    save_model(model, tmp_path / "ckpt", get_tokenizer())
    with pytest.raises(GPT2LabError, match="vocabulary of 50257 tokens but tokenizer .* has 1500"):
        load_model_and_tokenizer(tmp_path / "ckpt", tokenizer=trained.path)


@pytest.mark.subprocess
def test_cli_train_stats_and_prepare_with_the_tokenizer(cli, shakespeare_path, tmp_path):
    from gpt2lab.data import ShardLoader, data_tokenizer, read_manifest

    tok_dir = tmp_path / "tok"
    result = cli(
        "tokenizer",
        "train",
        shakespeare_path,
        "--split-on",
        r"\n\n",
        "--vocab-size",
        "2000",
        "--max-chars",
        "400k",
        "--pattern",
        "gpt4",
        "--out",
        tok_dir,
    )
    assert result.code == 0, result.err
    assert "trained bpe2000-" in result.out
    tok = get_tokenizer(tok_dir)
    assert tok.n_vocab == 2000

    result = cli("tokenizer", "stats", shakespeare_path, "--tokenizer", tok_dir, "--json", tmp_path / "s.json")
    assert result.code == 0, result.err
    assert "gpt2" in result.out and tok.name in result.out
    import json

    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[0]["tokens"] == 338_025 and rows[1]["n_vocab"] == 2000

    data = tmp_path / "data"
    result = cli("prepare", shakespeare_path, "--tokenizer", tok_dir, "--out", data, "--no-progress")
    assert result.code == 0, result.err
    manifest = read_manifest(data)
    assert manifest["tokenizer"]["vocab_hash"] == tok.vocab_hash
    assert "--tokenizer" in manifest["command"]
    assert data_tokenizer(data).vocab_hash == tok.vocab_hash
    text = shakespeare_path.read_text()
    assert manifest["total_tokens"] == len(tok.encode(text)) + 1  # one document, one <|endoftext|>
    x, _ = next(iter(ShardLoader(data, "val", batch_size=2, seq_len=16, rank=0, world_size=1, seed=0, shuffle=False)))
    assert int(x.max()) < 2000
    assert x[0, 0].item() == tok.eot_token

    bad = cli("tokenizer", "train", tmp_path / "nothing-here", "--vocab-size", "300", "--out", tmp_path / "t2")
    assert bad.code == 1 and "nothing-here" in bad.err


def test_cli_train_and_stats_on_a_glob_of_python_files(cli, tmp_path):
    import json

    from gpt2lab.tokenizer import DESCRIPTOR

    src = tmp_path / "src"
    src.mkdir()
    files = {
        f"mod{i:02d}.py": f'def times_{i}(x: int) -> int:\n    """Return x times {i}."""\n    return x * {i}\n\n\n'
        f"print(times_{i}(3))\n"
        for i in range(40)
    }
    for name, text in files.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "cached.py").write_bytes(b"\x00\x00\x0d\x0a\xa7\x0dbinary")  # not text: skipped and counted
    (src / "notes.txt").write_text("not Python")  # the pattern does not match it

    result = cli("tokenizer", "train", f"{src}/*.py", "--vocab-size", "300", "--out", tmp_path / "tok")
    assert result.code == 0, result.err
    chars = sum(len(t) for t in files.values())
    assert f"from {chars:,} characters in 40 piece(s)" in result.out
    assert f"note: skipped 1 file(s) that are not UTF-8 text: {src / 'cached.py'}" in result.err
    trained_on = json.loads((tmp_path / "tok" / DESCRIPTOR).read_text())["trained_on"]
    assert trained_on["documents"] == 40 and trained_on["skipped_files"] == 1
    tok = get_tokenizer(tmp_path / "tok")
    assert tok.n_vocab == 300
    assert all(tok.decode(tok.encode(t)) == t for t in files.values())

    # The directory with --ext py reads the same files; stats count what tiktoken counts, file by file.
    result = cli(
        "tokenizer", "stats", src, "--ext", "py", "--tokenizer", tmp_path / "tok", "--json", tmp_path / "s.json"
    )
    assert result.code == 0, result.err
    assert "note: skipped 1 file(s)" in result.err
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[0]["bytes"] == sum(len(t.encode()) for t in files.values())
    assert rows[0]["tokens"] == sum(len(get_tokenizer().encoding.encode_ordinary(t)) for t in files.values())
    assert rows[1]["tokens"] == sum(len(tok.encoding.encode_ordinary(t)) for t in files.values())
