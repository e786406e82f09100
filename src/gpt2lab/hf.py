"""The one bridge to Hugging Face: GPT-2 checkpoints in and out.

Import reads every format the Hub uses for GPT-2; export writes a directory that
`transformers.GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .chat import ChatTemplate, template_of
from .config import GPTConfig
from .errors import GPT2LabError
from .fileio import atomic_dir, atomic_save_safetensors, atomic_write_bytes, atomic_write_json, load_safetensors
from .model import GPT
from .tokenizer import Tokenizer

# Short names accepted for OpenAI's releases (their repositories moved under openai-community/).
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
# Weights stored by Conv1D as (in, out) (transformers/pytorch_utils.py, class Conv1D): transposed to
# nn.Linear's (out, in).
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers written by older transformers versions; not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# How an exported chat token is marked: special (never split, skipped by decode(skip_special_tokens)),
# and matched exactly, without eating the whitespace around it.
ADDED_TOKEN_FLAGS = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 `config.json` dict; unsupported variants are refused."""
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise GPT2LabError(f"{source}: model_type is {model_type!r}, not 'gpt2'; only GPT-2 checkpoints load here")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise GPT2LabError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new')")
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * n_embd):
        raise GPT2LabError(f"{source}: n_inner={n_inner} is not 4 * n_embd ({4 * n_embd}); not supported")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise GPT2LabError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise GPT2LabError(f"{source}: scale_attn_weights=false is not supported")
    if hf.get("add_cross_attention", False):
        raise GPT2LabError(f"{source}: add_cross_attention=true is not supported")
    if not hf.get("tie_word_embeddings", True):
        raise GPT2LabError(f"{source}: untied word embeddings (tie_word_embeddings=false) are not supported")
    try:
        # Dropout is a training choice, not part of the weights: imported models start at 0.0.
        return GPTConfig(
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf.get("vocab_size", 50257),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    except ValueError as e:
        raise GPT2LabError(f"{source}: {e}") from None


def config_to_hf(config: GPTConfig, eot_token: int | None = 50256) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_inner": None,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.layer_norm_eps,
        "attn_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- state dicts


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], config: GPTConfig, source: str = "") -> dict[str, torch.Tensor]:
    """Map a Hugging Face GPT-2 state dict onto gpt2lab's parameter names, checking every key and shape.
    Keys come with or without the `transformer.` prefix; old checkpoints' mask buffers are dropped."""
    where = f" in {source}" if source else ""
    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # gpt2lab name -> the key as the file spells it
    hf_lm_head = None
    for key, tensor in hf_sd.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":
            hf_lm_head = tensor
            continue
        name = key[len("transformer.") :] if key.startswith("transformer.") else key
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        sd["transformer." + name] = tensor
        origin["transformer." + name] = key
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise GPT2LabError(f"missing weight {missing[0]}{where} ({len(missing)} missing in all)")
    if unexpected:
        raise GPT2LabError(f"unexpected weight {origin[unexpected[0]]}{where} ({len(unexpected)} in all)")
    wte = sd["transformer.wte.weight"]
    for k, shape in expected.items():
        got = tuple(sd[k].shape)
        want = (config.vocab_size, config.n_embd) if k == "transformer.wte.weight" else shape
        if k.endswith(CONV1D_SUFFIXES):
            got, want = got[::-1], want[::-1]  # report in the file's own (in, out) layout
        if got != want:
            raise GPT2LabError(
                f"weight {origin[k]}{where} has shape {list(got)}, expected {list(want)} for this config"
            )
    if hf_lm_head is not None and hf_lm_head.shape != wte.shape:
        raise GPT2LabError(f"lm_head.weight{where} has shape {list(hf_lm_head.shape)}, expected {list(wte.shape)}")
    pad = config.padded_vocab_size - config.vocab_size
    if pad:
        sd["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(pad, config.n_embd)])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """gpt2lab weights under Hugging Face's names and layouts; padding rows cut, lm_head left tied."""
    out: dict[str, torch.Tensor] = {}
    V = model.config.vocab_size
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k == "transformer.wte.weight":
            v = v[:V]
        if k.endswith(CONV1D_SUFFIXES):
            v = v.t()
        out[k] = v.detach().to("cpu").contiguous()
    return out


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """gpt2lab parameter name -> shape, for the unpadded vocabulary; lm_head is tied and not listed."""
    with torch.device("meta"):
        model = GPT(config.replace(pad_vocab_multiple=1))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


# ----------------------------------------------------------------------------- files


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GPT2LabError(
            f"cannot read {path}: {first} (the file is corrupt, truncated, or not a plain weights file)"
        ) from None
    if not isinstance(sd, dict):
        raise GPT2LabError(f"{path} does not hold a state dict")
    return sd


def _load_sharded(folder: Path, index_name: str, loader) -> dict[str, torch.Tensor]:
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GPT2LabError(f"cannot read the shard index {index_path}: {e}") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = folder / shard
        if not shard_path.is_file():
            raise GPT2LabError(f"{index_path} lists shard {shard}, which is not in {folder}")
        sd.update(loader(shard_path))
    return sd


def read_hf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored in a Hugging Face model directory (or a single weights file):
    `model.safetensors`, sharded safetensors with a `model.safetensors.index.json`, or `pytorch_model.bin`
    (sharded or not; read with `torch.load(weights_only=True)`, never unpickled)."""
    path = Path(path)
    if path.is_file():
        return _load_bin(path) if path.suffix in (".bin", ".pt", ".pth") else load_safetensors(path)
    if (path / "model.safetensors").is_file():
        return load_safetensors(path / "model.safetensors")
    if (path / SAFE_INDEX).is_file():
        return _load_sharded(path, SAFE_INDEX, load_safetensors)
    if (path / "pytorch_model.bin").is_file():
        return _load_bin(path / "pytorch_model.bin")
    if (path / BIN_INDEX).is_file():
        return _load_sharded(path, BIN_INDEX, _load_bin)
    raise GPT2LabError(
        f"no weights in {path}: expected model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX}"
    )


def read_hf_config(folder: Path) -> GPTConfig:
    cfg_path = folder / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise GPT2LabError(f"no config.json in {folder}: a Hugging Face GPT-2 directory needs one") from None
    except (OSError, ValueError) as e:
        raise GPT2LabError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(raw, dict):
        raise GPT2LabError(f"{cfg_path} is not a JSON object")
    return config_from_hf(raw, str(cfg_path))


# ----------------------------------------------------------------------------- the Hub


def hub_repo_id(name: str) -> str | None:
    """The Hub repository for a model name, or None when `name` does not look like one."""
    if name in HUB_NAMES:
        return HUB_NAMES[name]
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    return None


def download(name: str) -> Path:
    """A local snapshot of a Hub model (config + weights), from huggingface_hub's cache when present."""
    repo_id = hub_repo_id(name)
    if repo_id is None:
        raise GPT2LabError(
            f"unknown model {name!r}: not a local path, not one of {', '.join(HUB_NAMES)}, and not a "
            "Hub id like 'user/model'; pass a local directory holding config.json and model.safetensors"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    # 'runs/foo' may be a Hub id or a mistyped local path: say both.
    also = f" (and there is no local path {name!r})" if "/" in name else ""

    def fetch(patterns: list[str]) -> Path:
        try:  # the cache first, so a model downloaded once works offline
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))

    try:
        folder = fetch(["config.json", "*.safetensors", SAFE_INDEX])
        if not any(folder.glob("*.safetensors")):
            folder = fetch(["config.json", "pytorch_model*.bin", BIN_INDEX])
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError):
        raise GPT2LabError(
            f"model {name!r} ({repo_id}) was not found on the Hugging Face Hub (or needs a login){also}; "
            "check the name, or pass a local directory holding config.json and model.safetensors"
        ) from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GPT2LabError(
            f"could not download model {name!r} ({repo_id}) from the Hugging Face Hub ({reason}){also}; "
            "connect to the internet once to cache it, or pass a local directory holding "
            "config.json and model.safetensors"
        ) from None
    return folder


