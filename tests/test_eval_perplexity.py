import json
import math

import pytest
import torch

from gpt2lab import GPT2LabError
from gpt2lab.eval import EvalContext, perplexity
from gpt2lab.eval.perplexity import Window, sliding_windows

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "Café, naïve, 東京 — bytes and tokens differ here.\n"
)


def test_windows_score_every_token_but_the_first_once():
    assert sliding_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    assert sliding_windows(3, 8, 8) == [Window(0, 3, 1)]
    for n, context, stride in [(10, 4, 2), (11, 4, 3), (50, 16, 5), (17, 16, 1), (64, 64, 63)]:
        scored = [t for w in sliding_windows(n, context, stride) for t in range(w.first, w.end)]
        assert scored == list(range(1, n))
        for w in sliding_windows(n, context, stride):
            assert w.end - w.begin <= context and w.begin < w.first
            # every scored token sees at least context - stride tokens, or all of them near the start
            assert w.first - w.begin >= min(context - stride, w.first)


def test_disjoint_chunks_leave_out_each_chunk_start_as_the_guide_does():
    assert sliding_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    scored = [t for w in sliding_windows(10, 4, 4) for t in range(w.first, w.end)]
    assert scored == [1, 2, 3, 5, 6, 7, 9]


def hf_guide_nll(hf, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's perplexity guide with transformers' own loss, counting tokens exactly."""
    seq = torch.tensor([ids])
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-trg_len] = -100
        n = int((labels[:, 1:] != -100).sum())  # transformers shifts the labels by one inside
        with torch.no_grad():
            nll += hf(input_ids, labels=labels).loss.item() * n
        scored += n
        prev_end = end
        if end == len(ids):
            break
    return nll, scored


@pytest.mark.parametrize("context,stride", [(16, 5), (32, 32), (64, 20)])
def test_strided_perplexity_equals_the_direct_computation(models, tok, context, stride):
    hf, ours = models
    ids = tok.encode(TEXT * 2)
    assert len(ids) > 2 * context  # several windows
    nll, scored = hf_guide_nll(hf, ids, context, stride)
    for batch_size in (1, 3):
        result = perplexity.evaluate(ours, ids, EvalContext(batch_size=batch_size), context=context, stride=stride)
        assert result.scored_tokens == scored
        assert scored == (len(ids) - 1 if stride < context else len(ids) - math.ceil(len(ids) / context))
        assert result.nll == pytest.approx(nll, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_logits_are_made_a_few_positions_at_a_time(models, tok, monkeypatch):
    _, ours = models
    ids = tok.encode(TEXT * 2)
    whole = perplexity.evaluate(ours, ids, EvalContext(batch_size=3), context=32, stride=20)
    from gpt2lab.eval import common

    monkeypatch.setattr(common, "nll_chunk_rows", lambda device: 5)
    rows = []
    hook = ours.lm_head.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[:-1].numel()))
    try:
        chunked = perplexity.evaluate(ours, ids, EvalContext(batch_size=3), context=32, stride=20)
    finally:
        hook.remove()
    assert max(rows) == 5 and sum(rows) == chunked.scored_tokens == len(ids) - 1
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-6)


def test_bits_per_byte_and_bos(models, tok, tmp_path):
    _, ours = models
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    corpus = perplexity.read_corpus(str(path))
    assert corpus.text == TEXT and corpus.source["kind"] == "files" and corpus.source["documents"] == 1
    ids, n_bytes = perplexity.corpus_tokens(corpus, tok)
    assert n_bytes == len(TEXT.encode("utf-8")) > len(TEXT)
    result = perplexity.evaluate(ours, ids, context=32, stride=16, n_bytes=n_bytes)
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / n_bytes)
    assert result.bits_per_token == pytest.approx(result.loss / math.log(2))

    with_bos, _ = perplexity.corpus_tokens(corpus, tok, bos=True)
    assert with_bos == [tok.eot_token, *ids]
    scored_all = perplexity.evaluate(ours, with_bos, context=32, stride=16)
    assert scored_all.scored_tokens == len(ids)  # the first text token is scored too

    first, first_bytes = perplexity.corpus_tokens(corpus, tok, max_tokens=20)
    assert first == ids[:20] and first_bytes == len(tok.decode_bytes(ids[:20]))


def test_defaults_are_the_model_context_and_half_of_it(models, tok):
    _, ours = models
    ids = tok.encode(TEXT * 2)
    result = perplexity.evaluate(ours, ids)
    assert (result.context, result.stride) == (64, 32)
    assert result.windows == math.ceil((len(ids) - 64) / 32) + 1
    assert result.scored_tokens == len(ids) - 1
    assert "every token but the first is scored exactly once" in perplexity.method(64, 32, bos=False)
    assert "except the first token of each chunk" in perplexity.method(64, 64, bos=False)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(context=65), "context must be between 2 and the model's block size (64)"),
        (dict(context=16, stride=17), "stride must be between 1 and the context (16)"),
        (dict(tokens=[5]), "perplexity needs at least 2 tokens"),
        (dict(tokens=[1, 50257]), "token id 50257 is outside the model's vocabulary"),
    ],
)
def test_bad_arguments(models, tok, kwargs, message):
    _, ours = models
    tokens = kwargs.pop("tokens", tok.encode(TEXT))
    with pytest.raises(GPT2LabError) as e:
        perplexity.evaluate(ours, tokens, **kwargs)
    assert message in str(e.value)


def test_cli_perplexity_of_a_text_file(cli, models, tok, tmp_path):
    hf, ours = models
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ppl.json"
    args = ["--task", "perplexity", "--data", path, "--context", "32", "--stride", "16", "--json", out]
    result = cli("eval", "--model", tmp_path / "hf", "--device", "cpu", *args)
    assert result.code == 0, result.err
    assert "perplexity" in result.out and "bits/byte" in result.out and "(1 not scored" in result.out
    report = json.loads(out.read_text())
    ids = tok.encode(TEXT)
    expected = perplexity.evaluate(ours, ids, context=32, stride=16, n_bytes=len(TEXT.encode()))
    assert report["results"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert report["results"]["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert report["results"]["scored_tokens"] == len(ids) - 1
    assert report["data"]["path"] == str(path)
    assert "windows of 32 tokens every 16 tokens" in report["method"]

    bad = cli("eval", "--model", tmp_path / "hf", "--task", "perplexity", "--data", tmp_path / "missing.txt")
    assert bad.code == 1 and "missing.txt: no such file or directory" in bad.err
    bad = cli("eval", "--model", tmp_path / "hf", "--task", "perplexity")
    assert bad.code == 1 and "--task perplexity needs --data" in bad.err
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    bad = cli("eval", "--model", tmp_path / "hf", "--task", "perplexity", "--data", tmp_path / "latin1.txt")
    assert bad.code == 1 and "latin1.txt: not UTF-8 text (undecodable bytes: 1)" in bad.err


def test_jsonl_and_parquet_corpora_are_documents_joined(tmp_path):
    docs = ["First document.", "Second one, with é.", "", "Third."]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    corpus = perplexity.read_corpus(str(tmp_path / "c.jsonl"), text_field="body")
    assert corpus.text == "First document.\n\nSecond one, with é.\n\nThird."  # empty records skipped
    assert corpus.source["documents"] == 3 and corpus.source["join"] == "\n\n"
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    assert (
        perplexity.read_corpus(str(tmp_path / "c.parquet"), join=" ").text
        == "First document. Second one, with é. Third."
    )
    with pytest.raises(GPT2LabError, match="fineweb-edu-10B is a large training corpus"):
        perplexity.read_corpus("fineweb-edu-10B")


def test_wikitext_2_is_read_as_the_guide_reads_it(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", ""]

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = perplexity.read_corpus("wikitext-2")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert corpus.text == "\n\n".join(rows)  # empty rows kept: "\n\n".join(test["text"])
    assert corpus.source["name"] == "wikitext-2" and corpus.source["documents"] == 5

    corpus = perplexity.read_corpus("hf:someone/corpus", hf_config="cfg", split="validation", join="\n")
    assert calls[-1] == ("someone/corpus", "cfg", "validation") and corpus.text == "\n".join(rows)
    with pytest.raises(GPT2LabError, match="has no column 'body'"):
        perplexity.read_corpus("hf:someone/corpus", text_field="body")


def test_unreachable_dataset_is_one_line(cli, models, tmp_path, monkeypatch):
    """Offline (the tests' HF_HUB_OFFLINE=1) and not cached, the error says a local file works too; with
    the Hub there, a failure gives datasets' reason (issue 23)."""
    datasets = pytest.importorskip("datasets")
    from gpt2lab import download

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    models[0].save_pretrained(tmp_path / "hf")
    where = "the Hugging Face dataset 'Salesforce/wikitext', config 'wikitext-2-raw-v1', split 'test'"
    result = cli("eval", "--model", tmp_path / "hf", "--task", "perplexity", "--data", "wikitext-2")
    assert result.code == 1
    assert result.err.strip().splitlines() == [
        f"gpt2lab eval: error: cannot open {where}: the Hugging Face Hub is unreachable (HF_HUB_OFFLINE is set) "
        "and the dataset is not in the cache; connect to the internet once to cache it, or evaluate a local "
        "file: --data path/to/file.txt"
    ]
    monkeypatch.setattr(download, "hub_unreachable", lambda: None)
    result = cli("eval", "--model", tmp_path / "hf", "--task", "perplexity", "--data", "wikitext-2")
    assert result.code == 1
    assert result.err.strip().splitlines() == [
        f"gpt2lab eval: error: cannot open {where}: Couldn't reach 'Salesforce/wikitext' on the Hub "
        "(LocalEntryNotFoundError) (check the name, --hf-config and --split)"
    ]
