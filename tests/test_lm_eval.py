"""gpt2lab as an lm-evaluation-harness model: the harness's numbers through `gpt2lab` equal its numbers
through its own `hf` model on the exported Hugging Face directory, offline, on local task files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from eval_data import ITEMS

from gpt2lab.errors import GPT2LabError
from gpt2lab.eval import lm_eval as harness
from gpt2lab.eval import scoring
from gpt2lab.hf import export_hf

TEXTS = [
    "The river ran past the old mill, and the miller's children watched the boats go by each morning. "
    "In winter the water froze, and the village skated from one bank to the other until the spring thaw.",
    "A recipe for bread: flour, water, salt and yeast. Knead for ten minutes, leave it to rise, shape it, "
    "and bake it in a hot oven until the crust is brown and the loaf sounds hollow when tapped underneath.",
    "Short one.",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch, offline_env):
    # The harness and `datasets` must not reach the Hub: local tasks and a local model need nothing from it.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(offline_env / "datasets"))


def write_tasks(folder: Path) -> Path:
    """Four local tasks, each a YAML over a JSONL file beside it: HellaSwag-shaped multiple choice, a
    LAMBADA-shaped last word, a wikitext-shaped rolling perplexity and a short greedy generation."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mc.jsonl", "w") as f:
        for item in ITEMS:
            f.write(json.dumps({"ctx": item["ctx"], "endings": item["endings"], "label": item["label"]}) + "\n")
    with open(folder / "texts.jsonl", "w") as f:
        for text in TEXTS:
            f.write(json.dumps({"text": text}) + "\n")

    def task(name: str, data: str, body: dict) -> None:
        files = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\ntest_split: test\n"
        metrics = "".join(f"  - metric: {m}\n" for m in body.pop("metrics"))
        lines = "".join(f"{k}: {v}\n" for k, v in body.items())
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{files}{lines}metric_list:\n{metrics}")

    task("tiny_mc", "mc.jsonl", {
        "output_type": "multiple_choice", "doc_to_text": '"{{ctx}}"', "doc_to_choice": '"{{endings}}"',
        "doc_to_target": "label", "metrics": ["acc", "acc_norm"],
    })  # fmt: skip
    task("tiny_lambada", "texts.jsonl", {
        "output_type": "loglikelihood", "doc_to_text": "\"{{text.split(' ')[:-1]|join(' ')}}\"",
        "doc_to_target": "\"{{' '+text.split(' ')[-1]}}\"", "metrics": ["perplexity", "acc"],
    })  # fmt: skip
    task("tiny_wikitext", "texts.jsonl", {
        "output_type": "loglikelihood_rolling", "doc_to_text": '""', "doc_to_target": '"{{text}}"',
        "metrics": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    })  # fmt: skip
    task("tiny_generate", "texts.jsonl", {
        "output_type": "generate_until", "doc_to_text": "\"{{text.split(' ')[:6]|join(' ')}}\"",
        "doc_to_target": '"{{text}}"', "generation_kwargs": '{until: ["."], max_gen_toks: 12, do_sample: false}',
        "metrics": ["exact_match"],
    })  # fmt: skip
    return folder


TASKS = ["tiny_mc", "tiny_lambada", "tiny_wikitext", "tiny_generate"]


@pytest.fixture(scope="module")
def both(models, tmp_path_factory):
    """The harness's results for the same weights through `gpt2lab` and through `hf` on the export."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from gpt2lab.tokenizer import get_tokenizer

    hf_model, ours = models
    root = tmp_path_factory.mktemp("lm_eval")
    tasks = write_tasks(root / "tasks")
    export = export_hf(ours, root / "export", get_tokenizer())
    mine = harness.run_tasks(ours, get_tokenizer(), TASKS, include_path=tasks, log_samples=True)
    theirs = simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},dtype=float32",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=4,
        log_samples=True,
        bootstrap_iters=0,
    )
    return mine, theirs


def test_multiple_choice_equals_hf(both):
    mine, theirs = both
    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"]["tiny_mc"][metric] == pytest.approx(theirs["results"]["tiny_mc"][metric], abs=1e-6)
    # The per-choice log-likelihoods, not only the verdicts.
    for a, b in zip(mine["samples"]["tiny_mc"], theirs["samples"]["tiny_mc"]):
        assert [r[0] for r in a["filtered_resps"]] == pytest.approx([r[0] for r in b["filtered_resps"]], abs=1e-4)


def test_last_word_and_rolling_perplexity_equal_hf(both):
    mine, theirs = both
    for task, metrics in {
        "tiny_lambada": ("perplexity,none", "acc,none"),
        "tiny_wikitext": ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"),
    }.items():
        for metric in metrics:
            got, want = mine["results"][task][metric], theirs["results"][task][metric]
            assert math.isfinite(got) and got == pytest.approx(want, rel=1e-4), (task, metric)


def test_generation_equals_hf(both):
    mine, theirs = both
    got = [s["filtered_resps"] for s in mine["samples"]["tiny_generate"]]
    want = [s["filtered_resps"] for s in theirs["samples"]["tiny_generate"]]
    assert got == want
    assert any(r[0] for r in got)  # something was generated


def test_rolling_windows_span_several_contexts(models):
    """A text longer than the 64-token context is cut into the harness's windows and summed: the
    same total as scoring it token by token with all the context each window allows."""
    from gpt2lab.tokenizer import get_tokenizer

    _, ours = models
    tok = get_tokenizer()
    lm = harness.model_class()(model=ours, tokenizer=tok, batch_size=2)
    text = " ".join(TEXTS * 2)
    ids = [tok.eot_token, *tok.encode(text)]
    assert len(ids) > 2 * ours.config.block_size

    class Req:
        args = (text,)

    (total,) = lm.loglikelihood_rolling([Req()])
    expected = 0.0
    with torch.no_grad():
        for start in range(1, len(ids), 64):  # disjoint chunks of 64 predictions, 64 tokens of input each
            end = min(start + 64, len(ids))
            inp = ids[max(0, end - 65) : end - 1]
            logp = torch.log_softmax(ours(torch.tensor([inp]))[0][0].double(), -1)
            n = end - start
            expected += float(logp[-n:].gather(1, torch.tensor(ids[start:end]).unsqueeze(1)).sum())
    assert total == pytest.approx(expected, rel=1e-5)


def alone(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The answer for one request, from a forward pass over its row alone, the harness's way."""
    inp = (ctx + cont)[-(model.config.block_size + 1) :][:-1]
    with torch.no_grad():
        logits = model(torch.tensor([inp]))[0][0, -len(cont) :].double()  # (n, V)
    logp = float(torch.log_softmax(logits, -1).gather(1, torch.tensor(cont).unsqueeze(1)).sum())
    return logp, logits.argmax(-1).tolist() == cont


