import json
import logging

import pytest
import torch
from helpers import gpt2lab_twin, hf_gpt2

from gpt2lab import load_model
from gpt2lab.checkpoint import save_model
from gpt2lab.errors import GPT2LabError
from gpt2lab.hf import export_hf, from_hf
from gpt2lab.tokenizer import get_tokenizer

ATOL = 1e-4  # float32, as the parity requirement states


def _max_diff(hf_model, ours, idx):
    with torch.no_grad():
        expected = hf_model(idx, labels=idx)
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
    logits_full, _ = ours(idx)
    return (expected.logits - logits_full).abs().max().item(), abs(expected.loss.item() - loss.item())


def test_tiny_parity_with_transformers():
    hf = hf_gpt2()
    ours = gpt2lab_twin(hf)
    idx = torch.randint(0, 50257, (3, 64))
    dlogits, dloss = _max_diff(hf, ours, idx)
    assert dlogits <= ATOL and dloss <= ATOL


def test_full_gpt2_config_parity_with_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # 124M, random weights
    ours = gpt2lab_twin(hf)
    assert ours.num_params() == 124_439_808
    idx = torch.randint(0, 50257, (1, 256))
    dlogits, dloss = _max_diff(hf, ours, idx)
    assert dlogits <= ATOL and dloss <= ATOL


def test_padded_vocab_parity_with_transformers():
    hf = hf_gpt2(seed=3)
    ours = gpt2lab_twin(hf, pad_vocab_multiple=64)
    assert ours.transformer.wte.weight.shape[0] == 50304
    idx = torch.randint(0, 50257, (2, 32))
    dlogits, dloss = _max_diff(hf, ours, idx)
    assert dlogits <= ATOL and dloss <= ATOL


def _logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def _write_bin(state_dict, path):
    torch.save({k: v.contiguous() for k, v in state_dict.items()}, path)


