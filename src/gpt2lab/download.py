"""gpt2lab's download cache, and fetching a public file into it once (HellaSwag, corpora, ...)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import GPT2LabError
from .fileio import atomic_open, file_sha256


def cache_dir() -> Path:
    """gpt2lab's download cache: $GPT2LAB_CACHE, else $XDG_CACHE_HOME/gpt2lab, else ~/.cache/gpt2lab."""
    env = os.environ.get("GPT2LAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gpt2lab"


def cached_download(url: str, name: str, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Path of `name` in the cache, downloading it from `url` first if it is not there yet.

    The file is streamed to a temporary name and renamed when complete (and its sha256 matches, when
    given), so an interrupted download never leaves a partial file under the final name.
    """
    path = cache_dir() / name
    if path.is_file() and (sha256 is None or file_sha256(path) == sha256):
        return path
    # Imported here: urllib.request costs more to import than the rest of this module, and a file
    # already in the cache needs none of it.
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            h = hashlib.sha256()
            with (
                atomic_open(path, "wb") as f,
                tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}", leave=False) as bar,
            ):
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                if sha256 is not None and h.hexdigest() != sha256:
                    raise GPT2LabError(
                        f"{url} downloaded with sha256 {h.hexdigest()}, expected {sha256}; try again later"
                    )
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise GPT2LabError(
            f"could not download {url} ({reason}); download it yourself and pass its local path, or place it at {path}"
        ) from None
    return path
