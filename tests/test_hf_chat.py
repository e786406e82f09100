"""A chat model exported with `gpt2lab convert --to-hf`: transformers' `apply_chat_template` gives exactly
the tokens gpt2lab trains on and prompts with, and the export reads back as the same chat model."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from gpt2lab.chat import ChatTemplate, template_of
from gpt2lab.checkpoint import load_model_and_tokenizer, save_model
from gpt2lab.config import GPTConfig
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"}],
    [
        {"role": "system", "content": "You are terse.\nAnswer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": " Paris "},
        {"role": "user", "content": "And  of Japan?\n\n"},
        {"role": "assistant", "content": "Tokyo"},
    ],
    [
        {"role": "user", "content": "ünïcödé, 東京, 😀 and tabs\t\there"},
        {"role": "assistant", "content": "¡Sí! ñ — ok"},
        {"role": "user", "content": ""},
    ],
]
# Text that spells the template's tokens inside a message: gpt2lab encodes it as text, while a Hugging
# Face tokenizer matches added special tokens in any text, so the two differ here (docs/data.md).
SPELLED = [{"role": "user", "content": "say <|end|> and <|endoftext|>"}, {"role": "assistant", "content": "<|end|>"}]


def chat_model(tok, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    template = ChatTemplate.for_tokenizer(tok)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=template.n_vocab, pad_vocab_multiple=64
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.5)  # spread the logits: a wrong row would show
    return model


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    tok = ChatTemplate.for_tokenizer(get_tokenizer()).tokenizer(get_tokenizer())
    root = tmp_path_factory.mktemp("hfchat")
    model = chat_model(tok)
    save_model(model, root / "ckpt", tok)
    return root, tok, model


def convert_to_hf(cli, ckpt, out) -> None:
    r = cli("convert", "--to-hf", ckpt, "--out", out)
    assert r.code == 0, r.err


def hf_ids(hf_tok, messages, **kwargs) -> list[int]:
    """`apply_chat_template(tokenize=True)`'s ids (recent transformers return them in a dict by default)."""
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"]) if not isinstance(out, list) else out


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    out = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
    return out.float()


def test_apply_chat_template_gives_gpt2lab_tokens(gpt2_export, cli, caplog):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    root, tok, model = gpt2_export
    convert_to_hf(cli, root / "ckpt", root / "hf")
    template = template_of(tok)
    hf_tok = AutoTokenizer.from_pretrained(root / "hf")
    assert len(hf_tok) == 50261 and hf_tok.convert_tokens_to_ids(["<|system|>", "<|end|>"]) == [50257, 50260]
    for messages in CONVERSATIONS:
        assert hf_ids(hf_tok, messages) == template.render(messages, tok)[0]
        assert hf_ids(hf_tok, messages, add_generation_prompt=True) == template.prompt_ids(messages, tok)
    # The documented difference: Hugging Face reads "<|end|>" typed in a message as the token itself.
    ours = template.render(SPELLED, tok)[0]
    theirs = hf_ids(hf_tok, SPELLED)
    assert ours.count(50260) == 2 and theirs.count(50260) == 4 and theirs.count(50256) == 2
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 50261
    with caplog.at_level(logging.INFO):
        hf_model = GPT2LMHeadModel.from_pretrained(root / "hf").eval()
    assert "newly initialized" not in " ".join(r.getMessage() for r in caplog.records)
    idx = torch.tensor([template.prompt_ids(CONVERSATIONS[1], tok)])
    torch.testing.assert_close(logits(hf_model, idx), logits(model, idx), rtol=0, atol=1e-5)


def test_the_export_reads_back_as_the_chat_model(gpt2_export, cli):
    root, tok, model = gpt2_export
    convert_to_hf(cli, root / "ckpt", root / "hf2")
    back, back_tok = load_model_and_tokenizer(root / "hf2")
    assert back.config.vocab_size == 50261 and back_tok.n_vocab == 50261
    assert template_of(back_tok) == template_of(tok)
    idx = torch.tensor([template_of(tok).render(CONVERSATIONS[0], tok)[0]])
    # float32 rounding: the reloaded output layer has the 50,261 real rows, not 50,304 padded ones, and
    # AVX2 kernels round a product of another shape differently (AVX-512 ones gave equal bits)
    torch.testing.assert_close(logits(back, idx), logits(model, idx), rtol=0, atol=1e-5)
    # and through convert --from-hf, to a gpt2lab checkpoint that records the template again
    r = cli("convert", "--from-hf", root / "hf2", "--out", root / "again")
    assert r.code == 0, r.err
    meta = json.loads((root / "again" / "gpt2lab.json").read_text())
    assert meta["chat_template"] == template_of(tok).to_record()


def test_a_trained_tokenizer_chat_model_exports_its_tokens(tmp_path, shakespeare_path, cli):
    from transformers import AutoTokenizer

    from gpt2lab.tokenizer_train import save_trained, train_bpe

    base = save_trained(
        train_bpe(shakespeare_path.read_text()[:50_000].split("\n\n"), 400, progress=False), tmp_path / "t"
    )
    template = ChatTemplate.for_tokenizer(base)
    tok = template.tokenizer(base)
    save_model(chat_model(tok, seed=1), tmp_path / "ckpt", tok)
    convert_to_hf(cli, tmp_path / "ckpt", tmp_path / "hf")
    hf_json = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in hf_json["added_tokens"]}
    assert {k: added[k] for k in template.token_ids} == {
        "<|system|>": 400,
        "<|user|>": 401,
        "<|assistant|>": 402,
        "<|end|>": 403,
    }
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        assert hf_ids(hf_tok, messages) == template.render(messages, tok)[0]
        prompt = hf_ids(hf_tok, messages, add_generation_prompt=True)
        assert prompt == template.prompt_ids(messages, tok)
    back, back_tok = load_model_and_tokenizer(tmp_path / "hf", tokenizer=str(base.path))
    assert back.config.vocab_size == 404 and template_of(back_tok) == template
