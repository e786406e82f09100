import math

import pytest
import torch
from helpers import gpt2lab_twin, hf_gpt2

from gpt2lab.config import GPTConfig
from gpt2lab.generate import (
    GenerationStats,
    SamplingParams,
    TextStreamer,
    filter_top_k,
    filter_top_p,
    generate,
    sample_next,
    stream_text,
)
from gpt2lab.model import GPT
from gpt2lab.tokenizer import get_tokenizer


@pytest.mark.parametrize("shape", [dict(), dict(n_layer=4, n_head=4, n_embd=128, n_positions=128)])
def test_greedy_matches_transformers_generate(shape):
    hf = hf_gpt2(seed=7, **shape)
    ours = gpt2lab_twin(hf)
    prompt = torch.randint(0, 50257, (1, 12))
    with torch.no_grad():
        expected = hf.generate(prompt, do_sample=False, max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
    got = generate(ours, prompt[0].tolist(), max_new_tokens=40, sampling=SamplingParams(temperature=0))
    assert got.tokens[0] == expected[0, 12:].tolist()


def test_batched_greedy_matches_transformers_generate():
    hf = hf_gpt2(seed=8)
    ours = gpt2lab_twin(hf)
    prompt = torch.randint(0, 50257, (1, 5))
    with torch.no_grad():
        expected = hf.generate(prompt.expand(3, -1), do_sample=False, max_new_tokens=20, pad_token_id=0)
    got = generate(ours, prompt[0].tolist(), max_new_tokens=20, sampling=SamplingParams(temperature=0), num_samples=3)
    assert got.tokens == expected[:, 5:].tolist()


@pytest.mark.parametrize("num_samples", [1, 3])
def test_cached_equals_uncached_including_window_slides(num_samples):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97)).eval()
    prompt = torch.randint(0, 97, (20,)).tolist()  # longer than the window: cropped
    greedy = SamplingParams(temperature=0)
    cached = generate(model, prompt, 60, sampling=greedy, num_samples=num_samples)
    uncached = generate(model, prompt, 60, sampling=greedy, num_samples=num_samples, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.stats.slides == uncached.stats.slides > 0
    top20 = SamplingParams(temperature=1.0, top_k=20, seed=3)
    sampled = generate(model, prompt, 60, sampling=top20, num_samples=num_samples)
    sampled_uncached = generate(model, prompt, 60, sampling=top20, num_samples=num_samples, use_cache=False)
    assert sampled.tokens == sampled_uncached.tokens


def test_the_cache_reads_only_the_positions_it_filled(monkeypatch):
    # Rows side by side read only the positions they filled: with the cache full of NaN first, decoding
    # must still equal the uncached logits.
    from gpt2lab import model as model_module

    real = model_module.KVCache.__init__

    def poisoned(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.k.fill_(float("nan"))
        self.v.fill_(float("nan"))

    monkeypatch.setattr(model_module.KVCache, "__init__", poisoned)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97)).eval()
    cache = model_module.KVCache(model.config, 2, 12)
    assert torch.isnan(cache.k).all()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        logits = [model(idx[:, :5], cache=cache)[0]]
        logits += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(logits, dim=1), full)
    greedy = SamplingParams(temperature=0)
    prompt = idx[0, :5].tolist()
    assert generate(model, prompt, 30, sampling=greedy).tokens == generate(
        model, prompt, 30, sampling=greedy, use_cache=False
    ).tokens


def test_window_semantics_each_token_sees_the_documented_context():
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=50)).eval()
    prompt = [1, 2, 3, 4, 5, 6]
    out = generate(model, prompt, 12, sampling=SamplingParams(temperature=0)).tokens[0]
    seq = list(prompt)
    start = 0
    for tok in out:
        if len(seq) - start > 8:
            start = len(seq) - 4
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[start:]]))
        assert int(logits[0, -1].argmax()) == tok
        seq.append(tok)


def test_top_k_on_a_hand_computed_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 3.0]])
    kept = filter_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, False, True]]
    kept3 = filter_top_k(logits, 3)
    assert torch.isfinite(kept3).tolist() == [[False, True, True, False, True]]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_on_a_hand_computed_distribution():
    probs = torch.tensor([[0.5, 0.05, 0.25, 0.15, 0.05]])
    logits = probs.log()
    # Sorted: 0.5, 0.25, 0.15, 0.05, 0.05. p=0.7: 0.5 < 0.7, 0.75 >= 0.7 -> keep {0, 2}.
    assert torch.isfinite(filter_top_p(logits, 0.7)).tolist() == [[True, False, True, False, False]]
    # p=0.75 is reached exactly by the first two.
    assert torch.isfinite(filter_top_p(logits, 0.75)).tolist() == [[True, False, True, False, False]]
    # p=0.8 needs the third.
    assert torch.isfinite(filter_top_p(logits, 0.8)).tolist() == [[True, False, True, True, False]]
    # A tiny p still keeps the most likely token.
    assert torch.isfinite(filter_top_p(logits, 1e-6)).tolist() == [[True, False, False, False, False]]
    renormalised = torch.softmax(filter_top_p(logits, 0.8), dim=-1)
    torch.testing.assert_close(renormalised, torch.tensor([[0.5, 0.0, 0.25, 0.15, 0.0]]) / 0.9)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[0.5, 0.05, 0.25, 0.15, 0.05]]).log().expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), generator=g)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    expected = torch.tensor([0.5, 0.0, 0.25, 0.15, 0.0]) / 0.9
    assert (freq - expected).abs().max().item() < 0.015
    hot = sample_next(torch.tensor([[2.0, 0.0]]).expand(20000, -1), SamplingParams(temperature=0.5), generator=g)
    p0 = 1 / (1 + math.exp(-4.0))  # softmax([4, 0])
    assert abs((hot == 0).float().mean().item() - p0) < 0.01


