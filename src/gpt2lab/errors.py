"""The one exception type users see.

Anything a user can cause (a bad path, a corrupt file, a wrong option, an unreachable hub) raises
`GPT2LabError` with a one-line message saying what was wrong and what to do. The CLI prints that line
and exits non-zero; any other exception is a bug in gpt2lab and keeps its traceback.
"""

from __future__ import annotations


class GPT2LabError(Exception):
    """A problem with the user's input or environment, described in one actionable line."""
