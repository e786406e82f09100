"""`gpt2lab chat`, driven through stdin: each reply is what /v1/chat/completions gives for the same
conversation and seed (reply k with seed + k), /clear and /exit, history cut from the front to fit the
context, the end of a reply at <|end|>, one line for a model that was never chat-trained, Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_utils import chat, chat_tokenizer, request, rigged, tiny_chat_model, tiny_model

from gpt2lab.chat import ChatTemplate
from gpt2lab.checkpoint import save_model
from gpt2lab.commands.chat import fit_history
from gpt2lab.tokenizer import get_tokenizer

TOK = chat_tokenizer()
TEMPLATE = ChatTemplate.for_tokenizer(TOK)
YES = TOK.encode_ordinary(" yes")[0]
FLAGS = ("--max-new-tokens", 12, "--temperature", 0.9, "--top-k", 0, "--seed", 5)
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    save_model(tiny_chat_model(seed=11), root / "chat", TOK)
    save_model(rigged(tiny_chat_model(seed=12), {YES: 0.0, TEMPLATE.end_id: -1.0}), root / "ends", TOK)
    save_model(tiny_model(seed=13), root / "base", get_tokenizer())
    return root


@pytest.fixture(scope="module")
def server(ckpts):
    """The checkpoints as `gpt2lab serve --model chat=... --model ends=...` loads them."""
    from gpt2lab.serve.app import create_app
    from gpt2lab.serve.engine import Engine
    from gpt2lab.serve.protocol import Limits
    from gpt2lab.serve.server import background_server, load_runners

    runners = load_runners([f"chat={ckpts / 'chat'}", f"ends={ckpts / 'ends'}"], "cpu", "float32", max_batch=2)
    engine = Engine(runners, max_queue=8)
    with background_server(engine, create_app(engine, Limits())) as url:
        yield url


def api_reply(url, messages, seed, model="chat", max_tokens=12):
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.9, "seed": seed}
    return chat(url, body)["choices"][0]["message"]["content"]


def talk(cli, monkeypatch, model, lines, *flags):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    return cli("chat", "--model", model, *FLAGS, *flags)


def test_replies_are_the_servers_for_the_conversation_so_far(cli, monkeypatch, ckpts, server):
    model = ckpts / "chat"
    res = talk(cli, monkeypatch, model, ["Hello there.", "What is two plus two?"], "--system", SYSTEM["content"])
    assert res.code == 0, res.err
    first = api_reply(server, [SYSTEM, user("Hello there.")], 5)
    second = api_reply(server, [SYSTEM, user("Hello there."), assistant(first), user("What is two plus two?")], 6)
    assert res.out == f"{first}\n{second}\n"
    assert first != second and len(TOK.encode_ordinary(first)) >= 8
    assert res.err == (
        f"gpt2lab chat: {model} on cpu, 64-token context, seed 5; /clear starts over, /exit or Ctrl-D ends\n"
    )


def test_clear_starts_over_and_exit_ends(cli, monkeypatch, ckpts, server):
    res = talk(cli, monkeypatch, ckpts / "chat", ["One.", "/clear", "", "Two.", "/exit", "Three."])
    assert res.code == 0, res.err
    assert res.out == f"{api_reply(server, [user('One.')], 5)}\n{api_reply(server, [user('Two.')], 6)}\n"
    assert res.err.endswith("\n(a new conversation)\n")


def test_fit_history_drops_whole_turns_from_the_front_and_keeps_the_system_prompt():
    turns = [SYSTEM, user("a b c"), assistant("d e"), user("f g h i"), assistant("j"), user("k l")]

    def size(messages):
        return len(TEMPLATE.prompt_ids(messages, TOK))

    assert fit_history(turns, TEMPLATE, TOK, size(turns)) == turns
    assert fit_history(turns, TEMPLATE, TOK, size(turns) - 1) == [SYSTEM, *turns[3:]]
    assert fit_history(turns, TEMPLATE, TOK, size([SYSTEM, *turns[3:]]) - 1) == [SYSTEM, turns[5]]
    assert fit_history(turns, TEMPLATE, TOK, size([SYSTEM, turns[5]])) == [SYSTEM, turns[5]]
    assert fit_history(turns, TEMPLATE, TOK, size([SYSTEM, turns[5]]) - 1) is None
    assert fit_history(turns[1:], TEMPLATE, TOK, size(turns[5:])) == [turns[5]]
    assert size([SYSTEM, turns[5]]) == 1 + 5 + 4 + 1  # <|endoftext|>, system turn, user turn, <|assistant|>


def test_a_long_conversation_loses_its_oldest_turns_not_the_context(cli, monkeypatch, ckpts, server):
    lines = [f"Tell me about the number {i} and the number {i + 1}, please." for i in range(5)]
    res = talk(cli, monkeypatch, ckpts / "chat", lines, "--system", SYSTEM["content"])
    assert res.code == 0, res.err
    history, replies, cut = [SYSTEM], [], 0
    for i, line in enumerate(lines):
        uncut = [*history, user(line)]
        history = fit_history(uncut, TEMPLATE, TOK, 64 - 12)
        if history != uncut:
            cut += 1
            code, out = request(server, "POST", "/v1/chat/completions",
                                {"model": "chat", "messages": uncut, "max_tokens": 12})  # fmt: skip
            assert code == 400 and out["error"]["code"] == "context_length_exceeded"
        assert history[0] == SYSTEM and history[-1] == user(line)
        replies.append(api_reply(server, history, 5 + i))
        history = [*history, assistant(replies[-1])]
    assert cut >= 2
    assert res.out == "".join(f"{r}\n" for r in replies)
    assert res.err.count("(the oldest turns no longer fit in the model's context and were dropped)\n") == cut


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(cli, monkeypatch, ckpts, server):
    long = "word " * 60
    res = talk(cli, monkeypatch, ckpts / "chat", [long, "Short."])
    assert res.code == 0, res.err
    assert res.out == f"{api_reply(server, [user('Short.')], 5)}\n"
    assert (
        "(that message is too long: the model's context is 64 tokens and the reply keeps 12 of them; shorten it)\n"
        in res.err
    )


def test_a_reply_ends_at_the_end_token(cli, monkeypatch, ckpts, server):
    lines = ["a", "b", "c", "d"]
    res = talk(cli, monkeypatch, ckpts / "ends", lines)
    replies, history = [], []
    for i, line in enumerate(lines):
        history.append(user(line))
        replies.append(api_reply(server, history, 5 + i, model="ends"))
        history.append(assistant(replies[-1]))
    assert res.out == "".join(f"{r}\n" for r in replies)
    counts = [r.count(" yes") for r in replies]
    assert all(r == " yes" * k for r, k in zip(replies, counts)) and min(counts) < 12  # ended by <|end|>
    greedy = talk(cli, monkeypatch, ckpts / "ends", ["a", "b"], "--temperature", 0)
    assert greedy.out == " yes" * 12 + "\n" + " yes" * 12 + "\n"


def test_a_model_never_chat_trained_is_one_line(cli, monkeypatch, ckpts):
    res = talk(cli, monkeypatch, ckpts / "base", ["Hello."])
    assert (res.code, res.out) == (1, "")
    assert res.err == (
        f"gpt2lab chat: error: {ckpts / 'base'} has no chat template: fine-tune it on conversations first "
        "(docs/training.md)\n"
    )


@pytest.mark.subprocess
def test_ctrl_c_ends_the_chat_cleanly(ckpts):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2lab", "chat", "--model", str(ckpts / "chat"), "--seed", "1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    header = proc.stderr.readline()  # printed once the model is loaded, just before the first read
    assert header.startswith("gpt2lab chat: "), header
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # No traceback and exit 0. The newline that ends the prompt's line is written when the interrupt
    # reaches the read; when a torch thread takes the signal, the read ends at the closed input instead.
    assert (proc.returncode, err) == (0, "") and out in ("\n", "")
