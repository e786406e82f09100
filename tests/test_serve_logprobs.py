"""What a completion says about its tokens: `logprobs` lists that agree with `text` (after stop strings
too), `text_offset` counted from the start of the returned text, prompt scoring with `max_tokens: 0`,
and how prompt text is encoded (a literal "<|endoftext|>" as `gpt2lab sample` encodes it)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import torch
from serve_utils import complete, request, running_server, stream_all, tiny_model

from gpt2lab.accel import pack_for_inference
from gpt2lab.checkpoint import save_model
from gpt2lab.tokenizer import get_tokenizer

SEED = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-logprobs") / "tiny"
    save_model(tiny_model(seed=SEED), path, get_tokenizer())
    return path


@pytest.fixture(scope="module")
def url():
    with running_server({"tiny": tiny_model(seed=SEED)}) as (base, _):
        yield base


def streamed_logprobs(url, body):
    """The streamed chunks' text and their logprobs lists, each concatenated."""
    chunks = [e for e in stream_all(url, body) if e != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    lists = {k: [] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for c in chunks:
        for k in lists:
            lists[k] += c["choices"][0]["logprobs"][k]
    return text, lists, chunks


def test_a_stop_string_cuts_the_logprobs_where_it_cuts_the_text(url):
    body = {"prompt": "Hello", "max_tokens": 30, "seed": 11, "logprobs": 2}
    full = complete(url, body)["choices"][0]
    lp = full["logprobs"]
    # A stop string that begins inside a token: the cut falls in the middle of token k.
    k = next(i for i in range(5, 30) if len(lp["tokens"][i]) >= 3 and lp["tokens"][i].isprintable())
    stop = full["text"][lp["text_offset"][k] + 1 :][:4]
    cut = full["text"].index(stop)
    kept = sum(o < cut for o in lp["text_offset"])
    assert lp["text_offset"][kept - 1] < cut < lp["text_offset"][kept - 1] + len(lp["tokens"][kept - 1])

    out = complete(url, {**body, "stop": stop})
    choice = out["choices"][0]
    assert choice["text"] == full["text"][:cut] and choice["finish_reason"] == "stop"
    assert choice["logprobs"] == {key: value[:kept] for key, value in lp.items()}
    assert out["usage"]["completion_tokens"] >= kept  # the tokens cut off were generated all the same

    text, lists, chunks = streamed_logprobs(url, {**body, "stop": stop})
    assert text == choice["text"] and lists == choice["logprobs"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_endoftext_ends_a_choice_and_is_in_neither_text_nor_logprobs():
    tok = get_tokenizer()
    model = tiny_model(seed=SEED)
    with running_server({"tiny": model}) as (base, _):
        body = {"prompt": "A", "max_tokens": 12, "temperature": 0, "logprobs": 1}
        before = complete(base, body)["choices"][0]["logprobs"]["tokens"]
        with torch.no_grad():  # <|endoftext|> just above the 4th greedy token: it comes 4th or sooner
            fourth = tok.encode(before[3])[0]
            model.lm_head.weight[tok.eot_token] = 1.05 * model.lm_head.weight[fourth]
        pack_for_inference(model, 8)  # the packs are stale: made again, as a new server would
        out = complete(base, body)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop"
    tokens = choice["logprobs"]["tokens"]
    assert "<|endoftext|>" not in tokens and tokens == before[: len(tokens)] and len(tokens) <= 3
    assert out["usage"]["completion_tokens"] == len(tokens) + 1
    assert "".join(tokens) == choice["text"]


def test_text_offset_counts_from_the_start_of_the_returned_text_echo_included(url):
    body = {"prompt": "Hello world", "max_tokens": 6, "temperature": 0, "logprobs": 1, "echo": True}
    choice = complete(url, body)["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"][:2] == ["Hello", " world"] and lp["text_offset"][:3] == [0, 5, 11]
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert choice["text"][offset : offset + len(token)] == token
    text, lists, chunks = streamed_logprobs(url, body)
    assert text == choice["text"] and lists == lp  # streamed offsets are absolute too
    assert chunks[0]["choices"][0]["text"].startswith("Hello world")
    plain = complete(url, {**body, "echo": False})["choices"][0]["logprobs"]
    assert plain["text_offset"] == [o - len("Hello world") for o in lp["text_offset"][2:]]


def test_a_character_split_over_tokens_starts_at_its_first_token(url):
    tok = get_tokenizer()
    ids = tok.encode("a 🤗 b")  # 'a', ' \xf0\x9f', '\xa4', '\x97', ' b'
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = complete(url, body)["choices"][0]
    assert choice["text"] == "a 🤗 b"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["a", "bytes:\\x20\\xf0\\x9f", "bytes:\\xa4", "bytes:\\x97", " b"]
    assert lp["text_offset"] == [0, 1, 3, 3, 3]


def test_max_tokens_0_with_echo_scores_the_prompt(url):
    tok = get_tokenizer()
    prompt = "The quick brown fox jumps"
    ids = tok.encode(prompt)
    out = complete(url, {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3, "n": 2})
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    model = tiny_model(seed=SEED)
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)  # (T, V)
    for choice in out["choices"]:
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert lp["tokens"] == [tok.decode([i]) for i in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = [float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)]
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
        for t, top in enumerate(lp["top_logprobs"][1:]):
            values, best = torch.topk(logp[t], 3)
            assert list(top) == [tok.decode([int(i)]) for i in best]
            assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)
    events = stream_all(url, {"prompt": prompt, "max_tokens": 0, "echo": True})
    assert events[-1] == "[DONE]" and len(events) == 2
    assert events[0]["choices"][0]["text"] == prompt and events[0]["choices"][0]["finish_reason"] == "length"


def test_a_literal_endoftext_in_a_prompt_is_text_as_sample_encodes_it(url, ckpt, cli):
    tok = get_tokenizer()
    prompt = "x<|endoftext|>y"
    ordinary = tok.encode_ordinary(prompt)
    assert tok.eot_token not in ordinary and len(ordinary) == 9
    for p, expected_ids in [(prompt, ordinary), ("", [tok.eot_token])]:
        out = complete(url, {"prompt": p, "max_tokens": 12, "temperature": 0, "echo": True, "logprobs": 0})
        assert out["usage"]["prompt_tokens"] == len(expected_ids)
        lp = out["choices"][0]["logprobs"]
        assert lp["tokens"][: len(expected_ids)] == [tok.decode([i]) for i in expected_ids]
        echo = tok.decode(expected_ids)  # the prompt as given; "<|endoftext|>" for the empty one
        assert out["choices"][0]["text"].startswith(echo)
        # The same weights from disk, as `gpt2lab sample` reads them.
        given = ("--prompt", p) if p else ()
        res = cli("sample", "--model", ckpt, "--max-new-tokens", 12, "--temperature", 0, *given)
        assert res.code == 0, res.err
        assert res.out == p + out["choices"][0]["text"][len(echo) :] + "\n"
    # The separator itself is a token id away; the two prompts differ.
    assert complete(url, {"prompt": [tok.eot_token], "max_tokens": 1})["usage"]["prompt_tokens"] == 1
    code, err = request(url, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 60})
    assert code == 400 and "9 in your prompt" in err["error"]["message"]
