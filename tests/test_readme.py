"""The README as a user meets it on a fresh clone (issue 22): short, opening with the two set-up
commands, every command one that `gpt2lab` (or make, or a file of the checkout) accepts, every Python
snippet run as written, offline, in a scratch directory, every command that needs the network saying
so beside it, and a file map that names exactly the files of src/gpt2lab. The docs pages are held to
their links, their commands and their Python's syntax.

A snippet that cannot run offline (a Hub model, a running server) says so on the line just above its
block; the test then only compiles it."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

README = REPO / "README.md"
DOCS = REPO / "docs"
PACKAGE = REPO / "src" / "gpt2lab"
MAX_LINES = 300
SETUP_COMMANDS = ["make demo", "make test"]

# Words that, in a command's own comment or on the line above its block, say it needs the network.
NETWORK_NOTE = re.compile(r"\b(hub|network)\b", re.IGNORECASE)
# ... and on the line above a Python block, that it is only compiled.
SKIP_NOTE = re.compile(r"needs (the hub|the network|a running server)", re.IGNORECASE)
# Paths in commands that are the user's own directories, not Hub names.
LOCAL_ROOTS = {"runs", "data", "checkpoints", "export", "tokenizers"}
# Programs a command may start with, besides the ones checked below; they are not run.
UNCHECKED_PROGRAMS = {"curl", "pip", "source", "cd"}


@dataclass
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    above: str  # the last non-empty line before the fence

    @property
    def where(self) -> str:
        return f"line {self.line}"


def blocks(path: Path) -> list[Block]:
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if m:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            above = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            found.append(Block(m.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1, above))
            i = end
        i += 1
    return found


def commands(block: Block) -> list[tuple[str, str]]:
    """(command, its comment) for each command of a shell block; continuation lines are joined."""
    out, pending = [], ""
    for raw in block.code.splitlines():
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        code, comment = line, ""
        quote = None  # a '#' outside quotes, after a space, starts a comment
        for pos, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (pos == 0 or line[pos - 1].isspace()):
                code, comment = line[:pos], line[pos + 1 :]
                break
        if code.strip():
            out.append((code.strip(), comment.strip()))
    return out


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in ("bash", "sh", "shell", "console")]


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.fixture(autouse=True)
def _in_the_checkout(monkeypatch):
    """The pages' commands run from the checkout's root (configs/..., bench/...)."""
    monkeypatch.chdir(REPO)


# -- the README's shape ------------------------------------------------------------------------------


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; at most {MAX_LINES}: move details to docs/"


def test_readme_opens_with_the_two_setup_commands():
    """A fresh machine needs two commands: one runs the demo, one runs the tests."""
    text = README.read_text(encoding="utf-8")
    first = blocks(README)[0]
    before = [line for line in text.splitlines()[: first.line - 1] if line.strip()]
    assert len(before) == 1 and before[0].startswith("# "), f"only the title comes before the set-up commands: {before}"
    assert [c for c, _ in commands(first)] == SETUP_COMMANDS


def test_machine_notes_only_in_the_performance_table():
    """Dates and machines drift: the README names them only in its one performance table, where each row
    gives its machine, its CPU features, its date and the command that measures it."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Performance")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    dated = re.compile(r"\b20\d\d-\d\d-\d\d\b|\b(EPYC|Xeon|Ryzen|Core i\d)\b|\bVMs?\b")
    outside = [f"{i + 1}: {line}" for i, line in enumerate(lines) if not start <= i < end and dated.search(line)]
    assert not outside, "dated or machine notes outside ## Performance:\n" + "\n".join(outside)
    rows = [line for line in lines[start:end] if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line)][1:]
    assert rows, "the performance table is missing"
    for row in rows:
        command = re.search(r"`((?:python |make )[^`]+)`", row)
        assert command, f"no command in row: {row}"
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", row), f"no date in row: {row}"
        assert "AVX" in row, f"no CPU features in row: {row}"
        check_command(command.group(1))


# -- commands ---------------------------------------------------------------------------------------


def gpt2lab_parser():
    from gpt2lab.cli import build_parser

    return build_parser()


