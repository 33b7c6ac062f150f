"""Byte sizes as operators write them: ``512``, ``64K``, ``1G`` (powers of 1024)."""

from __future__ import annotations

import re

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``text`` into a number of bytes; raise ValueError with a clear message."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: use a whole number of bytes, optionally"
            " followed by K, M, G or T (powers of 1024), e.g. 512K or 1G"
        )
    number, unit = match.groups()
    return int(number) * 1024 ** _UNITS[unit.upper()]
