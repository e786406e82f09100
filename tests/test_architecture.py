"""The import direction of docs/architecture.md, read from the sources with `ast` (nothing is imported):
each module imports only from its own layer or the layers below, and the torch-free parts import no
torch, not even through another gpt2lab module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

SRC = REPO / "src"

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = {
    "foundation": (
        "gpt2lab._lazy",
        "gpt2lab._version",
        "gpt2lab.chat",
        "gpt2lab.download",
        "gpt2lab.errors",
        "gpt2lab.fileio",
        "gpt2lab.jsonl",
        "gpt2lab.openmp",
        "gpt2lab.runtime",
        "gpt2lab.tokenizer",
    ),
    "config": ("gpt2lab.config",),
    "model": ("gpt2lab.model",),
    "accel": ("gpt2lab.accel",),
    "model users": ("gpt2lab.checkpoint", "gpt2lab.distributed", "gpt2lab.generate", "gpt2lab.gguf", "gpt2lab.hf"),
    "data": ("gpt2lab.data", "gpt2lab.tokenizer_train"),
    "eval": ("gpt2lab.eval",),
    "serve": ("gpt2lab.serve",),
    "train": ("gpt2lab.train", "gpt2lab.metrics"),
    "commands": ("gpt2lab.commands", "gpt2lab.demo"),
    "cli": ("gpt2lab.cli", "gpt2lab.__main__"),
}
# data, eval, serve and train sit side by side: evaluation reads data, training reads data and evaluates.
PEERS = {"data", "eval", "serve", "train"}
PEER_IMPORTS = {("eval", "data"), ("train", "data"), ("train", "eval")}

# Started often and in many processes: they import no torch (docs/architecture.md).
TORCH_FREE = (
    "gpt2lab",
    "gpt2lab.chat",
    "gpt2lab.cli",
    "gpt2lab.config",
    "gpt2lab.data",
    "gpt2lab.data.encode",
    "gpt2lab.data.prepare",
    "gpt2lab.data.shards",
    "gpt2lab.data.sources",
    "gpt2lab.data.sources.base",
    "gpt2lab.data.sources.files",
    "gpt2lab.data.sources.hf",
    "gpt2lab.openmp",
    "gpt2lab.tokenizer",
    "gpt2lab.tokenizer_train",
    "gpt2lab.train.config",
)
HEAVY = ("torch", "transformers", "datasets", "matplotlib", "safetensors.torch")


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / "gpt2lab").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(imported at module level, imported anywhere) by module `name`, as dotted names; imports under
    `if TYPE_CHECKING:` do not run and are left out."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    anywhere: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            found: list[str] = []
            if isinstance(child, ast.Import):
                found = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*anchor, *([child.module] if child.module else [])])
                found = [base]
                # `from package import submodule` imports the submodule too.
                found += [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in MODULES]
            anywhere.update(found)
            if not nested:
                top.update(found)
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), nested=False)
    return top, anywhere


def layer_of(name: str) -> str | None:
    best, layer = "", None
    for candidate, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, layer = prefix, candidate
    return layer


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "gpt2lab" and layer_of(m) is None] == []


def test_imports_run_down_the_layers():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    wrong = []
    for name in MODULES:
        here = layer_of(name)
        if here is None:  # the package's lazy exports
            continue
        for imported in imports_of(name)[1]:
            there = layer_of(imported) if imported.startswith("gpt2lab.") else None
            if there is None or there == here:
                continue
            peers = here in PEERS and there in PEERS
            if rank[there] > rank[here] or (peers and (here, there) not in PEER_IMPORTS):
                wrong.append(f"{name} ({here}) imports {imported} ({there})")
    assert wrong == []


def test_the_model_file_is_plain_gpt2():
    """model.py imports torch and the config only, reads top to bottom in one sitting, and knows nothing
    of CPUs, kernels, packing, timing or measurements: those are applied from outside (gpt2lab.accel)."""
    _, imported = imports_of("gpt2lab.model")
    assert sorted(imported - {"__future__"}) == [
        "collections.abc",
        "copy",
        "gpt2lab.config",
        "torch",
        "torch.nn",
        "torch.nn.functional",
    ]
    text = MODULES["gpt2lab.model"].read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    words = ("oneDNN", "mkldnn", "MKL", "AVX", "CPU", "kernel", "pack", "tuning", "perf_counter", "time.", "accel")
    assert [w for w in words if w in text] == []
    classes = [n.name for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]
    assert classes == ["CausalSelfAttention", "MLP", "Block", "GPT", "KVCache"]


def loaded_by(name: str) -> set[str]:
    """Every module that importing `name` runs at import time: its module-level imports, their
    packages' __init__ files, and so on down."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # packages run their __init__ first
        if current in MODULES:
            todo += imports_of(current)[0]
    return seen


@pytest.mark.parametrize("name", [*TORCH_FREE, *(m for m in MODULES if m.startswith("gpt2lab.commands"))])
def test_torch_free_parts_load_no_torch_through_any_import(name):
    heavy = sorted(m for m in loaded_by(name) if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []


def test_the_check_sees_torch_where_it_is():
    assert "torch" in loaded_by("gpt2lab.checkpoint")  # checkpoint -> model -> torch
    assert "torch" in loaded_by("gpt2lab.train.loop")
    assert "gpt2lab.train.config" in loaded_by("gpt2lab.commands.train")
