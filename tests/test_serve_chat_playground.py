"""The playground's chat mode in a real browser (the fixtures and the skip of test_serve_playground.py):
a message gets a streamed reply whose tokens carry the probability tint and alternatives, whose text is
the API's reply for the same seed; the conversation goes on with its history, Clear starts over, and a
model without a chat template says so."""

from __future__ import annotations

import math

import pytest
from serve_utils import chat, chat_tokenizer, request, running_server, tiny_chat_model, tiny_model

# Skips this module as it skips itself, without Chromium or Playwright; `browser` is its fixture.
from test_serve_playground import SHOWN, Page, browser, expect, expected_rows, pct, tip_rows  # noqa: F401

SETTINGS = {"temperature": "0.8", "top_k": "40", "top_p": "1", "max_tokens": "16", "seed": "42"}
SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def server():
    models = {"talker": tiny_chat_model(seed=21), "base": tiny_model(seed=22)}
    with running_server(models, tokenizers={"talker": chat_tokenizer()}) as (url, _):
        yield url


def open_chat(page: Page, url: str, model: str = "talker") -> None:
    page.goto(url + "/")
    expect(page.locator("#model option")).to_have_count(2)
    page.check("#mode-chat")
    page.select_option("#model", model)
    for field, value in SETTINGS.items():
        page.fill(f"#{field}", value)
    page.fill("#system", SYSTEM)


def say(page: Page, text: str, by_enter: bool = False) -> None:
    page.fill("#message", text)
    if by_enter:
        page.press("#message", "Enter")
    else:
        page.click("#send")
    expect(page.locator("#status")).to_have_text("done", timeout=60_000)


def api_reply(url: str, messages: list[dict[str, str]]) -> dict:
    s = SETTINGS
    numbers = {"temperature": float(s["temperature"]), "top_k": int(s["top_k"]), "top_p": float(s["top_p"]),
               "max_tokens": int(s["max_tokens"]), "seed": int(s["seed"])}  # fmt: skip
    messages = [{"role": "system", "content": SYSTEM}, *messages]
    body = {"model": "talker", "messages": messages, **numbers, "logprobs": True, "top_logprobs": 5}
    return chat(url, body)["choices"][0]


def turns(page: Page) -> list[tuple[str, str]]:
    return [tuple(t) for t in page.eval_on_selector_all(
        "#conversation .turn", "ts => ts.map(t => [t.className, t.querySelector('.text').textContent])")]  # fmt: skip


