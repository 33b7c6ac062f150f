"""Throughput, CPU and memory of a real wsfiles server, against the servers
people would pick instead and the machine's own limits, all in one run.

Run from the repository root (wsfiles must be installed, ``twistd wsfiles``
must work; the Node peers need ``npm ci --prefix bench/node``, else they are
skipped with one line saying so)::

    python bench/throughput.py --runs 3        # 1 GiB file, median of 3
    python bench/throughput.py --size 256M --runs 3

In one run it:

1. writes a file of ``--size`` bytes (default 1G; K/M/G are powers of 1024)
   into a temporary folder;
2. starts the servers as subprocesses on 127.0.0.1: ``twistd --nodaemon
   --pidfile= --logfile=- wsfiles --listen tcp:0:interface=127.0.0.1 ...``;
   the peers doing the same job (stream, SHA-256, fsync, rename, digest in the
   reply; downloads streamed with back-pressure and their digest): a Node.js
   server on npm ``ws`` + ``bufferutil`` (bench/node/ws-server.js, with its
   client bench/node/client.js, one long-lived Node process) and one on the
   Python ``websockets`` library (bench/_websockets_peer.py); and two
   references that do less (no hash, no fsync): ``@tus/server`` with
   ``@tus/file-store`` and ``tus-js-client`` (one PATCH; downloads are its GET)
   and Twisted's FTP server (bench/_ftp_server.py) with ``ftplib``;
3. runs the contenders in turn, ``--runs`` times (A, B, C, ..., A, B, C, ...,
   so machine noise falls on all of them alike): each uploads then downloads
   the file, after deleting its own previous copy (freeing its pages) just
   before; then the physical limits (bench/_limits.py): one Python process
   copying the same file to the same disk and fsyncing it (the durable write
   rate) and moving as many bytes over a loopback TCP connection (the loopback
   copy rate).  ``--warmup`` rounds (default 1) come first and are shown
   but not counted: the first time each process writes into memory the VM
   has handed back to its host costs it 1.8-2.3 CPU s per GiB (free page
   reporting; docs/performance.md): in two runs here without a warm-up the
   first round's durable write was 2.7-3.3x slower than the next ones, and
   wsfiles' upload up to 2.5x.  wsfiles uses the project's client
   (``wsfiles.client``, on the Twisted reactor of this process, malloc tuned
   as the ``wsfiles`` command does it unless ``--untuned``); every downloaded
   copy's SHA-256 is checked against the source;
4. reads each server's peak resident set (VmHWM in /proc/PID/status)
   after the last transfer, before stopping it;
5. prints, per direction and contender, the median of the runs: MB/s and the
   CPU seconds per GiB of the server, the client and all other processes;
   then the ratios of wsfiles to each peer and limit (ratios of the medians)
   and the targets of issue 18, each also as a ``RESULT {json}`` line for
   bench/run_all.py;
6. times SHA-256 on this machine and prints, per direction, the ceiling a
   service that must hash what the protocol says it hashes could reach here
   against FTP (see ``hashing_ceilings``).

CPU is read from /proc (utime + stime of each process, all its threads; the
client of wsfiles, websockets and FTP is this process); "others" is what every
other process used meanwhile (/proc/stat): a large figure says the machine was
busy and that transfer is skewed.

MB means 10^6 bytes throughout.  Only 127.0.0.1 is used, every wait has a
bound, and the servers and the temporary files are removed at the end, also
on errors or Ctrl-C.  The exit status is 0 when the measurements completed
(whatever the targets say), 1 when the benchmark itself failed.  Linux only
(/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import ftplib
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _node_peers as node_peers
import _websockets_peer as websockets_peer
from _common import (
    GIB,
    LOOPBACK,
    MB,
    WSFILES_READY,
    ServerProcess,
    announced,
    bounded,
    check_copy,
    cpu_seconds,
    header,
    machine_busy_seconds,
    make_source,
    print_result,
    read_status_kib,
    run_on_reactor,
    run_script,
    size_argument,
    twistd_wsfiles,
)
from twisted.internet import threads

from wsfiles.client import WsfilesError, connect, upload_frame_size
from wsfiles.tuning import tune_malloc

FTP_BLOCK = 256 * 1024
CONNECT_TIMEOUT = 30.0
FTP_USER = "bench"
FTP_PASSWORD = "bench"
FILE_NAME = "bench.bin"

#: Issue 18's targets (ratios of medians measured in the same run).
RSS_TARGET_MB = 100.0
SAME_JOB_TARGET = 1.3  # wsfiles vs a peer doing the same job (and vs tus on downloads)
DURABLE_TARGET = 0.7  # upload vs the disk's durable write rate
FTP_DOWNLOAD_TARGET = 1.0
CPU_TARGETS = {  # CPU seconds per GiB, (direction, side)
    ("upload", "server"): 1.5,
    ("upload", "client"): 1.5,
    ("download", "server"): 0.8,
}
#: Other processes' CPU, in CPUs, above which the report warns about a busy machine.
BUSY_MACHINE = 0.2
#: SHA-256 is timed over this many bytes (best of HASH_TRIES) and scaled to the file size.
HASH_SAMPLE = 256 * 1024 * 1024
HASH_TRIES = 3
#: Whole-file SHA-256 passes per direction: an upload is hashed by the server (for
#: ``ack``) and by the client (which checks it); a download only by the client, the
#: server sending the digest it recorded when the file was stored.
HASH_PASSES = {"upload": 2, "download": 1}

BENCH = Path(__file__).resolve().parent
READY = {
    "wsfiles": WSFILES_READY,
    "FTP": re.compile(r"ftp listening on 127\.0\.0\.1:(\d+)"),
    "websockets": re.compile(r"websockets listening on 127\.0\.0\.1:(\d+)"),
    **node_peers.READY,
}

#: The servers, in the order each run measures them; the first is the one under test.
CONTENDERS = ("wsfiles", "wsfiles-blake3", "node-ws", "websockets", "tus", "FTP")
#: wsfiles with the hash its command line picks when the server offers it
#: (docs/protocol.md, "Faster hashing: BLAKE3"): the same server process.
OURS = ("wsfiles", "wsfiles-blake3")
#: Peers doing wsfiles' whole job (hash, fsync, rename, digest in the reply).
SAME_JOB = ("node-ws", "websockets")
#: What the others do less of, for the report.
REFERENCE = {"tus": "no hash, no fsync", "FTP": "no hash, no fsync"}
DURABLE = "durable write"
LOOPBACK_COPY = "loopback copy"
LIMITS = (DURABLE, LOOPBACK_COPY)
DIRECTIONS = ("upload", "download")


# -- measurements --------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """One timed transfer: wall-clock seconds and the CPU used meanwhile."""

    seconds: float
    server_cpu: float
    client_cpu: float
    #: CPU used by everything else on the machine (other jobs skew the figures).
    other_cpu: float
    #: Shown after the figures (the durable write says how long its fsync took).
    note: str = ""

    def describe(self, size: int) -> str:
        per_gib = GIB / size
        return (
            f"{size / self.seconds / MB:8.1f} MB/s  {self.seconds:6.2f} s"
            f"   CPU s/GiB: server {self.server_cpu * per_gib:5.2f},"
            f" client {self.client_cpu * per_gib:5.2f}, others {self.other_cpu * per_gib:5.2f}"
            + (f"  ({self.note})" if self.note else "")
        )


class Stopwatch:
    """Times a transfer, with the CPU used by the server, the client and the rest.

    The client is process ``client_pid``, or this process when None.
    """

    def __init__(self, server_pid: int, client_pid: int | None = None) -> None:
        self._server_pid = server_pid
        self._client_pid = client_pid
        self._marks = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        client = time.process_time() if self._client_pid is None else cpu_seconds(self._client_pid)
        return (time.perf_counter(), cpu_seconds(self._server_pid), client, machine_busy_seconds())

    def start(self) -> None:
        self._marks = self._now()

    def elapsed(self) -> float:
        """Wall-clock seconds since ``start``; cheap (reads no /proc file)."""
        return time.perf_counter() - self._marks[0]

    def stop(self) -> Transfer:
        wall, server, client, busy = (b - a for a, b in zip(self._marks, self._now(), strict=True))
        return Transfer(wall, server, client, max(0.0, busy - server - client))


#: One run: per contender (and limit), a Transfer per direction.
Round = dict[str, dict[str, Transfer]]


@dataclass
class Setup:
    """What every contender's run needs."""

    servers: dict[str, ServerProcess]
    node_client: node_peers.NodeClient | None
    source: Path
    work: Path
    expected: str
    timeout: float

    @property
    def sink(self) -> Path:
        return self.work / "copy.bin"

    def root(self, name: str) -> Path:
        return self.work / f"{name}-root"