def parse_gpt2lab(args: list[str]):
    """argparse's namespace for `gpt2lab ARGS`, or a failure with argparse's own message."""
    if not args or args[0] in ("-h", "--help", "--version"):
        return None
    from gpt2lab.cli import COMMANDS

    assert args[0] in COMMANDS, f"gpt2lab has no subcommand {args[0]!r} (it has: {', '.join(COMMANDS)})"
    if "-h" in args or "--help" in args:
        return None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return gpt2lab_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`gpt2lab {shlex.join(args)}` does not parse: {err.getvalue().strip()}")


@pytest.fixture(scope="module")
def demo_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab.demo", "--help"], env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_command(command: str, demo_flags: str = "") -> None:
    """Fail unless `command` would start as written: a gpt2lab subcommand with options it accepts (and,
    for `train`, a config that resolves), a make target, or a file of the checkout."""
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value in front
        words.pop(0)
    program = words[0]
    args = gpt2lab_words(command)
    if args is not None:  # gpt2lab, torchrun -m gpt2lab, python -m gpt2lab
        resolved(args)
    elif program == "torchrun":
        pytest.fail(f"{command}: torchrun runs `-m gpt2lab` here")
    elif words[1:3] == ["-m", "gpt2lab.demo"]:
        for flag in (w.split("=")[0] for w in words[3:] if w.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}\b", demo_flags), (
                f"`python -m gpt2lab.demo` has no option {flag}"
            )
    elif program in ("python", "python3"):
        assert (REPO / words[1]).is_file(), f"{command}: no file {words[1]}"
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
        for target in (w for w in words[1:] if "=" not in w):
            assert target in targets, f"{command}: the Makefile has no target {target}"
    elif program.startswith(("bench/", "tests/", "./")):
        assert (REPO / program).is_file(), f"{command}: no file {program}"
    else:
        assert program in UNCHECKED_PROGRAMS, (
            f"{command}: what is {program}? (a command of gpt2lab, make or the checkout)"
        )


def resolved(args: list[str]):
    """The parsed arguments; for `train`, the resolved config as well (the file, --set, the flags)."""
    ns = parse_gpt2lab(args)
    if ns is not None and args[0] == "train":
        from gpt2lab.commands.train import resolve
        from gpt2lab.errors import GPT2LabError

        try:
            ns.resolved = resolve(ns)
        except GPT2LabError as e:
            pytest.fail(f"`gpt2lab {shlex.join(args)}`: {e}")
    return ns


def is_hub_name(value: str) -> bool:
    value = value.split("=", 1)[1] if "=" in value else value  # serve's NAME=MODEL
    if value.startswith((".", "/", "~")) or (REPO / value).exists():
        return False
    return value.split("/")[0] not in LOCAL_ROOTS


def needs_network(ns) -> bool:
    """Whether a parsed gpt2lab command fetches weights or data: Hub models, Hub datasets, HellaSwag."""
    if ns is None:
        return False
    values = []
    for attr in ("model", "init_from", "from_hf"):
        got = getattr(ns, attr, None)
        values += got if isinstance(got, list) else [got] if got else []
    if any(is_hub_name(str(v)) for v in values):
        return True
    from gpt2lab.data.sources import CORPUS_PRESETS

    for attr in ("source", "corpus", "data"):
        got = str(getattr(ns, attr, "") or "")
        preset = CORPUS_PRESETS.get(got)
        if got.startswith("hf:") or got == "wikitext-2" or (preset is not None and preset.hf_dataset):
            return True
    if getattr(ns, "task", None) == "hellaswag" and not getattr(ns, "data", None):
        return True
    cfg = getattr(ns, "resolved", None)
    return cfg is not None and (
        (cfg.train.init_from and is_hub_name(cfg.train.init_from)) or "hellaswag" in cfg.eval.tasks
    )


def gpt2lab_words(command: str) -> list[str] | None:
    """The arguments of `gpt2lab ...`, `torchrun ... -m gpt2lab ...` or `python -m gpt2lab ...`, else None."""
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value in front
        words.pop(0)
    if words and words[0] == "gpt2lab":
        return words[1:]
    if "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "gpt2lab":
        return words[words.index("-m") + 2 :]
    return None


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_every_command_is_accepted(page, demo_help):
    checked = 0
    for block in shell_blocks(page):
        for command, _ in commands(block):
            try:
                check_command(command, demo_help)
            except AssertionError as e:
                pytest.fail(f"{page.name} {block.where}: {e}")
            checked += 1
    assert checked or page != README


