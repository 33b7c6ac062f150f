"""Concurrency of a real wsfiles server: 16 clients moving big files at once, then 1,000 clients.

Run from the repository root (wsfiles must be installed, ``twistd wsfiles`` must work)::

    python bench/concurrency.py                    # 16 x 64 MiB, then 1,000 clients
    python bench/concurrency.py --sixteen-size 16M --clients 200
    python bench/concurrency.py --anonymous        # phase 2 without a users file
    python bench/concurrency.py --help             # --seed, --skip-sixteen, --skip-crowd, ...

Before anything is timed it writes the source files into a temporary folder
(seeded random bytes) and, for phase 2, makes one users-file entry per client
with ``wsfiles.users.add_user`` (what ``wsfiles user add --users FILE NAME``
runs; two threads, each into a file of its own, joined into one).  Then, on one
Twisted reactor in this process, with the project's client (``wsfiles.client``):

1. **16 clients transferring at once.**  A fresh ``twistd --nodaemon --pidfile=
   --logfile=- wsfiles --listen tcp:0:interface=127.0.0.1 --root TMP ...``
   (anonymous: all 16 share the root, each with a name of its own).  16 clients
   connect; all 16 upload a distinct ``--sixteen-size`` file (64 MiB: 1 GiB in
   all) at the same moment, and once every upload is acknowledged all 16
   download their file at once into files on disk.  The server's peak RSS
   (VmHWM in /proc/PID/status) is read right after: the target is < 200 MB.
   The client checks every ``ack``/``sent`` SHA-256; outside the timing this
   script hashes every downloaded copy and the server's stored copy and
   compares them with the source.  Then, as a same-run baseline for the same
   bytes, one client on the same server uploads the 16 files one after another
   (new names) and downloads them one after another; the 16-client aggregate
   MB/s each way is printed as a ratio of that.
2. **1,000 concurrent clients** (``--clients``).  Each client has a name of its
   own, in a users file given to a fresh server with ``--users`` (so each has
   its own folder, its own ``changed`` events and its own token, as 1,000
   clients of a real deployment would; ``--anonymous`` runs them all as the
   anonymous client instead, with distinct file names in one folder, where every
   ``changed`` event lists every client's files to every client).  The
   connection limits are raised to fit.  The clients connect in bounded batches
   (``--connects-at-once``): 8 handshakes in flight with tokens, 50 anonymous.
   Twisted's listen backlog is 50, and the server checks 2 tokens at a time
   with scrypt (tens of ms each) while the client drops a handshake unanswered
   after 5 s: at 50 in flight on a busy machine most connects timed out and the
   server went on hashing for them.  Connecting is timed and costed apart; the
   machine-wide listen-queue overflow counter is shown for each stage.  Once all are
   connected, every client at the same moment saves one file of random size
   64 KiB to 1 MiB (seeded) and then gets it back.  The file channel the server
   offers in each first save is opened holding one of 50 slots shared by all
   clients (those are connects too, 1,000 at once otherwise; without the slots
   most overflowed the backlog and failed in Autobahn's 5 s handshake timeout).
   Latency is measured per command on the wire: save from sending ``save`` to
   its ``ack``, get from sending ``get`` to its ``sent``; the save's includes
   waiting for a slot and opening the file channel, both also shown apart.
   The downloaded bytes are compared with the uploaded ones as they arrive, and
   afterwards every stored file under the server's root is compared too.
   Target: no error at all and every SHA-256 right.  Aggregate MB/s is over the
   transfer window (first ``save`` sent to last ``get`` done), both ways
   together and each way.  The server's peak RSS is read after connecting and
   (after a reset of the peak through /proc/PID/clear_refs) again after the
   transfers; its CPU seconds are given
   for each stage.

Each target is printed as ``TARGET: FIGURE   target GOAL  PASS|FAIL`` and as a
``RESULT {json}`` line (``bench/_common.print_result``) that bench/run_all.py
collects; figures without a target print no verdict.  MB means 10^6 bytes.
CPU figures include the other processes of the machine: on a shared machine
they, and the MB/s, are noisy.  Both servers' logs are scanned for tracebacks
and warnings.

Only 127.0.0.1 is used; every transfer, connect, close and phase has a time
bound; the servers (started with ``--grace 5``) and the temporary folder are
removed at the end, also on errors or Ctrl-C.  The exit status is 0 when the
measurements completed (whatever the targets say: errors and mismatches are
FAIL results), 1 when the benchmark itself could not complete.  Linux only
(/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import _common
from _common import (
    GIB,
    KIB,
    MB,
    MIB,
    cpu_seconds,
    header,
    machine_busy_seconds,
    percentile,
    print_result,
    read_status_kib,
    run_on_reactor,
    run_script,
    sha256_of,
    twistd_wsfiles,
)
from twisted.internet import defer, threads

from wsfiles.client import WsfilesClient, WsfilesError, connect
from wsfiles.sizes import parse_size
from wsfiles.users import add_user

T = TypeVar("T")

SIXTEEN = 16
CONNECTS_AT_ONCE = 50  # Twisted's listen backlog is 50
#: With tokens: the server checks 2 at once (scrypt, tens of ms each) and the
#: client drops a handshake unanswered after 5 s (Autobahn's default).
AUTHENTICATED_CONNECTS_AT_ONCE = 8
CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0
CROWD_OP_TIMEOUT = 120.0
#: Big transfers get this long plus a second per SLOWEST_RATE bytes.
BIG_OP_BASE_TIMEOUT = 60.0
SLOWEST_RATE = 5 * MB
VERIFY_TIMEOUT = 300.0
SMALLEST_FILE = 64 * KIB
LARGEST_FILE = MIB
USER_MAKERS = 2  # threads hashing tokens (scrypt releases the GIL)
SERVER_GRACE = "5"
GENERATE_BLOCK = 4 * MIB

LOG_LEVEL = re.compile(r"\[[^\]#]*#(warn|error|critical)\]")


# -- the server subprocess ---------------------------------------------------


class ServerProcess(_common.ServerProcess):
    """``twistd wsfiles`` whose log is scanned for tracebacks and warnings."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        super().__init__(name, argv, log_path=log_path)
        # Written by the reader thread; read after stop().
        self.lines = 0
        self.tracebacks = 0
        self.levels: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()

    def on_line(self, line: str) -> None:
        self.lines += 1
        if "Traceback" in line:
            self.tracebacks += 1
        level = LOG_LEVEL.search(line)
        if level:
            self.levels[level.group(1)] += 1
        if level or "Traceback" in line or "Unhandled" in line:
            text = re.sub(r"\d+", "N", line.partition(" ")[2])[:200]
            self.problems[text] += 1

    def log_summary(self) -> str:
        levels = ", ".join(f"{k} {n}" for k, n in sorted(self.levels.items())) or "none"
        text = (
            f"{self.name} log: {self.lines} lines, {self.tracebacks} 'Traceback',"
            f" warnings/errors: {levels}; exit code {self.exit_code}"
        )
        for problem, n in self.problems.most_common(8):
            text += f"\n  {n} x {problem}"
        return text


