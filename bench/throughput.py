"""Throughput and memory of a real wsfiles server, against Twisted's FTP server.

Run from the repository root (wsfiles must be installed, ``twistd wsfiles``
must work)::

    python bench/throughput.py                 # 1 GiB file, one run
    python bench/throughput.py --size 256M --runs 3

In one run it:

1. writes a file of ``--size`` bytes (default 1G; K/M/G are powers of 1024)
   into a temporary folder;
2. starts ``twistd --nodaemon --pidfile= --logfile=- wsfiles --listen
   tcp:0:interface=127.0.0.1 ...`` and the FTP baseline (bench/_ftp_server.py,
   Twisted's ``twisted.protocols.ftp``) as subprocesses on 127.0.0.1;
3. per run, uploads and downloads the file with the project's client
   (``wsfiles.client``, on the Twisted reactor of this process), then STORs and
   RETRs it with ``ftplib`` (256 KiB blocks), timing each transfer and checking
   every downloaded copy's SHA-256 against the source;
4. reads the wsfiles server's peak resident set (VmHWM in /proc/PID/status)
   after the last transfer, before stopping it;
5. prints the best of ``--runs`` for each direction, the wsfiles/FTP ratios and
   PASS/FAIL against the targets (server peak RSS < 100 MB; wsfiles at least
   0.7x FTP each way).

Each transfer is also shown with the CPU seconds the server, this process (the
client) and all other processes used meanwhile: CPU close to the wall time
says which end is the bottleneck, and a large "others" says the machine was
busy and the figures are skewed.  Each run deletes the previous run's copies
first, so every upload creates a new file on both servers.

MB means 10^6 bytes throughout.  Only 127.0.0.1 is used, every wait has a
bound, and both servers and the temporary files are removed at the end, also
on errors or Ctrl-C.  The exit status is 0 when the measurements completed
(whatever the targets say), 1 when the benchmark itself failed.  Linux only
(/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import hashlib
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from _common import (
    GIB,
    LOOPBACK,
    MB,
    WSFILES_READY,
    ServerProcess,
    bounded,
    cpu_seconds,
    header,
    machine_busy_seconds,
    read_status_kib,
    run_on_reactor,
    sha256_of,
    twistd_wsfiles,
    verdict,
)
from twisted.internet import threads

from wsfiles.client import connect
from wsfiles.sizes import parse_size

T = TypeVar("T")

FTP_BLOCK = 256 * 1024
CONNECT_TIMEOUT = 30.0
FTP_USER = "bench"
FTP_PASSWORD = "bench"
FILE_NAME = "bench.bin"

RSS_TARGET_MB = 100.0
RATIO_TARGET = 0.7
#: Other processes' CPU, in CPUs, above which the report warns about a busy machine.
BUSY_MACHINE = 0.2

FTP_READY = re.compile(r"ftp listening on 127\.0\.0\.1:(\d+)")


# -- files ---------------------------------------------------------------


def make_source(path: Path, size: int) -> str:
    """Write ``size`` random-ish bytes to ``path``; return their SHA-256."""
    pool = os.urandom(8 * 1024 * 1024)
    digest = hashlib.sha256()
    remaining = size
    counter = 0
    with path.open("wb") as f:
        while remaining:
            # Vary each block a little so no two 8 MiB blocks are identical.
            block = counter.to_bytes(8, "little") + pool[8:]
            block = block[: min(len(block), remaining)]
            f.write(block)
            digest.update(block)
            remaining -= len(block)
            counter += 1
    return digest.hexdigest()


def check_copy(what: str, path: Path, expected: str) -> None:
    """Compare a downloaded copy with the source, then delete it."""
    try:
        actual = sha256_of(path)
    finally:
        path.unlink(missing_ok=True)
    if actual != expected:
        raise RuntimeError(f"{what}: SHA-256 {actual} differs from the source's {expected}")


# -- server subprocesses -------------------------------------------------


# -- measurements --------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One timed transfer: wall-clock seconds and the CPU used meanwhile."""

    seconds: float
    server_cpu: float
    client_cpu: float
    #: CPU used by everything else on the machine (other jobs skew the figures).
    other_cpu: float

    def describe(self, size: int) -> str:
        return (
            f"{size / self.seconds / MB:8.1f} MB/s  {self.seconds:6.2f} s"
            f"   CPU s: server {self.server_cpu:5.2f}, client {self.client_cpu:5.2f},"
            f" others {self.other_cpu:5.2f}"
        )