async def wsfiles_round(setup: Setup, reactor: Any, hash: str = "sha256") -> dict[str, Transfer]:
    """Delete the last copy, upload, download with wsfiles.client on this process's reactor."""
    server = setup.servers["wsfiles"]
    url = f"ws://{LOOPBACK}:{server.port}"
    client = await bounded(connect(url, reactor=reactor), CONNECT_TIMEOUT, reactor)
    watch = Stopwatch(server.pid)
    try:
        with contextlib.suppress(WsfilesError):  # not_found on the first run
            await bounded(client.delete(FILE_NAME), CONNECT_TIMEOUT, reactor)
        with setup.source.open("rb") as f:
            watch.start()
            await bounded(client.upload(FILE_NAME, f, hash=hash), setup.timeout, reactor)
            up = watch.stop()
        with setup.sink.open("wb") as f:
            watch.start()
            await bounded(client.download(FILE_NAME, f, hash=hash), setup.timeout, reactor)
            down = watch.stop()
    finally:
        await bounded(client.close(), CONNECT_TIMEOUT, reactor)
    await threads.deferToThread(check_copy, "wsfiles download", setup.sink, setup.expected)
    return {"upload": up, "download": down}


def ftp_round(setup: Setup) -> dict[str, Transfer]:
    """STOR then RETR with ftplib (blocking: run it in a thread)."""
    server = setup.servers["FTP"]
    (setup.root("FTP") / FILE_NAME).unlink(missing_ok=True)
    watch = Stopwatch(server.pid)

    def within_deadline(_: object = None) -> None:
        if watch.elapsed() > setup.timeout:
            raise TimeoutError(f"FTP transfer took longer than {setup.timeout:g} s")

    with ftplib.FTP(timeout=CONNECT_TIMEOUT) as ftp:
        ftp.connect(LOOPBACK, server.port)
        ftp.login(FTP_USER, FTP_PASSWORD)
        with setup.source.open("rb") as f:
            watch.start()
            ftp.storbinary(f"STOR {FILE_NAME}", f, blocksize=FTP_BLOCK, callback=within_deadline)
            up = watch.stop()
        with setup.sink.open("wb") as f:

            def write(block: bytes) -> None:
                f.write(block)
                within_deadline()

            watch.start()
            ftp.retrbinary(f"RETR {FILE_NAME}", write, blocksize=FTP_BLOCK)
            down = watch.stop()
    check_copy("FTP download", setup.sink, setup.expected)
    return {"upload": up, "download": down}


