"""`POST /v1/chat/completions` over real HTTP on 127.0.0.1: the template's prompt, exact tokens, OpenAI's
chat shapes streamed and not, the reply's end at <|end|>, logprobs, the official client, errors."""

from __future__ import annotations

import json
import math
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_utils import (
    chat,
    chat_tokenizer,
    complete,
    open_stream,
    request,
    rigged,
    running_server,
    stream_all,
    tiny_chat_model,
    tiny_model,
)

from gpt2lab.chat import ChatTemplate
from gpt2lab.generate import SamplingParams, stream_text

TOK = chat_tokenizer()
TEMPLATE = ChatTemplate.for_tokenizer(TOK)
END, EOT = TEMPLATE.end_id, TOK.eot_token
YES, NO = TOK.encode_ordinary(" yes")[0], TOK.encode_ordinary(" no")[0]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
BASE_MODEL_ERROR = (
    "the model 'base' has no chat template: it was never fine-tuned on conversations; fine-tune it first "
    "(docs/training.md) or use /v1/completions"
)


@pytest.fixture(scope="module")
def models():
    return {
        "chat": tiny_chat_model(seed=5),
        "ends": rigged(tiny_chat_model(seed=6), {YES: 0.0, NO: 0.0, END: -1.0}),  # P(<|end|>) = 0.16
        "eot": rigged(tiny_chat_model(seed=7), {YES: 0.0, EOT: 2.0}),
        "base": tiny_model(seed=8),
    }


@pytest.fixture(scope="module")
def server(models):
    toks = {name: TOK for name in ("chat", "ends", "eot")}
    with running_server(models, max_batch=4, tokenizers=toks) as (url, engine):
        yield url, engine


def library_reply(model, messages, seed, max_new, temperature=0.9):
    """What `generate` streams for the template's prompt: the reply the endpoint must give."""
    sampling = SamplingParams(temperature=temperature, seed=seed, stop_token=EOT)
    ids = TEMPLATE.prompt_ids(messages, TOK)
    return "".join(stream_text(model, TOK, ids, max_new, sampling=sampling, end_tokens=(END,)))


def body(**kw):
    return {"model": "chat", "messages": MESSAGES, "max_tokens": 20, "temperature": 0.9, "seed": 7, **kw}


def test_reply_is_the_template_prompt_continued_as_generate_does(server, models):
    url, _ = server
    out = chat(url, body())
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "chat"
    [choice] = out["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": library_reply(models["chat"], MESSAGES, 7, 20),
        "refusal": None,
    }
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt_tokens = len(TEMPLATE.prompt_ids(MESSAGES, TOK))
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 20, "total_tokens": prompt_tokens + 20}
    # A second turn: the history as the client sends it back.
    turns = [*MESSAGES, choice["message"], {"role": "user", "content": "Another."}]
    again = chat(url, body(messages=turns, seed=8))["choices"][0]["message"]["content"]
    assert again == library_reply(models["chat"], [{k: m[k] for k in ("role", "content")} for m in turns], 8, 20)


def test_stream_is_role_delta_content_deltas_finish_and_done(server):
    url, _ = server
    whole = chat(url, body())["choices"][0]["message"]["content"]
    events = stream_all(url, body(stream=True, stream_options={"include_usage": True}), path="/v1/chat/completions")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    final = chunks[-2]["choices"]
    assert final == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    middle = [c["choices"][0] for c in chunks[1:-2]]
    assert all(set(c["delta"]) == {"content"} and c["finish_reason"] is None for c in middle)
    assert "".join(c["delta"]["content"] for c in middle) == whole


