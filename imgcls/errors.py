"""One exception type for user errors.

Anything a user can fix (a bad path, flag, file or name) raises :class:`ImgclsError`
with a message and a hint. The CLI prints it as one line and exits non-zero; internal
errors are *not* caught and dressed up as user errors (they keep their traceback).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ImgclsError(Exception):
    """A problem the user can fix. ``str(err)`` is one line: the problem, then the fix."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.oneline())

    def oneline(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f" ({self.hint.rstrip('.')})"
        return " ".join(text.split())


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``"did you mean 'a', 'b'?"`` for close matches, or an empty string."""
    pool = list(choices)
    lower = {c.lower(): c for c in pool}
    matches = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)
    if not matches:
        # substring matches help for long registries (timm has ~1,300 names)
        matches = [c for c in lower if name.lower() in c][:n]
    if not matches:
        return ""
    return "did you mean " + ", ".join(f"'{lower[m]}'" for m in matches) + "?"