def start_server(stack: contextlib.ExitStack, name: str, argv: list[str], log: Path) -> Any:
    print(f"{name}: {shlex.join(argv)}", flush=True)
    server = stack.enter_context(ServerProcess(name, argv, log))
    print(
        f"{name}: pid {server.pid}, port {server.port},"
        f" idle RSS {read_status_kib(server.pid, 'VmRSS')} kB",
        flush=True,
    )
    return server


# -- helpers -------------------------------------------------------------------


def listen_overflows() -> int:
    """Machine-wide count of connections dropped because an accept queue was full."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def mb_of_kib(kib: int) -> str:
    return f"{kib * KIB / MB:.1f} MB"


def describe(error: BaseException) -> str:
    if isinstance(error, WsfilesError):
        return f"{error.code}: {error.message}"
    if isinstance(error, defer.TimeoutError | defer.CancelledError):
        return "timed out"
    return f"{type(error).__name__}: {error}"


async def bounded(coroutine: Coroutine[Any, Any, T], seconds: float, reactor: Any) -> T:
    return await _common.bounded(coroutine, seconds, reactor)


def abort(client: WsfilesClient) -> None:
    """Drop both of ``client``'s connections at once."""
    for protocol in (client._command, client._file):
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()


async def close_all(clients: list[WsfilesClient], reactor: Any) -> None:
    async def close(client: WsfilesClient) -> None:
        try:
            await bounded(client.close(), CLOSE_TIMEOUT, reactor)
        except Exception:
            abort(client)

    await defer.DeferredList([defer.ensureDeferred(close(c)) for c in clients])


class Probe:
    """Times commands on the wire (sent -> final answer) and drops ``changed`` events.

    It wraps the client's ``send`` and ``_received`` on the instance: the client
    sends every command through ``send`` and hands every message to
    ``_received``.
    """

    FINAL = ("ack", "sent", "error")

    def __init__(self, client: WsfilesClient) -> None:
        self.sent_at: dict[int, float] = {}
        self.done_at: dict[int, float] = {}
        self.commands: list[tuple[str, int]] = []
        self.events = 0
        self.event_entries = 0
        #: File-channel set-ups: seconds waiting for a slot, seconds to open.
        self.channel_wait: list[float] = []
        self.channel_open: list[float] = []
        send, received = client.send, client._received

        def timed_send(message: dict[str, Any]) -> int:
            now = time.monotonic()
            request_id = send(message)
            self.sent_at[request_id] = now
            self.commands.append((str(message.get("op")), request_id))
            return request_id

        def timed_received(message: dict[str, Any]) -> None:
            op = message.get("op")
            if op == "changed" and "id" not in message:
                self.events += 1  # counted, not queued: nobody reads them here
                self.event_entries += len(message.get("files") or ())
                return
            if op in self.FINAL and isinstance(message.get("id"), int):
                self.done_at.setdefault(message["id"], time.monotonic())
            received(message)

        client.send = timed_send  # type: ignore[method-assign]
        client._received = timed_received  # type: ignore[method-assign]

    def latency(self, op: str) -> float:
        """Seconds from the last ``op`` sent to its final answer."""
        request_id = next(rid for kind, rid in reversed(self.commands) if kind == op)
        return self.done_at[request_id] - self.sent_at[request_id]


