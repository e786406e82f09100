import math

import pytest
import torch

from gpt2lab.config import MODEL_PRESETS, GPTConfig
from gpt2lab.model import GPT, KVCache, count_parameters, unwrap


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
    assert cache.pos == [20, 20, 20]


def test_forward_rejects_sequences_longer_than_context():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10))
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_kv_cache_rows_at_their_own_positions_match_each_row_alone():
    # The server's use: rows join at their own positions, are fed in any order, and one may be named
    # twice (a lone row decoded as two); each row's logits equal its sequence run alone without a cache.
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=64)
    model = GPT(cfg).eval()
    seqs = torch.randint(0, 64, (3, 20))
    cache = KVCache(cfg, batch_size=4)
    with torch.no_grad():
        for row, (seq, n) in zip([3, 0, 2], [(0, 4), (1, 9), (2, 6)]):
            model(seqs[seq : seq + 1, :n], cache=cache.select([row]))
        assert cache.pos == [9, 0, 6, 4]
        got, _ = model(torch.stack([seqs[2, 6:7], seqs[0, 4:5], seqs[1, 9:10]]), cache=cache.select([2, 3, 0]))
        twice, _ = model(torch.stack([seqs[0, 5:6]] * 2), cache=cache.select([3, 3]))
        assert cache.pos == [10, 0, 7, 6]
        for i, (seq, n) in enumerate([(2, 7), (0, 5), (1, 10)]):
            alone, _ = model(seqs[seq : seq + 1, :n])
            torch.testing.assert_close(got[i, -1], alone[0, -1], rtol=0, atol=1e-5)
        alone, _ = model(seqs[0:1, :6])
        torch.testing.assert_close(twice[:, -1], alone[:, -1].expand(2, -1), rtol=0, atol=1e-5)
        cache.copy_row(2, 1)
        assert cache.pos[1] == 7 and torch.equal(cache.k[:, 1, :, :7], cache.k[:, 2, :, :7])
    with pytest.raises(ValueError, match="longer than the KV cache"):
        model(seqs[:1, :1], cache=_full_cache(cfg, model))


def _full_cache(cfg, model):
    cache = KVCache(cfg, 1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    return cache


def test_hidden_states_and_head_are_the_forward_pass():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, pad_vocab_multiple=64))
    idx = torch.randint(0, 50, (2, 8))
    logits, _ = model(idx)
    hidden = model.hidden_states(idx)
    assert hidden.shape == (2, 8, 16) and logits.shape == (2, 8, 50)
    assert torch.equal(model.head(hidden), logits)


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
