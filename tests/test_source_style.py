"""Habits of the sources that review alone lets drift (issue 22), read from the files with `re` and
`ast` (nothing is imported). Each test lists every offending file:line, so one run shows all of them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "src" / "gpt2lab"
TEXT_SUFFIXES = (".py", ".js", ".html", ".css")

# A machine note dates as soon as the machine changes: numbers belong in docs/performance.md or
# docs/cpu.md, with the command that measured them, and the code points there.
CPU_MODELS = re.compile(
    r"\b(?:EPYC|Xeon|Opteron|Threadripper|Ryzen|Athlon|Pentium|Celeron|Graviton\d*|Neoverse|Snapdragon"
    r"|Core ?i[3579]|Core Ultra|Ampere Altra|Apple M\d|M\d (?:Pro|Max|Ultra)|Zen ?\d"
    r"|(?:Sapphire|Emerald|Granite) Rapids|(?:Ice|Cascade|Cooper|Alder|Raptor|Meteor) Lake|Skylake)\b"
)
MACHINE = re.compile(r"\b\d+-(?:core|vCPU)\b|\bVMs?\b")
MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
DATES = re.compile(
    r"\b(?:19|20)\d\d[-/](?:0[1-9]|1[0-2])[-/](?:0[1-9]|[12]\d|3[01])\b"  # 2024-05-20
    rf"|\b{MONTH} (?:\d{{1,2}},? )?(?:19|20)\d\d\b"  # May 2024, May 20, 2024
    rf"|\b\d{{1,2}} {MONTH} (?:19|20)\d\d\b"  # 20 May 2024
)
# A speed measured on one machine, told as a ratio: "2.5x faster", "15% slower", "twice as fast".
RATIOS = re.compile(
    r"\b\d+(?:\.\d+)?(?: ?[-–] ?\d+(?:\.\d+)?)? ?(?:x|×|%| times) "
    r"(?:faster|slower|quicker|as fast|as slow|the speed|the throughput|more tokens|fewer tokens)\b"
    r"|\b(?:twice|three times|four times|half) as (?:fast|slow|quick)\b",
    re.IGNORECASE,
)
DATED_NOTES = {"CPU model": CPU_MODELS, "machine": MACHINE, "date": DATES, "measured ratio": RATIOS}

MAX_FUNCTION_LINES = 80

# GPT-2's names for the insides of a block and the final norm (model.py). Only the model and the
# bridges that map those names to other formats may use them; everything else goes through the
# model's own methods, so the model can change its insides without breaking a caller.
BLOCK_INSIDES = {"c_attn", "c_fc", "c_proj", "ln_1", "ln_2", "ln_f", "mlp"}
BRIDGES = {
    "model.py",  # the model itself
    "hf.py",  # Hugging Face checkpoints in and out
    "gguf.py",  # a GGUF exporter, once there is one
}
# The same names inside a parameter name: "transformer.h.0.ln_1.weight", "transformer.h.", "mlp".
PARAM_NAME = re.compile(r"(?:^|\.)(?:" + "|".join(sorted(BLOCK_INSIDES)) + r")(?:\.|$)|(?:^|\.)h\.(?:\d|$)")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def text_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*") if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts)


def python_files() -> list[Path]:
    return [p for p in text_files() if p.suffix == ".py"]


def report(what: str, offenders: list[str]) -> str:
    return f"{len(offenders)} {what}:\n" + "\n".join(offenders)


def test_no_dated_machine_notes():
    """No CPU model, machine, date or measured speed ratio in the package's files: one sentence of reason,
    and where numbers matter, a pointer to the docs section that holds them."""
    offenders = []
    for path in text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for kind, pattern in DATED_NOTES.items():
                m = pattern.search(line)
                if m:
                    offenders.append(f"{rel(path)}:{n}: {kind} {m.group(0)!r}: {line.strip()}")
    assert not offenders, report("lines with a dated machine note", offenders)


def test_the_patterns_catch_what_they_mean():
    for note in (
        "about 2.5x faster than MKL on a 2-core AMD EPYC",
        "but 15% slower on an Intel Xeon",
        "measured on 2026-12-02",
        "as of December 2026",
        "twice as fast as exp",
        "on an Apple M2",
        "on a Core i7",
    ):
        assert any(p.search(note) for p in DATED_NOTES.values()), note
    for fine in (
        "a 4x MLP with tanh-approximated GELU",
        "MAGIC = 20240520",
        "10% for a small one",
        "x = stream[o + kT : o + kT + T]",
        "oneDNN's packed layout, chosen where it pays on this machine (docs/cpu.md)",
    ):
        assert not any(p.search(fine) for p in DATED_NOTES.values()), fine


def test_functions_fit_on_a_screen():
    """No function (docstring included) runs over MAX_FUNCTION_LINES lines: split it into named pieces."""
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{rel(path)}:{node.lineno}: {node.name} is {length} lines")
    assert not offenders, report(f"functions over {MAX_FUNCTION_LINES} lines", offenders)


def docstring_nodes(tree: ast.Module) -> set[int]:
    """id() of every docstring constant in `tree`: prose, not a use of a name."""
    found = set()
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def block_inside_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each read of a block's insides: `x.ln_f`, `x.h[i]`, or such a name in a string."""
    tree = ast.parse(source)
    docstrings = docstring_nodes(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in BLOCK_INSIDES:
            uses.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "h":
            uses.append((node.lineno, ".h[...]"))
        elif isinstance(node, ast.Constant) and id(node) not in docstrings and PARAM_NAME.search(str(node.value)):
            uses.append((node.lineno, repr(node.value)))
    return sorted(uses)


def test_only_the_model_and_its_bridges_read_a_blocks_insides():
    offenders = []
    for path in python_files():
        if path.relative_to(PACKAGE).as_posix() in BRIDGES:
            continue
        for line, what in block_inside_uses(path.read_text(encoding="utf-8")):
            offenders.append(f"{rel(path)}:{line}: {what}")
    assert not offenders, report("reads of a block's insides outside model.py and the bridges", offenders)


def test_block_inside_uses_finds_attributes_subscripts_and_names():
    source = '''"""Docstrings may name ln_f and mlp.c_fc freely."""
x = model.transformer.ln_f(h)
y = model.transformer.h[0]
keys = ["transformer.h.0.ln_1.weight", "transformer.h.", "lm_head.weight"]
for block in model.transformer.h:
    pass
'''
    assert block_inside_uses(source) == [
        (2, ".ln_f"),
        (3, ".h[...]"),
        (4, "'transformer.h.'"),
        (4, "'transformer.h.0.ln_1.weight'"),
    ]
