"""The token shard format, the manifest beside the shards, and reading a split as one token sequence.

A shard is llm.c's `.bin` file, so shards made by llm.c or modded-nanogpt's cached FineWeb train here
unchanged, and ours train there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import GPT2LabError
from ..fileio import atomic_open, file_sha256

# llm.c's layout (dev/data/data_common.py, `write_datafile`), so a valid shard is exactly 1024 + 2 N bytes:
#   bytes [0, 1024)     header: 256 little-endian int32; [0] = MAGIC, [1] = VERSION, [2] = N tokens, then 0s
#   bytes [1024, ...)   N tokens, little-endian uint16
MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
# The header stores the count as an int32.
MAX_SHARD_TOKENS = 2**31 - 1
# A loss mask file (chat data) beside each shard X.bin, named X.mask: the same 1024-byte header with
# MASK_MAGIC, then N uint8 values, 1 where token i is a target the loss learns (predicting it from < i).
MASK_MAGIC = 20241207
MASK_DTYPE = np.dtype("u1")
MASK_SUFFIX = ".mask"
# kind -> (magic, bytes per value, what the file is called in errors)
_KINDS = {"shard": (MAGIC, TOKEN_DTYPE.itemsize, "token shard"), "mask": (MASK_MAGIC, 1, "loss mask file")}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gpt2lab-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def make_header(num_tokens: int, magic: int = MAGIC) -> bytes:
    """The 1024-byte llm.c header for a shard of `num_tokens` tokens (or a mask file, magic=MASK_MAGIC)."""
    if not 0 <= num_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds 0 to {MAX_SHARD_TOKENS} tokens, not {num_tokens}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = magic, VERSION, num_tokens
    return header.tobytes()


REBUILD_HINT = "prepare the data again"


def parse_header(
    header: bytes, path: str | os.PathLike, file_size: int, hint: str = REBUILD_HINT, kind: str = "shard"
) -> int:
    """Number of values in the file at `path`, after checking its header against the file size.

    `kind` is "shard" (uint16 tokens, MAGIC) or "mask" (uint8 loss mask, MASK_MAGIC). Raises
    GPT2LabError naming the file, ending with `hint` (what the user should do about it).
    """
    magic_want, itemsize, what = _KINDS[kind]
    if len(header) < HEADER_BYTES:
        raise GPT2LabError(
            f"{path}: truncated {kind} ({file_size} bytes, shorter than the {HEADER_BYTES}-byte header); {hint}"
        )
    magic, version, num_tokens = np.frombuffer(header, dtype="<i4", count=3).tolist()
    if magic != magic_want:
        where = "'gpt2lab prepare' or llm.c" if kind == "shard" else "'gpt2lab prepare' from chat data"
        raise GPT2LabError(
            f"{path}: not a {what} (magic number {magic}, expected {magic_want}); point at a directory made by {where}"
        )
    if version != VERSION:
        note = " (uint32 tokens, llm.c's Llama 3 format)" if version == 2 and kind == "shard" else ""
        raise GPT2LabError(f"{path}: {kind} version {version}{note} is not supported; gpt2lab reads version {VERSION}")
    expected = HEADER_BYTES + num_tokens * itemsize
    if num_tokens < 0 or file_size != expected:
        state = "truncated" if file_size < expected else "has trailing bytes"
        unit = "tokens" if kind == "shard" else "mask values"
        raise GPT2LabError(
            f"{path}: {state}: the header says {num_tokens} {unit} ({expected} bytes) but the file has "
            f"{file_size} bytes; {hint}"
        )
    return num_tokens


def read_header(path: str | os.PathLike, hint: str = REBUILD_HINT, kind: str = "shard") -> int:
    """Validate the shard (or, with kind="mask", the mask file) at `path` and return its length."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise GPT2LabError(f"cannot read {kind} {path}: {e.strerror or e}") from None
    return parse_header(header, path, size, hint, kind)


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a validated shard as a read-only uint16 memmap, shape (N,)."""
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a validated shard, copied into memory: uint16, shape (N,)."""
    return np.array(open_shard(path))


