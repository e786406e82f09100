"""Training on the assistant's replies only (train.loss = "assistant"): no gradient from masked targets,
the step's loss as one big batch's, exact resume (AdamW and Muon), a text model's vocabulary grown
for the chat tokens, checkpoints that carry the template, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from chat_data import sum_conversations, write_chat_data
from safetensors.torch import load_file
from train_utils import tiny_config, train_losses

from gpt2lab import accel
from gpt2lab import checkpoint as ckpt
from gpt2lab.chat import template_of
from gpt2lab.config import GPTConfig
from gpt2lab.data.chat_loader import masked_targets, open_chat_loader
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.train import train
from gpt2lab.train.config import load_train_config

pytestmark = pytest.mark.usefixtures("one_thread")
CHAT_VOCAB = 50261  # GPT-2's 50257 tokens and the 4 chat tokens


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """400 train and 60 val sum conversations, GPT-2's tokenizer with the chat tokens."""
    root = tmp_path_factory.mktemp("chat") / "data"
    return write_chat_data(root, sum_conversations(400, seed=1), sum_conversations(60, seed=2))


def chat_config(data_dir: Path, out: Path, shape: bool = True, **sections: dict):
    """tiny_config on chat data: rows of 32 tokens, 4 micro-batches of 4 rows per step."""
    base = {
        "train": {"loss": "assistant", "seq_len": 32, "total_batch_tokens": 512},
        "eval": {"every": 0, "val_tokens": 512, "sample_tokens": 0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return tiny_config(data_dir, out, shape=shape, **base)


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(ckpt.checkpoint_dir(run_dir, step) / ckpt.WEIGHTS_FILE)


def gradients(model: GPT, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
def test_no_gradient_reaches_the_model_from_a_target_whose_mask_is_0(chat_dir, fused):
    # A row of real data: its next tokens and which of them are learned, as the loader reads them.
    loader = open_chat_loader(chat_dir, "train", batch_size=4, seq_len=32)
    x, y = loader.rows([0, 1, 2, 3])
    learn = (y != -1).numpy()
    assert 0 < learn.sum() < learn.size // 2
    next_tokens = torch.cat([x[:, 1:], torch.full((4, 1), 7)], dim=1).numpy()  # (4, 32), any last token
    next_tokens[learn] = y.numpy()[learn]
    assert torch.equal(torch.from_numpy(masked_targets(next_tokens, learn)), y)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=CHAT_VOCAB))
    if fused:
        accel.use_fused_loss(model)
    base = gradients(model, x, y)
    # Other tokens at every masked target position: the gradients are the same, bit for bit.
    other = next_tokens.copy()
    other[~learn] = np.random.default_rng(0).integers(0, CHAT_VOCAB, int((~learn).sum()))
    for name, grad in gradients(model, x, torch.from_numpy(masked_targets(other, learn))).items():
        assert torch.equal(grad, base[name]), name
    # Another token at one learned position: the gradients change (the comparison above can fail).
    flipped = next_tokens.copy()
    i, j = np.argwhere(learn)[0]
    flipped[i, j] = (flipped[i, j] + 1) % CHAT_VOCAB
    changed = gradients(model, x, torch.from_numpy(masked_targets(flipped, learn)))
    assert not torch.equal(changed["transformer.wte.weight"], base["transformer.wte.weight"])
    # And the gradient is that of the mean loss over the learned positions alone, computed from the logits.
    model.zero_grad(set_to_none=True)
    logits = GPT.forward(model, x)[0]  # (4, 32, V), the plain forward
    logp = torch.log_softmax(logits.double(), dim=-1)[torch.from_numpy(learn)]  # (n, V)
    (-logp.gather(1, y[torch.from_numpy(learn)][:, None]).mean()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, base[name], rtol=1e-4, atol=1e-6)


def test_the_loss_key_is_checked_and_text_data_is_refused(corpus, tmp_path):
    with pytest.raises(GPT2LabError, match=r"train.loss must be one of all, assistant .*, got 'replies'"):
        tiny_config(corpus, tmp_path / "run", train={"loss": "replies"})
    with pytest.raises(GPT2LabError) as caught:
        train(tiny_config(corpus, tmp_path / "run", train={"loss": "assistant"}), progress=False)
    assert str(caught.value) == (
        f"train.loss = 'assistant' learns the assistant's replies of chat data, but {corpus} was not prepared from "
        "conversations: prepare it from records with a 'messages' field, or use train.loss = 'all'"
    )


def test_accumulated_micro_batches_give_the_loss_and_update_of_one_big_batch(chat_dir, tmp_path):
    # 4 micro-batches of 4 rows against 1 of 16: the same rows; their learned targets differ in number,
    # so averaging the 4 means would weigh a target of a sparse micro-batch more.
    sections = dict(train={"max_steps": 3}, checkpoint={"every": 3})
    accumulated = train(chat_config(chat_dir, tmp_path / "acc", **sections), progress=False)
    big = train(chat_config(chat_dir, tmp_path / "big", train={**sections["train"], "batch_size": 16}), progress=False)
    assert accumulated.step == big.step == 3
    losses_acc, losses_big = train_losses(tmp_path / "acc"), train_losses(tmp_path / "big")
    assert losses_acc[0][1] == pytest.approx(losses_big[0][1], abs=1e-6)
    for (_, a), (_, b) in zip(losses_acc, losses_big):
        assert a == pytest.approx(b, abs=1e-5)
    wa, wb = weights(tmp_path / "acc", 3), weights(tmp_path / "big", 3)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5)
    # The val loss is over the learned targets of the val rows: fewer than the rows' positions.
    records = [json.loads(line) for line in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    val = open_chat_loader(chat_dir, "val", batch_size=1, seq_len=32)
    learned = sum(int((val.row(k)[1] != -1).sum()) for k in range(512 // 32))
    assert evaluation["val_tokens"] == learned < 512
    assert evaluation["val_loss"] == pytest.approx(accumulated.val_loss)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_chat_training_resumes_bit_for_bit(chat_dir, tmp_path, optimizer):
    # Evaluating (val loss, and a reply sampled to the val data's first user message) changes no training.
    evaluation = {"every": 3, "sample_tokens": 4}
    sections = dict(model={"dropout": 0.1}, data={"shuffle": True}, optim={"name": optimizer}, eval=evaluation)
    straight = train(chat_config(chat_dir, tmp_path / "straight", **sections), progress=False)
    assert straight.step == 8
    part = train(chat_config(chat_dir, tmp_path / "resumed", **sections), stop_at=5, progress=False)
    assert part.step == 5 and part.interrupted
    rest = train(chat_config(chat_dir, tmp_path / "resumed", **sections), resume="auto", progress=False)
    assert rest.step == 8
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    a, b = weights(tmp_path / "straight", 8), weights(tmp_path / "resumed", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if r["kind"] == "sample"]
    first_user = next(m["content"] for m in sum_conversations(60, seed=2)[0] if m["role"] == "user")
    assert [r["step"] for r in samples] == [3, 6, 8] and {r["prompt"] for r in samples} == {first_user}
    assert not any("<|end|>" in r["text"] for r in samples)  # a reply ends at <|end|>, which is not shown
    losses = [loss for _, loss in train_losses(tmp_path / "straight")]
    assert losses[-1] < losses[0] - 0.5  # it learns
    # The checkpoint carries the chat template, so sample, chat and serve find it.
    model, tok = ckpt.load_model_and_tokenizer(str(ckpt.checkpoint_dir(tmp_path / "resumed", 8)))
    assert model.config.vocab_size == tok.n_vocab == CHAT_VOCAB and template_of(tok) is not None


def test_a_text_model_fine_tuned_on_chat_data_gets_the_chat_tokens(corpus, chat_dir, tmp_path):
    text_cfg = tiny_config(corpus, tmp_path / "text", train={"max_steps": 2, "seq_len": 32, "total_batch_tokens": 256})
    text = train(text_cfg, progress=False)
    text_weights = weights(tmp_path / "text", 2)["transformer.wte.weight"]  # (50304, 32)
    cfg = chat_config(chat_dir, tmp_path / "chat", shape=False, train={"init_from": str(text.run_dir), "max_steps": 1})
    tuned = train(cfg, progress=False)
    model, tok = ckpt.load_model_and_tokenizer(str(tuned.checkpoint))
    assert model.config.vocab_size == CHAT_VOCAB and model.config.padded_vocab_size == 50304
    assert (
        template_of(tok) is not None and ckpt.read_meta(tuned.checkpoint)["chat_template"]["tokens"]["<|end|>"] == 50260
    )

    # Before any step: the text rows as they were, the 4 new rows at the mean of the text rows, padding zero.
    from gpt2lab.train.build import pretrained_model

    grown = pretrained_model(cfg, tok).transformer.wte.weight.detach()  # (50304, 32)
    assert torch.equal(grown[:50257], text_weights[:50257])
    mean = text_weights[:50257].mean(dim=0)
    for row in range(50257, CHAT_VOCAB):
        assert torch.equal(grown[row], mean)
    assert not grown[CHAT_VOCAB:].any()


def test_growing_adds_rows_where_the_embedding_has_no_spare_ones():
    from gpt2lab.train.build import with_shape

    torch.manual_seed(0)
    small = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=100, pad_vocab_multiple=1))
    grown = with_shape(small, small.config.replace(vocab_size=104))
    wte = grown.transformer.wte.weight.detach()
    assert wte.shape == (104, 8) and torch.equal(wte[:100], small.transformer.wte.weight.detach())
    assert torch.equal(wte[100:], small.transformer.wte.weight.detach().mean(dim=0).expand(4, 8))
    assert grown.lm_head.weight is grown.transformer.wte.weight  # still tied


def test_sft_config_loads_and_names_a_chat_loss():
    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "sft-gpt2.toml")
    assert (cfg.train.init_from, cfg.train.loss) == ("gpt2", "assistant")
    assert 3e-5 <= cfg.optim.lr <= 1e-4 and 1000 <= cfg.train.max_steps <= 10000 and cfg.eval.every > 0
    assert get_tokenizer().n_vocab == 50257


