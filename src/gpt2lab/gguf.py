"""The bridge to llama.cpp: a gpt2lab model as a GGUF file of llama.cpp's `gpt2` architecture, and back.

The file holds what llama.cpp's own converter writes for a Hugging Face GPT-2 (convert_hf_to_gguf.py,
GPT2Model): the hyperparameters under `gpt2.*`, the byte-level BPE as `tokenizer.ggml.*` (tokens in
GPT-2's printable byte alphabet, the merges, the pre-tokenizer's name), and the weights under the
names of llama.cpp's llama-arch tensor table. Weights are nn.Linear's (out, in), as llama.cpp wants
them; the tied head is not written, since llama.cpp reuses `token_embd` when `output` is absent.
Needs the `gguf` package (`pip install 'gpt2lab[gguf]'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import GPTConfig
from .errors import GPT2LabError
from .fileio import atomic_path
from .model import GPT
from .tokenizer import GPT2_PATTERN, Tokenizer, gpt2_byte_to_unicode

if TYPE_CHECKING:
    import gguf as gguf_lib

TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp splits text before BPE with a named pre-tokenizer (llama-vocab.cpp); a name is only right
# when it splits exactly as the tokenizer's own pattern does. GPT-2's regex is its "gpt-2".
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2"}
ARCH = "gpt2"


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GPT2LabError("GGUF export needs the 'gguf' package: pip install 'gpt2lab[gguf]'") from None
    return gguf


# ----------------------------------------------------------------------------- names


def tensor_names(config: GPTConfig) -> dict[str, str]:
    """gpt2lab parameter name -> GGUF tensor name, lm_head left out (tied to the token embedding)."""
    gg = _gguf()
    T, N = gg.MODEL_TENSOR, gg.TENSOR_NAMES
    names = {
        "transformer.wte.weight": N[T.TOKEN_EMBD] + ".weight",
        "transformer.wpe.weight": N[T.POS_EMBD] + ".weight",
        "transformer.ln_f.weight": N[T.OUTPUT_NORM] + ".weight",
        "transformer.ln_f.bias": N[T.OUTPUT_NORM] + ".bias",
    }
    per_block = {
        "ln_1": T.ATTN_NORM,
        "attn.c_attn": T.ATTN_QKV,
        "attn.c_proj": T.ATTN_OUT,
        "ln_2": T.FFN_NORM,
        "mlp.c_fc": T.FFN_UP,
        "mlp.c_proj": T.FFN_DOWN,
    }
    for i in range(config.n_layer):
        for ours, theirs in per_block.items():
            for kind in ("weight", "bias"):
                names[f"transformer.h.{i}.{ours}.{kind}"] = N[theirs].format(bid=i) + "." + kind
    return names


# ----------------------------------------------------------------------------- the vocabulary


def pre_tokenizer(tokenizer: Tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for `tokenizer`'s split pattern; a GPT2LabError when it has none."""
    pattern = tokenizer.encoding._pat_str
    if pattern not in PRE_TOKENIZERS:
        raise GPT2LabError(
            f"tokenizer {tokenizer.name!r} splits text with a pattern llama.cpp has no pre-tokenizer for "
            "(GGUF export supports GPT-2's split rules only); train the tokenizer with --pattern gpt2"
        )
    return PRE_TOKENIZERS[pattern]


def _bpe_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """Replay tiktoken's BPE on `token` with only the merges ranked under `below`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's `gpt2` tokenizer reads them: every id's text in
    GPT-2's byte alphabet, special tokens as control tokens, and merge k as the pair that makes the
    token ranked k (found by replaying BPE below its rank, so trained tokenizers need no merges file)."""
    gg = _gguf()
    ranks: dict[bytes, int] = tokenizer.encoding._mergeable_ranks
    alphabet = gpt2_byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    tokens: list[str | None] = [None] * tokenizer.n_vocab
    types = [int(gg.TokenType.NORMAL)] * tokenizer.n_vocab
    for token, rank in ranks.items():
        tokens[rank] = text(token)
    for special, rank in tokenizer.special_tokens.items():
        tokens[rank] = special
        types[rank] = int(gg.TokenType.CONTROL)
    if None in tokens:
        raise GPT2LabError(f"tokenizer {tokenizer.name!r} has no token with id {tokens.index(None)}; cannot export it")
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise GPT2LabError(f"tokenizer {tokenizer.name!r}: token {rank} is not made by one merge; cannot export it")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    return tokens, types, merges  # type: ignore[return-value]


# ----------------------------------------------------------------------------- weights


def _encode(gg: Any, array: np.ndarray, wanted: str) -> tuple[np.ndarray, Any]:
    """`array` (float32) in the wanted type; vectors, and the position table, stay float32 as in
    llama.cpp's converter; q8_0 falls back to f16 for rows that are not whole 32-value blocks."""
    Q = gg.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[wanted]
    if array.ndim < 2 or qtype == Q.F32:
        return array, Q.F32
    if qtype == Q.Q8_0 and array.shape[-1] % 32:
        qtype = Q.F16
    return gg.quants.quantize(array, qtype), qtype


def file_type(gg: Any, wanted: str) -> int:
    F = gg.LlamaFileType
    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[wanted])


