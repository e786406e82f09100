"""FSDP2 training on 2 gloo ranks: the same losses as one process, sharded checkpoints that resume on
another number of ranks, under DDP and after a kill -9, half the bytes per rank, torch.compile;
activation checkpointing; the memory plan.

The default tests start one 2-rank torchrun job (about 20 s on a 2-core CPU); the slow ones eight
more (about 2.5 min).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env
from safetensors.torch import load_file
from train_utils import tiny_config, train_losses

from gpt2lab import checkpoint as ckpt
from gpt2lab.accel import use_fused_loss
from gpt2lab.config import GPTConfig
from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.train import checkpoint as train_checkpoint
from gpt2lab.train import train
from gpt2lab.train.config import to_toml
from gpt2lab.train.parallel import enable_activation_checkpointing
from gpt2lab.train.plan import activation_bytes, parameter_shapes, plan, shard_numel

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5  # float32: 2 ranks reduce in another order than 1 process accumulates
WORKER = Path(__file__).with_name("fsdp_worker.py")


def metrics(run_dir: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r["kind"] == "train"]


def torchrun(*args, nproc: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    result = subprocess.run(
        cmd, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_close_losses(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, abs=TOL), step


def fsdp_config(corpus: Path, out: Path, **train_keys):
    return tiny_config(corpus, out, train={"parallel": "fsdp", **train_keys}, eval={"every": 4})


@pytest.mark.subprocess
def test_fsdp_equals_one_process_resumes_on_one_rank_and_halves_the_bytes(corpus, tmp_path, cli):
    one = tmp_path / "one"
    train(tiny_config(corpus, one, eval={"every": 4}), progress=False)
    fsdp = tmp_path / "fsdp"
    config = tmp_path / "fsdp.toml"
    config.write_text(to_toml(fsdp_config(corpus, fsdp)))
    torchrun(WORKER, config, tmp_path)

    # 8 steps of 2 ranks x 1 micro-batch under FSDP == 1 process x 2 micro-steps: losses and the global norm.
    assert_close_losses(train_losses(fsdp), train_losses(one))
    # The clipped norm is the global one (one rank's shard alone would be about 1/sqrt(2) of it): equal to
    # 1e-5 at step 1, from the same weights; later the float32 reordering, amplified by AdamW on a tiny
    # model at lr 3e-3, moves it by up to 2e-4 relative while the losses stay within 1e-5.
    norms_fsdp, norms_one = metrics(fsdp, "grad_norm"), metrics(one, "grad_norm")
    assert norms_fsdp[0] == pytest.approx(norms_one[0], rel=1e-5)
    for a, b in zip(norms_fsdp, norms_one):
        assert a == pytest.approx(b, rel=1e-3)
    full = ckpt.checkpoint_dir(fsdp, 8)
    meta = ckpt.read_meta(full)["training"]
    assert (meta["parallel"], meta["world_size"]) == ("fsdp", 2)
    assert (full / train_checkpoint.SHARDED_SUBDIR / ".metadata").is_file()
    assert not (full / train_checkpoint.OPTIMIZER_FILE).exists()
    wa, wb = load_file(full / ckpt.WEIGHTS_FILE), load_file(ckpt.checkpoint_dir(one, 8) / ckpt.WEIGHTS_FILE)
    assert wa.keys() == wb.keys()
    for k in wa:  # AdamW divides by sqrt(v): a rarely seen embedding row moves by up to 5e-5 (1 of 1.6M)
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)

    # Each rank holds its rows: the bytes the plan predicts, about half of DDP's.
    model_cfg = GPT(tiny_config(corpus, one).model_config(50257)).config
    sharded, ddp = plan(model_cfg, "fsdp", 2, 4, 16), plan(model_cfg, "ddp", 2, 4, 16)
    held = [json.loads((tmp_path / f"bytes_rank{r}.json").read_text()) for r in (0, 1)]
    assert held[0] == {
        "parameters": sharded.parameters,
        "gradients": sharded.gradients,
        "optimizer": sharded.optimizer,
        "compiled_graphs": 0,
    }
    for kind in ("parameters", "gradients", "optimizer"):
        assert held[0][kind] + held[1][kind] == getattr(ddp, kind)  # nothing held twice
        assert held[1][kind] / getattr(ddp, kind) == pytest.approx(0.5, abs=0.01)

    # 2 ranks -> 1 process: DCP reshards onto whole tensors; the data continues where it stopped.
    resumed = tmp_path / "resumed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config(corpus, resumed, eval={"every": 4}), resume=str(ckpt.checkpoint_dir(fsdp, 4)), progress=False)
    assert not [w for w in caught if "single process" in str(w.message)]  # no_dist is asked for, not assumed
    assert_close_losses(train_losses(resumed), train_losses(fsdp)[4:])

    # Every consumer of a checkpoint reads the FSDP run.
    result = cli("sample", "--model", fsdp, "--prompt", "ROMEO:", "--max-new-tokens", "4", "--device", "cpu")
    assert result.code == 0 and result.out.startswith("ROMEO:")
    args = ["--task", "val-loss", "--data", corpus, "--seq-len", "16", "--max-tokens", "256", "--no-progress"]
    assert cli("eval", "--model", fsdp, *args, "--json", tmp_path / "eval.json").code == 0
    measured = json.loads((tmp_path / "eval.json").read_text())["results"]["loss"]
    assert measured == pytest.approx(meta["val_loss"], abs=1e-6)
    assert cli("convert", "--to-hf", full, "--out", tmp_path / "hf").code == 0
    tuned = tmp_path / "tuned"
    cfg = tiny_config(corpus, tuned, shape=False, train={"init_from": str(fsdp), "max_steps": 1})
    assert train(cfg, progress=False).step == 1


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """An uninterrupted 8-step FSDP run on 2 ranks, checkpoints at steps 4 and 8: the slow tests' reference."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "straight.toml").write_text(to_toml(fsdp_config(corpus, root / "straight")))
    torchrun("-m", "gpt2lab", "train", root / "straight.toml", "--no-progress")
    return root / "straight"