def mask_name(shard_file: str) -> str:
    """The mask file's name beside shard `shard_file`: X.bin -> X.mask."""
    return str(Path(shard_file).with_suffix(MASK_SUFFIX))


def open_mask(path: str | os.PathLike, hint: str = REBUILD_HINT) -> np.ndarray:
    """The loss mask of a validated mask file as a read-only uint8 memmap, shape (N,), values 0 or 1."""
    n = read_header(path, hint, kind="mask")
    if n == 0:
        return np.zeros(0, dtype=MASK_DTYPE)
    return np.memmap(path, dtype=MASK_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))


@dataclass(frozen=True)
class ShardInfo:
    """A shard as the manifest lists it."""

    file: str
    split: str
    tokens: int
    sha256: str
    # Chat data: the loss mask file beside the shard, its sha256, and how many of its values are 1.
    mask: str | None = None
    mask_sha256: str | None = None
    learned_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "split": self.split, "tokens": self.tokens, "sha256": self.sha256}
        if self.mask is not None:
            out.update(mask=self.mask, mask_sha256=self.mask_sha256, learned_tokens=self.learned_tokens)
        return out


class ShardWriter:
    """Stream tokens into a new shard; the file appears under its name only once `close()` succeeds.

    Tokens are written as they arrive (memory does not grow with the shard), the header is written
    last, and the file goes through `fileio.atomic_open` (temp name, fsync, rename). Use as a context
    manager: leaving it with an exception discards the partial file.
    """

    magic, dtype = MAGIC, TOKEN_DTYPE

    def __init__(self, path: str | os.PathLike, split: str) -> None:
        self.path = Path(path)
        self.split = split
        self.tokens = 0
        self._ctx = atomic_open(self.path, "wb")
        self._file: BinaryIO = self._ctx.__enter__()
        self._file.write(make_header(0, self.magic))

    def write(self, tokens: np.ndarray) -> None:
        """Append `tokens` (shape (n,), any integer dtype with values < 65536)."""
        if self.tokens + len(tokens) > MAX_SHARD_TOKENS:
            raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens")
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.tokens += len(tokens)

    def _finish(self) -> str:
        """Write the final header, fsync and rename into place; the file's sha256."""
        self._file.seek(0)
        self._file.write(make_header(self.tokens, self.magic))
        self._ctx.__exit__(None, None, None)
        return file_sha256(self.path)

    def close(self) -> ShardInfo:
        """Finish the header, fsync, rename into place; returns the shard's manifest entry."""
        return ShardInfo(self.path.name, self.split, self.tokens, self._finish())

    def discard(self) -> None:
        """Abandon the shard: the temp file is removed and nothing appears under `path`."""
        self._ctx.__exit__(_Discarded, _Discarded(), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._ctx.__exit__(exc_type, exc, tb)


class _Discarded(Exception):
    """Signals atomic_open to throw its temp file away."""


class MaskWriter(ShardWriter):
    """Stream a loss mask (values 0/1) into a new mask file, atomically as ShardWriter does."""

    magic, dtype = MASK_MAGIC, MASK_DTYPE

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path, split="")

    def write(self, tokens: np.ndarray) -> None:
        """Append mask values (shape (n,), each 0 or 1)."""
        if len(tokens) and not 0 <= int(np.min(tokens)) <= int(np.max(tokens)) <= 1:
            raise ValueError("a loss mask holds only 0 and 1")
        super().write(tokens)

    def close(self) -> tuple[str, str]:  # type: ignore[override]
        """Finish the file; returns (its name, its sha256) for the shard's manifest entry."""
        return self.path.name, self._finish()


def write_shard(path: str | os.PathLike, tokens: np.ndarray, split: str = "train") -> ShardInfo:
    """Write `tokens` (shape (N,)) as one shard at `path`, atomically; returns its manifest entry."""
    with ShardWriter(path, split) as writer:
        writer.write(tokens)
        return writer.close()


