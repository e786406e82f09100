"""CORE (nanochat's core_eval.py): prompts, few-shot draws, item order, truncation, scoring, centring."""

import json
import math
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import subprocess_env

from gpt2lab import GPT2LabError
from gpt2lab.eval import core
from gpt2lab.eval.common import EvalContext

pytestmark = pytest.mark.usefixtures("one_thread")

# One task of each type. Every multiple-choice choice and every schema continuation is one token, so
# under a model whose logits are all zero each row's mean loss is exactly ln(V) and the first row wins.
MC = [{"query": f"Question {i}: pick one.", "choices": [" A", " B", " C", " D"], "gold": g} for i, g in
      enumerate([0, 0, 2, 0, 3])]  # fmt: skip
SCHEMA = [
    {"context_options": [f"The cat {i} sat", f"The dog {i} ran"], "continuation": "down", "gold": g}
    for i, g in enumerate([1, 0, 1, 1])
]
LM = [{"context": f"  Say {w} ", "continuation": c} for w, c in [("x", "!"), ("y", "?"), ("z", "!"), ("w", "?")]]
TASKS = [
    ("mc_task", "multiple_choice", "mc.jsonl", 2, " ", 25.0, MC),
    ("schema_task", "schema", "schema.jsonl", 1, " ", 50.0, SCHEMA),
    ("lm_task", "language_modeling", "lm.jsonl", 1, "", 0.0, LM),
]


