"""GGUF export without llama.cpp: the file read back with gguf-py's reader rebuilds the model (same logits),
and says what it is (metadata, vocabulary, merges); at the end, llama.cpp itself runs it (marked slow)."""

from __future__ import annotations

import itertools
import random

import gguf
import pytest
import regex
import torch
from helpers import shakespeare_text

from gpt2lab.checkpoint import save_model
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.gguf import TYPES, export_gguf, read_gguf
from gpt2lab.model import GPT
from gpt2lab.tokenizer import gpt2_data_dir

pytestmark = pytest.mark.usefixtures("one_thread")

# Largest |logit| difference against the float32 model, for weights spread as GPT-2's init spreads them
# (N(0, 0.02)). f16 keeps 11 significant bits, bf16 8, q8_0 8 per value plus one f16 scale per 32.
TOLERANCE = {"f32": 0.0, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 2e-2}
TEXT = "Is this a dagger which I see before me, the handle toward my hand? Come, let me clutch thee."


def tiny_model(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=vocab_size, pad_vocab_multiple=64)
    return GPT(config).eval()


def logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


@pytest.fixture(scope="module")
def trained_tok(tmp_path_factory):
    from gpt2lab.tokenizer_train import save_trained, train_bpe

    docs = shakespeare_text()[:200_000].split("\n\n")
    return save_trained(train_bpe(docs, 600, progress=False), tmp_path_factory.mktemp("tok") / "bpe600")


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory, tok):
    model = tiny_model(tok.n_vocab)
    return model, export_gguf(model, tmp_path_factory.mktemp("gguf") / "gpt2.gguf", tok, "f32", name="tiny")


def field(reader, key):
    return reader.get_field(key).contents()


def test_f32_round_trip_is_exact_with_gpt2s_tokenizer(gpt2_file, tok):
    model, path = gpt2_file
    back = read_gguf(path)
    # The file holds the 50,257 real rows; the model comes back with its padding (zeros), its config whole.
    assert model.config.padded_vocab_size == 50304 and back.config == model.config
    ids = tok.encode(TEXT)
    assert torch.equal(logits(back, ids), logits(model, ids))


@pytest.mark.parametrize("weight_type", TYPES)
def test_round_trip_with_a_trained_tokenizer(weight_type, trained_tok, tmp_path):
    model = tiny_model(trained_tok.n_vocab, seed=1)
    path = export_gguf(model, tmp_path / "m.gguf", trained_tok, weight_type)
    ids = trained_tok.encode(TEXT)
    diff = (logits(read_gguf(path), ids) - logits(model, ids)).abs().max().item()
    assert diff <= TOLERANCE[weight_type], f"{weight_type}: max |logit difference| {diff}"
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    big = "F32" if weight_type == "f32" else weight_type.upper()
    assert types["blk.0.attn_qkv.weight"] == types["token_embd.weight"] == big
    assert types["blk.1.attn_norm.bias"] == types["position_embd.weight"] == "F32"


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(trained_tok, tmp_path):
    torch.manual_seed(2)
    model = GPT(GPTConfig(n_layer=1, n_head=3, n_embd=48, block_size=32, vocab_size=trained_tok.n_vocab)).eval()
    path = export_gguf(model, tmp_path / "nano.gguf", trained_tok, "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_qkv.weight"] == "F16"  # rows of 48 values
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 192 = 6 blocks
    ids = trained_tok.encode(TEXT)[:32]
    assert (logits(read_gguf(path), ids) - logits(model, ids)).abs().max().item() <= TOLERANCE["q8_0"]


def test_metadata_says_what_the_file_is(gpt2_file, tok):
    model, path = gpt2_file
    reader = gguf.GGUFReader(str(path))
    c = model.config
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "general.name") == "tiny"
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    expected = {
        "context_length": c.block_size,
        "embedding_length": c.n_embd,
        "feed_forward_length": 4 * c.n_embd,
        "block_count": c.n_layer,
        "attention.head_count": c.n_head,
        "vocab_size": 50257,
    }
    for key, value in expected.items():
        assert field(reader, f"gpt2.{key}") == value, key
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "gpt2lab.tokenizer.vocab_hash") == tok.vocab_hash
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert len(names) == 4 + 12 * c.n_layer
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert [int(n) for n in embd.shape] == [c.n_embd, 50257]  # padding rows trimmed


