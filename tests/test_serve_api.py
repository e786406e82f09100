"""`gpt2lab serve` over real HTTP on 127.0.0.1: exactness, the OpenAI client, streaming, batching, errors."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_utils import complete, open_stream, request, running_server, stream_all, tiny_model

from gpt2lab.checkpoint import save_model
from gpt2lab.tokenizer import get_tokenizer

PROMPTS = ["Hello, I am", "The meaning of life is", "ROMEO:", "1, 2, 3,", "Once upon a time", "def f(x):", "A", "Q: "]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_model(tiny_model(seed=3), path, get_tokenizer())
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    """The checkpoint loaded as `gpt2lab serve --model tiny=CKPT` loads it, plus a second model."""
    from gpt2lab.serve.app import create_app
    from gpt2lab.serve.engine import Engine, ModelRunner
    from gpt2lab.serve.protocol import Limits
    from gpt2lab.serve.server import background_server, load_runners

    runners = load_runners([f"tiny={ckpt}"], "cpu", "float32", max_batch=8)
    other = ModelRunner("other", tiny_model(seed=4), get_tokenizer(), 8)
    engine = Engine([*runners, other], max_queue=64)
    with background_server(engine, create_app(engine, Limits(max_n=4))) as url:
        yield url, engine


def wait_until(cond, timeout=10.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.02)
    return False


def idle(url):
    return wait_until(lambda: request(url, "GET", "/health")[1]["running"] == 0)


# -- exactness ---------------------------------------------------------------------------------------


def test_greedy_is_what_sample_prints(server, ckpt, cli):
    url, _ = server
    for prompt in PROMPTS[:3]:
        out = complete(url, {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0})
        res = cli("sample", "--model", ckpt, "--prompt", prompt, "--max-new-tokens", 24, "--temperature", 0)
        assert res.code == 0, res.err
        assert res.out == prompt + out["choices"][0]["text"] + "\n"
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 24


def test_seeded_sampling_is_what_sample_prints_alone_and_under_load(server, ckpt, cli):
    url, _ = server
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0.9, "seed": 1234}
    alone = complete(url, body)["choices"][0]["text"]
    res = cli("sample", "--model", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", 30, "--temperature", 0.9,
              "--top-k", 0, "--seed", 1234)  # fmt: skip
    assert res.out == "ROMEO:" + alone + "\n"
    # The same request again while seven others decode beside it, joining and leaving at other steps.
    others = [
        {"model": "tiny", "prompt": p, "max_tokens": 5 + 7 * i, "temperature": 1.0} for i, p in enumerate(PROMPTS[1:])
    ]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(complete, url, b) for b in others[:4]]
        time.sleep(0.05)
        mine = pool.submit(complete, url, body)
        futures += [pool.submit(complete, url, b) for b in others[4:]]
        assert mine.result()["choices"][0]["text"] == alone
        assert all(f.result()["choices"][0]["finish_reason"] for f in futures)


def test_sixteen_concurrent_clients_each_get_their_own_greedy_answer(server):
    url, engine = server
    bodies = [
        {"model": "tiny" if i % 3 else "other", "prompt": PROMPTS[i % 8] * (1 + i % 3), "max_tokens": 4 + 3 * i,
         "temperature": 0}
        for i in range(16)
    ]  # fmt: skip
    expected = [complete(url, b)["choices"][0]["text"] for b in bodies]  # one at a time
    steps0 = engine.steps
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda b: complete(url, b)["choices"][0]["text"], bodies))
    assert got == expected
    # Batched: far fewer decode rounds than the 16 requests' tokens one after another.
    assert engine.steps - steps0 < sum(b["max_tokens"] for b in bodies) // 2


def test_a_short_request_does_not_wait_for_a_long_one(server):
    url, _ = server
    with open_stream(url, {"model": "tiny", "prompt": "A", "max_tokens": 60, "temperature": 0}) as long_events:
        first = next(long_events)
        assert first["choices"][0]["finish_reason"] is None
        short = complete(url, {"model": "tiny", "prompt": "B", "max_tokens": 2, "temperature": 0})
        assert short["choices"][0]["finish_reason"] == "length"
        assert request(url, "GET", "/health")[1]["running"] == 1  # the long one is still decoding
        rest = list(long_events)
    assert rest[-1] == "[DONE]"
    assert rest[-2]["choices"][0]["finish_reason"] == "length"


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server):
    url, engine = server
    assert idle(url)
    with open_stream(url, {"model": "tiny", "prompt": "A", "max_tokens": 63, "temperature": 1.0}) as events:
        next(events)
        next(events)
        assert request(url, "GET", "/health")[1]["running"] == 1
    steps = engine.steps
    assert idle(url)
    assert engine.steps - steps < 30  # freed long before its 63 tokens


# -- the API -----------------------------------------------------------------------------------------


def test_streaming_chunks_add_up_to_the_plain_response(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 12, "temperature": 0, "logprobs": 3}
    plain = complete(url, body)["choices"][0]
    events = stream_all(url, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 1, "completion_tokens": 12, "total_tokens": 13}
    chunks = events[:-2]
    assert len(chunks) == 12  # one per token
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert tokens == plain["logprobs"]["tokens"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 11 + ["length"]


def test_logprobs_echo_and_offsets_in_openai_shape(server):
    url, _ = server
    out = complete(url, {"model": "tiny", "prompt": "Hello world", "max_tokens": 3, "temperature": 0, "logprobs": 5,
                         "echo": True})["choices"][0]  # fmt: skip
    lp = out["logprobs"]
    tok = get_tokenizer()
    assert out["text"].startswith("Hello world")
    assert lp["tokens"][:2] == ["Hello", " world"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [0, 5, 11, *lp["text_offset"][3:]]
    for token, logprob, top in zip(lp["tokens"][2:], lp["token_logprobs"][2:], lp["top_logprobs"][2:]):
        assert len(top) == 5
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
        assert top[token] == logprob
        assert sorted(top.values(), reverse=True) == list(top.values())
    assert "".join(lp["tokens"]) == out["text"] == tok.decode(tok.encode(out["text"]))


def test_n_choices_and_a_list_of_prompts_in_openai_order(server):
    url, _ = server
    out = complete(url, {"model": "tiny", "prompt": ["A", "B"], "n": 3, "max_tokens": 6, "seed": 7})
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert len(set(texts[:3])) == 3  # each choice draws from its own stream
    # Choice j of a seeded request is that request with seed + j, alone.
    for j in range(3):
        alone = complete(url, {"model": "tiny", "prompt": "B", "max_tokens": 6, "seed": 7 + j})
        assert alone["choices"][0]["text"] == texts[3 + j]
    assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 36, "total_tokens": 38}


def test_token_id_prompts_equal_text_prompts(server):
    url, _ = server
    tok = get_tokenizer()
    ids = tok.encode("ROMEO:")
    a = complete(url, {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0})
    b = complete(url, {"model": "tiny", "prompt": ids, "max_tokens": 5, "temperature": 0})
    c = complete(url, {"model": "tiny", "prompt": [ids, ids], "max_tokens": 5, "temperature": 0})
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == c["choices"][1]["text"]


def test_stop_strings_cut_the_text_and_end_the_choice(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 20, "seed": 11}
    full = complete(url, body)["choices"][0]["text"]
    word = full.split()[3]
    cut = full.index(word)
    out = complete(url, {**body, "stop": ["zzqx", word]})
    assert out["choices"][0] == {"index": 0, "text": full[:cut], "logprobs": None, "finish_reason": "stop"}
    assert out["usage"]["completion_tokens"] < 20
    streamed = stream_all(url, {**body, "stop": word})
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == full[:cut]
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"


def test_the_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "other"]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, logprobs=2)
    direct = complete(url, {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0})
    assert out.choices[0].text == direct["choices"][0]["text"]
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert len(out.choices[0].logprobs.top_logprobs[0]) == 2
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == out.choices[0].text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="Hello")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="Hello", top_p=0)


def test_health_and_models(server):
    url, _ = server
    status, health = request(url, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["models"] == ["tiny", "other"]
    status, models = request(url, "GET", "/v1/models")
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["context_length"]) for m in models["data"]] == [
        ("tiny", "model", 64),
        ("other", "model", 64),
    ]


# -- bad input ---------------------------------------------------------------------------------------

BAD = [
    (b'{"prompt": "x",', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model", "'gpt-9' does not exist here; this server has: tiny, other"),
    ({"prompt": "x " * 40, "max_tokens": 30}, 400, "max_tokens", "maximum context length is 64 tokens, however you "
     "requested 71 tokens (41 in your prompt; 30 for the completion)"),
    ({"prompt": "x " * 70, "max_tokens": 1}, 400, "prompt", "maximum context length is 64 tokens"),
    ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens", "max_tokens must be between 1 and 64 on this "
     "server, got 65"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens 0 is only allowed with echo: true (to score "
     "the prompt with logprobs)"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "max_tokens must be between 1 and 64 on this server, "
     "got -1"),
    ({"prompt": "x", "max_tokens": -1, "echo": True}, 400, "max_tokens", "max_tokens must be between 0 and 64"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature", "temperature must be between 0 and 2, got -0.5"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "top_p must be in (0, 1], got 0.0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"prompt": "x", "top_k": -1}, 400, "top_k", "top_k must be >= 0"),
    ({"prompt": "x", "n": 5}, 400, "n", "n must be between 1 and 4 on this server, got 5"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", "logprobs must be between 0 and 5, got 6"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 stop sequences"),
    ({"prompt": "x", "max_tokens": "10"}, 400, "max_tokens", 'max_tokens: input should be a valid integer, got "10"'),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "input should be a valid boolean"),
    ({"prompt": 5}, 400, "prompt", "prompt must be a string, a list of strings, a list of token ids"),
    ({"prompt": []}, 400, "prompt", "prompt must be a string"),
    ({"prompt": [1, "a"]}, 400, "prompt", "prompt must be a string"),
    ({"prompt": [50257]}, 400, "prompt", "token id 50257 is outside the vocabulary (0 .. 50256)"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "frequency_penalty is not supported"),
    ({"prompt": "x", "temprature": 0.5}, 400, "temprature", "unrecognized request argument supplied: temprature"),
]  # fmt: skip


@pytest.mark.parametrize("body,status,param,message", BAD)
def test_bad_input_gets_one_openai_error_and_the_server_keeps_serving(server, body, status, param, message):
    url, _ = server
    code, out = request(url, "POST", "/v1/completions", body)
    assert code == status
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["type"] == "invalid_request_error"
    assert out["error"]["param"] == param
    assert message in out["error"]["message"]
    assert complete(url, {"prompt": "x", "max_tokens": 1})["choices"][0]["finish_reason"] == "length"


def test_unknown_routes_and_methods_answer_in_the_same_shape(server):
    url, _ = server
    code, out = request(url, "POST", "/v1/embeddings", {"input": "x"})
    assert code == 404 and out["error"]["message"] == (
        "no route POST /v1/embeddings; see GET /v1/models, POST /v1/completions and POST /v1/chat/completions"
    )
    code, out = request(url, "GET", "/v1/chat/completions")
    assert code == 405 and out["error"]["message"] == "GET is not allowed on /v1/chat/completions"
    code, out = request(url, "GET", "/v1/completions")
    assert code == 405 and out["error"]["message"] == "GET is not allowed on /v1/completions"


def test_api_key_is_required_when_set():
    with running_server({"tiny": tiny_model()}, api_key="s3cret") as (url, _):
        body = {"prompt": "x", "max_tokens": 2}
        code, out = request(url, "POST", "/v1/completions", body)
        assert code == 401 and out["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer KEY" in out["error"]["message"]
        code, out = request(url, "POST", "/v1/completions", body, headers={"Authorization": "Bearer nope"})
        assert (code, out["error"]["message"]) == (401, "incorrect API key provided")
        assert request(url, "GET", "/v1/models")[0] == 401
        assert complete(url, body, headers={"Authorization": "Bearer s3cret"})["usage"]["completion_tokens"] == 2
        assert request(url, "GET", "/health")[0] == 200  # liveness checks need no key


def test_past_the_queue_bound_requests_get_503_not_a_backlog():
    with running_server({"tiny": tiny_model()}, max_batch=1, max_queue=1) as (url, engine):
        hold = {"prompt": "A", "max_tokens": 60, "temperature": 1.0}
        with open_stream(url, hold) as events:
            next(events)  # occupies the only slot
            waiting = threading.Thread(target=complete, args=(url, {"prompt": "B", "max_tokens": 2}))
            waiting.start()
            assert wait_until(lambda: engine.waiting_count() == 1)
            code, out = request(url, "POST", "/v1/completions", {"prompt": "C", "max_tokens": 2})
            assert code == 503
            assert out["error"]["type"] == "server_error" and out["error"]["code"] == "server_busy"
            assert "1 prompt(s) are waiting and the queue holds 1" in out["error"]["message"]
        waiting.join(30)
        assert not waiting.is_alive()
        assert complete(url, {"prompt": "C", "max_tokens": 2})["choices"][0]["finish_reason"] == "length"