def gate_file_channel(client: WsfilesClient, gate: defer.DeferredSemaphore, probe: Probe) -> None:
    """Open ``client``'s file channel only while holding one of ``gate``'s slots.

    The client opens it when the server offers one, inside its first save: with
    every client saving at once, that would be 1,000 connects at once against a
    listen backlog of 50.
    """
    open_channel = client._open_file_channel

    async def gated(path: str) -> None:
        asked = time.monotonic()
        await gate.acquire()
        admitted = time.monotonic()
        try:
            await open_channel(path)
        finally:
            gate.release()
        probe.channel_wait.append(admitted - asked)
        probe.channel_open.append(time.monotonic() - admitted)

    client._open_file_channel = gated  # type: ignore[method-assign]


class CompareSink:
    """A download sink comparing each chunk with the expected bytes, storing nothing."""

    def __init__(self, expected: bytes) -> None:
        self.expected = expected
        self.position = 0
        self.matches = True

    def write(self, data: bytes) -> int:
        if self.matches and not self.expected.startswith(data, self.position):
            self.matches = False
        self.position += len(data)
        return len(data)

    def complete(self) -> bool:
        return self.matches and self.position == len(self.expected)


@dataclass
class Usage:
    """Wall time and CPU seconds of one stage."""

    seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0

    def others(self) -> float:
        return max(0.0, self.machine_cpu - self.server_cpu - self.client_cpu)

    def text(self) -> str:
        return (
            f"{self.seconds:6.2f} s   CPU s: server {self.server_cpu:5.2f},"
            f" client {self.client_cpu:5.2f}, others {self.others():5.2f}"
        )