class Stopwatch:
    """Times a transfer, with the CPU used by the server, this process and the rest."""

    def __init__(self, server_pid: int) -> None:
        self._server_pid = server_pid
        self._marks = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        return (
            time.perf_counter(),
            cpu_seconds(self._server_pid),
            time.process_time(),
            machine_busy_seconds(),
        )

    def start(self) -> None:
        self._marks = self._now()

    def elapsed(self) -> float:
        """Wall-clock seconds since ``start``; cheap (reads no /proc file)."""
        return time.perf_counter() - self._marks[0]

    def stop(self) -> Transfer:
        wall, server, client, busy = (b - a for a, b in zip(self._marks, self._now(), strict=True))
        return Transfer(wall, server, client, max(0.0, busy - server - client))


@dataclass(frozen=True)
class Round:
    """The four transfers of one run."""

    ws_up: Transfer
    ws_down: Transfer
    ftp_up: Transfer
    ftp_down: Transfer


async def wsfiles_round(
    server: ServerProcess, source: Path, sink: Path, expected: str, timeout: float, reactor: Any
) -> tuple[Transfer, Transfer]:
    """Upload then download with wsfiles.client, on this process's reactor."""
    url = f"ws://{LOOPBACK}:{server.port}"
    client = await bounded(connect(url, reactor=reactor), CONNECT_TIMEOUT, reactor)
    watch = Stopwatch(server.pid)
    try:
        with source.open("rb") as f:
            watch.start()
            await bounded(client.upload(FILE_NAME, f), timeout, reactor)
            up = watch.stop()
        with sink.open("wb") as f:
            watch.start()
            await bounded(client.download(FILE_NAME, f), timeout, reactor)
            down = watch.stop()
    finally:
        await bounded(client.close(), CONNECT_TIMEOUT, reactor)
    await threads.deferToThread(check_copy, "wsfiles download", sink, expected)
    return up, down


def ftp_round(
    server: ServerProcess, source: Path, sink: Path, expected: str, timeout: float
) -> tuple[Transfer, Transfer]:
    """STOR then RETR with ftplib (blocking: run it in a thread)."""
    watch = Stopwatch(server.pid)

    def within_deadline(_: object = None) -> None:
        if watch.elapsed() > timeout:
            raise TimeoutError(f"FTP transfer took longer than {timeout:g} s")

    with ftplib.FTP(timeout=CONNECT_TIMEOUT) as ftp:
        ftp.connect(LOOPBACK, server.port)
        ftp.login(FTP_USER, FTP_PASSWORD)
        with source.open("rb") as f:
            watch.start()
            ftp.storbinary(f"STOR {FILE_NAME}", f, blocksize=FTP_BLOCK, callback=within_deadline)
            up = watch.stop()
        with sink.open("wb") as f:

            def write(block: bytes) -> None:
                f.write(block)
                within_deadline()

            watch.start()
            ftp.retrbinary(f"RETR {FILE_NAME}", write, blocksize=FTP_BLOCK)
            down = watch.stop()
    check_copy("FTP download", sink, expected)
    return up, down


async def measure(
    ws: ServerProcess,
    ftp: ServerProcess,
    source: Path,
    work: Path,
    expected: str,
    runs: int,
    timeout: float,
    reactor: Any,
) -> list[Round]:
    rounds = []
    size = source.stat().st_size
    for number in range(1, runs + 1):
        # Every run stores a new file: overwriting the previous run's copy
        # would add the cost of freeing its pages to the upload's time.
        for root in ("ws-root", "ftp-root"):
            (work / root / FILE_NAME).unlink(missing_ok=True)
        ws_up, ws_down = await wsfiles_round(
            ws, source, work / "ws-copy.bin", expected, timeout, reactor
        )
        ftp_up, ftp_down = await threads.deferToThread(
            ftp_round, ftp, source, work / "ftp-copy.bin", expected, timeout
        )
        result = Round(ws_up, ws_down, ftp_up, ftp_down)
        rounds.append(result)
        print(f"run {number}:", flush=True)
        for label, transfer in (
            ("wsfiles up", ws_up),
            ("wsfiles down", ws_down),
            ("FTP up", ftp_up),
            ("FTP down", ftp_down),
        ):
            print(f"  {label:13}{transfer.describe(size)}", flush=True)
    return rounds


# -- report --------------------------------------------------------------