def test_chat_data_prepared_from_jsonl_trains(tmp_path):
    from gpt2lab.data.prepare import PrepareOptions, prepare

    conversations = sum_conversations(300, seed=3)
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations), encoding="utf-8")
    prepare(PrepareOptions(source=str(source), out=tmp_path / "data", val_tokens=800, workers=1, progress=False))
    loader = open_chat_loader(tmp_path / "data", "train", batch_size=4, seq_len=32)
    tok = get_tokenizer()
    bos = tok.eot_token
    rows = [loader.row(k) for k in range(loader.rows_in_epoch)]
    assert sum(x[0] == bos for x, _ in rows) >= len(rows) - 1  # a row starts a conversation (the split's first may not)
    # Every learned target is a reply token or <|end|>: the template's mask, read back through prepare's files.
    end = 50260  # <|end|>
    replies = {
        t for m in conversations for r in m if r["role"] == "assistant" for t in tok.encode_ordinary(r["content"])
    }
    learned = {int(t) for _, y in rows for t in y if t != -1}
    assert learned <= replies | {end} and end in learned
    run = train(chat_config(tmp_path / "data", tmp_path / "run", train={"max_steps": 2}), progress=False)
    assert run.step == 2 and ckpt.read_meta(run.checkpoint)["chat_template"]["tokens"]["<|end|>"] == end