class Meter:
    """Measures a stage's wall time and CPU: ``with Meter(pid) as usage: ...``."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.usage = Usage()

    def __enter__(self) -> Usage:
        self._start = time.monotonic()
        self._server = cpu_seconds(self.pid)
        self._client = time.process_time()
        self._machine = machine_busy_seconds()
        return self.usage

    def __exit__(self, *exc_info: object) -> None:
        self.usage.seconds = time.monotonic() - self._start
        self.usage.server_cpu = cpu_seconds(self.pid) - self._server
        self.usage.client_cpu = time.process_time() - self._client
        self.usage.machine_cpu = machine_busy_seconds() - self._machine


# -- phase 1: 16 clients, big files --------------------------------------------


@dataclass
class SixteenOutcome:
    size: int = 0
    concurrent_up: Usage = field(default_factory=Usage)
    concurrent_down: Usage = field(default_factory=Usage)
    single_up: Usage = field(default_factory=Usage)
    single_down: Usage = field(default_factory=Usage)
    hwm_kib: int = 0  # after the 16 clients, before the baseline
    hwm_end_kib: int = 0  # after the baseline too
    idle_kib: int = 0
    errors: list[str] = field(default_factory=list)
    checked: int = 0  # transfers whose bytes were compared and matched
    expected_checks: int = 0


def write_sources(folder: Path, count: int, size: int, seed: int) -> list[tuple[Path, str]]:
    """``count`` files of ``size`` seeded random bytes; their paths and SHA-256."""
    folder.mkdir()
    sources = []
    for i in range(count):
        rng = random.Random(f"{seed}-sixteen-{i}")
        digest = hashlib.sha256()
        path = folder / f"big-{i:02d}.bin"
        with path.open("wb") as f:
            left = size
            while left > 0:
                block = rng.randbytes(min(GENERATE_BLOCK, left))
                f.write(block)
                digest.update(block)
                left -= len(block)
        sources.append((path, digest.hexdigest()))
    return sources


def big_timeout(size: int) -> float:
    return BIG_OP_BASE_TIMEOUT + size / SLOWEST_RATE


async def upload_path(client: WsfilesClient, name: str, path: Path, reactor: Any) -> str:
    with path.open("rb") as source:
        ack = await bounded(client.upload(name, source), big_timeout(path.stat().st_size), reactor)
    return str(ack.get("sha256"))


async def download_path(
    client: WsfilesClient, name: str, path: Path, size: int, reactor: Any
) -> str:
    with path.open("wb") as sink:
        sent = await bounded(client.download(name, sink), big_timeout(size), reactor)
    return str(sent.get("sha256"))


async def check_copy(
    outcome: SixteenOutcome, what: str, path: Path, expected: str, reported: str | None
) -> None:
    """Compare a copy (downloaded or stored) and what the server reported with the source."""
    outcome.expected_checks += 1
    if not path.is_file():
        outcome.errors.append(f"{what}: {path.name} is missing")
        return
    actual = await threads.deferToThread(sha256_of, path)
    if actual != expected:
        outcome.errors.append(f"{what}: {path.name} holds other bytes than the source")
    elif reported is not None and reported != expected:
        outcome.errors.append(f"{what}: the server reported SHA-256 {reported[:12]}...")
    else:
        outcome.checked += 1


async def run_sixteen(
    reactor: Any,
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    sources: list[tuple[Path, str]],
    temp: Path,
) -> SixteenOutcome:
    outcome = SixteenOutcome(size=args.sixteen_size)
    root = temp / "sixteen-root"
    copies = temp / "sixteen-copies"
    copies.mkdir()
    max_size = str(max(GIB, args.sixteen_size))
    argv = twistd_wsfiles(root, "--max-size", max_size, "--grace", SERVER_GRACE)
    server = start_server(stack, "server 1", argv, temp / "server-1.log")
    outcome.idle_kib = read_status_kib(server.pid, "VmRSS")
    url = f"ws://{_common.LOOPBACK}:{server.port}"
    size = args.sixteen_size
    names = [f"c{i:02d}-{path.name}" for i, (path, _) in enumerate(sources)]

    # 16 clients at once: all upload, then all download.
    clients: list[WsfilesClient] = []
    try:
        for _ in sources:
            clients.append(await bounded(connect(url, reactor=reactor), CONNECT_TIMEOUT, reactor))
        acks: list[Any] = []
        with Meter(server.pid) as outcome.concurrent_up:
            acks = await defer.DeferredList(
                [
                    defer.ensureDeferred(upload_path(client, name, path, reactor))
                    for client, name, (path, _) in zip(clients, names, sources, strict=True)
                ],
                consumeErrors=True,
            )
        uploaded = []
        for i, (ok, value) in enumerate(acks):
            if ok:
                uploaded.append(i)
            else:
                outcome.errors.append(f"16 clients: upload {names[i]}: {describe(value.value)}")
        sents: list[Any] = []
        with Meter(server.pid) as outcome.concurrent_down:
            sents = await defer.DeferredList(
                [
                    defer.ensureDeferred(
                        download_path(clients[i], names[i], copies / names[i], size, reactor)
                    )
                    for i in uploaded
                ],
                consumeErrors=True,
            )
    finally:
        await close_all(clients, reactor)
    outcome.hwm_kib = read_status_kib(server.pid, "VmHWM")
    print(
        f"16 clients done: up {outcome.concurrent_up.seconds:.2f} s,"
        f" down {outcome.concurrent_down.seconds:.2f} s; checking copies...",
        flush=True,
    )
    for i in uploaded:
        await check_copy(outcome, "16 clients, ack", root / names[i], sources[i][1], acks[i][1])
    for i, (ok, value) in zip(uploaded, sents, strict=True):
        if not ok:
            outcome.errors.append(f"16 clients: download {names[i]}: {describe(value.value)}")
            continue
        copy = copies / names[i]
        await check_copy(outcome, "16 clients, download", copy, sources[i][1], value)
        copy.unlink(missing_ok=True)

    # The baseline: one client, the same files one after another, new names.
    print("one client, the same files one after another...", flush=True)
    single_names = [f"one-{path.name}" for path, _ in sources]
    client = await bounded(connect(url, reactor=reactor), CONNECT_TIMEOUT, reactor)
    single_acks: list[str | None] = [None] * len(sources)
    single_sents: list[str | None] = [None] * len(sources)
    try:
        with Meter(server.pid) as outcome.single_up:
            for i, (path, _) in enumerate(sources):
                try:
                    single_acks[i] = await upload_path(client, single_names[i], path, reactor)
                except Exception as e:
                    outcome.errors.append(f"one client: upload {single_names[i]}: {describe(e)}")
        with Meter(server.pid) as outcome.single_down:
            for i, name in enumerate(single_names):
                if single_acks[i] is None:
                    continue
                try:
                    single_sents[i] = await download_path(
                        client, name, copies / name, size, reactor
                    )
                except Exception as e:
                    outcome.errors.append(f"one client: download {name}: {describe(e)}")
    finally:
        await close_all([client], reactor)
    outcome.hwm_end_kib = read_status_kib(server.pid, "VmHWM")
    for i, (_, digest) in enumerate(sources):
        name = single_names[i]
        if single_acks[i] is not None:
            await check_copy(outcome, "one client, ack", root / name, digest, single_acks[i])
        if single_sents[i] is not None:
            await check_copy(
                outcome, "one client, download", copies / name, digest, single_sents[i]
            )
        (copies / name).unlink(missing_ok=True)
    server.stop()
    print(server.log_summary(), flush=True)
    if server.tracebacks:
        outcome.errors.append(f"server 1 logged {server.tracebacks} tracebacks")
    return outcome


def report_sixteen(outcome: SixteenOutcome) -> None:
    total = outcome.size * SIXTEEN
    print()
    print(
        f"phase 1: {SIXTEEN} clients x {outcome.size} bytes = {total} bytes each way"
        " (MB = 10^6 bytes)"
    )
    rows = (
        ("16 at once     up", outcome.concurrent_up),
        ("16 at once   down", outcome.concurrent_down),
        ("one client     up", outcome.single_up),
        ("one client   down", outcome.single_down),
    )
    for label, usage in rows:
        print(f"  {label} {total / max(usage.seconds, 1e-9) / MB:8.1f} MB/s {usage.text()}")
    print(
        f"  server RSS: idle {mb_of_kib(outcome.idle_kib)}, peak after the 16 clients"
        f" {mb_of_kib(outcome.hwm_kib)}, after the one-client baseline too"
        f" {mb_of_kib(outcome.hwm_end_kib)}"
    )
    for error in outcome.errors[:20]:
        print(f"  error: {error}")
    if len(outcome.errors) > 20:
        print(f"  ... and {len(outcome.errors) - 20} more")
    transfers_failed = any(not e.startswith("server") for e in outcome.errors)
    print_result(
        "16 clients at once: server peak RSS",
        f"{mb_of_kib(outcome.hwm_kib)} (VmHWM {outcome.hwm_kib} kB)"
        + (" (some transfers failed)" if transfers_failed else ""),
        "< 200 MB",
        outcome.hwm_kib * KIB < 200 * MB and not transfers_failed,
    )
    ok = not outcome.errors and outcome.checked == outcome.expected_checks
    print_result(
        "16 clients at once: SHA-256 and errors",
        f"{outcome.checked} of {outcome.expected_checks} stored and downloaded copies match"
        f" the sources (and the ack/sent SHA-256); {len(outcome.errors)} errors",
        "all match, no error",
        ok,
    )
    for way, many, one in (
        ("upload", outcome.concurrent_up, outcome.single_up),
        ("download", outcome.concurrent_down, outcome.single_down),
    ):
        rate_many = total / max(many.seconds, 1e-9) / MB
        rate_one = total / max(one.seconds, 1e-9) / MB
        print_result(
            f"16 clients at once: aggregate {way}",
            f"{rate_many:.1f} MB/s = {rate_many / rate_one:.2f}x one client's {rate_one:.1f}"
            " MB/s (same bytes, same run)",
            "none (reported)",
            None,
        )


# -- phase 2: 1,000 clients, small files ---------------------------------------


@dataclass
class Member:
    """One of the crowd: its name, token, file and what happened."""

    index: int
    name: str
    token: str | None
    file_name: str
    data: bytes
    client: WsfilesClient | None = None
    probe: Probe | None = None
    save_latency: float | None = None
    get_latency: float | None = None
    downloaded_ok: bool = False


@dataclass
class CrowdOutcome:
    clients: int = 0
    anonymous: bool = False
    users_seconds: float = 0.0
    connect: Usage = field(default_factory=Usage)
    transfer: Usage = field(default_factory=Usage)
    connected: int = 0
    idle_kib: int = 0
    connected_rss_kib: int = 0
    connect_hwm_kib: int = 0
    transfer_hwm_kib: int = 0
    hwm_reset: bool = False
    end_rss_kib: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    errors: list[str] = field(default_factory=list)
    downloads_matched: int = 0
    stored_matched: int = 0
    events: int = 0
    event_entries: int = 0
    connect_overflows: int = 0
    transfer_overflows: int = 0
    channel_wait: list[float] = field(default_factory=list)
    channel_open: list[float] = field(default_factory=list)
    save_latencies: list[float] = field(default_factory=list)
    get_latencies: list[float] = field(default_factory=list)
    server_log: str = ""


def make_crowd(args: argparse.Namespace) -> list[Member]:
    """The clients' names and files (seeded random sizes and bytes); no tokens yet."""
    rng = random.Random(f"{args.seed}-crowd")
    members = []
    for i in range(args.clients):
        size = rng.randint(SMALLEST_FILE, LARGEST_FILE)
        data = random.Random(f"{args.seed}-crowd-{i}").randbytes(size)
        name = f"bench-{i:04d}"
        members.append(Member(i, name, None, f"{name}.bin", data))
    return members


