"""A trained tokenizer end to end: prepare -> train -> sample -> eval -> export -> AutoTokenizer."""

from __future__ import annotations

import pytest
import torch
from train_utils import tiny_config

from gpt2lab import checkpoint as ckpt
from gpt2lab.data.prepare import PrepareOptions, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def custom(tmp_path_factory, shakespeare_path):
    """A 600-token tokenizer and 60K characters of Shakespeare prepared with it."""
    from gpt2lab.tokenizer_train import save_trained, train_bpe

    root = tmp_path_factory.mktemp("custom")
    text = shakespeare_path.read_text()
    tok = save_trained(train_bpe(text[:200_000].split("\n\n"), 600, progress=False), root / "tok")
    corpus = root / "corpus.txt"
    corpus.write_text(text[:60_000])
    prepare(
        PrepareOptions(
            source=str(corpus), out=root / "data", val_tokens=2048, workers=1, progress=False, tokenizer=str(tok.path)
        )
    )
    return tok, root / "data"


def test_custom_tokenizer_end_to_end(custom, tmp_path, cli):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok, data = custom
    run = tmp_path / "run"
    train(tiny_config(data, run), progress=False)
    latest = ckpt.find_latest(run)
    meta = ckpt.read_meta(latest)
    assert meta["model"]["vocab_size"] == 600  # the vocabulary follows the tokenizer
    assert meta["model"]["pad_vocab_multiple"] == 64
    assert meta["tokenizer"]["vocab_hash"] == tok.vocab_hash
    model, loaded_tok = ckpt.load_model_and_tokenizer(run)
    assert model.transformer.wte.weight.shape[0] == 640
    assert loaded_tok.vocab_hash == tok.vocab_hash

    sampled = cli(
        "sample", "--model", run, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "0", "--device", "cpu"
    )
    assert sampled.code == 0, sampled.err
    assert sampled.out.startswith("ROMEO:")
    evaluated = cli(
        "eval",
        "--model",
        run,
        "--task",
        "val-loss",
        "--data",
        data,
        "--max-tokens",
        "512",
        "--seq-len",
        "16",
        "--device",
        "cpu",
    )
    assert evaluated.code == 0, evaluated.err

    exported = cli("convert", "--to-hf", run, "--out", tmp_path / "hf")
    assert exported.code == 0, exported.err
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "KING RICHARD III: Now is the winter 😀 <|endoftext|>"
    assert hf_tok(text)["input_ids"] == tok.encode(text, allowed_special="all")
    hf_model = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("To be, or not to be")])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids)[0], rtol=0, atol=1e-4)


def test_mismatched_tokenizer_is_refused(custom, corpus, tmp_path):
    tok, data = custom
    gpt2_data = corpus
    run = tmp_path / "gpt2-run"
    train(tiny_config(gpt2_data, run, train={"max_steps": 2}, checkpoint={"every": 2}), progress=False)

    # GPT-2-token weights fine-tuned on custom-token data, and the other way round.
    cfg = tiny_config(data, tmp_path / "ft", shape=False, train={"init_from": str(run), "max_steps": 1})
    with pytest.raises(GPT2LabError, match=r"trained with tokenizer 'gpt2' but the data was tokenized with 'bpe600"):
        train(cfg, progress=False)
    custom_run = tmp_path / "custom-run"
    train(tiny_config(data, custom_run, train={"max_steps": 2}, checkpoint={"every": 2}), progress=False)
    cfg = tiny_config(gpt2_data, tmp_path / "ft2", shape=False, train={"init_from": str(custom_run), "max_steps": 1})
    with pytest.raises(GPT2LabError, match=r"trained with tokenizer 'bpe600.*' but the data was tokenized with 'gpt2'"):
        train(cfg, progress=False)

    # Resuming a run on data prepared with another tokenizer.
    cfg = tiny_config(gpt2_data, custom_run, train={"max_steps": 4})
    with pytest.raises(GPT2LabError, match="tokenizer 'bpe600.*' but the data was tokenized with 'gpt2'"):
        train(cfg, resume="auto", progress=False)

    # The loader itself refuses shards whose manifest names another tokenizer.
    from gpt2lab.data import ShardLoader

    with pytest.raises(GPT2LabError, match="tokenized with 'bpe600"):
        ShardLoader(data, "train", batch_size=1, seq_len=8, tokenizer=get_tokenizer())
