"""`gpt2lab prepare`'s memory does not grow with a document's length, with or without whitespace
(issue 11): a single-line document of one repeated character is read, cut and tokenized in pieces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import subprocess_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")

# Peak resident memory, in MiB, of `prepare` with 2 workers: the parent's peak plus twice the largest
# worker's (an upper bound of the three processes' peak together: their peaks need not coincide). The
# parent's is its VmHWM, not ru_maxrss, which Linux carries over an exec from the process that forked
# it (here pytest, torch loaded); the workers are forked by this small parent.
PEAK = textwrap.dedent(
    """
    import json, re, resource, sys
    from gpt2lab.data.prepare import PrepareOptions, prepare
    m = prepare(PrepareOptions(sys.argv[1], sys.argv[2], workers=2, progress=False)).manifest
    with open("/proc/self/status") as f:
        me = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"tokens": m["total_tokens"], "parent": me / 1024, "worker": child / 1024}))
    """
)


def one_line(path: Path, char: str, mib: int) -> Path:
    block = char * (1 << 20)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(mib):
            f.write(block)
    return path


def peak(tmp_path: Path, char: str, mib: int) -> tuple[dict, float]:
    src = one_line(tmp_path / f"doc{mib}.txt", char, mib)
    r = subprocess.run(
        [sys.executable, "-c", PEAK, str(src), str(tmp_path / f"out{mib}")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    src.unlink()
    return report, report["parent"] + 2 * report["worker"]


@pytest.mark.subprocess
def test_memory_does_not_grow_with_a_document_without_a_safe_cut(tmp_path):
    """8 MiB and 32 MiB of one space (no safe cut anywhere, and fast to tokenize): the same peak, where
    holding the document whole would add at least its 24 MiB difference to the parent alone."""
    small, small_total = peak(tmp_path, " ", 8)
    large, large_total = peak(tmp_path, " ", 32)
    assert small["tokens"] == 8 * (1 << 20) + 1 and large["tokens"] == 32 * (1 << 20) + 1
    # Measured: +5 MiB in the parent, +6 MiB in all (allocator noise); whole, it would be >= 24 MiB.
    assert large["parent"] - small["parent"] < 12, (small, large)
    assert large_total - small_total < 16, (small, large)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_200_mb_line_of_one_character_stays_within_300_mb(tmp_path):
    report, total = peak(tmp_path, "a", 200)
    assert report["tokens"] == 200 * (1 << 20) // 4 + 1  # "aaaa" is one GPT-2 token
    assert total < 300, report