@pytest.mark.slow
@pytest.mark.subprocess
def test_fsdp_resume_is_bitwise_and_a_one_rank_run_continues_on_two(corpus, tmp_path, straight):
    # An FSDP run stopped at step 4 and resumed on the same 2 ranks == the uninterrupted run, bit for bit.
    stopped = tmp_path / "stopped"
    (tmp_path / "stopped.toml").write_text(to_toml(fsdp_config(corpus, stopped)))
    torchrun("-m", "gpt2lab", "train", tmp_path / "stopped.toml", "--no-progress", "--stop-at", "4")
    assert [p.name for p in ckpt.find_checkpoints(stopped)] == ["step_00000004"]
    torchrun("-m", "gpt2lab", "train", tmp_path / "stopped.toml", "--no-progress", "--resume", "auto")
    assert train_losses(stopped) == train_losses(straight)
    wa, wb = (load_file(ckpt.checkpoint_dir(r, 8) / ckpt.WEIGHTS_FILE) for r in (straight, stopped))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # A one-process checkpoint (whole tensors) continues on 2 FSDP ranks (--parallel on the command line).
    one = tmp_path / "one"
    train(tiny_config(corpus, one, eval={"every": 4}), progress=False)
    (tmp_path / "two.toml").write_text(to_toml(tiny_config(corpus, tmp_path / "two", eval={"every": 4})))
    resume = ckpt.checkpoint_dir(one, 4)
    torchrun("-m", "gpt2lab", "train", tmp_path / "two.toml", "--no-progress", "--parallel", "fsdp", "--resume", resume)
    assert_close_losses(train_losses(tmp_path / "two"), train_losses(one)[4:])
    assert_close_losses(train_losses(straight), train_losses(one))


