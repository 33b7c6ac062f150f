"""Where the CPU goes: py-spy flame graphs of the server and the client moving a big file.

Run from the repository root (wsfiles and py-spy installed; py-spy attaches
with ptrace, so run it as root or with ptrace allowed)::

    python bench/profile.py                      # 1 GiB, graphs into docs/profile/
    python bench/profile.py --size 256M --out /tmp/graphs

It starts ``twistd wsfiles --rate-limit 1000000`` on 127.0.0.1
(bench/_common.py), records the server answering pipelined ``list``s for 4 s
(bench/connections.py's lean client, 128 in flight) into
``list-pipelined-server.{svg,txt}``, then for an upload and then a download
of the same file with ``wsfiles.client`` it runs
two ``py-spy record`` processes at once, one attached to the server and one
to this process (the client), and writes per direction and side:

- ``DIRECTION-SIDE.svg``: the flame graph (open it in a browser);
- ``DIRECTION-SIDE.txt``: the functions with the most samples of their own
  and the heaviest call paths, per thread, the figures quoted in
  docs/performance.md.

py-spy samples 250 times a second with ``--nonblocking`` (it does not stop
the process to sample it, so the graphs cost the transfer little, at the
price of an occasional torn stack).  The samples include time threads spend
waiting in ``epoll``/locks: read "own samples" of ``doPoll`` or
``Condition.wait`` as idle.  Only 127.0.0.1 is used; the server and the
temporary folder are removed at the end.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import connections
from _common import (
    ServerProcess,
    bounded,
    header,
    make_source,
    run_on_reactor,
    size_argument,
    twistd_wsfiles,
)

from wsfiles.client import connect
from wsfiles.tuning import tune_malloc

REPO = Path(__file__).resolve().parent.parent
RATE = 250
TRANSFER_TIMEOUT = 300.0
PY_SPY_STOP_TIMEOUT = 60.0
LIST_SECONDS = 4.0
LIST_WINDOW = 128
LIST_ANSWER = b'{"op": "list"'


class Recording:
    """``py-spy record`` attached to a process until ``stop`` (SIGINT makes it write)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self._raw = out.with_suffix(".raw")
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        common = [py_spy, "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking"]
        # Two recorders: the SVG, and the raw stacks the text summary is made from.
        self._processes = [
            subprocess.Popen(
                [*common, *options],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for options in (
                ["--output", str(out)],
                ["--threads", "--format", "raw", "--output", str(self._raw)],
            )
        ]

    def stop(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self._processes:
            try:
                process.wait(PY_SPY_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(PY_SPY_STOP_TIMEOUT)
        if self._raw.exists():
            self.out.with_suffix(".txt").write_text(summary(self._raw))
            self._raw.unlink()


def summary(raw: Path, top: int = 15) -> str:
    """Per thread: sample count, the top functions by own samples and by inclusive samples."""
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        # "thread (TID): NAME" first, then outermost to innermost frames.
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        thread = "PoolThread" if thread.startswith("PoolThread") else thread
        totals[thread] += count
        own[thread][frames[-1]] += count
        for function in {frame.split(" (")[0] for frame in frames[1:]}:
            inclusive[thread][function] += count
    lines = []
    everything = sum(totals.values()) or 1
    for thread, total in totals.most_common():
        lines.append(f"== {thread}: {total} samples ({total / everything:.0%} of all)")
        lines.append("-- own samples")
        lines += [f"{n / total:6.1%}  {name}" for name, n in own[thread].most_common(top)]
        lines.append("-- inclusive samples")
        lines += [f"{n / total:6.1%}  {name}" for name, n in inclusive[thread].most_common(top * 2)]
        lines.append("")
    return "\n".join(lines)


async def pipelined_lists(reactor: Any, port: int, server_pid: int, out: Path) -> None:
    """Profile the server answering pipelined ``list``s (bench/connections.py's client)."""
    proto = await connections.open_lean(reactor, port, "/command", None)
    try:
        await connections.measure(reactor, proto, server_pid, 0.5, LIST_WINDOW, LIST_ANSWER)
        recording = Recording(server_pid, out / "list-pipelined-server.svg")
        try:
            rate = await connections.measure(
                reactor, proto, server_pid, LIST_SECONDS, LIST_WINDOW, LIST_ANSWER
            )
        finally:
            recording.stop()
        print(f"pipelined list: {rate.per_second:,.0f}/s while profiled", flush=True)
    finally:
        proto.transport.abortConnection()


async def transfers(
    reactor: Any,
    port: int,
    server_pid: int,
    source: Path,
    copy: Path,
    out: Path,
    hash: str = "sha256",
) -> None:
    client = await bounded(connect(f"ws://127.0.0.1:{port}", reactor=reactor), 30, reactor)
    size = source.stat().st_size
    try:
        for direction in ("upload", "download"):
            recordings = [
                Recording(server_pid, out / f"{direction}-server.svg"),
                Recording(os.getpid(), out / f"{direction}-client.svg"),
            ]
            start = time.perf_counter()
            try:
                if direction == "upload":
                    with source.open("rb") as f:
                        await bounded(
                            client.upload("profile.bin", f, hash=hash), TRANSFER_TIMEOUT, reactor
                        )
                else:
                    with copy.open("wb") as f:
                        await bounded(
                            client.download("profile.bin", f, hash=hash), TRANSFER_TIMEOUT, reactor
                        )
            finally:
                seconds = time.perf_counter() - start
                for recording in recordings:
                    recording.stop()
            print(f"{direction}: {size / seconds / 1e6:.0f} MB/s while profiled", flush=True)
    finally:
        await bounded(client.close(), 30, reactor)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=size_argument, default="1G", help="file size (default 1G)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "profile")
    parser.add_argument(
        "--hash", choices=["sha256", "blake3"], default="sha256", help="the transfers' hash"
    )
    args = parser.parse_args(argv)
    size: int = args.size
    header()
    tune_malloc()  # as the wsfiles command and bench/throughput.py do
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wsfiles-profile-") as temp:
        work = Path(temp)
        (work / "root").mkdir()
        source = work / "source.bin"
        expected = make_source(source, size)
        argv_server = twistd_wsfiles(
            work / "root", "--max-size", str(max(size, 1 << 30)), "--rate-limit", "1000000"
        )
        with ServerProcess("wsfiles", argv_server) as server:

            async def profiles(reactor: Any) -> None:
                await pipelined_lists(reactor, server.port, server.pid, args.out)
                await transfers(
                    reactor,
                    server.port,
                    server.pid,
                    source,
                    work / "copy.bin",
                    args.out,
                    args.hash,
                )

            run_on_reactor(profiles)
        with (work / "copy.bin").open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != expected:
                raise RuntimeError("the downloaded copy differs from the source")
    for path in sorted(args.out.glob("*.txt")):
        print(f"\n##### {path.name}\n{path.read_text()}")
    print(f"flame graphs and summaries in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