@pytest.mark.parametrize("share", [True, False])
def test_scoring_ways_agree(models, share):
    """Shared contexts in one row and a row per request give the same answers."""
    _, ours = models
    requests = [([5, 6, 7, 8], [9, 10]), ([5, 6, 7, 8], [11]), ([1] * 70, [2, 3]), ([4], [1, 2, 3])]
    got = scoring.score_requests(ours, requests, batch_size=3, share_context=share)
    for (ctx, cont), (logp, _) in zip(requests, got):
        assert logp == pytest.approx(alone(ours, ctx, cont)[0], rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_choices_after_a_shared_context_each_see_only_it(models, batch_size):
    """A context shared by more choices than fit one 64-token row: the row holds the context once and
    the choices after it, the rest start another row with the context again; rows of other contexts and
    of different lengths are padded together. Every answer, the greedy verdict too, is that of the
    request alone in its row."""
    _, ours = models
    ctx = [(7 * t) % 500 + 1 for t in range(30)]
    with torch.no_grad():
        best = int(ours(torch.tensor([ctx]))[0][0, -1].argmax())  # a continuation that is the greedy choice
    requests = [(ctx, [best])] + [(ctx, [(11 * k + t) % 500 for t in range(2 + k % 7)]) for k in range(9)]
    requests += [([3, 1, 4, 1, 5], [9, 2, 6]), ([3, 1, 4, 1, 5], [5]), ([2, 7], [1, 8, 2, 8])]
    requests += [([2], [5, 6]), ([9], [1, 4, 7])]  # no prefix: one row, each request from position 0
    cut = [(*scoring.cut_request(c, n, 64), n) for c, n in requests]
    rows = scoring.pack_rows(cut, True, 64)
    assert sum(1 for prefix, _ in rows if prefix == ctx[:-1]) == 2
    assert [members for prefix, members in rows if not prefix] == [[len(requests) - 2, len(requests) - 1]]
    assert all(len(prefix) + sum(len(cut[i][1]) for i in members) <= 64 for prefix, members in rows)
    got = scoring.score_requests(ours, requests, batch_size=batch_size, share_context=True)
    for (c, n), (logp, is_greedy) in zip(requests, got):
        want_logp, want_greedy = alone(ours, c, n)
        assert logp == pytest.approx(want_logp, rel=1e-5, abs=1e-5)
        assert is_greedy == want_greedy
    assert got[0][1] and not all(g for _, g in got)


def test_registered_under_its_name():
    from lm_eval.api.registry import get_model

    assert get_model("gpt2lab") is harness.register()


def test_unknown_task_is_one_line(models, tmp_path):
    from gpt2lab.tokenizer import get_tokenizer

    with pytest.raises(GPT2LabError, match="no task nonexistent_task"):
        harness.run_tasks(models[1], get_tokenizer(), ["nonexistent_task"], include_path=write_tasks(tmp_path))


def test_cli_writes_harness_results_beside_its_own(cli, models, tmp_path):
    hf_model, _ = models
    hf_model.save_pretrained(tmp_path / "hf")
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "report.json"
    r = cli(
        "eval", "--model", tmp_path / "hf", "--lm-eval", "tiny_mc,tiny_wikitext",
        "--lm-eval-include", tasks, "--json", out, "--no-progress",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "tiny_mc" in r.out and "acc_norm" in r.out
    report = json.loads(out.read_text())
    assert set(report["lm_eval"]["results"]) == {"tiny_mc", "tiny_wikitext"}
    assert report["lm_eval"]["harness_version"]


def test_the_harness_command_line_runs_gpt2lab(both, models, tmp_path):
    """`gpt2lab-lm-eval` is the harness's own command line (`lm_eval run ...`) with `--model gpt2lab`:
    a run directory's numbers equal the in-process ones."""
    hf_model, _ = models
    hf_model.save_pretrained(tmp_path / "hf")
    script = Path(sys.executable).with_name("gpt2lab-lm-eval")
    args = ["run", "--model", "gpt2lab", "--model_args", f"pretrained={tmp_path / 'hf'}", "--tasks", "tiny_mc"]
    args += ["--include_path", str(write_tasks(tmp_path / "tasks")), "--output_path", str(tmp_path / "out")]
    r = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (written,) = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(written.read_text())["results"]["tiny_mc"]
    mine = both[0]["results"]["tiny_mc"]
    assert (got["acc,none"], got["acc_norm,none"]) == (mine["acc,none"], mine["acc_norm,none"])
