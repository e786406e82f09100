import json

import pytest
import torch
from eval_data import ITEMS, write_items
from helpers import gpt2lab_twin, hf_gpt2

from gpt2lab import GPT2LabError, distributed
from gpt2lab.eval import HELLASWAG_REFERENCES, hellaswag
from gpt2lab.eval.common import EvalContext

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(hf, tok, record):
    """One candidate at a time through transformers, its own shifted-label loss over the ending tokens."""
    ctx = tok.encode(record["ctx"])
    sums, means = [], []
    for ending in record["endings"]:
        end = tok.encode(" " + ending)
        ids = torch.tensor([ctx + end])
        labels = ids.clone()
        labels[:, : len(ctx)] = -100  # only the ending is scored
        with torch.no_grad():
            mean = hf(ids, labels=labels).loss.item()
        sums.append(mean * len(end))
        means.append(mean)
    return sums, means


@pytest.mark.parametrize("share_context", [True, False])
def test_scores_equal_transformers_brute_force(models, tok, items_file, share_context):
    hf, ours = models
    items = hellaswag.read_items(items_file)
    scores = hellaswag.score_items(ours, tok, items, EvalContext(batch_size=4), share_context=share_context)
    correct = correct_norm = 0
    for record, score in zip(ITEMS, scores):
        sums, means = brute_force(hf, tok, record)
        assert score.sum_losses == pytest.approx(sums, abs=1e-4)
        assert score.mean_losses == pytest.approx(means, abs=1e-4)
        assert score.pred == min(range(4), key=sums.__getitem__)
        assert score.pred_norm == min(range(4), key=means.__getitem__)
        assert score.label == record["label"]
        correct += score.pred == record["label"]
        correct_norm += score.pred_norm == record["label"]
    # Summed and mean losses must pick differently somewhere, or acc and acc_norm are not both tested.
    assert any(s.pred != s.pred_norm for s in scores)
    result = hellaswag.evaluate(ours, tok, items, EvalContext(batch_size=3))
    assert (result.items, result.correct, result.correct_norm) == (len(ITEMS), correct, correct_norm)
    assert result.acc_norm == correct_norm / len(ITEMS)


def test_batched_equals_unbatched_and_shared_context(models, tok, items_file):
    _, ours = models
    items = hellaswag.read_items(items_file)
    one = hellaswag.score_items(ours, tok, items, EvalContext(batch_size=1), share_context=False)
    for batch_size, share in [(2, False), (5, False), (64, False), (1, True)]:
        many = hellaswag.score_items(ours, tok, items, EvalContext(batch_size=batch_size), share_context=share)
        for a, b in zip(one, many):
            assert a.sum_losses == pytest.approx(b.sum_losses, abs=1e-5)
            assert a.mean_losses == pytest.approx(b.mean_losses, abs=1e-5)
            assert (a.pred, a.pred_norm) == (b.pred, b.pred_norm)


def test_context_longer_than_the_model_window_keeps_its_end(models, tok, tmp_path):
    hf, ours = models  # block_size 64
    long_ctx = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    record = {**ITEMS[0], "ctx": long_ctx}
    items = hellaswag.read_items(write_items(tmp_path / "long.jsonl", [record]))
    score = hellaswag.score_items(ours, tok, items)[0]
    for i, ending in enumerate(record["endings"]):
        end = tok.encode(" " + ending)
        ctx = tok.encode(long_ctx)[-(64 - len(end)) :]
        ids = torch.tensor([ctx + end])
        labels = ids.clone()
        labels[:, : len(ctx)] = -100
        with torch.no_grad():
            assert score.mean_losses[i] == pytest.approx(hf(ids, labels=labels).loss.item(), abs=1e-4)


