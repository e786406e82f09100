"""TrainConfig: the shipped TOML files, --set overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2lab.errors import GPT2LabError
from gpt2lab.train import gradient_accumulation
from gpt2lab.train.config import TrainConfig, load_train_config, parse_override, to_toml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_train_config(path)
    copy = tmp_path / "copy.toml"
    copy.write_text(to_toml(cfg))
    assert load_train_config(copy) == cfg


def test_required_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.toml")}
    assert {"gpt2-124M-fineweb-edu.toml", "shakespeare-cpu.toml", "finetune-gpt2-shakespeare.toml"} <= names


def test_124M_recipe_is_build_nanogpts():
    cfg = load_train_config(CONFIGS / "gpt2-124M-fineweb-edu.toml")
    o, t = cfg.optim, cfg.train
    assert (t.total_batch_tokens, t.batch_size, t.seq_len, t.max_steps) == (524288, 64, 1024, 19073)
    assert (o.lr, o.min_lr, o.warmup_steps, o.schedule) == (6e-4, 6e-5, 715, "cosine")
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    m = cfg.model_config()
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.padded_vocab_size) == (12, 12, 768, 1024, 50304)
    assert gradient_accumulation(cfg, 8) == 1 and gradient_accumulation(cfg, 1) == 8


def test_overrides_are_typed():
    cfg = load_train_config(
        CONFIGS / "shakespeare-cpu.toml",
        ["optim.lr=3e-3", "train.max_steps=100", "train.init_from=gpt2", "eval.tasks=['x']", "train.out_dir=2024"],
    )
    assert cfg.optim.lr == 3e-3 and cfg.train.max_steps == 100
    assert cfg.train.init_from == "gpt2" and cfg.eval.tasks == ("x",) and cfg.train.out_dir == "2024"
    assert parse_override("optim.weight_decay=0") == ("optim.weight_decay", 0)
    assert TrainConfig().with_overrides({"optim.weight_decay": 0}).optim.weight_decay == 0.0  # ints become floats


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("foo.bar=1", r"unknown key foo.bar; the sections are \[model\]"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("train.max_steps=1.5", "train.max_steps must be an integer"),
        ("train.compile=1", "train.compile must be true or false"),
        ("optim.lr=-1", "optim.lr must be positive"),
        ("optim.lr=3e-4", r"optim.min_lr must be between 0 and optim.lr \(0.0003\); lower both, got 0.0006"),
        ("train.max_minutes=-1", r"train.max_minutes must be >= 0 \(0 = no time limit\)"),
        ("optim.schedule=step", "optim.schedule must be one of"),
        ("train.precision=fp8", "train.precision must be one of"),
        ("model.preset=gpt5", "model.preset must be one of"),
        ("optim.name=lion", "optim.name must be one of adamw, muon, got 'lion'"),
        ("optim.muon_lr=0", "optim.muon_lr must be positive"),
        ("optim.muon_momentum=1", r"optim.muon_momentum must be in \[0, 1\)"),
        ("novalue", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(GPT2LabError, match=message):
        load_train_config(CONFIGS / "shakespeare-cpu.toml", [override])


def test_muon_with_fsdp_is_refused():
    with pytest.raises(GPT2LabError) as e:
        load_train_config(CONFIGS / "shakespeare-cpu.toml", ["optim.name=muon", "train.parallel=fsdp"])
    assert str(e.value).endswith(
        "optim.name = 'muon' orthogonalizes whole matrices, which FSDP shards across ranks: "
        "train with DDP (train.parallel = 'ddp') or with optim.name = 'adamw'"
    )


def test_bad_toml_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(GPT2LabError, match=r"bad.toml: unknown key optim.learning_rate"):
        load_train_config(bad)
    bad.write_text("[trainer]\nx = 1\n")
    with pytest.raises(GPT2LabError, match=r"unknown section \[trainer\]"):
        load_train_config(bad)
    bad.write_text("[train\n")
    with pytest.raises(GPT2LabError, match="not valid TOML"):
        load_train_config(bad)
    with pytest.raises(GPT2LabError, match="not found"):
        load_train_config(tmp_path / "missing.toml")


def test_every_unknown_key_is_reported_at_once_with_the_closest_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 1e-3\n[train]\nmax_step = 10\nlr = 1e-3\nwhatever = 1\n[trainer]\nx = 1\n")
    overrides = ["trian.max_steps=3", "eval.sample_promt=x", "optim.lr=1e-3"]
    with pytest.raises(GPT2LabError) as e:
        load_train_config(bad, overrides)
    assert str(e.value) == (
        f"{bad}: unknown key optim.lrr (did you mean optim.lr?), unknown key train.max_step (did you mean "
        "train.max_steps?), unknown key train.lr (did you mean optim.lr?), unknown key train.whatever, unknown "
        "section [trainer] (did you mean [train]?); --set: unknown key trian.max_steps (did you mean "
        "train.max_steps?), unknown key eval.sample_promt (did you mean eval.sample_prompt?); train has: "
        + ", ".join(TrainConfig().to_dict()["train"])
    )
    with pytest.raises(GPT2LabError, match=r"^--set: unknown key optim.lrr \(did you mean optim.lr\?\), unknown key "):
        TrainConfig().with_overrides({"optim.lrr": 1.0, "train.max_stepz": 2})


def test_gradient_accumulation_must_divide():
    cfg = TrainConfig().replace("train", total_batch_tokens=524288, batch_size=48, seq_len=1024)
    with pytest.raises(GPT2LabError, match=r"must be a multiple of batch_size x seq_len x ranks = 48 x 1024 x 1"):
        gradient_accumulation(cfg, 1)
    assert gradient_accumulation(cfg.replace("train", batch_size=16), 4) == 8


def test_cli_reports_config_errors(cli):
    result = cli("train", CONFIGS / "shakespeare-cpu.toml", "--set", "optim.betas=0.9")
    assert result.code == 1
    assert "unknown key optim.betas" in result.err and "Traceback" not in result.err
    result = cli("train", CONFIGS / "shakespeare-cpu.toml", "--set", "train.batch_size=7")
    assert result.code == 1 and "must be a multiple of" in result.err


def test_cli_print_config_applies_flags(cli):
    result = cli(
        "train", CONFIGS / "shakespeare-cpu.toml", "--set", "optim.lr=3e-3", "--max-steps", "7", "--print-config"
    )
    assert result.code == 0, result.err
    assert "lr = 0.003" in result.out and "max_steps = 7" in result.out


def test_every_command_line_shortcut_is_its_set_override(capsys):
    from gpt2lab.cli import build_parser
    from gpt2lab.commands.train import SHORTCUTS, resolve
    from gpt2lab.train.config import key_type

    config = str(CONFIGS / "shakespeare-cpu.toml")
    values = {str: "fsdp", int: 7, float: 2.5}  # fsdp: a value every string key here takes
    flags, sets = [config, "--set", "optim.name=adamw"], [config, "--set", "optim.name=adamw"]  # muon refuses fsdp
    for flag, shortcut in SHORTCUTS.items():
        kind = key_type(shortcut.key)
        assert kind in (bool, int, float, str), (flag, kind)
        if kind is bool:
            flags.append(flag)
            sets += ["--set", f"{shortcut.key}=true"]
        else:
            flags += [flag, str(values[kind])]
            sets += ["--set", f"{shortcut.key}={values[kind]}"]
    parser = build_parser()
    by_flags = resolve(parser.parse_args(["train", *flags]))
    assert by_flags == resolve(parser.parse_args(["train", *sets]))
    assert by_flags.data.dir == "fsdp" and by_flags.train.max_minutes == 2.5 and by_flags.train.compile
    # A flag wins over --set of its key, and --help names the key each flag sets.
    assert (
        resolve(parser.parse_args(["train", config, "--set", "train.max_steps=3", "--max-steps", "5"])).train.max_steps
        == 5
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(f"({shortcut.key})" in help_text for shortcut in SHORTCUTS.values())


def test_a_shortcut_value_is_checked_as_set_checks_it(cli):
    result = cli("train", CONFIGS / "shakespeare-cpu.toml", "--eval-every", "-1", "--print-config")
    assert result.code == 1 and "command line: eval.every must be >= 0 (0 = only at the end), got -1" in result.err