@pytest.mark.slow
@pytest.mark.subprocess
def test_fsdp_composes_with_compile_and_its_checkpoint_resumes_under_ddp(corpus, tmp_path, straight):
    # torch.compile around the sharded model (aot_eager: Dynamo + AOTAutograd, no C++ compiler needed).
    # FSDP2's hooks are closed to Dynamo, so the root's frame (the loop over the blocks) runs eagerly
    # and each block's forward between its hooks is compiled, as are the fused loss's pieces: the same
    # losses as the eager FSDP run, to float32 reordering.
    compiled = tmp_path / "compiled"
    cfg = fsdp_config(corpus, compiled, compile=True, compile_backend="aot_eager")
    (tmp_path / "compiled.toml").write_text(to_toml(cfg))
    torchrun(WORKER, tmp_path / "compiled.toml", tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"bytes_rank{rank}.json").read_text())["compiled_graphs"] >= 2
    assert_close_losses(train_losses(compiled), train_losses(straight))
    assert len(train_losses(compiled)) == 8
    wa, wb = (load_file(ckpt.checkpoint_dir(r, 8) / ckpt.WEIGHTS_FILE) for r in (compiled, straight))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)

    # The FSDP checkpoint of step 4 continues as a 2-process DDP run: DCP reads whole tensors on each
    # rank, the loader position and RNG states are the ranks' own.
    ddp = tmp_path / "ddp"
    (tmp_path / "ddp.toml").write_text(to_toml(tiny_config(corpus, ddp, eval={"every": 4})))
    resume = ckpt.checkpoint_dir(straight, 4)
    torchrun("-m", "gpt2lab", "train", tmp_path / "ddp.toml", "--no-progress", "--resume", resume)
    assert ckpt.read_meta(ckpt.checkpoint_dir(ddp, 8))["training"]["parallel"] == "ddp"
    assert_close_losses(train_losses(ddp), train_losses(straight)[4:])


@pytest.mark.slow
@pytest.mark.subprocess
def test_fsdp_run_killed_while_checkpointing_resumes_bitwise(corpus, tmp_path, straight):
    # Rank 1 is SIGKILLed with the step-8 shards on disk but the checkpoint not yet complete.
    killed = tmp_path / "killed"
    (tmp_path / "killed.toml").write_text(to_toml(fsdp_config(corpus, killed)))
    result = torchrun(WORKER, tmp_path / "killed.toml", "-", "--kill-rank1-at", "8", ok=False)
    assert result.returncode != 0 and "SIGKILL" in result.stderr, result.stderr[-4000:]
    half_written = list((killed / "checkpoints").glob(".step_00000008.tmp-*"))
    assert len(half_written) == 1 and (half_written[0] / train_checkpoint.SHARDED_SUBDIR).is_dir()
    assert not (half_written[0] / ckpt.META_FILE).exists()
    # The previous checkpoint is whole and loads; --resume auto picks it and finishes the run bit for bit.
    assert train_checkpoint.find_latest_training(killed) == ckpt.checkpoint_dir(killed, 4)
    meta, states = train_checkpoint.load_training_checkpoint(ckpt.checkpoint_dir(killed, 4))
    assert states["counters"]["step"] == 4 and meta["training"]["world_size"] == 2
    torchrun("-m", "gpt2lab", "train", tmp_path / "killed.toml", "--no-progress", "--resume", "auto")
    assert train_losses(killed) == train_losses(straight)
    wa, wb = (load_file(ckpt.checkpoint_dir(r, 8) / ckpt.WEIGHTS_FILE) for r in (killed, straight))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list((killed / "checkpoints").glob(".*"))  # the half-written directory was removed


