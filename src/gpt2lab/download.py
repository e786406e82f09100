"""gpt2lab's download cache, fetching a public file into it once (HellaSwag, corpora, ...), and opening
a Hugging Face dataset so that a machine without network fails at once, in one line."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
        if reason := unreachable(url):  # at once, rather than after urlopen's timeout
            raise urllib.error.URLError(reason)
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


# huggingface_hub retries a failed request five times over about 25 s, a warning per try; one connection
# attempt answers sooner whether there is a network at all.
PROBE_SECONDS = 1.5
HUB_ENDPOINT = "https://huggingface.co"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# Where huggingface_hub and datasets keep their offline switch, read from the environment when imported.
OFFLINE_SWITCHES = {
    "huggingface_hub.constants": ("HF_HUB_OFFLINE",),
    "datasets.config": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
}


def unreachable(url: str, timeout: float = PROBE_SECONDS) -> str | None:
    """Why `url`'s server cannot be reached now, or None when a TCP connection to it (or to the proxy
    urllib would use for it) opens within `timeout` seconds, the name lookup included, or when `url` is
    not http(s)."""
    import urllib.request

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return None  # a file: URL, or one urllib reaches its own way
    host, port = parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or host, via.port or 8080
    failure = [f"no answer from {host} within {timeout:g} s"]

    def connect() -> None:  # on a thread: the name lookup has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            failure[0] = ""
        except OSError as e:
            failure[0] = f"cannot connect to {host}: {e.strerror or e}"

    thread = threading.Thread(target=connect, name="gpt2lab-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return failure[0] or None


def hub_unreachable(timeout: float = PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None: one of OFFLINE_VARIABLES set true, or no
    connection to its host (HF_ENDPOINT, else huggingface.co) within `timeout` seconds."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name} is set"
    return unreachable(os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT, timeout)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub and datasets in offline mode inside the block: their caches only, no request.

    Both read HF_HUB_OFFLINE once, when imported, so the switch is set on the imported modules (import
    `datasets` before entering) and put back after.
    """
    saved = []
    for module_name, names in OFFLINE_SWITCHES.items():
        module = sys.modules.get(module_name)
        for name in names:
            if module is not None and hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def load_hf_dataset(
    dataset: str, config: str | None, split: str, *, streaming: bool, where: str, check: str, instead: str
) -> Any:
    """`datasets.load_dataset(dataset, config, split=split, streaming=streaming)`, every failure a
    GPT2LabError naming `where` (the dataset, config and split, in words).

    A local `dataset` (a folder of data files) is read without the Hub. Where the Hub cannot be reached
    (`hub_unreachable`), a dataset loaded once before comes from the cache; otherwise, and always when
    streaming (which reads the Hub as it goes), the error comes at once and says `instead` (what works
    offline). Other failures say the reason and `check`.
    """
    try:
        import datasets
    except ImportError:
        raise GPT2LabError(
            "reading a Hugging Face dataset needs the 'datasets' package: pip install 'gpt2lab[data]'"
        ) from None
    offline = None if Path(dataset).expanduser().exists() else hub_unreachable()
    if offline is None:
        try:
            return datasets.load_dataset(dataset, config, split=split, streaming=streaming)
        except Exception as e:  # datasets raises many types (network, not found, bad config); all are the user's
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GPT2LabError(f"cannot open the {where}: {reason} ({check})") from None
    if not streaming:
        with contextlib.suppress(Exception), hub_offline():
            return datasets.load_dataset(dataset, config, split=split)
    cached = "" if streaming else " and the dataset is not in the cache"
    raise GPT2LabError(f"cannot open the {where}: the Hugging Face Hub is unreachable ({offline}){cached}; {instead}")
