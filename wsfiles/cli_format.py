"""What the ``wsfiles`` command shows people: sizes, listings, progress bars.

Sizes are in binary units (1 KiB = 1024 bytes, 1 MiB = 1024 KiB), labelled
as such everywhere: ``ls``, the progress bar and the messages agree.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(size: float) -> str:
    """``size`` bytes for people: ``512 B``, ``1.5 KiB``, ``3.0 MiB`` (binary units)."""
    if size < 1024:
        return f"{int(size)} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        # Move up while rounding would print 1024.0 of this unit.
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def listing_lines(files: list[dict[str, Any]], *, exact: bool = False) -> list[str]:
    """``ls`` output: size (human, or exact bytes), local modification time, name.

    A folder (protocol 1.2) has ``-`` for its size and a ``/`` after its name,
    as ``ls -F`` marks it; entries without a ``type`` (protocol 1.1) are files.
    """
    width = 14 if exact else 10
    lines = []
    for info in files:
        name = info["name"]
        if info.get("type") == "folder":
            size, name = "-", name + "/"
        else:
            size = str(info["size"]) if exact else human_size(info["size"])
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["mtime"]))
        lines.append(f"{size:>{width}}  {stamp}  {name}")
    return lines


def _make_bar_class() -> type:
    """A tqdm whose sizes and speed are in binary units with their true names.

    tqdm's own ``unit_scale`` with ``unit_divisor=1024`` divides by 1024 but
    still prints ``kB``/``MB``; the extra ``format_dict`` entries below feed
    our labels to ``bar_format`` instead.
    """
    from tqdm import tqdm

    class BinaryBar(tqdm):  # type: ignore[misc]
        @property
        def format_dict(self) -> dict[str, Any]:
            d = super().format_dict
            rate = d.get("rate")
            if rate is None and d.get("elapsed"):
                rate = d["n"] / d["elapsed"]
            d["done"] = human_size(d["n"])
            d["size"] = human_size(d["total"] or 0)
            d["speed"] = "?" if rate is None else human_size(rate) + "/s"
            return d

    return BinaryBar


BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done} of {size} [{elapsed}<{remaining}, {speed}]"
#: Before the size is known (a download's first bytes can overtake its "sending").
BAR_FORMAT_NO_SIZE = "{desc}: {done} [{elapsed}, {speed}]"


@contextlib.contextmanager
def progress_bar(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    bar = _make_bar_class()(desc=label, total=None, bar_format=BAR_FORMAT_NO_SIZE, file=sys.stderr)

    def update(done: int, total: int) -> None:
        known = total > 0 and done <= total
        bar.total = total if known else None
        bar.bar_format = BAR_FORMAT if known else BAR_FORMAT_NO_SIZE
        bar.n = done
        bar.refresh() if done == total else bar.update(0)

    try:
        yield update
    finally:
        bar.close()
