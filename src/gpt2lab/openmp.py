"""How long torch's idle OpenMP threads spin, chosen before torch loads (libgomp reads it only then)."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# libgomp's default is 300,000 spins; 10,000 keeps a quiet machine as fast and a busy one from stalling
# at every parallel region (docs/cpu.md, "Threads on a busy machine").
SPINCOUNT = "10000"
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def spin_briefly(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set GOMP_SPINCOUNT=10000 in `environ` (default: this process's) unless OMP_WAIT_POLICY or
    GOMP_SPINCOUNT is set already, the user's choice; returns whether it was set.

    Only takes effect in a process that has not loaded torch yet, and in the processes it starts.
    """
    environ = os.environ if environ is None else environ
    if any(environ.get(name, "").strip() for name in USER_SETTINGS):
        return False
    environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return True


def spin_briefly_before_torch() -> bool:
    """`spin_briefly` for this process, where torch is not loaded yet: once it is, libgomp has read its
    settings and the change would only reach child processes (as in a test calling the CLI in process)."""
    if "torch" in sys.modules:
        return False
    return spin_briefly()