def test_limit_metrics_and_training_hook(models, tok, items_file):
    _, ours = models
    items = hellaswag.load_validation(items_file)
    ours.train()
    limited = hellaswag.evaluate(ours, tok, items, limit=2)
    assert ours.training  # the evaluation restored train mode
    assert limited.items == 2
    full = hellaswag.evaluate(ours, tok, items)
    ours.eval()
    assert full.metrics() == {"hellaswag_acc_norm": full.acc_norm, "hellaswag_acc": full.acc, "hellaswag_items": 6}
    assert full.to_dict() == {
        "acc_norm": full.acc_norm,
        "acc": full.acc,
        "items": 6,
        "correct": full.correct,
        "correct_norm": full.correct_norm,
    }
    assert HELLASWAG_REFERENCES == {"gpt2-124M": 0.2955, "gpt3-125M": 0.337}


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "holds no HellaSwag items (the file is empty)"),
        ("\n\n", "holds no HellaSwag items"),
        ("GOOD\nGOOD\n{not json\n", "items.jsonl:3: not valid JSON"),
        (
            'GOOD\n{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": 4}\n',
            "items.jsonl:2: 'label' must be 0, 1, 2 or 3",
        ),
        ('{"ctx": "a", "endings": ["a", "b", "c", "d"], "label": "two"}\n', "items.jsonl:1: 'label' must be"),
        ('{"ctx": "a", "endings": ["a", "b", "c"], "label": 0}\n', "items.jsonl:1: 'endings' must be a list of 4"),
        ('{"ctx": "a", "endings": ["a", "b", "c", "d"]}\n', "items.jsonl:1: missing field 'label'"),
        ('["a", "b"]\n', "items.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, message):
    good = json.dumps(ITEMS[0])
    path = tmp_path / "items.jsonl"
    path.write_text(content.replace("GOOD", good))
    with pytest.raises(GPT2LabError, match=None) as e:
        hellaswag.read_items(path)
    assert message in str(e.value)


def test_string_labels_of_the_hub_copy_are_accepted(tmp_path):
    record = {**ITEMS[0], "label": "3"}
    assert hellaswag.read_items(write_items(tmp_path / "hub.jsonl", [record]))[0].label == 3


def test_vocab_mismatch_is_refused(tok, items_file):
    small = gpt2lab_twin(hf_gpt2(seed=1, vocab_size=1000))
    with pytest.raises(GPT2LabError, match="vocabulary of 1000 tokens but the 'gpt2' tokenizer has 50257"):
        hellaswag.evaluate(small, tok, hellaswag.read_items(items_file))


def test_cli_table_and_json(cli, hf_dir, items_file, tmp_path, models, tok):
    out = tmp_path / "out" / "hellaswag.json"
    result = cli(
        "eval", "--model", hf_dir, "--task", "hellaswag", "--data", items_file, "--json", out, "--device", "cpu"
    )
    assert result.code == 0, result.err
    assert "acc_norm" in result.out and "items" in result.out and "completion style" in result.out
    report = json.loads(out.read_text())
    expected = hellaswag.evaluate(models[1], tok, hellaswag.read_items(items_file))
    assert report["results"]["acc_norm"] == expected.acc_norm
    assert report["results"]["acc"] == expected.acc
    assert report["results"]["items"] == 6
    assert report["task"] == "hellaswag"
    assert report["model"]["source"] == str(hf_dir)
    assert report["model"]["tokenizer"]["name"] == "gpt2"
    assert report["data"]["path"] == str(items_file) and len(report["data"]["sha256"]) == 64
    assert "lowest mean loss" in report["method"]
    assert report["references"]["acc_norm"]["gpt2-124M"] == 0.2955
    assert report["run"]["world_size"] == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "ITEMS", "--limit", "0"], "--limit must be at least 1"),
        (["--data", "/nonexistent/h.jsonl"], "HellaSwag file /nonexistent/h.jsonl not found"),
        (["--data", "BAD"], "bad.jsonl:2: not valid JSON"),
        (["--data", "ITEMS", "--model", "SMALL"], "vocabulary of 1000 tokens"),
    ],
)
def test_cli_errors_are_one_line(cli, hf_dir, items_file, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(ITEMS[0]) + "\n{oops\n")
    small = tmp_path / "small"
    hf_gpt2(seed=1, vocab_size=1000).save_pretrained(small)
    subst = {"ITEMS": str(items_file), "BAD": str(tmp_path / "bad.jsonl"), "SMALL": str(small)}
    args = [subst.get(a, a) for a in args]
    if "--model" not in args:
        args += ["--model", str(hf_dir)]
    result = cli("eval", "--task", "hellaswag", "--device", "cpu", *args)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    assert message in lines[0]


def test_official_file_is_downloaded_once_into_the_cache(monkeypatch, items_file, offline_env):
    calls = []

    def fake_download(url, name, sha256=None):
        calls.append((url, name))
        return items_file

    monkeypatch.setattr(distributed, "cached_download", fake_download)
    items = hellaswag.load_validation()
    assert len(items) == 6
    assert calls == [(hellaswag.HELLASWAG_URL, "hellaswag_val.jsonl")]
    assert (
        hellaswag.HELLASWAG_URL == "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    )