def write_mask(path: str | os.PathLike, mask: np.ndarray | Sequence[int]) -> tuple[str, str]:
    """Write a loss mask (shape (N,), values 0 or 1) as one mask file at `path`, atomically.

    Returns (file name, sha256): the shard entry's "mask" and "mask_sha256".
    """
    with MaskWriter(path) as writer:
        writer.write(np.asarray(mask))
        return writer.close()


# ---------------------------------------------------------------------------------------------------
# The manifest and the splits


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `manifest.json` of a prepared directory.

    Keys used by training and evaluation: `tokenizer` ({"name", "vocab_hash"}), `shards` (a list of
    {"file", "split", "tokens", "sha256"} in stream order), `splits` ({"train": {"tokens", "shards"},
    "val": {...}}). docs/formats.md describes every field.
    """
    path = Path(data_dir) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GPT2LabError(f"{path} not found: prepare the data first with 'gpt2lab prepare'") from None
    except OSError as e:
        raise GPT2LabError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise GPT2LabError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise GPT2LabError(f"{path} is not a gpt2lab shard manifest; prepare the data again")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise GPT2LabError(
            f"{path} has manifest version {manifest.get('format_version')}; this gpt2lab reads version "
            f"{MANIFEST_VERSION}: prepare the data again"
        )
    return manifest


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, where: str | os.PathLike = "the data") -> None:
    """Raise GPT2LabError unless `manifest` was made with `tokenizer` (same name and vocab hash)."""
    made = manifest.get("tokenizer") or {}
    if made.get("vocab_hash") != tokenizer.vocab_hash:
        raise GPT2LabError(
            f"{where} was tokenized with {made.get('name')!r} (vocab hash {str(made.get('vocab_hash'))[:12]}…) "
            f"but this run uses {tokenizer.name!r} (vocab hash {tokenizer.vocab_hash[:12]}…); "
            "prepare the data again with this tokenizer"
        )


TOKENIZER_SUBDIR = "tokenizer"


def data_tokenizer(data_dir: str | os.PathLike) -> Any:
    """The tokenizer a prepared directory was made with: the trained tokenizer `prepare --tokenizer`
    copied into `DATA/tokenizer/`, or GPT-2's (checked against the manifest's vocab hash), with the chat
    tokens when the manifest records a chat template."""
    from ..chat import chat_tokenizer
    from ..tokenizer import tokenizer_from_record

    manifest = read_manifest(data_dir)
    base = tokenizer_from_record(manifest.get("tokenizer"), Path(data_dir) / TOKENIZER_SUBDIR, f"{data_dir}")
    return chat_tokenizer(manifest.get("chat_template"), base, f"{data_dir}")


def split_shard_paths(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shard files of `split` in stream order: from manifest.json, else llm.c's `*_{split}_*.bin` names."""
    if split not in SPLITS:
        raise GPT2LabError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise GPT2LabError(f"data directory {root} not found: prepare the data first with 'gpt2lab prepare'")
    if (root / MANIFEST_NAME).exists():
        manifest = read_manifest(root)
        paths = [root / s["file"] for s in manifest["shards"] if s["split"] == split]
        for path in paths:
            if not path.is_file():
                raise GPT2LabError(f"{path} is listed in {root / MANIFEST_NAME} but missing; prepare the data again")
    else:
        paths = sorted(root.glob(f"*_{split}_*.bin"))
    if not paths:
        raise GPT2LabError(f"{root} has no '{split}' shards; prepare the data with 'gpt2lab prepare'")
    return paths