def test_vocabulary_is_gpt2s_own_files(gpt2_file):
    import json

    _, path = gpt2_file
    reader = gguf.GGUFReader(str(path))
    tokens = field(reader, "tokenizer.ggml.tokens")
    encoder = json.loads((gpt2_data_dir() / "encoder.json").read_text(encoding="utf-8"))
    assert len(tokens) == len(encoder) and all(tokens[i] == t for t, i in encoder.items())
    merges = (gpt2_data_dir() / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert field(reader, "tokenizer.ggml.merges") == [m for m in merges if m]
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert token_types[50256] == gguf.TokenType.CONTROL and set(token_types[:50256]) == {gguf.TokenType.NORMAL}


def pair_rank_bpe(word: bytes, merge_rank: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """BPE by the rank of the pair, as llama.cpp and Hugging Face apply a merges list."""
    parts = [word[i : i + 1] for i in range(len(word))]
    while len(parts) > 1:
        pairs = [(merge_rank.get((a, b), len(merge_rank)), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == len(merge_rank):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def test_trained_merges_encode_as_the_tokenizer_does(trained_tok, tmp_path):
    from gpt2lab.tokenizer import gpt2_byte_to_unicode

    path = export_gguf(tiny_model(trained_tok.n_vocab), tmp_path / "t.gguf", trained_tok)
    reader = gguf.GGUFReader(str(path))
    to_byte = {u: b for b, u in gpt2_byte_to_unicode().items()}
    as_bytes = lambda s: bytes(to_byte[c] for c in s)
    tokens = [
        as_bytes(t) if i != trained_tok.eot_token else b"" for i, t in enumerate(field(reader, "tokenizer.ggml.tokens"))
    ]
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == trained_tok.n_vocab - 257
    merge_rank = {tuple(as_bytes(p) for p in m.split(" ")): r for r, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    text = shakespeare_text()[-20_000:]  # the training text stops at 200,000 characters
    got = [
        ids[p]
        for word in regex.findall(trained_tok.encoding._pat_str, text)
        for p in pair_rank_bpe(word.encode(), merge_rank)
    ]
    assert got == trained_tok.encode(text)


def test_a_tokenizer_llama_cpp_cannot_split_is_refused(trained_tok, tmp_path):
    from gpt2lab.tokenizer_train import save_trained, train_bpe

    docs = shakespeare_text()[:50_000].split("\n\n")
    gpt4 = save_trained(train_bpe(docs, 300, pattern="gpt4", progress=False), tmp_path / "gpt4")
    with pytest.raises(GPT2LabError, match="no pre-tokenizer"):
        export_gguf(tiny_model(gpt4.n_vocab), tmp_path / "x.gguf", gpt4)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".x.gguf*")) == []


def test_cli_exports_a_checkpoint_and_refuses_bad_input(cli, trained_tok, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(tiny_model(trained_tok.n_vocab), ckpt, trained_tok)
    out = tmp_path / "m.gguf"
    r = cli("convert", "--to-gguf", ckpt, "--out", out, "--type", "q8_0")
    assert r.code == 0, r.err
    assert "wrote GGUF file" in r.out and out.is_file()
    assert field(gguf.GGUFReader(str(out)), "general.name") == "ckpt"
    bad = [
        (("--to-gguf", ckpt, "--out", tmp_path / "n.gguf", "--type", "q4"), "unknown --type 'q4'"),
        (("--to-gguf", ckpt, "--out", out), "already exists"),
        (("--to-gguf", ckpt, "--out", tmp_path), "is a directory"),
        (("--to-hf", ckpt, "--out", tmp_path / "hf", "--type", "f16"), "--type applies to --to-gguf only"),
    ]
    for args, message in bad:
        r = cli("convert", *args)
        assert r.code != 0 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = cli("convert", "--to-gguf", ckpt, "--out", out, "--type", "f16", "--overwrite")
    assert r.code == 0, r.err
    assert field(gguf.GGUFReader(str(out)), "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]


# ----------------------------------------------------------------------------- llama.cpp itself (slow)
# `pip install llama-cpp-python` builds llama.cpp from source where no wheel fits; these run with -m slow.

# Stated bounds. f32: the largest logit difference, relative to the largest logit; llama.cpp's CPU
# backend takes GELU from a table of f16 values (ggml-cpu, GGML_GELU_FP16), so the two agree to about
# 1e-3 of the logits' scale rather than to float32 rounding. q8_0: top-1 agreement and the mean
# KL(gpt2lab || llama.cpp) over every position of the held-out text.
F32_MAX_REL = 1e-3
F32_MEDIAN_REL = 1e-5  # with the GELU llama.cpp computes (measured: 5e-6 of the largest logit)
Q8_TOP1 = 0.9
Q8_MEAN_KL = 1e-2
TRICKY = "  Tabs\tand  spaces,\n\n\nnumbers 12345 and 3.14; don't won't they'll I'm — café, naïve, 東京! x  "


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp's tests need llama-cpp-python")


def spread_model(vocab_size: int) -> GPT:
    """A model whose logits are far apart (weights 5x GPT-2's init), so greedy decoding has clear winners."""
    torch.manual_seed(7)
    model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=128, block_size=256, vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


class Float16TableGELU(torch.nn.Module):
    """GELU as llama.cpp's CPU backend computes it (ggml's GGML_GELU_FP16): the input rounded to
    float16, looked up in a table of float16 results; 0 below -10 and x above 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def with_float16_gelu(model: GPT) -> GPT:
    copy = GPT(model.config).eval()
    copy.load_state_dict(model.state_dict())
    for block in copy.transformer.h:
        block.mlp.gelu = Float16TableGELU()
    return copy


def llama(llama_cpp, path, **kwargs):
    # float32 keys and values: llama.cpp keeps its KV cache in f16 unless told otherwise
    return llama_cpp.Llama(
        str(path), n_ctx=256, n_threads=2, n_threads_batch=2, type_k=0, type_v=0, verbose=False, **kwargs
    )


def jumbles(n: int, seed: int) -> list[str]:
    """Texts made of the pieces where split rules differ: runs of spaces, tabs and newlines, digits,
    contractions in both cases, punctuation, non-breaking spaces, accents and CJK, trailing whitespace."""
    pieces = ["a", "B", "1", "23", "4567", " ", "  ", "\n", "\r\n", "\t", "'s", "'S", "'ll", "!", "?!", "é", "東"]
    pieces += ["\u00a0", "\n\n", " \n", "x", "...", "-"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["gpt2", "trained", "trained on jumbles"])
def test_llama_cpp_tokenizes_as_gpt2lab(llama_cpp, which, tok, trained_tok, tmp_path):
    from gpt2lab.tokenizer_train import save_trained, train_bpe

    tokenizer = {"gpt2": tok, "trained": trained_tok}.get(which)
    if tokenizer is None:  # merges across every kind of boundary, so a wrong split shows in the tokens
        docs = shakespeare_text()[:100_000].split("\n\n") + jumbles(20_000, seed=1)
        tokenizer = save_trained(train_bpe(docs, 3000, progress=False), tmp_path / "tok")
    path = export_gguf(tiny_model(tokenizer.n_vocab), tmp_path / "m.gguf", tokenizer)
    llm = llama(llama_cpp, path, vocab_only=True)
    for text in [TRICKY, shakespeare_text()[-5000:], TEXT, *jumbles(2000, seed=2)]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), repr(text)
    assert llm.token_eos() == tokenizer.eot_token


@pytest.mark.slow
def test_llama_cpp_logits_and_greedy_tokens_match(llama_cpp, tok, tmp_path):
    import numpy as np

    from gpt2lab.generate import SamplingParams, generate

    model = spread_model(tok.n_vocab)
    ids = tok.encode(shakespeare_text()[-3000:])[:200]  # held out: the end of the text
    expected = logits(model, ids)
    f32 = llama(llama_cpp, export_gguf(model, tmp_path / "f32.gguf", tok, "f32"), logits_all=True)
    f32.eval(ids)
    got = torch.from_numpy(np.array(f32.scores[: len(ids)]))
    diff = (got - expected).abs()
    scale = expected.abs().max().item()
    # llama.cpp's CPU GELU reads a table over float16 inputs and outputs: against a model that rounds
    # GELU the same way, most of the difference goes (the rest is float16 roundings that float32's last
    # bits tip one way or the other, amplified by this model's large weights).
    table_diff = (got - logits(with_float16_gelu(model), ids)).abs()
    for name, d in [("exact GELU", diff), ("llama.cpp's float16 GELU", table_diff)]:
        print(
            f"f32 against gpt2lab with {name}: max |logit difference| {d.max().item():.2e}, median "
            f"{d.median().item():.2e}, over {len(ids)} positions with logits up to {scale:.2f}"
        )
    assert diff.max().item() <= F32_MAX_REL * scale
    assert min(diff.median().item(), table_diff.median().item()) <= F32_MEDIAN_REL * scale

    # One token per step: on some CPUs (AMX) this llama.cpp crashes on q8_0 batches, whoever quantized.
    q8 = llama(llama_cpp, export_gguf(model, tmp_path / "q8.gguf", tok, "q8_0"), logits_all=True, n_batch=1, n_ubatch=1)
    q8.eval(ids)
    got = torch.from_numpy(np.array(q8.scores[: len(ids)]))
    top1 = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    p = expected.log_softmax(-1)
    kl = (p.exp() * (p - got.log_softmax(-1))).sum(-1).mean().item()
    print(f"q8_0: top-1 agreement {top1:.3f}, mean KL {kl:.2e} over {len(ids)} positions")
    assert top1 >= Q8_TOP1 and kl <= Q8_MEAN_KL

    prompt = ids[:32]
    ours = generate(model, prompt, 64, sampling=SamplingParams(temperature=0)).tokens[0]
    theirs = [t for _, t in zip(range(64), f32.generate(prompt, top_k=1, temp=0.0, reset=True))]
    assert theirs == ours


@pytest.mark.slow
def test_q8_0_is_what_llama_cpps_own_quantizer_writes(llama_cpp, tok, tmp_path):
    import ctypes

    import numpy as np

    model = spread_model(tok.n_vocab)
    export_gguf(model, tmp_path / "f32.gguf", tok, "f32")
    export_gguf(model, tmp_path / "ours.gguf", tok, "q8_0")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q8_0)
    theirs = tmp_path / "theirs.gguf"
    assert (
        llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(theirs).encode(), ctypes.byref(params))
        == 0
    )
    ours = {t.name: (t.tensor_type, t.data) for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    for t in gguf.GGUFReader(str(theirs)).tensors:
        assert ours[t.name][0] == t.tensor_type and np.array_equal(ours[t.name][1], t.data), t.name