def websockets_round(setup: Setup) -> dict[str, Transfer]:
    """Upload then download with the websockets library's client (blocking: a thread)."""
    server = setup.servers["websockets"]
    (setup.root("websockets") / FILE_NAME).unlink(missing_ok=True)
    watch = Stopwatch(server.pid)
    watch.start()
    websockets_peer.upload(server.port, setup.source, FILE_NAME, setup.timeout)
    up = watch.stop()
    watch.start()
    websockets_peer.download(server.port, FILE_NAME, setup.sink, setup.timeout)
    down = watch.stop()
    check_copy("websockets download", setup.sink, setup.expected)
    return {"upload": up, "download": down}


def node_ws_round(setup: Setup) -> dict[str, Transfer]:
    """Upload then download with the Node ws client (bench/node/client.js; blocking)."""
    server, client = setup.servers["node-ws"], setup.node_client
    assert client is not None
    (setup.root("node-ws") / FILE_NAME).unlink(missing_ok=True)
    watch = Stopwatch(server.pid, client.pid)
    watch.start()
    client.request(
        setup.timeout, op="ws-upload", port=server.port, source=str(setup.source), name=FILE_NAME
    )
    up = watch.stop()
    watch.start()
    client.request(
        setup.timeout, op="ws-download", port=server.port, name=FILE_NAME, sink=str(setup.sink)
    )
    down = watch.stop()
    check_copy("node-ws download", setup.sink, setup.expected)
    return {"upload": up, "download": down}