def make_users(path: Path, members: list[Member]) -> None:
    """A users file with one entry per member, through ``wsfiles.users.add_user``.

    USER_MAKERS threads each add their share to a file of their own (add_user
    appends and checks for duplicates in its file), joined at the end.
    """
    parts = [path.with_name(f"{path.name}.part{k}") for k in range(USER_MAKERS)]
    failures: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for member in members[k::USER_MAKERS]:
                member.token = add_user(str(parts[k]), member.name)
        except BaseException as e:
            failures.append(e)

    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(USER_MAKERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(600)  # generous: each entry is one scrypt hash, tens of ms
    if failures or any(worker.is_alive() for worker in workers):
        raise RuntimeError(f"making the users file failed: {failures[:1] or 'timed out'}")
    with path.open("wb") as out:
        os.chmod(path, 0o600)
        for part in parts:
            out.write(part.read_bytes())
            part.unlink()


async def connect_crowd(
    reactor: Any, url: str, members: list[Member], at_once: int, outcome: CrowdOutcome
) -> None:
    gate = defer.DeferredSemaphore(at_once)

    async def one(member: Member) -> None:
        try:
            client = await bounded(
                connect(url, member.token, reactor=reactor), CONNECT_TIMEOUT, reactor
            )
        except Exception as e:
            outcome.errors.append(f"connect {member.name}: {describe(e)}")
            return
        member.client = client
        member.probe = Probe(client)
        expected = "anonymous" if member.token is None else member.name
        if client.hello.get("client") != expected:
            outcome.errors.append(f"connect {member.name}: hello says {client.hello.get('client')}")

    await defer.DeferredList([gate.run(lambda m=m: defer.ensureDeferred(one(m))) for m in members])
    outcome.connected = sum(1 for m in members if m.client is not None)


async def save_and_get(reactor: Any, member: Member, outcome: CrowdOutcome) -> None:
    client, probe = member.client, member.probe
    assert client is not None and probe is not None
    try:
        await bounded(client.upload(member.file_name, member.data), CROWD_OP_TIMEOUT, reactor)
    except Exception as e:
        outcome.errors.append(f"save {member.file_name}: {describe(e)}")
        return
    member.save_latency = probe.latency("save")
    outcome.bytes_up += len(member.data)
    sink = CompareSink(member.data)
    try:
        await bounded(
            client.download(member.file_name, cast(BinaryIO, sink)), CROWD_OP_TIMEOUT, reactor
        )
    except Exception as e:
        outcome.errors.append(f"get {member.file_name}: {describe(e)}")
        return
    member.get_latency = probe.latency("get")
    outcome.bytes_down += sink.position
    if sink.complete():
        member.downloaded_ok = True
    else:
        outcome.errors.append(f"get {member.file_name}: other bytes than uploaded")


def connect_budget(args: argparse.Namespace) -> float:
    return CONNECT_TIMEOUT * (args.clients / args.connects_at_once + 1)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: ``5`` into /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def check_stored(root: Path, members: list[Member], outcome: CrowdOutcome) -> None:
    """Every saved file is in the server's root with the bytes uploaded."""
    for member in members:
        if member.save_latency is None:
            continue
        folder = root if member.token is None else root / member.name
        path = folder / member.file_name
        try:
            stored = path.read_bytes()
        except OSError as e:
            outcome.errors.append(f"stored {member.file_name}: {e.strerror}")
            continue
        if stored == member.data:
            outcome.stored_matched += 1
        else:
            outcome.errors.append(f"stored {member.file_name}: other bytes than uploaded")


async def run_crowd(
    reactor: Any,
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    members: list[Member],
    users_file: Path | None,
    temp: Path,
    outcome: CrowdOutcome,
) -> None:
    root = temp / "crowd-root"
    limit = str(args.clients + 64)
    options = [
        "--max-size",
        "1M",
        "--grace",
        SERVER_GRACE,
        "--max-connections",
        limit,
        "--max-connections-per-ip",
        limit,
        "--max-connections-per-client",
        limit,
    ]
    if users_file is not None:
        options += ["--users", str(users_file)]
    argv = twistd_wsfiles(root, *options)
    server = start_server(stack, "server 2", argv, temp / "server-2.log")
    url = f"ws://{_common.LOOPBACK}:{server.port}"
    outcome.idle_kib = read_status_kib(server.pid, "VmRSS")
    connected = []
    try:
        at_once = args.connects_at_once
        print(f"connecting {len(members)} clients, {at_once} at a time...", flush=True)
        overflows = listen_overflows()
        with Meter(server.pid) as outcome.connect:
            await bounded(
                connect_crowd(reactor, url, members, at_once, outcome),
                connect_budget(args),
                reactor,
            )
        outcome.connect_overflows = listen_overflows() - overflows
        connected = [m for m in members if m.client is not None]
        channel_gate = defer.DeferredSemaphore(CONNECTS_AT_ONCE)
        for m in connected:
            assert m.client is not None
            assert m.probe is not None
            gate_file_channel(m.client, channel_gate, m.probe)
        outcome.connected_rss_kib = read_status_kib(server.pid, "VmRSS")
        outcome.connect_hwm_kib = read_status_kib(server.pid, "VmHWM")
        outcome.hwm_reset = reset_peak_rss(server.pid)
        print(
            f"connected {len(connected)} in {outcome.connect.seconds:.1f} s;"
            " every client saves, then gets, all at once...",
            flush=True,
        )
        overflows = listen_overflows()
        with Meter(server.pid) as outcome.transfer:
            await bounded(
                defer.DeferredList(
                    [defer.ensureDeferred(save_and_get(reactor, m, outcome)) for m in connected]
                ),
                CROWD_OP_TIMEOUT * 2 + 30,
                reactor,
            )
        outcome.transfer_overflows = listen_overflows() - overflows
        outcome.transfer_hwm_kib = read_status_kib(server.pid, "VmHWM")
    finally:
        await close_all([m.client for m in connected if m.client is not None], reactor)
    for m in connected:
        assert m.probe is not None
        outcome.events += m.probe.events
        outcome.event_entries += m.probe.event_entries
        outcome.channel_wait += m.probe.channel_wait
        outcome.channel_open += m.probe.channel_open
        if m.save_latency is not None:
            outcome.save_latencies.append(m.save_latency)
        if m.get_latency is not None:
            outcome.get_latencies.append(m.get_latency)
        outcome.downloads_matched += m.downloaded_ok
    outcome.end_rss_kib = read_status_kib(server.pid, "VmRSS")
    if not outcome.hwm_reset:
        outcome.transfer_hwm_kib = max(outcome.transfer_hwm_kib, outcome.connect_hwm_kib)
    print("transfers done; comparing the stored files...", flush=True)
    await bounded(
        threads.deferToThread(check_stored, root, members, outcome), VERIFY_TIMEOUT, reactor
    )
    server.stop()
    outcome.server_log = server.log_summary()
    if server.tracebacks:
        outcome.errors.append(f"server 2 logged {server.tracebacks} tracebacks")


def report_crowd(outcome: CrowdOutcome) -> None:
    n = outcome.clients
    who = (
        "all as the anonymous client, distinct file names in one folder"
        if outcome.anonymous
        else "each its own user (users file, token checked with scrypt)"
    )
    print()
    print(f"phase 2: {n} clients, {who}")
    if not outcome.anonymous:
        print(f"  users file: {n} entries made in {outcome.users_seconds:.1f} s (before timing)")
    print(f"  connect: {outcome.connected} of {n} connected, {outcome.connect.text()}")
    print(f"  save + get: {outcome.transfer.text()}")
    seconds = max(outcome.transfer.seconds, 1e-9)
    up, down = outcome.bytes_up / MB, outcome.bytes_down / MB
    print(
        f"  moved {up:.1f} MB up + {down:.1f} MB down; aggregate {(up + down) / seconds:.1f}"
        f" MB/s ({up / seconds:.1f} up, {down / seconds:.1f} down) over the window"
    )
    for op, values in (("save", outcome.save_latencies), ("get", outcome.get_latencies)):
        if values:
            print(
                f"  latency {op}: p50 {percentile(values, 0.5) * 1000:.1f} ms,"
                f" p99 {percentile(values, 0.99) * 1000:.1f} ms,"
                f" max {max(values) * 1000:.1f} ms (n={len(values)})"
            )
    for what, values in (
        ("waiting for a file-channel slot", outcome.channel_wait),
        ("opening the file channel", outcome.channel_open),
    ):
        if values:
            print(
                f"  within save, {what}: p50 {percentile(values, 0.5) * 1000:.1f} ms,"
                f" p99 {percentile(values, 0.99) * 1000:.1f} ms (n={len(values)})"
            )
    print(
        f"  listen queue overflows (machine-wide TcpExtListenOverflows): connecting"
        f" {outcome.connect_overflows}, during save + get {outcome.transfer_overflows}"
    )
    print(f"  changed events received: {outcome.events} listing {outcome.event_entries} files")
    reset = "reset after connecting" if outcome.hwm_reset else "could not be reset: whole run"
    print(
        f"  server RSS: idle {mb_of_kib(outcome.idle_kib)}, connected"
        f" {mb_of_kib(outcome.connected_rss_kib)}, peak while connecting"
        f" {mb_of_kib(outcome.connect_hwm_kib)}, peak during save + get"
        f" {mb_of_kib(outcome.transfer_hwm_kib)} ({reset}), at the end"
        f" {mb_of_kib(outcome.end_rss_kib)}"
    )
    print(f"  {outcome.server_log}")
    grouped: Counter[str] = Counter()
    example: dict[str, str] = {}
    for error in outcome.errors:
        key = re.sub(r"\d+", "N", error)
        grouped[key] += 1
        example.setdefault(key, error)
    for key, count in grouped.most_common(15):
        print(f"  {count} x error: {example[key]}")

    print_result(
        f"{n} clients: errors",
        f"{len(outcome.errors)} errors ({outcome.connected} of {n} connected,"
        f" {len(outcome.save_latencies)} saves and {len(outcome.get_latencies)} gets done)",
        "0 errors",
        not outcome.errors,
    )
    ok = outcome.downloads_matched == n and outcome.stored_matched == n
    print_result(
        f"{n} clients: SHA-256",
        f"{outcome.downloads_matched} of {n} downloads and {outcome.stored_matched} of {n}"
        " stored files match the uploaded bytes (ack/sent SHA-256 checked by the client)",
        "all match",
        ok,
    )
    print_result(
        f"{n} clients: aggregate MB/s",
        f"{(up + down) / seconds:.1f} MB/s up + down ({up / seconds:.1f} up,"
        f" {down / seconds:.1f} down; {up + down:.1f} MB in {seconds:.2f} s)",
        "none (reported)",
        None,
    )
    for op, values in (("save", outcome.save_latencies), ("get", outcome.get_latencies)):
        figure = "none completed"
        if values:
            figure = (
                f"p50 {percentile(values, 0.5) * 1000:.1f} ms, p99"
                f" {percentile(values, 0.99) * 1000:.1f} ms (n={len(values)})"
            )
        print_result(f"{n} clients: {op} latency", figure, "none (reported)", None)
    peak = max(outcome.connect_hwm_kib, outcome.transfer_hwm_kib)
    print_result(
        f"{n} clients: server peak RSS",
        f"{mb_of_kib(peak)} ({mb_of_kib(outcome.connect_hwm_kib)} while connecting,"
        f" {mb_of_kib(outcome.transfer_hwm_kib)} during save + get)",
        "none (reported)",
        None,
    )
    print_result(
        f"{n} clients: server CPU",
        f"{outcome.connect.server_cpu:.1f} s connecting ({outcome.connect.seconds:.1f} s wall),"
        f" {outcome.transfer.server_cpu:.1f} s during save + get"
        f" ({outcome.transfer.seconds:.1f} s wall)",
        "none (reported)",
        None,
    )


# -- main ----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--sixteen-size", default="64M", help="phase 1: bytes per client (64M; K/M/G = 1024^n)"
    )
    parser.add_argument("--clients", type=int, default=1000, help="phase 2: clients (1000)")
    parser.add_argument(
        "--anonymous",
        action="store_true",
        help="phase 2: all clients anonymous (one folder) instead of one user each",
    )
    parser.add_argument(
        "--connects-at-once",
        type=int,
        help=f"phase 2: handshakes in flight at once ({AUTHENTICATED_CONNECTS_AT_ONCE} with"
        f" tokens, {CONNECTS_AT_ONCE} with --anonymous)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    parser.add_argument("--skip-sixteen", action="store_true", help="run phase 2 only")
    parser.add_argument("--skip-crowd", action="store_true", help="run phase 1 only")
    parser.add_argument("--keep-logs", type=Path, help="copy both servers' logs into this folder")
    args = parser.parse_args(argv)
    try:
        args.sixteen_size = parse_size(args.sixteen_size)
    except ValueError as e:
        parser.error(f"--sixteen-size: {e}")
    if not 1 <= args.sixteen_size <= 4 * GIB:
        parser.error("--sixteen-size must be in 1..4G")
    if not 1 <= args.clients <= 10_000:
        parser.error("--clients must be in 1..10000")
    if args.connects_at_once is None:
        args.connects_at_once = (
            CONNECTS_AT_ONCE if args.anonymous else AUTHENTICATED_CONNECTS_AT_ONCE
        )
    if not 1 <= args.connects_at_once <= CONNECTS_AT_ONCE:
        parser.error(f"--connects-at-once must be in 1..{CONNECTS_AT_ONCE} (the listen backlog)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    header()
    with tempfile.TemporaryDirectory(prefix="wsfiles-concurrency-") as temp_name:
        temp = Path(temp_name)
        sources: list[tuple[Path, str]] = []
        if not args.skip_sixteen:
            start = time.monotonic()
            sources = write_sources(temp / "sources", SIXTEEN, args.sixteen_size, args.seed)
            print(
                f"phase 1: wrote {SIXTEEN} source files of {args.sixteen_size} bytes in"
                f" {time.monotonic() - start:.1f} s",
                flush=True,
            )
        members: list[Member] = []
        crowd = CrowdOutcome(clients=args.clients, anonymous=args.anonymous)
        users_file: Path | None = None
        if not args.skip_crowd:
            members = make_crowd(args)
            total = sum(len(m.data) for m in members)
            print(f"phase 2: {len(members)} files, {total} bytes (seed {args.seed})", flush=True)
            if not args.anonymous:
                users_file = temp / "users"
                start = time.monotonic()
                make_users(users_file, members)
                crowd.users_seconds = time.monotonic() - start
                print(
                    f"phase 2: users file with {len(members)} entries made in"
                    f" {crowd.users_seconds:.1f} s",
                    flush=True,
                )
        sixteen: SixteenOutcome | None = None
        completed = True
        with contextlib.ExitStack() as servers:

            async def both(reactor: Any) -> None:
                nonlocal sixteen
                if not args.skip_sixteen:
                    sixteen = await run_sixteen(reactor, servers, args, sources, temp)
                    for path, _ in sources:  # free the disk before phase 2
                        path.unlink()
                if not args.skip_crowd:
                    await run_crowd(reactor, servers, args, members, users_file, temp, crowd)

            budget = (
                (0 if args.skip_sixteen else 4 * big_timeout(args.sixteen_size * SIXTEEN) + 120)
                + connect_budget(args)
                + CROWD_OP_TIMEOUT * 2
                + VERIFY_TIMEOUT
                + 120
            )
            try:
                run_on_reactor(both, budget)
            except Exception as e:
                completed = False
                print(f"the benchmark failed: {describe(e)}", file=sys.stderr)
                print_result("benchmark run", f"failed: {describe(e)}", "completes", False)
            finally:
                if args.keep_logs is not None:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for log in temp.glob("server-*.log"):
                        shutil.copy(log, args.keep_logs / log.name)
        if sixteen is not None:
            report_sixteen(sixteen)
        if completed and not args.skip_crowd:
            report_crowd(crowd)
    return 0 if completed else 1


if __name__ == "__main__":
    run_script(main)