# ----------------------------------------------------------------------------- public entry points


def from_hf(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    pad_vocab_multiple: int = 1,
) -> GPT:
    """A gpt2lab GPT holding a Hugging Face GPT-2's weights (Hub name, directory or weights file)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        source = str(path)
    else:
        folder = download(str(name_or_path))
        source = str(name_or_path)
        path = folder
    config = read_hf_config(folder).replace(pad_vocab_multiple=pad_vocab_multiple)
    sd = state_dict_from_hf(read_hf_weights(path), config, source)
    model = GPT.from_state_dict(config, sd, device=device, dtype=dtype)
    model.eval()
    return model


def export_hf(model: GPT, out_dir: str | os.PathLike, tokenizer: Tokenizer, overwrite: bool = False) -> Path:
    """Write a Hugging Face GPT-2 directory: config.json, model.safetensors, tokenizer files."""
    out = Path(out_dir)
    if model.config.vocab_size != tokenizer.n_vocab:
        raise GPT2LabError(
            f"the model's vocabulary ({model.config.vocab_size}) does not match the tokenizer's "
            f"({tokenizer.n_vocab}); export needs the tokenizer the model was trained with"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GPT2LabError(f"{out} already exists and is not empty; choose a new --out or pass --overwrite")
    with atomic_dir(out, overwrite=True) as tmp:
        atomic_write_json(tmp / "config.json", config_to_hf(model.config, tokenizer.eot_token))
        atomic_write_json(
            tmp / "generation_config.json",
            {"bos_token_id": tokenizer.eot_token, "eos_token_id": tokenizer.eot_token},
        )
        atomic_save_safetensors(tmp / "model.safetensors", state_dict_to_hf(model), metadata={"format": "pt"})
        for name, data in hf_tokenizer_files(tokenizer, model.config.block_size).items():
            atomic_write_bytes(tmp / name, data)
    return out


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, bytes]:
    """The files `AutoTokenizer.from_pretrained` reads: GPT-2's vocab.json + merges.txt, or for a trained
    tokenizer the `tokenizers` JSON written when it was trained; plus the tokenizer configs. A chat
    tokenizer's four tokens are added special tokens, and its template is the `chat_template`."""
    from .tokenizer import EOT_TEXT, HF_FILE, gpt2_data_dir

    template = template_of(tokenizer)
    tokenizer = tokenizer.base
    special: dict[str, Any] = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {"model_max_length": model_max_length, **special, "add_prefix_space": False, "add_bos_token": False}
    files: dict[str, bytes] = {}
    if tokenizer.path is None:
        if tokenizer.name != "gpt2":
            raise GPT2LabError(f"exporting tokenizer {tokenizer.name!r} to Hugging Face is not supported")
        folder = gpt2_data_dir()
        files["vocab.json"] = (folder / "encoder.json").read_bytes()
        files["merges.txt"] = (folder / "vocab.bpe").read_bytes()
        config.update(tokenizer_class="GPT2Tokenizer", errors="replace")
    else:
        hf_json = tokenizer.path / HF_FILE
        if not hf_json.is_file():
            raise GPT2LabError(f"{tokenizer.path} has no {HF_FILE}; the tokenizer cannot be exported to Hugging Face")
        files[HF_FILE] = hf_json.read_bytes()
        config.update(tokenizer_class="PreTrainedTokenizerFast")
    if template is not None:
        added = [{"id": i, "content": text, **ADDED_TOKEN_FLAGS} for text, i in template.token_ids.items()]
        if HF_FILE in files:  # the fast tokenizer reads its added tokens from tokenizer.json itself
            hf = json.loads(files[HF_FILE])
            hf["added_tokens"] = [t for t in hf.get("added_tokens") or [] if t["id"] < template.first_id] + added
            files[HF_FILE] = (json.dumps(hf, ensure_ascii=False, indent=2) + "\n").encode()
        else:
            files["added_tokens.json"] = (json.dumps(template.token_ids, indent=2) + "\n").encode()
        special["additional_special_tokens"] = list(template.token_ids)
        config.update(
            additional_special_tokens=list(template.token_ids),
            added_tokens_decoder={str(t.pop("id")): t for t in added},
            chat_template=template.hf_chat_template(),
        )
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    files["special_tokens_map.json"] = (json.dumps(special, indent=2) + "\n").encode()
    return files


def with_hf_chat_tokens(folder: str | os.PathLike, base: Tokenizer) -> Tokenizer:
    """`base` with the chat tokens, when the Hugging Face directory `folder` has them as added tokens
    (as `export_hf` writes a chat model); else `base` unchanged."""
    path = Path(folder) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        added = {t["content"]: int(i) for i, t in (config.get("added_tokens_decoder") or {}).items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return base
    template = ChatTemplate.for_tokenizer(base)
    if all(added.get(text) == i for text, i in template.token_ids.items()):
        return template.tokenizer(base)
    return base