def report(
    size: int, rounds: list[Round], ws_hwm_kib: int, ftp_hwm_kib: int, client_kib: int
) -> None:
    def best(pick: Callable[[Round], Transfer]) -> float:
        return min(pick(r).seconds for r in rounds)

    ws_up, ws_down = best(lambda r: r.ws_up), best(lambda r: r.ws_down)
    ftp_up, ftp_down = best(lambda r: r.ftp_up), best(lambda r: r.ftp_down)
    rss_mb = ws_hwm_kib * 1024 / MB
    print()
    print(f"best of {len(rounds)} run(s), {size} bytes, MB = 10^6 bytes")
    print(f"{'':10} {'wsfiles':>12} {'FTP':>12} {'wsfiles/FTP':>12}   target")
    for label, ws_s, ftp_s in (("upload", ws_up, ftp_up), ("download", ws_down, ftp_down)):
        ratio = ftp_s / ws_s  # (size / ws_s) / (size / ftp_s)
        print(
            f"{label:10} {size / ws_s / MB:7.1f} MB/s {size / ftp_s / MB:7.1f} MB/s"
            f" {ratio:11.3g}x   >= {RATIO_TARGET}x  {verdict(ratio >= RATIO_TARGET)}"
        )
    print(
        f"wsfiles server peak RSS (VmHWM): {rss_mb:.1f} MB ({ws_hwm_kib} kB)"
        f"   target < {RSS_TARGET_MB:g} MB  {verdict(rss_mb < RSS_TARGET_MB)}"
    )
    print(
        f"for comparison: FTP server peak RSS {ftp_hwm_kib * 1024 / MB:.1f} MB,"
        f" benchmark (client) process peak RSS {client_kib * 1024 / MB:.1f} MB"
    )
    transfers = [t for r in rounds for t in (r.ws_up, r.ws_down, r.ftp_up, r.ftp_down)]
    others = sum(t.other_cpu for t in transfers) / sum(t.seconds for t in transfers)
    print(f"other processes kept {others:.0%} of one CPU busy during the transfers", end="")
    print(": the machine was not quiet, figures are skewed" if others > BUSY_MACHINE else "")


# -- main ----------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="file size, e.g. 512M or 1G (default 1G)")
    parser.add_argument("--runs", type=int, default=1, help="repetitions; the best counts")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per transfer (300)"
    )
    args = parser.parse_args(argv)
    try:
        args.size = parse_size(args.size)
    except ValueError as e:
        parser.error(f"--size: {e}")
    if args.size < 1:
        parser.error("--size must be at least 1 byte")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    return args


@contextlib.contextmanager
def announced(step: str) -> Iterator[None]:
    print(f"{step}...", end=" ", flush=True)
    start = time.perf_counter()
    yield
    print(f"{time.perf_counter() - start:.1f} s", flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    size: int = args.size
    header()
    with tempfile.TemporaryDirectory(prefix="wsfiles-bench-") as temp:
        work = Path(temp)
        for folder in ("ws-root", "ftp-root"):
            (work / folder).mkdir()
        source = work / "source.bin"
        with announced(f"writing a {size}-byte source file"):
            expected = make_source(source, size)
        ws_argv = twistd_wsfiles(
            work / "ws-root", "--max-size", "2G" if size <= 2 * GIB else str(size)
        )
        ftp_argv = [
            sys.executable, str(Path(__file__).with_name("_ftp_server.py")),
            str(work / "ftp-root"), FTP_USER, FTP_PASSWORD,
        ]  # fmt: skip
        print(f"wsfiles server: {shlex.join(ws_argv)}")
        print(f"FTP server: {shlex.join(ftp_argv)}", flush=True)
        ws = ServerProcess("wsfiles", ws_argv, WSFILES_READY)
        ftp = ServerProcess("ftp", ftp_argv, FTP_READY)
        with ws, ftp:
            idle_kib = read_status_kib(ws.pid, "VmRSS")
            print(f"wsfiles server: pid {ws.pid}, port {ws.port}, idle RSS {idle_kib} kB")
            try:
                rounds = run_on_reactor(
                    lambda reactor: measure(
                        ws, ftp, source, work, expected, args.runs, args.timeout, reactor
                    )
                )
            except BaseException:
                print(ws.recent_output() + ftp.recent_output(), file=sys.stderr)
                raise
            ws_hwm = read_status_kib(ws.pid, "VmHWM")
            ftp_hwm = read_status_kib(ftp.pid, "VmHWM")
        client_hwm = read_status_kib(os.getpid(), "VmHWM")
    report(size, rounds, ws_hwm, ftp_hwm, client_hwm)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(1)