def _write_metadata(w: gguf_lib.GGUFWriter, config: GPTConfig, tokenizer: Tokenizer, name: str, wanted: str) -> None:
    gg = _gguf()
    w.add_name(name)
    w.add_description(f"GPT-2 exported by gpt2lab ({wanted}); tokenizer {tokenizer.name}")
    w.add_context_length(config.block_size)
    w.add_embedding_length(config.n_embd)
    w.add_feed_forward_length(4 * config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_head_count(config.n_head)
    w.add_layer_norm_eps(config.layer_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(file_type(gg, wanted))
    if wanted == "q8_0":
        w.add_quantization_version(gg.GGML_QUANT_VERSION)
    tokens, types, merges = vocabulary(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.eot_token)
    w.add_eos_token_id(tokenizer.eot_token)
    w.add_add_bos_token(False)  # GPT-2 prepends nothing; gpt2lab's own prompts start with the text
    w.add_string("gpt2lab.tokenizer.vocab_hash", tokenizer.vocab_hash)
    # The padding the model had (its rows are not written): read_gguf restores it, so the rebuilt output
    # layer has the original's shape and the same kernels compute the same bits.
    w.add_uint32("gpt2lab.pad_vocab_multiple", config.pad_vocab_multiple)


def check_destination(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an --out that is a directory, or an existing file unless `overwrite`."""
    out = Path(out)
    if out.is_dir():
        raise GPT2LabError(f"{out} is a directory; --out names the .gguf file to write")
    if out.exists() and not overwrite:
        raise GPT2LabError(f"{out} already exists; choose a new --out or pass --overwrite")


def export_gguf(
    model: GPT,
    out: str | os.PathLike,
    tokenizer: Tokenizer,
    weight_type: str = "f32",
    name: str = "gpt2lab",
    overwrite: bool = False,
) -> Path:
    """Write `model` and `tokenizer` as one GGUF file llama.cpp loads (`weight_type`: f32, f16, bf16 or q8_0)."""
    gg = _gguf()
    out = Path(out)
    if weight_type not in TYPES:
        raise GPT2LabError(f"unknown GGUF type {weight_type!r}; choose one of {', '.join(TYPES)}")
    check_destination(out, overwrite)
    config = model.config
    if config.vocab_size != tokenizer.n_vocab:
        raise GPT2LabError(
            f"the model's vocabulary ({config.vocab_size}) does not match the tokenizer's ({tokenizer.n_vocab}); "
            "export needs the tokenizer the model was trained with"
        )
    pre_tokenizer(tokenizer)  # refuse before writing anything
    sd = model.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        w = gg.GGUFWriter(tmp, arch=ARCH)
        _write_metadata(w, config, tokenizer, name, weight_type)
        for ours, theirs in tensor_names(config).items():
            t = sd[ours].detach().to("cpu", torch.float32)
            if ours == "transformer.wte.weight":
                t = t[: config.vocab_size]  # padding rows are never used: llama.cpp sizes them from the tokens
            keep = "f32" if ours == "transformer.wpe.weight" else weight_type
            data, qtype = _encode(gg, t.contiguous().numpy(), keep)
            w.add_tensor(theirs, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


# ----------------------------------------------------------------------------- reading back


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise GPT2LabError(f"the GGUF file has no {key}")
    return field.contents()


def read_gguf(path: str | os.PathLike) -> GPT:
    """A gpt2lab GPT rebuilt from a GGUF file this module wrote (quantized tensors dequantized to float32)."""
    gg = _gguf()
    try:
        reader = gg.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise GPT2LabError(f"cannot read {path} as GGUF: {e}") from None
    if _field(reader, "general.architecture") != ARCH:
        raise GPT2LabError(f"{path} is not a GPT-2 GGUF file (architecture {_field(reader, 'general.architecture')!r})")
    pad = reader.get_field("gpt2lab.pad_vocab_multiple")
    eps = float(_field(reader, f"{ARCH}.attention.layer_norm_epsilon"))
    config = GPTConfig(
        n_layer=int(_field(reader, f"{ARCH}.block_count")),
        n_head=int(_field(reader, f"{ARCH}.attention.head_count")),
        n_embd=int(_field(reader, f"{ARCH}.embedding_length")),
        block_size=int(_field(reader, f"{ARCH}.context_length")),
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        layer_norm_eps=float(f"{eps:.7g}"),  # stored as float32: back to the decimal it was (1e-5)
        pad_vocab_multiple=1 if pad is None else int(pad.contents()),
    )
    ours = {theirs: name for name, theirs in tensor_names(config).items()}
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name not in ours:
            raise GPT2LabError(f"unexpected tensor {t.name} in {path}")
        values = gg.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        sd[ours[t.name]] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    missing = sorted(set(ours.values()) - set(sd))
    if missing:
        raise GPT2LabError(f"missing tensor for {missing[0]} in {path}")
    wte = sd["transformer.wte.weight"]  # (V, C): the padding rows, zero, come back
    sd["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(config.padded_vocab_size - len(wte), wte.size(1))])
    return GPT.from_state_dict(config, sd).eval()
