"""The playground in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright's Python
package. The server runs on 127.0.0.1 at a free port with two tiny models; the page must stream tokens
tinted by probability, show each token's top 5 alternatives on hover and on keyboard focus, compare two
models on one seed, and fit a phone's width. It skips, saying why, only where no Chromium is found.

The README's screenshot (docs/serve-playground.png) is made by the same code, with two briefly trained
models instead of random ones, so the tints and alternatives mean something:

    .venv/bin/python tests/test_serve_playground.py docs/serve-playground.png
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script too

from serve_utils import complete, running_server, tiny_model

# Headless, and nothing that reaches the network: the page must work offline.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHROMIUM_ENV = "GPT2LAB_CHROMIUM"


def find_chromium() -> str | None:
    """$GPT2LAB_CHROMIUM, else Debian's chromium (`apt-get install chromium`; `make test` installs it)."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given
    for name in ["chromium", "chromium-browser"]:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip(
        f"no Chromium found: install Debian's chromium package (apt-get install chromium) or set {CHROMIUM_ENV}",
        allow_module_level=True,
    )
pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is missing: pip install -e '.[dev]'")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

SETTINGS = {"prompt": "ROMEO:\n", "temperature": "0.8", "top_k": "40", "top_p": "1", "max_tokens": "24", "seed": "42"}
SHOWN = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"})  # as app.js shows tokens


def pct(p: float) -> str:
    """The page's percentages (app.js, pct)."""
    if p >= 0.995:
        return "100%"
    if p >= 0.1:
        return f"{100 * p:.0f}%"
    if p >= 0.001:
        return f"{100 * p:.1f}%"
    if p >= 1e-6:
        return f"{100 * p:.1g}%"
    return "<0.0001%"


def api_body(model: str) -> dict[str, Any]:
    """What the page asks for with SETTINGS (app.js, generate), without streaming."""
    s = SETTINGS
    numbers = {"temperature": float(s["temperature"]), "top_k": int(s["top_k"]), "top_p": float(s["top_p"])}
    return {"model": model, "prompt": s["prompt"], **numbers, "max_tokens": int(s["max_tokens"]),
            "seed": int(s["seed"]), "logprobs": 5}  # fmt: skip


def fill_and_generate(page: Page, url: str, compare_with: str | None = None, settings: dict[str, str] = SETTINGS):
    """Load the page, set every control, press Generate (in compare mode against `compare_with`), and
    wait until every panel is done."""
    page.goto(url + "/")
    expect(page.locator("#model option")).not_to_have_count(0)
    for field, value in settings.items():
        page.fill(f"#{field}", value)
    if compare_with is not None:
        page.check("#compare")
        page.select_option("#model2", compare_with)
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("done", timeout=60_000)


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def panel_tokens(page: Page, panel: int) -> list[dict[str, Any]]:
    return page.eval_on_selector_all(
        f".panel:nth-child({panel + 1}) .tok",
        "spans => spans.map(s => ({text: s.textContent, token: s.dataset.token, p: Number(s.dataset.p),"
        " background: s.style.background, tabindex: s.getAttribute('tabindex')}))",
    )


def tip_rows(page: Page) -> list[tuple[str, str]]:
    expect(page.locator("#tip")).to_be_visible()
    return [tuple(r) for r in page.eval_on_selector_all(
        "#tip tr", "rows => rows.map(r => [r.cells[0].textContent, r.cells[2].textContent])")]  # fmt: skip


def expected_rows(top: dict[str, float]) -> list[tuple[str, str]]:
    return [(token.translate(SHOWN), pct(math.exp(lp))) for token, lp in top.items()]