def _legacy_state_dict(hf):
    """The layout of OpenAI-era Hub files: no `transformer.` prefix, attention-mask buffers included."""
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n_pos = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def _make(fmt, hf, folder):
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.to_json_file(folder / "config.json")
    if fmt == "safetensors":
        hf.save_pretrained(folder)
    elif fmt == "sharded-safetensors":
        hf.save_pretrained(folder, max_shard_size="1MB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif fmt == "bin":
        _write_bin(hf.state_dict(), folder / "pytorch_model.bin")
    elif fmt == "legacy-bin":
        _write_bin(_legacy_state_dict(hf), folder / "pytorch_model.bin")
    elif fmt == "legacy-safetensors":
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in _legacy_state_dict(hf).items() if not k.endswith("masked_bias")}
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "sharded-bin":
        sd = hf.state_dict()
        keys = sorted(sd)
        halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2]}
        halves["pytorch_model-00002-of-00002.bin"] = keys[len(keys) // 2 :]
        weight_map = {}
        for name, ks in halves.items():
            _write_bin({k: sd[k] for k in ks}, folder / name)
            weight_map.update({k: name for k in ks})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


FORMATS = ["safetensors", "sharded-safetensors", "bin", "legacy-bin", "legacy-safetensors", "sharded-bin"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_import_every_hub_format(fmt, tmp_path):
    hf = hf_gpt2(seed=1)
    folder = _make(fmt, hf, tmp_path / fmt)
    model = load_model(folder)
    assert not model.training
    idx = torch.randint(0, 50257, (2, 16))
    assert (_logits(hf, idx) - _logits(model, idx)).abs().max().item() <= ATOL


def test_import_single_weights_file(tmp_path):
    hf = hf_gpt2(seed=2)
    folder = _make("bin", hf, tmp_path / "m")
    model = from_hf(folder / "pytorch_model.bin")
    idx = torch.randint(0, 50257, (1, 8))
    assert (_logits(hf, idx) - _logits(model, idx)).abs().max().item() <= ATOL


def test_bin_files_are_read_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    hf_gpt2().config.to_json_file(folder / "config.json")
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(GPT2LabError, match="cannot read .*pytorch_model.bin"):
        load_model(folder)


def test_export_loads_in_transformers_without_warnings(tmp_path, caplog):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = hf_gpt2(seed=4)
    ours = gpt2lab_twin(hf, pad_vocab_multiple=64)
    out = export_hf(ours, tmp_path / "export", get_tokenizer())
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    with caplog.at_level(logging.INFO):
        reloaded = GPT2LMHeadModel.from_pretrained(out).eval()
    messages = " ".join(r.getMessage() for r in caplog.records).lower()
    for word in ("missing", "newly initialized", "unexpected", "not used", "mismatch"):
        assert word not in messages, messages
    idx = torch.randint(0, 50257, (2, 24))
    torch.testing.assert_close(_logits(reloaded, idx), _logits(ours, idx), rtol=0, atol=1e-5)
    assert reloaded.config.vocab_size == 50257
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "Round trip: ünïcode, 😀, <|endoftext|>"
    assert hf_tok(text)["input_ids"] == get_tokenizer().encode(text, allowed_special="all")
    assert hf_tok.eos_token_id == 50256


def test_gpt2lab_checkpoint_round_trip(tmp_path):
    hf = hf_gpt2(seed=5)
    ours = gpt2lab_twin(hf, pad_vocab_multiple=64)
    tok = get_tokenizer()
    save_model(ours, tmp_path / "ckpt", {"name": tok.name, "vocab_hash": tok.vocab_hash})
    back = load_model(tmp_path / "ckpt")
    assert back.config == ours.config
    idx = torch.randint(0, 50257, (1, 16))
    assert torch.equal(_logits(back, idx), _logits(ours, idx))
    with pytest.raises(GPT2LabError, match="already exists and is not empty"):
        save_model(ours, tmp_path / "ckpt", {"name": tok.name})


# ---------------------------------------------------------------------------- bad input


def test_unknown_model_name_is_one_clear_error():
    with pytest.raises(GPT2LabError, match=r"unknown model 'gpt7'.*local directory"):
        load_model("gpt7")


def test_offline_hub_name_says_how_to_pass_a_path():
    with pytest.raises(GPT2LabError, match=r"could not download model 'gpt2-medium' .*local directory"):
        load_model("gpt2-medium")


def test_directory_without_weights(tmp_path):
    hf_gpt2().config.to_json_file(tmp_path / "config.json")
    with pytest.raises(GPT2LabError, match="no weights in .*expected model.safetensors"):
        load_model(tmp_path)


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(GPT2LabError, match="neither a gpt2lab checkpoint"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    folder = _make("safetensors", hf_gpt2(), tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GPT2LabError, match="cannot read .*model.safetensors.*corrupt or truncated"):
        load_model(folder)


def test_corrupt_bin(tmp_path):
    folder = _make("bin", hf_gpt2(), tmp_path / "m")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:1000])
    with pytest.raises(GPT2LabError, match="cannot read .*pytorch_model.bin"):
        load_model(folder)


def test_wrong_shape_names_the_weight(tmp_path):
    from safetensors.torch import save_file

    hf = hf_gpt2()
    folder = _make("safetensors", hf, tmp_path / "m")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        GPT2LabError, match=r"weight transformer.h.1.mlp.c_fc.weight .* has shape \[32, 100\], expected \[32, 128\]"
    ):
        load_model(folder)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    from safetensors.torch import save_file

    hf = hf_gpt2()
    folder = _make("safetensors", hf, tmp_path / "m")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    del sd["transformer.ln_f.bias"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GPT2LabError, match="missing weight transformer.ln_f.bias"):
        load_model(folder)
    sd["transformer.ln_f.bias"] = torch.zeros(32)
    sd["transformer.h.0.extra.weight"] = torch.zeros(3)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GPT2LabError, match="unexpected weight transformer.h.0.extra.weight"):
        load_model(folder)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"activation_function": "relu"}, "activation_function 'relu'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_head": 3}, "divisible by n_head"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, message):
    folder = _make("safetensors", hf_gpt2(), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GPT2LabError, match=message):
        load_model(folder)