def test_a_conversation_streams_tinted_replies_that_are_the_apis(server, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    open_chat(page, server)
    shown = "ids => ids.map(id => document.getElementById(id).checkVisibility())"
    assert page.evaluate(shown, ["prompt", "outputs", "generate", "compare", "chat", "system"]) == [
        False, False, False, False, True, True]  # fmt: skip
    say(page, "Hello there.")
    first = api_reply(server, [{"role": "user", "content": "Hello there."}])
    assert turns(page) == [("turn user", "Hello there."), ("turn assistant", first["message"]["content"])]
    content = first["logprobs"]["content"]
    tokens = page.eval_on_selector_all(
        "#conversation .turn.assistant .tok",
        "spans => spans.map(s => ({text: s.textContent, token: s.dataset.token, p: Number(s.dataset.p),"
        " background: s.style.background}))",
    )
    assert [t["token"] for t in tokens] == [t["token"] for t in content] and len(tokens) == 16
    assert [t["text"] for t in tokens] == [t["token"] for t in content]  # plain ASCII tokens: their own text
    assert [t["p"] for t in tokens] == pytest.approx([math.exp(t["logprob"]) for t in content], rel=1e-12)
    assert all(t["background"].startswith("rgb(") for t in tokens)
    stats = page.inner_text("#conversation .turn.assistant .stats")
    assert stats.startswith("seed 42 \u00b7 16 tokens \u00b7 ") and stats.endswith(" \u00b7 length")
    page.hover("#conversation .turn.assistant .tok >> nth=3")
    assert tip_rows(page) == expected_rows({a["token"]: a["logprob"] for a in content[3]["top_logprobs"]})
    assert page.inner_text("#tip .head") == f"{content[3]['token'].translate(SHOWN)} chosen at {pct(tokens[3]['p'])}"

    # The second message goes with the history; Enter sends it.
    say(page, "And then?", by_enter=True)
    history = [{"role": "user", "content": "Hello there."},
               {"role": "assistant", "content": first["message"]["content"]},
               {"role": "user", "content": "And then?"}]  # fmt: skip
    second = api_reply(server, history)["message"]["content"]
    assert turns(page)[2:] == [("turn user", "And then?"), ("turn assistant", second)]
    assert page.input_value("#message") == ""

    page.click("#clear")
    assert turns(page) == []
    say(page, "And then?")
    fresh = api_reply(server, history[2:])["message"]["content"]
    assert turns(page) == [("turn user", "And then?"), ("turn assistant", fresh)]


def test_a_model_without_a_chat_template_says_so_and_the_message_stays(server, browser):  # noqa: F811
    page = browser.new_page()
    open_chat(page, server, model="base")
    say(page, "Hi.")
    expect(page.locator("#conversation .error")).to_have_text(
        "the model 'base' has no chat template: it was never fine-tuned on conversations; fine-tune it first "
        "(docs/training.md) or use /v1/completions"
    )
    assert page.input_value("#message") == "Hi."
    assert page.eval_on_selector_all("#conversation .turn.failed", "ts => ts.length") == 2


def test_chat_on_a_phone_nothing_overflows(server, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    open_chat(page, server)
    say(page, "Tell me a long story about a phone screen.")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    for turn in page.locator("#conversation .turn").all():
        box = turn.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
    page.tap("#conversation .turn.assistant .tok >> nth=0")
    assert len(tip_rows(page)) == 5


def test_token_offsets_come_from_the_token_bytes(server, browser):  # noqa: F811
    """Chat's logprobs carry bytes, not text_offset: the page finds where each token's text starts from them.
    The chunks the server streams for "a 🤗 b" (as in test_serve_playground.py, whose spans this must give)."""
    page = browser.new_page()
    page.goto(server + "/")

    def chunk(text, tokens):
        content = [{"token": t, "logprob": -1.0, "bytes": b, "top_logprobs": [{"token": t, "logprob": -1.0}]}
                   for t, b in tokens]  # fmt: skip
        return {"delta": {"content": text}, "logprobs": {"content": content}}

    chunks = [
        chunk("a", [("a", [97])]),
        chunk(" ", [("bytes:\\x20\\xf0\\x9f", [32, 240, 159])]),
        chunk("\U0001f917", []),
        chunk(" b", [("bytes:\\xa4", [164]), ("bytes:\\x97", [151]), (" b", [32, 98])]),
    ]
    spans = page.evaluate(
        """chunks => {
             const view = makeReply("m", 1);
             for (const choice of chunks) takeChat(view, choice);
             return [view.reply, Array.from(view.text.querySelectorAll(".tok"),
                                            s => [s.textContent, s.getAttribute("tabindex")])];
           }""",
        chunks,
    )
    assert spans == ["a \U0001f917 b", [["a", "0"], [" \U0001f917", "-1"], ["", None], ["", None], [" b", "-1"]]]


def test_the_oldest_turns_are_left_out_when_the_context_is_full(server, browser):  # noqa: F811
    """The tiny model's context is 64 tokens and each reply 16: the third message no longer fits with the
    whole conversation, so the page sends it without the first turn (as `gpt2lab chat` trims), and the
    reply is the API's for that shorter conversation."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    open_chat(page, server)
    said = ["Hello there.", "And then?", "Tell me more about it."]
    history: list[dict[str, str]] = []
    for text in said[:2]:
        say(page, text)
        asked = [*history, {"role": "user", "content": text}]
        history = [*asked, {"role": "assistant", "content": api_reply(server, asked)["message"]["content"]}]
    whole = [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": said[2]}]
    body = {"model": "talker", "max_tokens": 16, "messages": whole}
    status, out = request(server, "POST", "/v1/chat/completions", body)
    assert (status, out["error"]["code"]) == (400, "context_length_exceeded")  # why the page must leave turns out
    say(page, said[2])
    reply = api_reply(server, [*history[2:], {"role": "user", "content": said[2]}])["message"]["content"]
    assert turns(page) == [
        ("turn user dropped", said[0]),
        ("turn assistant dropped", history[1]["content"]),
        ("turn user", said[1]),
        ("turn assistant", history[3]["content"]),
        ("turn user", said[2]),
        ("turn assistant", reply),
    ]
    assert page.locator("#conversation .error").count() == 0