def test_seeded_sampling_is_reproducible():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=60)).eval()
    a = generate(model, [1, 2, 3], 30, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=123), num_samples=2)
    b = generate(model, [1, 2, 3], 30, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=123), num_samples=2)
    c = generate(model, [1, 2, 3], 30, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=124), num_samples=2)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.tokens[0] != a.tokens[1]  # samples of one batch differ


def test_stop_at_eot_per_sample():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=32, vocab_size=5)).eval()
    out = generate(model, [0], 25, sampling=SamplingParams(temperature=1.0, seed=0, stop_token=4), num_samples=4)
    for tokens in out.tokens:
        assert 4 not in tokens[:-1]
        assert len(tokens) == 25 or tokens[-1] == 4
    assert any(len(t) < 25 for t in out.tokens)
    # Decoding ran exactly as long as the longest sample.
    assert out.stats.new_tokens == max(len(t) for t in out.tokens)


def test_stream_text_stops_before_printing_the_stop_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64, vocab_size=50257)).eval()
    tok = get_tokenizer()
    # The stop token is whichever token the seeded run produces 5th, so it is sure to be met.
    free = generate(model, [0], 10, sampling=SamplingParams(temperature=1.0, seed=2)).tokens[0]
    stop = free[4]
    first = free.index(stop)
    sampling = SamplingParams(temperature=1.0, seed=2, stop_token=stop)
    stats = GenerationStats()
    streamed = "".join(stream_text(model, tok, [0], 10, sampling=sampling, stats=stats))
    assert streamed == tok.decode(free[:first])
    assert stats.new_tokens == first + 1


def test_streamer_yields_only_whole_characters():
    tok = get_tokenizer()
    text = "a😀b你好🇫🇷"
    ids = tok.encode(text)
    streamer = TextStreamer(tok)
    pieces = [streamer.push(t) for t in ids] + [streamer.flush()]
    assert "".join(pieces) == text
    assert len(ids) > len(text)  # some characters really are split across tokens
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # every piece is whole UTF-8


def test_stream_text_equals_batch_decode():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50257)).eval()
    tok = get_tokenizer()
    seeded = SamplingParams(temperature=1.0, seed=5)
    streamed = "".join(stream_text(model, tok, "Hello", 30, sampling=seeded))
    batch = generate(model, tok.encode("Hello"), 30, sampling=seeded)
    assert streamed == tok.decode(batch.tokens[0])


def test_an_empty_prompt_starts_a_new_document_in_python_as_in_the_cli():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50257)).eval()
    tok = get_tokenizer()
    greedy = SamplingParams(temperature=0)
    from_eot = generate(model, [tok.eot_token], 12, sampling=greedy)
    empty = generate(model, [], 12, sampling=greedy)
    assert empty.tokens == from_eot.tokens and empty.stats.prompt_tokens == 1
    assert "".join(stream_text(model, tok, "", 12, sampling=greedy)) == tok.decode(from_eot.tokens[0])


def test_generate_tokens_validates_arguments():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        SamplingParams(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -0.5"):
        SamplingParams(temperature=-0.5)


def test_an_empty_prompt_on_a_chat_model_starts_with_the_token_given():
    from gpt2lab.chat import ChatTemplate

    tok = get_tokenizer()
    template = ChatTemplate.for_tokenizer(tok)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=template.n_vocab)).eval()
    greedy = SamplingParams(temperature=0)
    from_eot = generate(model, [tok.eot_token], 12, sampling=greedy)
    assert generate(model, [], 12, sampling=greedy, new_document=tok.eot_token).tokens == from_eot.tokens
    from_end = generate(model, [template.end_id], 12, sampling=greedy)  # the default: the last id
    assert generate(model, [], 12, sampling=greedy).tokens == from_end.tokens
    chat_tok = template.tokenizer(tok)
    assert "".join(stream_text(model, chat_tok, "", 12, sampling=greedy)) == chat_tok.decode(from_eot.tokens[0])