def tus_round(setup: Setup) -> dict[str, Transfer]:
    """Upload with tus-js-client (one PATCH), download with a GET (bench/node/client.js)."""
    server, client = setup.servers["tus"], setup.node_client
    assert client is not None
    root = setup.root("tus")
    for old in root.iterdir():  # tus names its files by upload id
        old.unlink()
    watch = Stopwatch(server.pid, client.pid)
    watch.start()
    answer = client.request(
        setup.timeout, op="tus-upload", port=server.port, source=str(setup.source), name=FILE_NAME
    )
    up = watch.stop()
    watch.start()
    client.request(setup.timeout, op="tus-download", url=answer["url"], sink=str(setup.sink))
    down = watch.stop()
    check_copy("tus download", setup.sink, setup.expected)
    return {"upload": up, "download": down}


def limit_run(argv: list[str], timeout: float) -> Transfer:
    """Run bench/_limits.py; its own timing, its CPU as the "server" side, the rest as others."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = machine_busy_seconds()
    done = subprocess.run(
        [sys.executable, str(BENCH / "_limits.py"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    busy = machine_busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"bench/_limits.py {argv[0]} failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout.splitlines()[-1])
    whole = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    note = f"fsync {figures['fsync_seconds']:.2f} s of it" if "fsync_seconds" in figures else ""
    return Transfer(figures["seconds"], figures["cpu"], 0.0, max(0.0, busy - whole), note)


def durable_write_round(setup: Setup) -> dict[str, Transfer]:
    copy = setup.root(DURABLE) / FILE_NAME
    copy.unlink(missing_ok=True)
    return {"upload": limit_run(["disk", str(setup.source), str(copy)], setup.timeout)}


def loopback_round(setup: Setup) -> dict[str, Transfer]:
    size = setup.source.stat().st_size
    copy = limit_run(["loopback", str(size)], setup.timeout)
    return {"upload": copy, "download": copy}


BLOCKING: dict[str, Callable[[Setup], dict[str, Transfer]]] = {
    "node-ws": node_ws_round,
    "websockets": websockets_round,
    "tus": tus_round,
    "FTP": ftp_round,
    DURABLE: durable_write_round,
    LOOPBACK_COPY: loopback_round,
}


async def measure(
    setup: Setup, order: list[str], runs: int, warmup: int, reactor: Any
) -> list[Round]:
    """``warmup`` rounds, then ``runs`` counted ones; each round runs ``order`` once."""
    rounds = []
    size = setup.source.stat().st_size
    for number in range(1 - warmup, runs + 1):
        result: Round = {}
        for name in order:
            if name in OURS:
                hash = "blake3" if name == "wsfiles-blake3" else "sha256"
                result[name] = await wsfiles_round(setup, reactor, hash)
            else:
                result[name] = await threads.deferToThread(BLOCKING[name], setup)
        if number >= 1:
            rounds.append(result)
        print(f"run {number}:" if number >= 1 else "warm-up (not counted):", flush=True)
        for name in order:
            for direction, transfer in result[name].items():
                if name == LOOPBACK_COPY and direction == "download":
                    continue  # the same transfer
                label = name if name in LIMITS else f"{name} {direction[:-4]}"
                print(f"  {label:16}{transfer.describe(size)}", flush=True)
    return rounds


def sha256_cpu_seconds(size: int) -> float:
    """CPU seconds this thread needs to SHA-256 ``size`` bytes held in memory, now."""
    block = os.urandom(8 * 1024 * 1024)
    blocks = HASH_SAMPLE // len(block)
    best = float("inf")
    for _ in range(HASH_TRIES):
        digest = hashlib.sha256()
        start = time.thread_time()
        for _ in range(blocks):
            digest.update(block)
        best = min(best, time.thread_time() - start)
    return best * size / (blocks * len(block))


# -- report --------------------------------------------------------------


def size_label(size: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def hashing_ceilings(size: int, rounds: list[Round], hash_seconds: float) -> None:
    """What FTP's own work plus the protocol's hashing would allow on this machine.

    A model, not a measurement of wsfiles: take the fastest FTP transfer's CPU
    (server + client: reading, sending, receiving, writing the bytes once),
    add the SHA-256 passes the protocol requires, spread all of it perfectly
    over this machine's CPUs (a single SHA-256 stream cannot be split, so never
    faster than one pass), and compare that time with FTP's.  Masking, frame
    parsing and the fsync before ``ack`` are left out, so a real WebSocket
    service lands below the figure, never above it.
    """
    cpus = len(os.sched_getaffinity(0))
    for label in DIRECTIONS:
        ftp = min((r["FTP"][label] for r in rounds), key=lambda t: t.seconds)
        passes = HASH_PASSES[label]
        work = ftp.server_cpu + ftp.client_cpu + passes * hash_seconds
        seconds = max(work / cpus, hash_seconds, ftp.seconds)
        print_result(
            f"{size_label(size)} {label} ceiling with SHA-256 (model)",
            f"{ftp.seconds / seconds:.2f}x FTP ({size / seconds / MB:.0f} MB/s): FTP's CPU"
            f" {ftp.server_cpu + ftp.client_cpu:.2f} s + {passes} x SHA-256 {hash_seconds:.2f} s"
            f" over {cpus} CPUs",
            "none (reported; issue 2 asked >= 0.7x FTP)",
            None,
        )


class Medians:
    """The median of the runs, per contender and direction."""

    def __init__(self, size: int, rounds: list[Round]) -> None:
        self.size = size
        self.rounds = rounds

    def _median(self, name: str, direction: str, figure: Callable[[Transfer], float]) -> float:
        return statistics.median(figure(r[name][direction]) for r in self.rounds)

    def seconds(self, name: str, direction: str) -> float:
        return self._median(name, direction, lambda t: t.seconds)

    def mb_s(self, name: str, direction: str) -> float:
        return self.size / self.seconds(name, direction) / MB

    def cpu_per_gib(self, name: str, direction: str, side: str) -> float:
        attribute = {"server": "server_cpu", "client": "client_cpu", "others": "other_cpu"}[side]
        per_gib = GIB / self.size
        return self._median(name, direction, lambda t: getattr(t, attribute) * per_gib)


def report(
    size: int,
    rounds: list[Round],
    order: list[str],
    skipped: dict[str, str],
    peak_kib: dict[str, int],
    client_kib: int,
    hash_seconds: float,
) -> None:
    m = Medians(size, rounds)
    label = size_label(size)
    contenders = [name for name in order if name not in LIMITS]
    print()
    print(f"median of {len(rounds)} run(s), {size} bytes, MB = 10^6 bytes;")
    print("CPU s per GiB moved: server / client / all other processes")
    print(f"{'':16}{'upload':>34}{'download':>34}")
    for name in order:
        cells = []
        for direction in DIRECTIONS:
            if direction not in rounds[0][name]:  # the durable write has no download
                cells.append(f"{'':>34}")
                continue
            cpu = " / ".join(
                f"{m.cpu_per_gib(name, direction, side):4.2f}"
                for side in ("server", "client", "others")
            )
            cells.append(f"{m.mb_s(name, direction):8.1f} MB/s  {cpu:>20}")
        note = f"  ({REFERENCE[name]})" if name in REFERENCE else ""
        print(f"{name:16}" + "".join(cells) + note)
    print("durable write: one process, its CPU under 'server'; loopback copy: one process,")
    print("sender and receiver threads, its CPU under 'server'")
    print()

    def ratio_result(
        direction: str, peer: str, goal: float | None, why: str = "", us: str = "wsfiles"
    ) -> None:
        ours, theirs = m.mb_s(us, direction), m.mb_s(peer, direction)
        ratio = ours / theirs
        goal_text = f">= {goal:g}x" if goal is not None else f"none ({why})"
        print_result(
            f"{label} {direction}, {us} vs {peer}",
            f"{ratio:.2f}x ({ours:.0f} vs {theirs:.0f} MB/s)",
            goal_text,
            None if goal is None else ratio >= goal,
        )

    for name, why in skipped.items():
        print_result(f"{label}, wsfiles vs {name}", f"skipped: {why}", "-", None)
    peers = [name for name in contenders if name not in OURS]
    for us in [name for name in contenders if name in OURS]:
        for peer in peers:
            if peer in SAME_JOB:
                ratio_result("upload", peer, SAME_JOB_TARGET, us=us)
            else:
                ratio_result("upload", peer, None, f"reference: {REFERENCE[peer]}", us=us)
        ratio_result("upload", DURABLE, DURABLE_TARGET, us=us)
        ratio_result("upload", LOOPBACK_COPY, None, "reported: the loopback limit", us=us)
        for peer in peers:
            goal = FTP_DOWNLOAD_TARGET if peer == "FTP" else SAME_JOB_TARGET
            ratio_result("download", peer, goal, us=us)
        ratio_result("download", LOOPBACK_COPY, None, "reported: the loopback limit", us=us)
        for (direction, side), goal in CPU_TARGETS.items():
            cpu = m.cpu_per_gib(us, direction, side)
            print_result(
                f"{direction}: {us} {side} CPU per GiB",
                f"{cpu:.2f} s",
                f"<= {goal:g} s",
                cpu <= goal,
            )
    for direction in DIRECTIONS:
        sides = ", ".join(
            f"{name} {m.cpu_per_gib(name, direction, 'server'):.2f}"
            f" / {m.cpu_per_gib(name, direction, 'client'):.2f}"
            for name in contenders
        )
        others = max(m.cpu_per_gib(name, direction, "others") for name in contenders)
        print_result(
            f"{direction}: CPU s per GiB, server / client",
            f"{sides} (others at most {others:.2f} per GiB)",
            "none (reported)",
            None,
        )
    rss_mb = peak_kib["wsfiles"] * 1024 / MB
    print_result(
        f"server peak RSS moving {label}",
        f"{rss_mb:.1f} MB",
        f"< {RSS_TARGET_MB:g} MB",
        rss_mb < RSS_TARGET_MB,
    )
    others = ", ".join(
        f"{peer} server {peak_kib[peer] * 1024 / MB:.1f} MB"
        for peer in contenders
        if peer not in OURS
    )
    print(
        f"for comparison, peak RSS: {others},"
        f" benchmark (client) process {client_kib * 1024 / MB:.1f} MB"
    )
    hashing_ceilings(size, rounds, hash_seconds)
    transfers = [t for r in rounds for pair in r.values() for t in pair.values()]
    busy = sum(t.other_cpu for t in transfers) / sum(t.seconds for t in transfers)
    print(f"other processes kept {busy:.0%} of one CPU busy during the transfers", end="")
    print(": the machine was not quiet, figures are skewed" if busy > BUSY_MACHINE else "")


# -- main ----------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=size_argument, default="1G", help="file size, e.g. 512M or 1G (default 1G)"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="repetitions, interleaved; the median counts"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="uncounted rounds first, so every process has touched its memory (1)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per transfer (300)"
    )
    parser.add_argument(
        "--untuned",
        action="store_true",
        help="leave this process's malloc alone (the wsfiles command tunes it: wsfiles.tuning)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    return args


def server_commands(work: Path, size: int) -> dict[str, list[str]]:
    commands = {
        "wsfiles": twistd_wsfiles(
            work / "wsfiles-root", "--max-size", "2G" if size <= 2 * GIB else str(size)
        ),
        "FTP": [
            sys.executable, str(BENCH / "_ftp_server.py"),
            str(work / "FTP-root"), FTP_USER, FTP_PASSWORD,
        ],
        "websockets": [
            sys.executable, str(BENCH / "_websockets_peer.py"), str(work / "websockets-root")
        ],
    }  # fmt: skip
    if node_peers.node_binary() is not None:
        for peer in ("node-ws", "tus"):
            commands[peer] = node_peers.server_argv(peer, work / f"{peer}-root")
    return commands


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    size: int = args.size
    header()
    tuned = False if args.untuned else tune_malloc()
    print(
        f"client: malloc {'tuned as by the wsfiles command' if tuned else 'untuned'}"
        f" (wsfiles.tuning), upload frames of {upload_frame_size() // 1024} KiB"
    )
    with tempfile.TemporaryDirectory(prefix="wsfiles-bench-") as temp:
        work = Path(temp)
        source = work / "source.bin"
        with announced(f"writing a {size}-byte source file"):
            expected = make_source(source, size)
        with contextlib.ExitStack() as stack:
            skipped: dict[str, str] = {}
            node_client = None
            problem = node_peers.unavailable()
            if problem is None:
                node_client = stack.enter_context(node_peers.NodeClient())
                print(f"node client: pid {node_client.pid}, node {node_client.node_version}")
                if node_client.tus_problem:
                    skipped["tus"] = node_client.tus_problem
            else:
                skipped = {peer: problem for peer in ("node-ws", "tus")}
            for why in dict.fromkeys(skipped.values()):  # one line per reason
                peers = " and ".join(peer for peer in skipped if skipped[peer] == why)
                print(f"skipping {peers}: {why}", flush=True)
            contenders = [name for name in CONTENDERS if name not in skipped]
            commands = server_commands(work, size)
            for name in [*contenders, *LIMITS]:
                work.joinpath(f"{name}-root").mkdir()
            servers = {}
            for peer in contenders:
                if peer == "wsfiles-blake3":
                    continue  # the wsfiles server, asked for BLAKE3
                print(f"{peer} server: {shlex.join(commands[peer])}", flush=True)
                servers[peer] = stack.enter_context(
                    ServerProcess(peer, commands[peer], READY[peer])
                )
                print(f"  {servers[peer].output[-1] if peer in node_peers.READY else ''}".rstrip())
            ws = servers["wsfiles-blake3"] = servers["wsfiles"]
            idle_kib = read_status_kib(ws.pid, "VmRSS")
            print(f"wsfiles server: pid {ws.pid}, port {ws.port}, idle RSS {idle_kib} kB")
            setup = Setup(servers, node_client, source, work, expected, args.timeout)
            order = [*contenders, *LIMITS]
            print(f"order of each run: {', '.join(order)}", flush=True)
            try:
                rounds = run_on_reactor(
                    lambda reactor: measure(setup, order, args.runs, args.warmup, reactor)
                )
            except BaseException:
                for server in servers.values():
                    print(server.recent_output(), file=sys.stderr)
                raise
            peak_kib = {peer: read_status_kib(servers[peer].pid, "VmHWM") for peer in contenders}
        client_hwm = read_status_kib(os.getpid(), "VmHWM")
        shutil.rmtree(work / "tus-root", ignore_errors=True)
    with announced("timing SHA-256 on this machine"):
        hash_seconds = sha256_cpu_seconds(size)
    report(size, rounds, order, skipped, peak_kib, client_hwm, hash_seconds)
    return 0


if __name__ == "__main__":
    run_script(main)
