"""Byte counts as people read them: GiB = 2^30 bytes, the unit of a card's memory."""

from __future__ import annotations

GiB = 1024**3


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"