def test_commands_that_need_the_network_say_so():
    """On a fresh clone offline every README command runs, or says beside it (its comment, or the line
    above its block) that it needs the Hub or the network."""
    silent = []
    for block in shell_blocks(README):
        for command, comment in commands(block):
            args = gpt2lab_words(command)
            if args is None:
                continue
            ns = resolved(args)
            if needs_network(ns) and not (NETWORK_NOTE.search(comment) or NETWORK_NOTE.search(block.above)):
                silent.append(f"{block.where}: {command}")
    assert not silent, "needs the network without saying so:\n" + "\n".join(silent)


def test_every_gpt2lab_subcommand_named_exists():
    from gpt2lab.cli import COMMANDS

    named = set(re.findall(r"`gpt2lab ([a-z][a-z-]*)", README.read_text(encoding="utf-8")))
    assert named, "the README names no gpt2lab subcommand"
    assert named <= set(COMMANDS), f"not gpt2lab subcommands: {sorted(named - set(COMMANDS))}"


# -- Python snippets --------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_readme_python_runs_offline(tmp_path):
    """Every ```python block, in order, in one scratch directory holding the checkout's configs/, each in
    its own interpreter, with the Hub offline (conftest's offline_env) and fresh caches."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    ran = 0
    for block in (b for b in blocks(README) if b.lang == "python"):
        compile(block.code, f"README.md {block.where}", "exec")
        if SKIP_NOTE.search(block.above):
            continue
        script = tmp_path / f"readme_line_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        result = subprocess.run(
            [sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (
            f"README.md {block.where} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
        ran += 1
    assert ran, "no Python snippet of the README ran"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_python_compiles(page):
    for block in (b for b in blocks(page) if b.lang == "python"):
        compile(block.code, f"{page.name} {block.where}", "exec")


# -- the file map -----------------------------------------------------------------------------------


def file_map() -> list[str]:
    """The paths the README's `## Files` tree names, relative to src/gpt2lab (folders end in '/')."""
    heading = README.read_text(encoding="utf-8").splitlines().index("## Files") + 1
    tree = next(b for b in blocks(README) if b.line > heading)
    lines = tree.code.splitlines()
    assert lines[0].strip() == "src/gpt2lab/", lines[0]
    paths, parents = [], []
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0 and indent >= 2, f"indent by two spaces a level: {line!r}"
        depth = indent // 2 - 1
        name = line.split()[0]
        assert len(line.split(None, 1)) == 2, f"every entry says in one line what it is: {line!r}"
        parents = parents[:depth]
        assert len(parents) == depth, f"an entry deeper than its folder: {line!r}"
        path = "".join(parents) + name
        paths.append(path)
        if name.endswith("/"):
            parents.append(name)
    return paths


def package_files() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*"):
        rel = path.relative_to(PACKAGE)
        if "__pycache__" in rel.parts or path.suffix == ".pyc" or rel.name.startswith("."):
            continue
        found.add(rel.as_posix() + ("/" if path.is_dir() else ""))
    return found


def test_file_map_names_exactly_the_files_of_the_package():
    """One line per file or folder; a folder's line stands for its __init__.py, and a glob line
    (`commands/*.py`) for the files it matches. Move, add or remove a file: change its line."""
    entries = file_map()
    covered, missing = set(), []
    for entry in entries:
        matches = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.glob(entry.rstrip("/"))]
        if not matches:
            missing.append(entry)
        for match in matches:
            covered.add(match + ("/" if (PACKAGE / match).is_dir() else ""))
            covered.update(f"{parent.as_posix()}/" for parent in Path(match).parents if parent.name)
            if (PACKAGE / match).is_dir():
                covered.add(match + "/__init__.py")
    assert not missing, f"the README's file map names what src/gpt2lab lacks: {missing}"
    unnamed = sorted(package_files() - covered)
    assert not unnamed, f"src/gpt2lab has files the README's file map leaves out: {unnamed}"
    assert len(entries) == len(set(entries)), "an entry is named twice"


# -- links ------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_links_and_paths_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for path in re.findall(r"`((?:configs|bench|docs|src|tests)/[\w./-]+?)`", prose):
        if not (REPO / path).exists():
            broken.append(path)
    assert not broken, f"{page.name} points at what does not exist: {broken}"