def saved_bytes(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages the forward keeps for the backward."""
    storages: dict[int, int] = {}

    def record(t: torch.Tensor) -> torch.Tensor:  # called with every tensor the forward saves
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        _, loss = model(*batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_activation_checkpointing_gives_the_same_losses_with_less_memory(corpus, tmp_path):
    sections = dict(model={"dropout": 0.1}, train={"max_steps": 4}, checkpoint={"every": 4})
    plain = train(tiny_config(corpus, tmp_path / "plain", **sections), progress=False)
    ac_sections = {**sections, "train": {**sections["train"], "activation_checkpointing": True}}
    ac = train(tiny_config(corpus, tmp_path / "ac", **ac_sections), progress=False)
    assert train_losses(tmp_path / "ac") == train_losses(tmp_path / "plain")  # bit for bit, dropout included
    assert plain.loss == ac.loss
    wa, wb = (load_file(ckpt.checkpoint_dir(tmp_path / r, 4) / ckpt.WEIGHTS_FILE) for r in ("plain", "ac"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # What the forward keeps, measured against the plan's formula (float32, no dropout), 4 layers.
    config = GPTConfig.from_preset("gpt-nano", n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=50257)
    torch.manual_seed(0)
    model = use_fused_loss(GPT(config))  # as the trainer runs it
    batch = (torch.randint(0, 50257, (4, 64)), torch.randint(0, 50257, (4, 64)))
    without = saved_bytes(model, batch)
    enable_activation_checkpointing(model)
    with_ac = saved_bytes(model, batch)
    planned, planned_ac = activation_bytes(config, 4, 64, 4)
    assert without == pytest.approx(planned, rel=0.05)
    # Checkpointed: each block keeps its input (the recomputed block exists only during the backward).
    block = (planned - planned_ac) // (config.n_layer - 1) + 4 * 64 * 64 * 4
    assert with_ac == pytest.approx(planned_ac - block, rel=0.05)
    assert without - with_ac == pytest.approx(config.n_layer * 15 * 4 * 64 * 64 * 4, rel=0.05)


@pytest.mark.parametrize("preset", ["gpt2", "gpt2-xl"])
def test_plan_counts_every_parameter_and_shards_like_fsdp(preset):
    config = GPTConfig.from_preset(preset)
    with torch.device("meta"):
        model = GPT(config)
    assert parameter_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    for world in (1, 2, 8):
        p = plan(config, "fsdp", world, 8, 1024, grad_accum=1)
        rank0 = sum(torch.chunk(torch.empty(p_.shape, device="meta"), world)[0].numel() for p_ in model.parameters())
        assert p.parameters == 4 * rank0 and p.optimizer == 8 * rank0 and p.gradients == 4 * rank0
        assert rank0 >= total / world and rank0 - total / world < sum(
            math.prod(s.shape[1:]) for s in model.parameters()
        )
        assert plan(config, "ddp", world, 8, 1024).parameters == 4 * total
    assert shard_numel((5, 3), 2) == 9 and shard_numel((1, 3), 8) == 3
    if preset == "gpt2-xl":  # 1.56B parameters (padded vocabulary): 16 bytes each is ~25 GB with DDP
        ddp8, fsdp8 = plan(config, "ddp", 8, 8, 1024), plan(config, "fsdp", 8, 8, 1024)
        assert ddp8.parameters + ddp8.gradients + ddp8.optimizer == 16 * total
        assert fsdp8.parameters + fsdp8.gradients + fsdp8.optimizer == pytest.approx(2 * total, rel=0.01)
        assert fsdp8.largest_batch(40e9, True) > fsdp8.largest_batch(40e9, False) > ddp8.largest_batch(40e9, False)


def test_plan_command_prints_both_ways(corpus, tmp_path, cli):
    config = tmp_path / "t.toml"
    config.write_text(to_toml(tiny_config(corpus, tmp_path / "run")))
    result = cli("train", config, "--plan", "--world-size", "2", "--gpu-memory", "1")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "ddp x2" in lines[1] and "fsdp x2" in lines[1]
    assert any(line.startswith("largest B in 1 GB") for line in lines)
    assert not (tmp_path / "run").exists()  # no training


def test_bad_parallel_settings_are_clear_errors(corpus, tmp_path):
    with pytest.raises(GPT2LabError, match="train.parallel must be one of ddp, fsdp, got 'zero'"):
        tiny_config(corpus, tmp_path / "r", train={"parallel": "zero"})
    with pytest.raises(GPT2LabError, match="train.parallel 'fsdp' shards the model .* not started by torchrun"):
        train(tiny_config(corpus, tmp_path / "r", train={"parallel": "fsdp"}), progress=False)


@pytest.mark.slow
@pytest.mark.subprocess
def test_twenty_fsdp_steps_equal_ddp_and_one_process(corpus, tmp_path):
    # Issue 13's bar: 2-rank FSDP == 2-rank DDP == 1 process accumulating 2 micro-steps, within 1e-5 for 20 steps.
    runs = {}
    for name, keys in (("fsdp", {"parallel": "fsdp"}), ("ddp", {})):
        out = tmp_path / name
        (tmp_path / f"{name}.toml").write_text(to_toml(tiny_config(corpus, out, train={"max_steps": 20, **keys})))
        torchrun("-m", "gpt2lab", "train", tmp_path / f"{name}.toml", "--no-progress")
        runs[name] = train_losses(out)
    one = tmp_path / "one"
    train(tiny_config(corpus, one, train={"max_steps": 20}), progress=False)
    assert len(runs["fsdp"]) == 20
    assert_close_losses(runs["fsdp"], train_losses(one))
    assert_close_losses(runs["ddp"], train_losses(one))
