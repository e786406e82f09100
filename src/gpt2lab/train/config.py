"""A training run's configuration: typed sections, TOML files, dotted `--set` overrides.

A run is one TrainConfig, made of the sections below, and is written as TOML:

    [model]                 [optim]               [train]
    preset = "gpt2"         lr = 6e-4             batch_size = 64 ...

Every key has a type (the field's annotation); a TOML file or a `--set section.key=value` override
with a value of the wrong type is a GPT2LabError naming the key, and unknown keys are one GPT2LabError
naming all of them, each with the closest known key. The model's own shape (GPTConfig, MODEL_PRESETS)
is `gpt2lab.config`; `TrainConfig.model_config()` builds one.

This module imports no torch: the CLI reads and prints configs (`gpt2lab train --print-config`)
before anything heavy is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any

from ..config import GPT2_VOCAB_SIZE, MODEL_PRESETS, GPTConfig
from ..errors import GPT2LabError

SAMPLE_PROMPT_FROM_DATA = "auto"  # eval.sample_prompt's value for a prompt taken from the data


@dataclass(frozen=True)
class ModelSection:
    """The network trained from scratch: a preset (see gpt2lab.config.MODEL_PRESETS) with any size overridden.

    With `train.init_from` the shape comes from the source weights instead and only `dropout` and
    `pad_vocab_multiple` apply.
    """

    preset: str = "gpt2"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None  # context length; None = train.seq_len
    dropout: float = 0.0
    # 50257 -> 50304 (a multiple of 64): faster output matmuls on GPUs (build-nanogpt, llm.c).
    pad_vocab_multiple: int = 64


@dataclass(frozen=True)
class DataSection:
    """Token shards made by `gpt2lab prepare` (or llm.c): train and val splits in one directory. The
    tokenizer is the one the directory was prepared with (its manifest); llm.c's shards are GPT-2's."""

    dir: str = "data/fineweb-edu-10B"
    shuffle: bool = True


@dataclass(frozen=True)
class OptimSection:
    """The optimizer and the learning-rate schedule (linear warmup, then decay to min_lr by max_steps).

    name: "adamw" (GPT-2's), or "muon": Muon for the blocks' attention and MLP matrices at the peak rate
    muon_lr, AdamW for the embeddings, biases and LayerNorms at lr (see train/optim.py).
    """

    name: str = "adamw"  # adamw | muon
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    # true: under a time limit (train.max_minutes) the schedule keeps pace with the clock where it is ahead
    # of the steps, so it ends at the limit or at max_steps, whichever comes first (Schedule.follow_clock).
    fit_schedule_to_time: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and embeddings only (see train/optim.py)
    grad_clip: float = 1.0  # global L2 norm; 0 turns clipping off
    muon_lr: float = 0.02  # Muon's peak rate (name = "muon"); min_lr / lr scales it too
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainSection:
    """The loop: batch geometry, length, precision, where the run lives, where it starts from."""

    out_dir: str = "runs/gpt2-124M"
    batch_size: int = 64  # sequences per device per micro-step
    seq_len: int = 1024
    total_batch_tokens: int = 524288  # per optimizer step, all devices; fixes gradient accumulation
    max_steps: int = 19073
    # A wall-time limit for one `train` call, in minutes (0 = none): when the next step would end past
    # it, the run ends after this one as if it were the last (evaluation, checkpoint); --resume auto
    # continues the same schedule. Lightning's max_time, a batch job's time limit.
    max_minutes: float = 0.0
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (see runtime.autocast_dtype)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend; "aot_eager" compiles in seconds (CPU tests)
    deterministic: bool = False  # repeatable GPU runs, at a cost (see runtime.deterministic)
    init_from: str = ""  # "" = from scratch; else a Hub name, HF directory or gpt2lab checkpoint/run
    # "all": every next token is a target. "assistant": chat data only (prepared from 'messages'
    # records): rows start at a conversation's start and the loss learns the assistant's replies alone,
    # averaged over the step's learned tokens (data/chat_loader.py).
    loss: str = "all"
    skip_nonfinite: int = 0  # steps with a non-finite loss or grad norm that may be skipped
    log_every: int = 1  # metrics.jsonl records every N steps
    tensorboard: bool = False
    # Weights & Biases: "" = off; else the project that rank 0 logs metrics.jsonl's records into (needs
    # the wandb extra; WANDB_MODE=offline logs without an account). See train/wandb_log.py.
    wandb_project: str = ""
    wandb_entity: str = ""  # "" = wandb's default (the logged-in user's)
    wandb_run_name: str = ""  # "" = the run directory's name
    # Under torchrun: "ddp" replicates the model on every rank, "fsdp" shards weights, gradients and
    # AdamW state across the ranks (FSDP2; see train/parallel.py and `gpt2lab train --plan`).
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute


@dataclass(frozen=True)
class EvalSection:
    """What runs every `every` steps: val loss, a text sample, and any extra tasks (HellaSwag)."""

    every: int = 250  # 0 = only at the end
    val_tokens: int = 10485760  # fixed val budget (build-nanogpt: 20 x 64 x 1024 x 8 GPUs)
    batch_size: int = 0  # 0 = train.batch_size
    # "auto": the first words of the data's val split (its first line, a few tokens), so the sample fits
    # whatever corpus is trained on; "" starts a new document; any other text is the prompt itself.
    sample_prompt: str = SAMPLE_PROMPT_FROM_DATA
    sample_tokens: int = 32
    tasks: tuple[str, ...] = ()  # e.g. ["hellaswag"]; see gpt2lab.train.evaluate


@dataclass(frozen=True)
class CheckpointSection:
    """When checkpoints are written and how many are kept."""

    every: int = 1000  # steps; 0 = only at the end (and on SIGINT / SIGTERM)
    keep_last: int = 2
    keep_best: bool = True  # also keep the checkpoint with the lowest val loss


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "eval": EvalSection,
    "checkpoint": CheckpointSection,
}


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. `TrainConfig()` is the GPT-2 (124M) FineWeb-Edu recipe's shape."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()} for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build and check a config from nested dicts (a parsed TOML file); missing keys keep defaults."""
        if not isinstance(d, dict):
            raise GPT2LabError(f"{source}: expected a table of sections")
        unknown = unknown_keys(d)
        if unknown:
            raise GPT2LabError(unknown_keys_message([(source, unknown)]))
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise GPT2LabError(f"{source}: '{name}' must be a table ([{name}])")
            hints = _field_types(section_cls)
            kwargs = {key: _check_type(f"{name}.{key}", value, hints[key], source) for key, value in values.items()}
            sections[name] = section_cls(**kwargs)
        config = cls(**sections)
        config.validate(source)
        return config

    def with_overrides(self, overrides: dict[str, Any], source: str = "--set") -> TrainConfig:
        """A copy with dotted keys replaced, e.g. {"optim.lr": 3e-4}; values are type-checked."""
        unknown = unknown_keys(overrides)
        if unknown:
            raise GPT2LabError(unknown_keys_message([(source, unknown)]))
        d = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            d[section][key] = value
        return TrainConfig.from_dict(d, source)

    def validate(self, source: str = "config") -> None:
        """Value checks that types alone cannot express; raises GPT2LabError naming the key."""

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                value = getattr(getattr(self, key.split(".")[0]), key.split(".")[1])
                raise GPT2LabError(f"{source}: {key} must be {what}, got {value!r}")

        m, o, t = self.model, self.optim, self.train
        if not t.init_from:
            need(m.preset in MODEL_PRESETS, "model.preset", f"one of {', '.join(MODEL_PRESETS)}")
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            need(getattr(m, key) is None or getattr(m, key) >= 1, f"model.{key}", "a positive integer")
        need(0.0 <= m.dropout < 1.0, "model.dropout", "in [0, 1)")
        need(m.pad_vocab_multiple >= 1, "model.pad_vocab_multiple", "a positive integer")
        need(o.name in OPTIMIZERS, "optim.name", f"one of {', '.join(OPTIMIZERS)}")
        need(o.lr > 0, "optim.lr", "positive")
        need(0 <= o.min_lr <= o.lr, "optim.min_lr", f"between 0 and optim.lr ({o.lr:g}); lower both")
        need(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0")
        need(o.schedule in SCHEDULES, "optim.schedule", f"one of {', '.join(SCHEDULES)}")
        need(0 <= o.beta1 < 1, "optim.beta1", "in [0, 1)")
        need(0 <= o.beta2 < 1, "optim.beta2", "in [0, 1)")
        need(o.eps > 0, "optim.eps", "positive")
        need(o.weight_decay >= 0, "optim.weight_decay", ">= 0")
        need(o.grad_clip >= 0, "optim.grad_clip", ">= 0 (0 = off)")
        need(o.muon_lr > 0, "optim.muon_lr", "positive")
        need(0 <= o.muon_momentum < 1, "optim.muon_momentum", "in [0, 1)")
        need(o.muon_weight_decay >= 0, "optim.muon_weight_decay", ">= 0")
        for key in ("batch_size", "seq_len", "total_batch_tokens", "max_steps", "log_every"):
            need(getattr(t, key) >= 1, f"train.{key}", "a positive integer")
        need(t.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}")
        need(t.skip_nonfinite >= 0, "train.skip_nonfinite", ">= 0")
        need(t.max_minutes >= 0, "train.max_minutes", ">= 0 (0 = no time limit)")
        fits = t.max_minutes > 0 or not o.fit_schedule_to_time
        need(fits, "optim.fit_schedule_to_time", "false without a time limit (train.max_minutes)")
        need(t.parallel in PARALLEL, "train.parallel", f"one of {', '.join(PARALLEL)}")
        need(t.loss in LOSSES, "train.loss", f"one of {', '.join(LOSSES)} (all tokens, or assistant replies only)")
        wandb_ok = not set(t.wandb_project) & set(WANDB_FORBIDDEN)
        need(wandb_ok, "train.wandb_project", f"a project name without any of {WANDB_FORBIDDEN}")
        if o.name == "muon" and t.parallel == "fsdp":
            raise GPT2LabError(
                f"{source}: optim.name = 'muon' orthogonalizes whole matrices, which FSDP shards across ranks: "
                "train with DDP (train.parallel = 'ddp') or with optim.name = 'adamw'"
            )
        need(bool(t.out_dir), "train.out_dir", "a directory")
        need(m.block_size is None or t.seq_len <= m.block_size, "train.seq_len", "at most model.block_size")
        need(self.eval.every >= 0, "eval.every", ">= 0 (0 = only at the end)")
        need(self.eval.val_tokens >= 0, "eval.val_tokens", ">= 0 (0 = no validation loss)")
        need(self.eval.batch_size >= 0, "eval.batch_size", ">= 0 (0 = train.batch_size)")
        need(self.eval.sample_tokens >= 0, "eval.sample_tokens", ">= 0 (0 = no sample)")
        need(self.checkpoint.every >= 0, "checkpoint.every", ">= 0 (0 = only at the end)")
        need(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "at least 1")

    def model_config(self, vocab_size: int = GPT2_VOCAB_SIZE) -> GPTConfig:
        """The GPTConfig of a run from scratch: the preset with the explicit sizes applied."""
        m = self.model
        sizes = {k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd") if getattr(m, k) is not None}
        try:
            return GPTConfig.from_preset(
                m.preset,
                **sizes,
                block_size=m.block_size or self.train.seq_len,
                vocab_size=vocab_size,
                dropout=m.dropout,
                pad_vocab_multiple=m.pad_vocab_multiple,
            )
        except ValueError as e:
            raise GPT2LabError(f"[model]: {e}") from None

    def replace(self, section: str, **changes: Any) -> TrainConfig:
        """A copy with fields of one section changed, e.g. `cfg.replace("train", max_steps=10)`."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
WANDB_FORBIDDEN = "/\\#?%:"  # the characters wandb refuses in a project's name
LOSSES = ("all", "assistant")
PARALLEL = ("ddp", "fsdp")  # train/parallel.py, which imports torch, names the same two


def key_type(key: str) -> Any:
    """The type of the config key `section.key`: its field's annotation, which --set checks values against."""
    section, _, name = key.partition(".")
    hints = _field_types(SECTIONS[section]) if section in SECTIONS else {}
    if name not in hints:
        raise GPT2LabError(f"unknown config key {key!r}")
    return hints[name]


def unknown_keys(d: dict[str, Any]) -> list[str]:
    """The names in `d` that are not config keys: `[section]` for an unknown table and `section.key` for
    an unknown key of a {section: {key: value}} dict (a parsed TOML file), or the unknown dotted keys of
    a {"section.key": value} dict (overrides)."""
    found = []
    for name, values in d.items():
        if isinstance(values, dict) and name in SECTIONS:
            found += [f"{name}.{key}" for key in values if key not in _field_types(SECTIONS[name])]
        elif isinstance(values, dict) or "." not in name:
            found.append(f"[{name}]" if isinstance(values, dict) else name)
        else:
            section, _, key = name.partition(".")
            if section not in SECTIONS or key not in _field_types(SECTIONS[section]):
                found.append(name)
    return found


def closest_key(name: str) -> str | None:
    """The known name nearest to an unknown one: `[section]` for a table; for `section.key`, a key of the
    same section, else the same or a similar key of another section (`train.lr` -> `optim.lr`)."""
    if name.startswith("["):
        close = difflib.get_close_matches(name.strip("[]"), list(SECTIONS), n=1)
        return f"[{close[0]}]" if close else None
    section, _, key = name.rpartition(".")
    own = list(_field_types(SECTIONS[section])) if section in SECTIONS else []
    if close := difflib.get_close_matches(key, own, n=1):
        return f"{section}.{close[0]}"
    anywhere: dict[str, str] = {}
    for other, cls in SECTIONS.items():
        for known in _field_types(cls):
            anywhere.setdefault(known, f"{other}.{known}")
    close = difflib.get_close_matches(key, list(anywhere), n=1, cutoff=0.8)  # stricter: a guess across sections
    return anywhere[close[0]] if close else None


def unknown_keys_message(found: list[tuple[str, list[str]]]) -> str:
    """One line naming every unknown key (`unknown_keys`) of each (source, names), each with the closest
    known key; where there is none, the keys of its section (or the sections) are listed after."""
    parts, listed = [], {}
    for source, names in found:
        items = []
        for name in names:
            close = closest_key(name)
            kind = "section" if name.startswith("[") else "key"
            items.append(f"unknown {kind} {name}" + (f" (did you mean {close}?)" if close else ""))
            section = name.rpartition(".")[0]
            if close is None and section in SECTIONS:
                listed[section] = f"{section} has: {', '.join(_field_types(SECTIONS[section]))}"
            elif close is None:
                listed[""] = f"the sections are {', '.join(f'[{s}]' for s in SECTIONS)}"
        parts.append(f"{source}: {', '.join(items)}")
    return "; ".join(parts + list(listed.values()))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    if args:  # X | None
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _check_type(key: str, value: Any, tp: Any, source: str) -> Any:
    """`value` if it has type `tp` (ints are accepted as floats, lists as tuples), else GPT2LabError."""
    if typing.get_origin(tp) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif typing.get_args(tp):  # X | None
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _check_type(key, value, inner, source)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise GPT2LabError(f"{source}: {key} must be {_type_name(tp)}, got {value!r}")


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A parsed TOML file; a missing or malformed file is a GPT2LabError."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise GPT2LabError(f"config file {path} not found; see configs/ for examples") from None
    except tomllib.TOMLDecodeError as e:
        raise GPT2LabError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise GPT2LabError(f"cannot read {path}: {e.strerror or e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value` -> (key, value). The value is read as a TOML value (3e-4, true, "x", [..])
    and, when that fails, taken as a plain string, so `train.init_from=gpt2` needs no quotes."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise GPT2LabError(f"--set {text!r}: expected section.key=value, e.g. optim.lr=3e-4")
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    with contextlib.suppress(GPT2LabError):  # an unknown key is reported where the overrides are applied
        if key_type(key) in (str, str | None) and not isinstance(value, str):
            value = raw.strip()  # e.g. out_dir=2024 is the directory "2024"
    return key, value


def load_train_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TOML file (or the defaults when `path` is None) + `section.key=value` overrides, checked."""
    tables = load_toml(path) if path is not None else {}
    parsed = dict(parse_override(o) for o in overrides)
    # Every unknown key at once, the file's and the overrides', so that one run shows every typo.
    found = [(str(path), unknown_keys(tables)), ("--set", unknown_keys(parsed))]
    if any(names for _, names in found):
        raise GPT2LabError(unknown_keys_message([(source, names) for source, names in found if names]))
    base = TrainConfig.from_dict(tables, str(path)) if path is not None else TrainConfig()
    return base.with_overrides(parsed) if parsed else base


def to_toml(config: TrainConfig) -> str:
    """The config as a TOML document that `load_train_config` reads back to an equal config."""
    lines = []
    for name, values in config.to_dict().items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if value is not None:  # TOML has no null; None is every such field's default
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
