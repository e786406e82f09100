import math

import pytest
import torch

from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.model import GPT, KVCache, Linear, count_parameters, unwrap


def test_gpt2_preset_has_124439808_parameters():
    cfg = GPTConfig.from_preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50257)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_439_808
    assert count_parameters(cfg) == 124_439_808


@pytest.mark.parametrize(
    "name,expected",
    [("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_larger_presets_match_openai_sizes(name, expected):
    # Counts of the Hugging Face checkpoints (tied lm_head counted once).
    cfg = GPTConfig.from_preset(name)
    assert count_parameters(cfg) == expected
    with torch.device("meta"):
        assert GPT(cfg).num_params() == expected


def test_padded_vocab_is_50304_and_not_counted():
    cfg = GPTConfig.from_preset("gpt2", pad_vocab_multiple=64)
    assert cfg.padded_vocab_size == 50304
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.transformer.wte.weight.shape == (50304, 768)
    assert model.num_params() == 124_439_808
    assert model.num_params(include_padding=True) == 124_439_808 + 47 * 768


def test_padded_logits_are_cut_and_padding_rows_zero():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100, pad_vocab_multiple=64)
    model = GPT(cfg)
    assert model.transformer.wte.weight.shape[0] == 128
    assert torch.all(model.transformer.wte.weight[100:] == 0)
    idx = torch.randint(0, 100, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 100)
    # The padded model computes exactly what an unpadded one with the same weights computes.
    sd = {k: v for k, v in model.state_dict().items()}
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:100]
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    plain = GPT.from_state_dict(cfg.replace(pad_vocab_multiple=1), sd)
    logits2, loss2 = plain(idx, idx)
    torch.testing.assert_close(logits, logits2, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, loss2, rtol=0, atol=1e-6)


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=4096)
    model = GPT(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.attn.c_attn.bias == 0)
        assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)
        assert block.ln_1.eps == 1e-5
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_loss_ignores_minus_one_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=50))
    idx = torch.randint(0, 50, (1, 8))
    targets = torch.randint(0, 50, (1, 8))
    logits, _ = model(idx)
    masked = targets.clone()
    masked[0, :4] = -1
    _, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], targets[0, 4:])
    torch.testing.assert_close(loss, expected)


def test_kv_cache_chunks_match_full_forward():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=64)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 64, (3, 20))
    full, _ = model(idx)
    cache = KVCache(cfg, batch_size=3)
    pieces = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 7), (7, 8), (8, 15), (15, 20)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    assert cache.pos == 20


def test_forward_rejects_sequences_longer_than_context():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_packed_cpu_weights_give_the_same_outputs(dtype, atol):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)).eval().to(dtype)
    idx = torch.randint(0, 100, (3, 16))
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    with torch.no_grad():
        plain, _ = model(idx)
    # Whether oneDNN packs a dtype depends on the CPU (bf16 needs AVX512-BF16 or AMX in some builds):
    # where packing declines, the model must keep running on the plain weights, exactly.
    if model.pack_for_cpu_inference(3):
        assert all(m.packed is not None for m in linears)
        with torch.no_grad():
            packed, _ = model(idx)
        torch.testing.assert_close(packed.float(), plain.float(), rtol=0, atol=atol)
    else:
        assert all(m.packed is None for m in linears)
        with torch.no_grad():
            unpacked, _ = model(idx)
        torch.testing.assert_close(unpacked, plain, rtol=0, atol=0)
    # With autograd on, the parameters themselves are used (gradients flow as usual).
    logits, _ = model(idx)
    assert logits.requires_grad


def test_packed_weights_never_go_stale_and_train_drops_them():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=40)).eval()
    idx = torch.randint(0, 40, (1, 8))
    packs = model.pack_for_cpu_inference(1)  # where oneDNN declines, all below runs on plain weights
    with torch.no_grad():
        before, _ = model(idx)
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # an optimizer step would do the same
        changed, _ = model(idx)
        model.pack_for_cpu_inference(None)
        expected, _ = model(idx)
    # The other layers still run packed in `changed`: oneDNN's products round differently from MKL's on
    # some CPUs (an Intel Xeon with AVX2 kernels), so equal to float32 rounding, and far from a stale pack.
    torch.testing.assert_close(changed, expected, rtol=1e-5, atol=1e-6)
    assert (before - expected).abs().max() > 1e-3
    assert model.pack_for_cpu_inference(1) == packs
    assert (model.transformer.h[0].mlp.c_fc.packed is not None) == packs
    model.train()
    assert all(getattr(m, "packed", None) is None for m in model.modules())
    model.eval()
    assert not model.to(torch.float16).pack_for_cpu_inference(1)  # not packed: plain kernels


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_head", 5, "divisible by n_head"),
        ("n_layer", 0, "positive integer"),
        ("dropout", 1.5, "dropout"),
        ("block_size", 2.5, "positive integer"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{field: value})


def test_config_round_trip_and_unknown_fields():
    cfg = GPTConfig.from_preset("gpt-micro", block_size=128, pad_vocab_multiple=64)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_lyer": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.from_preset("gpt5")
    assert set(MODEL_PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


def test_unwrap_finds_the_gpt_inside_ddp_and_compile_wrappers():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))

    class DDPLike(torch.nn.Module):  # DistributedDataParallel keeps the wrapped model as `.module`
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    compiled = torch.compile(model, backend="eager")  # wrapping only: nothing is compiled until called
    assert unwrap(model) is model
    assert unwrap(compiled) is model
    assert unwrap(DDPLike(model)) is model
    assert unwrap(DDPLike(compiled)) is model