@pytest.fixture(scope="module")
def server():
    with running_server({"alpha": tiny_model(seed=1), "beta": tiny_model(seed=2)}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


def test_tokens_stream_in_tinted_with_their_alternatives_on_hover_and_focus(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    fill_and_generate(page, server)
    want = complete(server, api_body("alpha"))["choices"][0]
    lp = want["logprobs"]
    assert page.inner_text(".panel h2 .name") == "alpha"
    assert page.inner_text(".panel .text") == SETTINGS["prompt"] + want["text"]
    tokens = panel_tokens(page, 0)
    assert [t["token"] for t in tokens] == lp["tokens"] and len(tokens) == 24
    assert [t["p"] for t in tokens] == pytest.approx([math.exp(v) for v in lp["token_logprobs"]], rel=1e-12)
    assert all(t["background"].startswith("rgb(") for t in tokens)  # tinted by its probability
    stats = page.inner_text(".panel h2 .stats")
    assert stats.startswith("seed 42 \u00b7 24 tokens \u00b7 ") and stats.endswith(" \u00b7 length")

    page.hover(".panel .tok >> nth=2")
    assert tip_rows(page) == expected_rows(lp["top_logprobs"][2])
    assert page.inner_text("#tip .head") == f"{lp['tokens'][2].translate(SHOWN)} chosen at {pct(tokens[2]['p'])}"
    page.mouse.move(0, 0)
    expect(page.locator("#tip")).to_be_hidden()

    # The keyboard: one tab stop in the panel's text, arrow keys move between tokens, each shows its tip.
    stops = [i for i, t in enumerate(tokens) if t["tabindex"] is not None]
    assert [tokens[i]["tabindex"] for i in stops].count("0") == 1
    page.focus(".panel .tok[tabindex='0']")
    page.keyboard.press("ArrowRight")
    focused = page.evaluate("() => document.activeElement.dataset.token")
    assert focused == lp["tokens"][stops[1]]
    assert tip_rows(page) == expected_rows(lp["top_logprobs"][stops[1]])
    page.keyboard.press("End")
    assert page.evaluate("() => document.activeElement.dataset.token") == lp["tokens"][stops[-1]]
    page.keyboard.press("Escape")
    expect(page.locator("#tip")).to_be_hidden()
    page.screenshot(path=str(tmp_path / "one-model.png"), full_page=True)


def test_compare_mode_runs_both_models_on_one_seed(server, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    fill_and_generate(page, server, compare_with="beta")
    assert page.eval_on_selector_all(".panel h2 .name", "ns => ns.map(n => n.textContent)") == ["alpha", "beta"]
    for i, name in enumerate(["alpha", "beta"]):
        want = complete(server, api_body(name))["choices"][0]
        assert page.inner_text(f".panel:nth-child({i + 1}) .text") == SETTINGS["prompt"] + want["text"]
        assert [t["token"] for t in panel_tokens(page, i)] == want["logprobs"]["tokens"]
    boxes = [page.locator(".panel").nth(i).bounding_box() for i in range(2)]
    assert boxes[0]["y"] == boxes[1]["y"] and boxes[0]["x"] + boxes[0]["width"] < boxes[1]["x"]  # side by side


def test_on_a_phone_nothing_overflows_and_the_panels_stack(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    fill_and_generate(page, server, compare_with="beta")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    boxes = [page.locator(".panel").nth(i).bounding_box() for i in range(2)]
    assert all(b["x"] >= 0 and b["x"] + b["width"] <= 390 for b in boxes)
    assert boxes[1]["y"] >= boxes[0]["y"] + boxes[0]["height"]  # one above the other
    page.tap(".panel .tok >> nth=0")  # tapping a token shows its alternatives
    assert len(tip_rows(page)) == 5
    tip = page.locator("#tip").bounding_box()
    assert tip["x"] >= 0 and tip["x"] + tip["width"] <= 390
    path = tmp_path / "phone.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_token_holding_no_whole_character_is_no_tab_stop(server, browser):
    """The chunks the server streams for "a 🤗 b" (engine.py: a token is sent with the first character of
    its text): the emoji's second and third bytes are tokens of their own that hold no character."""
    page = browser.new_page()
    page.goto(server + "/")
    lp = lambda tokens, offsets: {"tokens": tokens, "token_logprobs": [-1.0] * len(tokens),
                                  "top_logprobs": [{t: -1.0} for t in tokens], "text_offset": offsets}  # fmt: skip
    chunks = [
        ("a", lp(["a"], [0])),
        (" ", lp(["bytes:\\x20\\xf0\\x9f"], [1])),
        ("\U0001f917", lp([], [])),  # completes the emoji: its text goes to the token holding its first byte
        (" b", lp(["bytes:\\xa4", "bytes:\\x97", " b"], [3, 3, 3])),
    ]
    spans = page.evaluate(
        """chunks => {
             const view = makePanel("m", 1);
             document.getElementById("outputs").append(view.panel);
             for (const [text, lp] of chunks) addChunk(view, text, lp);
             return Array.from(view.text.querySelectorAll(".tok"), s => [s.textContent, s.getAttribute("tabindex")]);
           }""",
        chunks,
    )
    assert spans == [["a", "0"], [" \U0001f917", "-1"], ["", None], ["", None], [" b", "-1"]]
    page.focus(".tok[tabindex='0']")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("() => document.activeElement.textContent") == " b"


# -- the README's screenshot ---------------------------------------------------------------------------


def trained_pair(steps: tuple[int, int] = (60, 400)) -> dict[str, Any]:
    """Two checkpoints of one short run on Tiny Shakespeare (a 2-layer, 64-wide GPT-2): early and later."""
    import copy

    import torch
    from helpers import shakespeare_text

    from gpt2lab.accel import use_fused_loss
    from gpt2lab.tokenizer import get_tokenizer

    ids = torch.tensor(get_tokenizer().encode_ordinary(shakespeare_text()[:400_000]))
    model = use_fused_loss(tiny_model(seed=0, n_embd=64, n_head=4).train())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    T, B, out = 64, 8, {}
    for step in range(1, max(steps) + 1):
        ix = torch.randint(len(ids) - T - 1, (B,), generator=gen).tolist()
        x = torch.stack([ids[i : i + T] for i in ix])  # (B, T)
        y = torch.stack([ids[i + 1 : i + T + 1] for i in ix])  # (B, T)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in steps:
            print(f"step {step}: loss {loss.item():.2f}", file=sys.stderr)
            out[f"shakespeare-step{step}"] = copy.deepcopy(model).eval()
    return out


def screenshot(path: str, models: dict[str, Any] | None = None) -> None:
    """The README's picture: compare mode, the later checkpoint against the early one, one tip open."""
    models = models or trained_pair()
    early, later = list(models)
    with running_server({later: models[later], early: models[early]}) as (url, _), sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
        settings = {**SETTINGS, "max_tokens": "48", "seed": "7"}
        fill_and_generate(page, url, compare_with=early, settings=settings)
        page.hover(".panel .tok >> nth=14")
        page.screenshot(path=path)
        browser.close()
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/serve-playground.png")