class TokenSequence:
    """Shards read as one flat token sequence without copying: `len()`, slicing, `read(start, n)`.

    `seq[a:b]` returns a new array of `dtype` (uint16 tokens; uint8 for loss masks), shape (b - a,),
    that may span shard boundaries. Steps other than 1 are not supported.
    """

    def __init__(
        self, shards: Sequence[np.ndarray], names: Sequence[str] | None = None, dtype: np.dtype | str = TOKEN_DTYPE
    ) -> None:
        self.shards = list(shards)
        self.names = list(names) if names is not None else [f"shard {i}" for i in range(len(self.shards))]
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.shards], dtype=np.int64)])
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Values [start, start + n), of `self.dtype`, shape (n,)."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) out of range for a sequence of {len(self)}")
        out = np.empty(n, dtype=self.dtype)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        done = 0
        while done < n:
            local = start + done - int(self.offsets[i])
            take = min(n - done, len(self.shards[i]) - local)
            out[done : done + take] = self.shards[i][local : local + take]
            done += take
            i += 1
        return out

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("TokenSequence supports slices only, e.g. seq[a:b]")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("TokenSequence slices must have step 1")
        return self.read(start, max(0, stop - start))

    def permuted(self, order: Sequence[int]) -> TokenSequence:
        """The same shards concatenated in `order` (used to shuffle shard order per epoch)."""
        return TokenSequence([self.shards[i] for i in order], [self.names[i] for i in order], self.dtype)


def open_split_tokens(data_dir: str | os.PathLike, split: str, tokenizer: Any = None) -> TokenSequence:
    """The `split` ("train" or "val") of a prepared directory as one flat `TokenSequence` of memmaps.

    Every shard's header and size are validated, and with a manifest its token count is checked too;
    with `tokenizer` given, the manifest's tokenizer must match it. Evaluation reads the val split this
    way so that it sees the same tokens whatever the number of ranks.
    """
    root = Path(data_dir)
    paths = split_shard_paths(root, split)
    expected: dict[str, int] = {}
    if (root / MANIFEST_NAME).exists():
        manifest = read_manifest(root)
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer, root / MANIFEST_NAME)
        expected = {s["file"]: int(s["tokens"]) for s in manifest["shards"]}
    shards = []
    for path in paths:
        tokens = open_shard(path)
        if path.name in expected and expected[path.name] != len(tokens):
            raise GPT2LabError(
                f"{path} holds {len(tokens)} tokens but {root / MANIFEST_NAME} lists {expected[path.name]}; "
                "prepare the data again"
            )
        shards.append(tokens)
    return TokenSequence(shards, [p.name for p in paths])


def no_masks_error(data_dir: str | os.PathLike) -> GPT2LabError:
    return GPT2LabError(
        f"{data_dir} has no loss masks: it was not prepared from chat data "
        "(prepare it from records with a 'messages' field)"
    )


def open_split_masks(data_dir: str | os.PathLike, split: str) -> TokenSequence:
    """The loss masks of `split` in a chat data directory, one uint8 `TokenSequence` (0/1 values)
    aligned with `open_split_tokens(data_dir, split)`: value i says whether token i is a target.

    Raises GPT2LabError for data that was not prepared from chat data, and for a mask file that is
    missing, damaged, or not as long as its shard.
    """
    root = Path(data_dir)
    paths = split_shard_paths(root, split)
    if not (root / MANIFEST_NAME).exists():
        raise no_masks_error(root)
    manifest = read_manifest(root)
    entries = [s for s in manifest["shards"] if s["split"] == split]
    if not manifest.get("chat_template") or any("mask" not in s for s in entries):
        raise no_masks_error(root)
    masks = []
    for path, entry in zip(paths, entries, strict=True):
        mask_path = root / entry["mask"]
        if not mask_path.is_file():
            raise GPT2LabError(f"{mask_path} is listed in {root / MANIFEST_NAME} but missing; {REBUILD_HINT}")
        mask = open_mask(mask_path)
        if len(mask) != int(entry["tokens"]):
            raise GPT2LabError(
                f"{mask_path} holds {len(mask)} mask values but its shard {path.name} has {entry['tokens']} "
                f"tokens; {REBUILD_HINT}"
            )
        masks.append(mask)
    return TokenSequence(masks, [s["mask"] for s in entries], MASK_DTYPE)