def write_bundle(root, tasks=TASKS, zip_name=None):
    """An eval_bundle of nanochat's layout under root/eval_bundle (and zipped as the published one is)."""
    top = root / "eval_bundle"
    (top / "eval_data").mkdir(parents=True)
    lines = ["icl_tasks:"]
    for label, kind, uri, shots, delim, _, items in tasks:
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]  # fmt: skip
        (top / "eval_data" / uri).write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    (top / "core.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    csv_rows = ["Eval Task,Task Category,Random baseline"] + [f"{t[0]},x,{t[5]}" for t in tasks]
    (top / "eval_meta_data.csv").write_text("\n".join(csv_rows) + "\n", encoding="utf-8")
    if zip_name is None:
        return top
    with zipfile.ZipFile(root / zip_name, "w") as z:
        for path in sorted(top.rglob("*")):
            z.write(path, path.relative_to(root).as_posix())
    return root / zip_name


def zero_model(models):
    """The tiny model with every weight zero: logits exactly 0, every loss ln(V), every argmax token 0 ('!')."""
    from helpers import gpt2lab_twin

    model = gpt2lab_twin(models[0])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_bundle_reads_tasks_baselines_and_nanochats_item_order(tmp_path):
    for bundle in (
        core.Bundle(write_bundle(tmp_path / "d")),
        core.Bundle(write_bundle(tmp_path / "z", zip_name="b.zip")),
    ):
        specs = bundle.tasks()
        assert [(s.label, s.task_type, s.num_fewshot, s.delimiter, s.random_baseline) for s in specs] == [
            ("mc_task", "multiple_choice", 2, " ", 25.0),
            ("schema_task", "schema", 1, " ", 50.0),
            ("lm_task", "language_modeling", 1, "", 0.0),
        ]
        # base_eval.py's order: the file's items shuffled by random.Random(1337), then cut to the limit.
        assert [it["query"][:10] for it in bundle.items(specs[0])] == [f"Question {i}" for i in (1, 0, 3, 2, 4)]
        assert bundle.items(specs[0], limit=2) == [MC[1], MC[0]]
    assert core.Bundle(tmp_path / "d" / "eval_bundle").tasks() == specs  # the folder itself works too


def test_fewshot_draws_are_nanochats():
    items = list(range(6))
    # random.Random(1234 + i).sample(the other items, k), values worked out once and written down.
    assert core.fewshot_examples(items, 0, 2) == [4, 1]
    assert core.fewshot_examples(items, 3, 3) == [1, 4, 5]
    assert core.fewshot_examples(items, 3, 0) == []
    assert core.fewshot_examples(items[:2], 0, 5) == [1]  # fewer items than shots: all the others


def test_renderings_are_the_strings_nanochats_templates_give():
    mc = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    shot = {"query": "Q: 1+1?", "choices": ["2", "5"], "gold": 0}
    assert core.render_multiple_choice(mc, "\nA: ", [shot, shot]) == [
        "Q: 1+1?\nA: 2\n\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA: 3",
        "Q: 1+1?\nA: 2\n\nQ: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4",
    ]
    assert core.render_multiple_choice(mc, " ", []) == ["Q: 2+2? 3", "Q: 2+2? 4"]
    schema = {"context_options": ["Ann fed it", "Bob fed it"], "continuation": "and it purred.", "gold": 0}
    sshot = {"context_options": ["It rained", "It shone"], "continuation": "so we stayed in.", "gold": 0}
    assert core.render_schema(schema, " ", [sshot]) == [
        "It rained so we stayed in.\n\nAnn fed it and it purred.",
        "It rained so we stayed in.\n\nBob fed it and it purred.",
    ]
    lm = {"context": " The end of the \n", "continuation": " story"}
    lshot = {"context": "\tOnce upon a ", "continuation": "time"}
    # Contexts trimmed; the prompt without its continuation stripped as a whole (its trailing space too).
    assert core.render_language_modeling(lm, " ", [lshot]) == [
        "Once upon a time\n\nThe end of the",
        "Once upon a time\n\nThe end of the  story",
    ]
    assert core.render_language_modeling({"context": "Hi", "continuation": "!"}, "", []) == ["Hi", "Hi!"]


def test_prepare_spans_and_truncation(tok):
    spec = core.TaskSpec("t", "multiple_choice", "t.jsonl", 0, " ", 25.0)
    items = [{"query": "one two three four five six", "choices": ["seven", "eight nine"], "gold": 1}]
    p = core.prepare(items, 0, spec, tok, block_size=1024)
    query = tok.encode("one two three four five six")
    assert p.rows == (
        (tok.eot_token, *query, *tok.encode(" seven")),
        (tok.eot_token, *query, *tok.encode(" eight nine")),
    )
    assert p.starts == (1 + len(query),) * 2 and p.ends == tuple(len(r) for r in p.rows) and p.gold == 1
    short = core.prepare(items, 0, spec, tok, block_size=4)  # the last 4 tokens of each row, spans shifted
    assert short.rows == tuple(r[-4:] for r in p.rows)
    assert short.starts == tuple(s - (len(r) - 4) for s, r in zip(p.starts, p.rows))
    assert short.ends == (4, 4)
    # " eight nine" fills a context of 2 (its span starts at 0 and scores nothing); a context of 1 is too short.
    assert core.prepare(items, 0, spec, tok, block_size=2).starts == (1, 0)
    with pytest.raises(GPT2LabError, match="nothing before its continuation fits the model's context of 1"):
        core.prepare(items, 0, spec, tok, block_size=1)
    schema = core.TaskSpec("s", "schema", "s.jsonl", 0, " ", 50.0)
    p = core.prepare(
        [{"context_options": ["A cat", "The big dog"], "continuation": "sat", "gold": 0}], 0, schema, tok, 64
    )
    assert p.ends == (4, 5) and p.starts == (3, 4)  # the common suffix " sat" is scored


def test_hand_computed_values_with_a_zero_model(tmp_path, models, tok):
    # All losses equal: the first choice or context wins, so a multiple-choice or schema item is right
    # exactly when its gold is 0; greedy decoding always gives token 0 ('!'), so a language-modelling
    # item is right exactly when its continuation is "!".
    result = core.evaluate(zero_model(models), tok, core.Bundle(write_bundle(tmp_path)), EvalContext(batch_size=2))
    mc, schema, lm = result.tasks
    assert (mc.items, mc.correct, mc.accuracy) == (5, 3, pytest.approx(0.6))
    assert mc.centered == pytest.approx((0.6 - 0.25) / 0.75)
    assert (schema.items, schema.correct, schema.centered) == (4, 1, pytest.approx((0.25 - 0.5) / 0.5))
    assert (lm.items, lm.correct, lm.centered) == (4, 2, pytest.approx(0.5))
    assert result.core == pytest.approx(((0.6 - 0.25) / 0.75 - 0.5 + 0.5) / 3)
    assert result.metrics() == {"core": result.core, "core_tasks": 3}
    assert result.to_dict()["per_task"]["lm_task"]["correct"] == 2


def test_a_span_cut_to_fill_the_whole_context_has_a_nan_mean_as_in_nanochat(models, tok):
    # nanochat scores a row's span [start, end) by the losses at [start - 1, end - 1). Cut to the model's 64
    # positions, a row whose 64-token choice fills them starts at 0: the slice [-1, 63) is empty, its mean
    # NaN. Python's min keeps a NaN that comes first and never picks a later one; every other row of the
    # zero model has the mean ln(50257).
    spec = core.TaskSpec("t", "multiple_choice", "t.jsonl", 0, "", 25.0)
    long = " up" * 64  # 64 tokens
    items = [{"query": "Pick one.", "choices": [" down", long], "gold": 1},
             {"query": "Pick one.", "choices": [long, " down"], "gold": 0},
             {"query": "Pick one.", "choices": [" down", long, " up"], "gold": 1}]  # fmt: skip
    batch = [core.prepare(items, i, spec, tok, block_size=64) for i in range(3)]
    assert [p.starts for p in batch] == [(4, 0), (0, 4), (4, 0, 4)]  # <|endoftext|> "Pick" " one" "." shared
    model = zero_model(models)
    r, losses, _, _ = core._losses_and_predictions(model, batch, torch.device("cpu"), None)
    assert r.tolist() == [0, 3, 4, 6]  # one scored token in each short row, none in the long ones
    assert losses.tolist() == pytest.approx([math.log(50257)] * 4)
    # means [ln V, nan] -> row 0 (gold 1: wrong); [nan, ln V] -> row 0 (right); [ln V, nan, ln V] -> row 0 (wrong)
    assert core.score_batch(model, batch, "multiple_choice", torch.device("cpu")) == [False, True, False]
    lm = core.TaskSpec("l", "language_modeling", "l.jsonl", 0, "", 0.0)
    with pytest.raises(GPT2LabError, match="context of 64"):  # nanochat's LM check fails on an empty slice
        core.prepare([{"context": "Pick one.", "continuation": long}], 0, lm, tok, block_size=64)


def brute_force(model, tok, bundle):
    """Right answers per task, each row through the plain forward alone, full logits, no padding."""
    counts = []
    for spec in bundle.tasks():
        items, right = bundle.items(spec), 0
        for i in range(len(items)):
            p = core.prepare(items, i, spec, tok, model.config.block_size)
            losses, greedy = [], []
            for row, s, e in zip(p.rows, p.starts, p.ends):
                with torch.no_grad():
                    logits, _ = model(torch.tensor([row]))
                losses.append(torch.nn.functional.cross_entropy(logits[0, s - 1 : e - 1], torch.tensor(row[s:e])))
                greedy.append(logits[0, s - 1 : e - 1].argmax(-1).tolist() == list(row[s:e]))
            means = [x.item() for x in losses]
            right += greedy[0] if spec.task_type == "language_modeling" else means.index(min(means)) == p.gold
        counts.append(right)
    return counts


def test_scores_equal_the_plain_forward_row_by_row(tmp_path, models, tok):
    _, model = models
    # A task whose prompts (about 90 tokens with the shot) overflow the model's 64 positions: rows cut.
    long_mc = [{"query": " ".join(["word"] * (40 + i)) + " pick", "choices": [" up", " it up"], "gold": i % 2}
               for i in range(4)]  # fmt: skip
    bundle = core.Bundle(
        write_bundle(tmp_path, [*TASKS, ("long", "multiple_choice", "long.jsonl", 1, "", 25.0, long_mc)])
    )
    expected = brute_force(model, tok, bundle)
    for batch_size in (1, 3):
        result = core.evaluate(model, tok, bundle, EvalContext(batch_size=batch_size))
        assert [t.correct for t in result.tasks] == expected


def test_language_modelling_is_exact_greedy_match(models, tok):
    _, model = models
    row = [tok.eot_token, *tok.encode("The quick brown fox")]
    with torch.no_grad():
        for _ in range(3):  # the model's own greedy continuation, 3 tokens
            row.append(model(torch.tensor([row]))[0][0, -1].argmax().item())
    greedy = core.Prepared((tuple(row),), (len(row) - 3,), (len(row),), -1)
    wrong = core.Prepared(((*row[:-1], (row[-1] + 1) % tok.n_vocab),), greedy.starts, greedy.ends, -1)
    assert core.score_batch(model, [greedy, wrong, greedy], "language_modeling", torch.device("cpu")) == [
        True,
        False,
        True,
    ]


def test_cli_prints_each_task_and_writes_json(tmp_path, hf_dir, cli):
    bundle = write_bundle(tmp_path, zip_name="eval_bundle.zip")
    out = tmp_path / "core.json"
    r = cli("eval", "--model", hf_dir, "--task", "core", "--bundle", bundle, "--limit", "3", "--no-progress",
            "--json", out)  # fmt: skip
    assert r.code == 0, r.err
    for label in ("mc_task", "schema_task", "lm_task", "CORE"):
        assert f"  {label}" in r.out
    report = json.loads(out.read_text())
    assert report["task"] == "core" and report["data"]["limit_per_task"] == 3
    assert {t["items"] for t in report["results"]["per_task"].values()} == {3}


def test_missing_bundle_and_offline_download_fail_in_one_line(tmp_path, cli, hf_dir, monkeypatch):
    r = cli("eval", "--model", hf_dir, "--task", "core", "--bundle", tmp_path / "nowhere")
    assert r.code != 0 and "eval bundle" in r.err and "not found" in r.err and "Traceback" not in r.err
    monkeypatch.setattr("gpt2lab.download.unreachable", lambda url, timeout=1.5: "no network")
    r = cli("eval", "--model", hf_dir, "--task", "core")
    assert r.code != 0 and f"could not download {core.EVAL_BUNDLE_URL} (no network)" in r.err
    assert len(r.err.strip().splitlines()) == 1


@pytest.mark.subprocess
def test_two_gloo_ranks_equal_one_process(tmp_path, models, hf_dir, tok):
    bundle = write_bundle(tmp_path)
    out = tmp_path / "ddp.json"
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2lab",
           "eval", "--model", str(hf_dir), "--task", "core", "--bundle", str(bundle), "--device", "cpu",
           "--batch-size", "2", "--no-progress", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["run"]["world_size"] == 2
    single = core.evaluate(models[1], tok, core.Bundle(bundle), EvalContext(batch_size=3))
    assert report["results"] == json.loads(json.dumps(single.to_dict()))
