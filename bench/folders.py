"""Listing folders (protocol 1.2) against the flat listing of the same number of files.

Run from the repository root (wsfiles must be installed)::

    python bench/folders.py [--entries 10000] [--rounds 5]

A real ``twistd wsfiles`` serves a root holding, side by side:

- ``ENTRIES`` files at the top: the flat figure, a 1.1 ``list`` (the whole
  folder in one reply) -- the baseline;
- ``big/``: a folder of ``ENTRIES`` files, listed by a 1.2 client page by page
  (``max_list`` 1,000 entries a reply, following ``cursor``);
- ``tree/``: ``ENTRIES`` files in 100 folders, listed recursively, page by page.

Each is timed end to end from one client on loopback (median of ``--rounds``),
and the server's RSS is read before and after.  Times are quoted as ratios
against the flat 1.1 listing of the same run (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    ServerProcess,
    header,
    print_result,
    read_status_kib,
    run_on_reactor,
    run_script,
    twistd_wsfiles,
)

from wsfiles.client import COMMAND_SUBPROTOCOLS, connect

FOLDERS_IN_TREE = 100
#: Pages followed at most per listing (a bound, far above what ENTRIES needs).
MAX_PAGES = 10_000


def populate(root: Path, entries: int) -> None:
    for n in range(entries):
        (root / f"flat-{n:06d}.txt").write_bytes(b"x")
    (root / "big").mkdir()
    for n in range(entries):
        (root / "big" / f"file-{n:06d}.txt").write_bytes(b"x")
    per_folder = max(1, entries // FOLDERS_IN_TREE)
    for f in range(FOLDERS_IN_TREE):
        folder = root / "tree" / f"folder-{f:03d}"
        folder.mkdir(parents=True)
        for n in range(per_folder):
            (folder / f"file-{n:06d}.txt").write_bytes(b"x")


async def paged(client: Any, path: str, recursive: bool) -> int:
    """Entries of ``path``, following cursors to the end; how many there were."""
    count, cursor = 0, None
    for _ in range(MAX_PAGES):
        command: dict[str, Any] = {"op": "list", "path": path, "recursive": recursive}
        if cursor is not None:
            command["cursor"] = cursor
        reply = await client.request(command)
        count += len(reply["files"])
        cursor = reply.get("cursor")
        if cursor is None:
            return count
    raise RuntimeError(f"more than {MAX_PAGES} pages")


async def measure(url: str, rounds: int, reactor: Any) -> dict[str, list[float]]:
    flat = await connect(url, reactor=reactor)
    folders = await connect(url, reactor=reactor, subprotocols=COMMAND_SUBPROTOCOLS)
    times: dict[str, list[float]] = {"flat": [], "folder": [], "tree": []}
    counts: dict[str, int] = {}
    try:
        for _ in range(rounds):  # interleaved, so noise falls on all three alike
            started = time.perf_counter()
            counts["flat"] = len(await flat.list())
            times["flat"].append(time.perf_counter() - started)
            started = time.perf_counter()
            counts["folder"] = await paged(folders, "big", False)
            times["folder"].append(time.perf_counter() - started)
            started = time.perf_counter()
            counts["tree"] = await paged(folders, "tree", True)
            times["tree"].append(time.perf_counter() - started)
    finally:
        await flat.close()
        await folders.close()
    print(f"entries listed: {counts}")
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    header()
    with tempfile.TemporaryDirectory(prefix="wsfiles-bench-folders-") as temp:
        root = Path(temp) / "root"
        root.mkdir()
        populate(root, args.entries)
        with ServerProcess("wsfiles", twistd_wsfiles(root)) as server:
            rss_before = read_status_kib(server.pid, "VmRSS")
            url = f"ws://127.0.0.1:{server.port}"
            times = run_on_reactor(lambda reactor: measure(url, args.rounds, reactor), 600)
            rss_after = read_status_kib(server.pid, "VmRSS")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: median {value * 1000:.0f} ms over {args.rounds} rounds")
    flat = medians["flat"]
    entries = f"{args.entries:,}"
    print_result(
        f"list of a {entries}-entry folder in pages (1.2) vs flat 1.1 list",
        f"{medians['folder'] / flat:.2f}x the time",
        "reported",
        None,
    )
    print_result(
        f"recursive list of a {entries}-file tree in pages vs flat 1.1 list",
        f"{medians['tree'] / flat:.2f}x the time",
        "reported",
        None,
    )
    print_result(
        "server RSS growth over all listings",
        f"{(rss_after - rss_before) / 1024:.1f} MiB (from {rss_before / 1024:.0f} MiB)",
        "reported",
        None,
    )
    return 0


if __name__ == "__main__":
    run_script(main)
