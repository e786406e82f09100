"""`gpt2lab serve` as a command, and the playground's files as the server ships them."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from importlib import resources

import pytest
from helpers import subprocess_env
from serve_utils import request, running_server, tiny_model

from gpt2lab.checkpoint import save_model
from gpt2lab.errors import GPT2LabError
from gpt2lab.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-cli") / "tiny-run"
    save_model(tiny_model(seed=2), path, get_tokenizer())
    return path


# -- GET / and its assets ------------------------------------------------------------------------------


def get(url, path):
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.getheader("content-type"), body


def test_the_playground_and_every_file_it_loads_are_served_with_their_types():
    pytest.importorskip("fastapi")
    with running_server({"tiny": tiny_model()}, api_key="k") as (url, _):
        status, ctype, body = get(url, "/")  # the page itself needs no key: it asks for one when needed
        assert (status, ctype) == (200, "text/html; charset=utf-8")
        html = body.decode()
        assert "<title>gpt2lab playground</title>" in html
        links = re.findall(r'(?:src|href)="([^"]+)"', html)
        assets = sorted(a for a in links if not a.startswith("data:"))  # the empty favicon is inline
        assert assets == ["/static/app.js", "/static/chat.js", "/static/style.css"] and len(links) == 4
        js, css = "text/javascript; charset=utf-8", "text/css; charset=utf-8"
        types = {"/static/app.js": js, "/static/chat.js": js, "/static/style.css": css}
        static = resources.files("gpt2lab.serve") / "static"
        for path in assets:
            status, ctype, served = get(url, path)
            assert (status, ctype) == (200, types[path])
            assert served == (static / path.rsplit("/", 1)[1]).read_bytes()
        for name in ["index.html", "app.js", "chat.js", "style.css"]:  # offline: nothing fetched from elsewhere
            text = (static / name).read_text()
            assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        for path in ["/static/nope.js", "/static/..%2Fapp.py", "/static/index.html", "/static/app"]:
            status, ctype, body = get(url, path)
            assert (status, ctype) == (404, "application/json"), path
        assert request(url, "GET", "/static/nope.js")[1]["error"]["message"] == "no static file 'nope.js'"


# -- the command ---------------------------------------------------------------------------------------


def test_without_fastapi_or_uvicorn_the_command_says_what_to_install(cli, ckpt, monkeypatch):
    for missing in ["fastapi", "uvicorn"]:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
            res = cli("serve", "--model", ckpt)
        assert res.code == 1
        hint = "gpt2lab serve needs FastAPI and uvicorn: pip install 'gpt2lab[serve]'"
        assert res.err == f"gpt2lab serve: error: {hint}\n"
        assert res.out == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
        (["--port", "-1"], "--port must be between 0 and 65535, got -1"),
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--max-queue", "0"], "--max-queue must be at least 1, got 0"),
        (["--port", "http"], None),
    ],
)
def test_bad_settings_give_one_clear_line(cli, ckpt, args, message):
    pytest.importorskip("fastapi")
    res = cli("serve", "--model", ckpt, *args)
    if message is None:  # argparse's own usage error
        assert res.code == 2 and res.err.endswith("gpt2lab serve: error: argument --port: invalid int value: 'http'\n")
    else:
        assert res.code == 1
        assert res.err == f"gpt2lab serve: error: {message}\n"


def test_a_port_in_use_gives_one_clear_line_before_loading_any_model(cli):
    pytest.importorskip("fastapi")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = cli("serve", "--model", "/no/such/model", "--port", port)
    assert res.code == 1
    assert res.err == (
        f"gpt2lab serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "choose another --port or --host\n"
    )


def test_model_specs_name_the_models():
    from gpt2lab.serve.server import parse_model_spec

    assert parse_model_spec("mine=runs/shakespeare") == ("mine", "runs/shakespeare")
    assert parse_model_spec("gpt2") == ("gpt2", "gpt2")
    assert parse_model_spec("openai-community/gpt2") == ("openai-community/gpt2", "openai-community/gpt2")
    assert parse_model_spec("big=openai-community/gpt2-xl") == ("big", "openai-community/gpt2-xl")


def test_model_specs_load_under_their_names(ckpt, tmp_path, monkeypatch):
    from gpt2lab.serve.server import load_runners, parse_model_spec

    runners = load_runners([f"mine={ckpt}", str(ckpt)], "cpu", "float32", max_batch=2)
    assert [r.name for r in runners] == ["mine", "tiny-run"]
    assert runners[0].model.config.n_embd == 32 and runners[0].max_batch == 2
    with pytest.raises(GPT2LabError, match="two models are named 'tiny-run'; name them apart with --model"):
        load_runners([str(ckpt), f"tiny-run={ckpt}"], "cpu", "float32", max_batch=2)
    odd = tmp_path / "a=b"  # a directory whose name holds '=' is a path, not NAME=MODEL
    odd.mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_model_spec("a=b") == ("a=b", "a=b")


def test_the_command_serves_until_sigterm(ckpt):
    """The real command in a child process: it prints its address, answers, and stops cleanly."""
    pytest.importorskip("fastapi")
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", f"mine={ckpt}", "--port", "0", "--max-batch", "2"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.fullmatch(r"gpt2lab serve: listening on (http://127\.0\.0\.1:\d+) \(playground at /, API at /v1\)\n",
                             line)  # fmt: skip
        assert found, line + proc.stderr.read()
        url = found.group(1)
        status, out = request(url, "POST", "/v1/completions", {"model": "mine", "prompt": "Hi", "max_tokens": 3})
        assert status == 200 and out["usage"]["completion_tokens"] == 3
        code, out = request(url, "POST", "/v1/completions", {"model": "tiny", "prompt": "Hi"})
        assert code == 404 and out["error"]["message"].endswith("this server has: mine")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert err.splitlines() == ["gpt2lab serve: mine on cpu", "gpt2lab serve: stopped"]