def test_n_choices_are_independent_samples_each_as_alone(server, models):
    url, _ = server
    out = chat(url, body(n=3, seed=100))
    texts = [c["message"]["content"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert texts == [library_reply(models["chat"], MESSAGES, 100 + j, 20) for j in range(3)]
    assert len(set(texts)) == 3
    assert out["usage"]["completion_tokens"] == 60
    streamed = stream_all(url, body(n=3, seed=100, stream=True), path="/v1/chat/completions")[:-1]
    per_choice = ["", "", ""]
    roles = [c["choices"][0]["index"] for c in streamed if c["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    for c in streamed:
        part = c["choices"][0]
        per_choice[part["index"]] += part["delta"].get("content", "")
    assert per_choice == texts


def test_logprobs_in_chat_form_agree_with_completions_on_the_same_prompt(server):
    url, _ = server
    out = chat(url, body(logprobs=True, top_logprobs=3, max_tokens=12))["choices"][0]
    content = out["logprobs"]["content"]
    assert out["logprobs"]["refusal"] is None
    assert "".join(t["token"] for t in content) == out["message"]["content"]
    # The same prompt ids through /v1/completions: the same tokens, log-probabilities and alternatives.
    ids = TEMPLATE.prompt_ids(MESSAGES, TOK)
    lp = complete(url, {"model": "chat", "prompt": ids, "max_tokens": 12, "temperature": 0.9, "seed": 7,
                        "logprobs": 3})["choices"][0]["logprobs"]  # fmt: skip
    assert [t["token"] for t in content] == lp["tokens"]
    assert [t["logprob"] for t in content] == lp["token_logprobs"]
    for t, top in zip(content, lp["top_logprobs"]):
        assert [(a["token"], a["logprob"]) for a in t["top_logprobs"]] == list(top.items())
        assert t["bytes"] == list(t["token"].encode("utf-8"))
        assert all(a["bytes"] == list(a["token"].encode("utf-8")) for a in t["top_logprobs"])
    streamed = stream_all(url, body(logprobs=True, top_logprobs=3, max_tokens=12, stream=True),
                          path="/v1/chat/completions")  # fmt: skip
    tokens = [t for c in streamed[1:-2] for t in c["choices"][0]["logprobs"]["content"]]
    assert tokens == content
    no_top = chat(url, body(logprobs=True, max_tokens=3))["choices"][0]["logprobs"]["content"]
    assert [t["top_logprobs"] for t in no_top] == [[], [], []]


def test_the_reply_ends_at_the_end_token_which_is_neither_text_nor_logprob(server):
    url, _ = server
    out = chat(url, body(model="ends", n=4, max_tokens=40, temperature=1.0, logprobs=True, top_logprobs=3))
    for c in out["choices"]:
        text, content = c["message"]["content"], c["logprobs"]["content"]
        assert c["finish_reason"] == "stop"  # P(40 tokens without <|end|>) = 0.84**40 < 0.001
        assert text == "".join(t["token"] for t in content) and set(text.split()) <= {"yes", "no"}
        assert all(t["token"] in (" yes", " no") for t in content)
        assert content and {a["token"] for a in content[0]["top_logprobs"]} == {" yes", " no", "<|end|>"}
    assert out["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) + 1 for c in out["choices"])
    greedy = chat(url, body(model="ends", temperature=0, messages=[{"role": "user", "content": "?"}]))
    assert greedy["choices"][0]["message"]["content"] == (" yes" if YES < NO else " no") * 20  # a tie: the lower id
    eot = chat(url, body(model="eot", temperature=0))
    assert eot["choices"][0]["message"]["content"] == "" and eot["choices"][0]["finish_reason"] == "stop"
    assert eot["usage"]["completion_tokens"] == 1


def test_max_tokens_default_is_the_rest_of_the_context_and_stop_strings_cut(server, models):
    url, _ = server
    out = chat(url, body(max_tokens=None))
    prompt_tokens = out["usage"]["prompt_tokens"]
    assert out["usage"]["completion_tokens"] == 64 - prompt_tokens
    assert chat(url, body(max_tokens=None, max_completion_tokens=5))["usage"]["completion_tokens"] == 5
    full = library_reply(models["chat"], MESSAGES, 7, 20)
    stop = full[5:8]
    cut = chat(url, body(stop=[stop]))["choices"][0]
    assert cut["message"]["content"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


BAD = [
    ({"messages": []}, "messages", "'messages' must be a non-empty list of {role, content} objects"),
    ({"messages": "hi"}, "messages", "'messages' must be a non-empty list of {role, content} objects"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages",
     "message 0 has role 'tool'; the roles are system, user and assistant"),
    ({"messages": [{"role": "user"}]}, "messages", "message 0 (user) has no text 'content'"),
    ({"messages": [{"role": "user", "content": " "}]}, "messages", "every message is empty"),
    ({"model": "base"}, "model", BASE_MODEL_ERROR),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs must be between 0 and 20, got 21"),
    ({"max_tokens": 60}, "max_tokens", "this model's maximum context length is 64 tokens, however you requested"),
    ({"max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens must be between 1 and 64 on this server, got 0"),
    ({"logprobs": 1}, "logprobs", "logprobs: input should be a valid boolean, got 1"),
    ({"prompt": "x"}, "prompt", "unrecognized request argument supplied: prompt"),
    ({"n": 9}, "n", "n must be between 1 and 4 on this server, got 9"),
    ({"presence_penalty": 1}, "presence_penalty", "presence_penalty is not supported; leave it out or set it to 0"),
]  # fmt: skip


@pytest.mark.parametrize("change,param,message", BAD)
def test_bad_requests_get_openai_errors_with_the_reason(server, change, param, message):
    url, _ = server
    code, out = request(url, "POST", "/v1/chat/completions", body(**change))
    assert code == 400
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    assert out["error"]["message"].startswith(message)
    if param == "model":
        assert out["error"]["code"] == "model_not_chat"


def test_openai_message_forms_meaning_plain_text_are_accepted(server):
    url, _ = server
    system = [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]
    parts = [{"role": "developer", "content": system},
             {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]  # fmt: skip
    assert chat(url, body(messages=parts))["choices"] == chat(url, body())["choices"]


def test_the_official_client_streamed_and_not(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="chat", messages=MESSAGES, max_tokens=15, temperature=0.9, seed=3)
    out = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert len(choice.logprobs.content[0].top_logprobs) == 2 and out.usage.completion_tokens == 15
    pieces, roles, finishes = [], [], []
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        pieces.append(delta.content or "")
        finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert roles == ["assistant"] and finishes == ["length"] and "".join(pieces) == choice.message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=MESSAGES)
    assert e.value.body["message"] == BASE_MODEL_ERROR


def test_chat_waits_in_the_same_bounded_queue_as_completions(models):
    toks = {"chat": TOK}
    with running_server({"chat": models["chat"]}, max_batch=1, max_queue=1, tokenizers=toks) as (url, engine):
        with open_stream(url, body(max_tokens=40), path="/v1/chat/completions") as events:
            next(events)  # the role chunk: the only slot is taken
            waiting = threading.Thread(target=complete, args=(url, {"prompt": "B", "max_tokens": 2}))
            waiting.start()
            for _ in range(1000):
                if engine.waiting_count() == 1:
                    break
                threading.Event().wait(0.01)
            code, out = request(url, "POST", "/v1/chat/completions", body())
            assert code == 503 and out["error"]["code"] == "server_busy"
        waiting.join(30)
        assert not waiting.is_alive()
        assert chat(url, body(max_tokens=2))["usage"]["completion_tokens"] == 2


def test_probabilities_are_the_models_own(server, models):
    """At temperature 0 on the rigged model the reported log-probabilities are log-softmax of its logits."""
    url, _ = server
    out = chat(url, body(model="ends", temperature=0, max_tokens=2, logprobs=True, top_logprobs=3))
    z = math.log(2 + math.exp(-1.0) + (TEMPLATE.n_vocab - 3) * math.exp(-30.0))
    first = out["choices"][0]["logprobs"]["content"][0]
    assert first["logprob"] == pytest.approx(-z, abs=1e-5)
    assert [a["logprob"] for a in first["top_logprobs"]] == pytest.approx([-z, -z, -1 - z], abs=1e-5)
    assert json.dumps(out).count("<|end|>") == 2  # only as an alternative, never as a token


def test_chat_and_completions_decode_together_each_as_alone(server):
    """Continuous batching: replies that join and leave one running batch are the replies given alone."""
    import concurrent.futures

    url, _ = server
    work = [("chat", body(seed=s, max_tokens=5 + 6 * s)) for s in range(5)]
    work += [("complete", {"model": "chat", "prompt": p, "max_tokens": 9, "seed": 1}) for p in ["A", "B c", "D"]]

    def one(item):
        kind, b = item
        out = chat(url, b) if kind == "chat" else complete(url, b)
        c = out["choices"][0]
        return c["message"]["content"] if kind == "chat" else c["text"]

    alone = [one(item) for item in work]
    with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(one, work))
    assert together == alone
