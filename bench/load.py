"""Load test of a real wsfiles server: many concurrent clients, a few of them misbehaving.

Run from the repository root (wsfiles must be installed, ``twistd wsfiles`` must work)::

    python bench/load.py                        # 200 clients for 30 s, files up to 256K
    python bench/load.py --clients 50 --duration 10 --max-file 64K --misbehaving 4
    python bench/load.py --help                 # --files-per-client, --seed, --eager, ...

It starts ``twistd --nodaemon --pidfile= --logfile=- wsfiles --listen
tcp:0:interface=127.0.0.1 --root TMPDIR --max-size 1M --max-connections-per-ip 1024``
(the ``twistd`` next to this Python) as a subprocess, then, on one Twisted reactor
in this process:

1. connects ``--clients`` well-behaved clients and ``--misbehaving`` misbehaving
   ones (``wsfiles.client``);
2. for ``--duration`` seconds every well-behaved client does a random mix of
   ``list``, ``save`` (random sizes 0..``--max-file``, random bytes, names of its
   own, sometimes overwriting one of them) and ``get`` of its own files.  The
   client checks every ``ack``/``sent`` SHA-256 against the bytes; this script
   also checks the bytes it gets back, and that ``list`` shows its files with
   their acknowledged sizes.  Each client sends at most 40 commands a second,
   under the server's default rate limit of 50;
3. meanwhile the misbehaving clients cycle through protocol violations and check
   that each is refused with its documented code: binary data on the command
   channel (``wrong_channel``, of any size: the channel stays usable), a command
   over 64 KiB (the command channel is closed with 1009),
   more data than declared or less (``size_mismatch``), a declared or sent size
   over the limit (``too_large``), garbage commands (``bad_request``), data on the
   file channel with no save waiting (``unexpected_data``), and dropping the file
   channel or the command channel in the middle of a 1 MiB upload
   (``channel_closed``).  Some of those uploads target a name the client saved
   before: it must keep its old content.  After an oversized upload the server
   closes the file channel; the client waits for that close before its next
   transfer (``--eager`` does not), and the close codes are tallied;
4. verifies with fresh clients and on disk that every acknowledged file holds the
   content of its last ``ack``, that nothing unacknowledged is listed (no name of
   a refused upload exists), and that ``ROOT/.wsfiles-tmp`` is empty;
5. reads the server's peak (VmHWM) and current RSS from /proc, stops it with
   SIGTERM and scans its log for tracebacks and warnings.

All well-behaved clients share the anonymous folder (the service's root), so
every ``list`` returns everybody's files, ``--files-per-client`` names per client
at most.  Messages the server pushes on its own (``changed``) are counted.

It prints operations per kind, aggregate MB/s (MB = 10^6 bytes), p50/p99
latencies, refusals by code, unexpected errors, the verification result, the
server's RSS and CPU, and the warnings in both processes' logs.  Rates are over
the ``--duration`` window; CPU figures include the other processes of the
machine, which a shared machine makes noisy.  The
exit status is 1 if there was any unexpected error, verification failure or
traceback in the server log, else 0.  Only 127.0.0.1 is used, every loop and wait
is bounded, and the server and the temporary folder are removed at the end, also
on errors or Ctrl-C.  Linux only (/proc).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shlex
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import _common
from _common import (
    cpu_seconds,
    header,
    machine_busy_seconds,
    percentile,
    read_status_kib,
    run_on_reactor,
    run_script,
    twistd_wsfiles,
)
from twisted.internet import defer, task
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from wsfiles.client import WsfilesClient, WsfilesError, connect
from wsfiles.config import COMMAND_MESSAGE_LIMIT
from wsfiles.names import RESERVED_PREFIX
from wsfiles.sizes import parse_size
from wsfiles.storage import TEMP_FOLDER
from wsfiles.streaming import CHUNK_SIZE

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
MB = 1_000_000
KIB = 1024
MIB = 1024 * 1024
SERVER_MAX_SIZE = "1M"
CONNECT_TIMEOUT = 30.0
CONNECTS_AT_ONCE = 50  # Twisted's listen backlog is 50
OP_TIMEOUT = 60.0
NOTICE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0
VERIFY_TIMEOUT = 300.0
POLL_INTERVAL = 0.02
COMMAND_RATE = 40.0  # per command channel; the server refuses more than 50/s
MAX_OPS_PER_CLIENT = 100_000
MAX_RECONNECTS = 5
MAX_EVENTS_SKIPPED = 10_000
VERIFIERS = 8
RSS_SAMPLE_INTERVAL = 0.5
ABORT_UPLOAD_SIZE = MIB
ABORT_AT = 512 * KIB

#: Messages a server may push on its own (live updates); counted, not errors.
EVENTS = ("changed",)

LOG_LEVEL = re.compile(r"\[[^\]#]*#(warn|error|critical)\]")

#: Texts that are not JSON commands: each must be answered with bad_request.
GARBAGE = (
    "{not json",
    "[1, 2, 3]",
    '"list"',
    "null",
    "",
    '{"op": 42}',
    '{"no_op": true}',
    '{"op": "list", "id": true}',
    '{"op": "list", "id": 1.5}',
    '{"op": "save", "name": "bad-x", "size": -1}',
    '{"op": "save", "name": "bad-x", "size": 1.5}',
    '{"op": "save", "name": "bad-x", "size": true}',
    '{"op": "save", "name": "bad-x"}',
    '{"op": "get", "name": 7}',
    '{"op": "get"}',
)

#: What each misbehaving client cycles through (each starts at its own offset).
SCENARIOS = (
    "wrong_channel",
    "size_over",
    "too_large_declared",
    "bad_request",
    "abort_file",
    "size_short",
    "command_too_big",
    "too_large_data",
    "unexpected_data",
    "abort_command",
)


# -- the server subprocess -----------------------------------------------


class ServerProcess(_common.ServerProcess):
    """``twistd wsfiles`` as a subprocess; its log goes to a file and is scanned."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        super().__init__("server", argv, log_path=log_path)
        # Filled by the reader thread; read only after stop().
        self.lines = 0
        self.tracebacks = 0
        self.unhandled = 0
        self.levels: Counter[str] = Counter()
        #: Warnings and errors, grouped (see _finish_entry), with their counts.
        self.problems: Counter[str] = Counter()
        self._entry: list[str] | None = None

    def on_line(self, line: str) -> None:
        self._scan(line)

    def on_end(self) -> None:
        self._finish_entry()

    def _scan(self, line: str) -> None:
        """Count one log line; group warnings and errors with their tracebacks."""
        self.lines += 1
        if "Traceback" in line:
            self.tracebacks += 1
        if "Unhandled" in line:
            self.unhandled += 1
        if line.startswith("\t"):  # a continuation: a traceback, say
            if self._entry is not None and len(self._entry) < 200:
                self._entry.append(line.strip())
            return
        self._finish_entry()
        level = LOG_LEVEL.search(line)
        if level:
            self.levels[level.group(1)] += 1
        if level or "Traceback" in line or "Unhandled" in line:
            self._entry = [line.partition(" ")[2]]  # without the timestamp

    def _finish_entry(self) -> None:
        """Group the entry just ended as "message -> exception (where)"."""
        entry, self._entry = self._entry, None
        if entry is None:
            return
        key = entry[0]
        rest = [line for line in entry[1:] if line]
        if rest:
            key += f" -> {rest[-1][:160]}"
            ours = [line for line in rest if line.startswith("File") and "/wsfiles/" in line]
            if ours:
                key += f" (last in wsfiles: {ours[-1].rpartition('/')[2]})"
        self.problems[normalized(key, 400)] += 1


@implementer(ILogObserver)
class LocalLog:
    """Warnings and errors logged by Twisted in this process: the clients' side."""

    LEVELS = (LogLevel.warn, LogLevel.error, LogLevel.critical)

    def __init__(self) -> None:
        self.levels: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level not in self.LEVELS:
            return
        self.levels[level.name] += 1
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += f": {type(failure.value).__name__}: {failure.getErrorMessage()}"
            if failure.frames:
                function, path, line = failure.frames[-1][:3]
                text += f" ({Path(path).name}:{line} in {function})"
        self.kinds[f"{level.name}: {normalized(text)}"] += 1


def normalized(text: str, limit: int = 200) -> str:
    """``text`` with numbers and file names replaced, to group similar messages."""
    text = re.sub(r"'(load|bad)-[^']*'", "NAME", text)
    return re.sub(r"\d+", "N", text)[:limit]


# -- bookkeeping ---------------------------------------------------------


@dataclass
class Expected:
    """What the server may hold under one name at the end."""

    #: Acceptable contents, SHA-256 -> size.  One after an ack; more when a save
    #: failed in a way that leaves the outcome open (already an unexpected error).
    contents: dict[str, int] = field(default_factory=dict)
    acknowledged: bool = False


@dataclass
class Stats:
    ops: Counter[str] = field(default_factory=Counter)
    window_ops: Counter[str] = field(default_factory=Counter)  # done within --duration
    window_bytes: int = 0
    attempts: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    event_entries: int = 0  # file entries in the events' lists
    #: How the server closed channels it had to close: what -> close code -> count.
    close_codes: defaultdict[str, Counter[int | None]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    latency: dict[str, list[float]] = field(
        default_factory=lambda: {"list": [], "save": [], "get": []}
    )
    bytes_up: int = 0
    bytes_down: int = 0
    largest_list: int = 0  # entries
    largest_list_bytes: int = 0  # about, as JSON
    reconnects: int = 0
    unexpected: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    expected: dict[str, Expected] = field(default_factory=dict)
    #: Names only ever used by uploads that had to be refused: must never exist.
    refused_names: set[str] = field(default_factory=set)

    def acknowledged(self, name: str, sha256: str, size: int) -> None:
        entry = self.expected.setdefault(name, Expected())
        entry.contents = {sha256: size}
        entry.acknowledged = True

    def maybe_stored(self, name: str, sha256: str, size: int) -> None:
        self.expected.setdefault(name, Expected()).contents[sha256] = size


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shorten(message: dict[str, Any]) -> str:
    text = repr(message)
    return text if len(text) <= 300 else text[:300] + "...}"


def describe(error: BaseException) -> str:
    if isinstance(error, WsfilesError):
        return f"{error.code}: {error.message}"
    return f"{type(error).__name__}: {error}"


class Pacer:
    """Keeps one command channel under COMMAND_RATE commands a second."""

    def __init__(self, reactor: Any, rate: float = COMMAND_RATE) -> None:
        self._reactor = reactor
        self._gap = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if now < self._next:
            await task.deferLater(self._reactor, self._next - now)
            now = time.monotonic()
        self._next = now + self._gap


class Context:
    """What every simulated client shares: the server's URL, limits and the tallies."""

    def __init__(self, reactor: Any, url: str, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.url = url
        self.max_file: int = args.max_file
        self.files_per_client: int = args.files_per_client
        self.max_size = parse_size(SERVER_MAX_SIZE)
        self.eager: bool = args.eager
        self.seed: int = args.seed
        self.deadline = 0.0
        self.stats = Stats()
        self.stats.refused_names.add("bad-x")  # named by refused garbage commands

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def unexpected(self, who: str, what: str) -> None:
        self.stats.unexpected.append(f"{who}: {what}")

    def failed(self, who: str, what: str) -> None:
        self.stats.failures.append(f"{who}: {what}")

    async def bounded(self, awaitable: Awaitable[T], seconds: float) -> T:
        """Await ``awaitable``, cancelling it (TimeoutError) after ``seconds``."""
        d: defer.Deferred[T] = defer.ensureDeferred(awaitable)  # type: ignore[arg-type]
        d.addTimeout(seconds, self.reactor)
        return await d

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self.reactor, seconds)

    async def connect(self) -> WsfilesClient:
        client = await self.bounded(connect(self.url, reactor=self.reactor), CONNECT_TIMEOUT)
        if client.hello.get("max_size") != self.max_size:
            raise RuntimeError(f"hello announces max_size {client.hello.get('max_size')}")
        return client

    async def close(self, client: WsfilesClient) -> None:
        try:
            await self.bounded(client.close(), CLOSE_TIMEOUT)
        except Exception:
            abort(client)

    def drain_notices(self, who: str, client: WsfilesClient) -> None:
        """Take the messages that answered no command: events count, others are errors."""
        for _ in range(len(client.notices.pending)):
            self.notice(who, client.notices.pending.pop(0))
        # Newer clients queue ``changed`` file lists apart; they must not pile up.
        changes = getattr(client, "changes", None)
        if changes is not None:
            self.stats.events["changed"] += len(changes.pending)
            self.stats.event_entries += sum(len(files) for files in changes.pending)
            changes.pending.clear()

    def notice(self, who: str, message: dict[str, Any]) -> bool:
        """Count an event the server may push (``changed``); else report it, False."""
        if message.get("op") in EVENTS and "id" not in message:
            self.stats.events[str(message["op"])] += 1
            self.stats.event_entries += len(message.get("files") or ())
            return True
        self.unexpected(who, f"unsolicited message {shorten(message)}")
        return False

    async def poll(self, condition: Callable[[], bool], seconds: float) -> bool:
        """Wait until ``condition()`` holds, at most ``seconds``; return whether it did."""
        for _ in range(int(seconds / POLL_INTERVAL) + 1):
            if condition():
                return True
            await self.sleep(POLL_INTERVAL)
        return condition()


def abort(client: WsfilesClient) -> None:
    """Drop both of ``client``'s connections at once."""
    for protocol in (client._command, client._file):
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()


class TrippingSource(io.BytesIO):
    """Bytes that call ``trip`` once, as soon as ``at`` of them have been read."""

    def __init__(self, data: bytes, at: int, trip: Callable[[], None]) -> None:
        super().__init__(data)
        self._at = at
        self._trip: Callable[[], None] | None = trip

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if self._trip is not None and self.tell() >= self._at:
            trip, self._trip = self._trip, None
            trip()
        return chunk


def pick_size(rng: random.Random, largest: int) -> int:
    """Mostly uniform in 0..largest, sometimes an edge of the frame size."""
    if rng.random() < 0.1:
        edges = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, largest]
        return rng.choice([size for size in edges if size <= largest])
    return rng.randint(0, largest)


# -- well-behaved clients ------------------------------------------------


class HonestClient:
    """Lists, saves and gets its own files, checking every answer."""

    def __init__(self, ctx: Context, index: int, client: WsfilesClient) -> None:
        self.ctx = ctx
        self.who = f"client {index}"
        self.client: WsfilesClient | None = client
        self.rng = random.Random(f"{ctx.seed}/honest/{index}")
        self.pacer = Pacer(ctx.reactor)
        self.names = [f"load-{index:03d}-{k}.bin" for k in range(ctx.files_per_client)]
        self.tried = 0  # self.names[:tried] have been saved at least once
        #: Acknowledged names whose content is certain: name -> (sha256, size).
        self.mine: dict[str, tuple[str, int]] = {}
        self.reconnects = 0

    async def run(self) -> None:
        try:
            for _ in range(MAX_OPS_PER_CLIENT):
                if not self.ctx.running() or self.client is None:
                    break
                kind = self._choose()
                await self.pacer.wait()
                try:
                    moved = await getattr(self, kind)(self.client)
                    self.ctx.stats.ops[kind] += 1
                    if self.ctx.running():
                        self.ctx.stats.window_ops[kind] += 1
                        self.ctx.stats.window_bytes += moved
                except Exception as e:
                    self.ctx.unexpected(self.who, f"{kind}: {describe(e)}")
                    # After an error reply the connection stays usable; after
                    # anything else (a timeout, a lost channel) start afresh.
                    if not self.ctx.running():
                        break
                    if not isinstance(e, WsfilesError) or self.client._command is None:
                        await self._reconnect()
                    continue
                self._check_notices()
        finally:
            if self.client is not None:
                await self.ctx.close(self.client)

    def _choose(self) -> str:
        r = self.rng.random()
        if not self.mine or r < 0.45:
            return "save"
        return "list" if r < 0.75 else "get"

    async def _reconnect(self) -> None:
        if self.client is not None:
            abort(self.client)
            self.client = None
        if self.reconnects >= MAX_RECONNECTS:
            self.ctx.unexpected(self.who, "gave up after too many reconnects")
            return
        self.reconnects += 1
        self.ctx.stats.reconnects += 1
        try:
            self.client = await self.ctx.connect()
        except Exception as e:
            self.ctx.unexpected(self.who, f"reconnect: {describe(e)}")

    def _check_notices(self) -> None:
        if self.client is not None:
            self.ctx.drain_notices(self.who, self.client)

    async def save(self, client: WsfilesClient) -> int:
        new = self.tried < len(self.names) and (self.tried == 0 or self.rng.random() < 0.5)
        if new:
            name = self.names[self.tried]
            self.tried += 1
        else:
            name = self.rng.choice(self.names[: self.tried])
        size = pick_size(self.rng, self.ctx.max_file)
        data = self.rng.randbytes(size)
        digest = sha256_hex(data)
        start = time.perf_counter()
        try:
            ack = await self.ctx.bounded(client.upload(name, data), OP_TIMEOUT)
        except BaseException:
            # Old content or new: either may be there now.
            self.ctx.stats.maybe_stored(name, digest, size)
            self.mine.pop(name, None)
            raise
        self.ctx.stats.latency["save"].append(time.perf_counter() - start)
        if (ack.get("name"), ack.get("size"), ack.get("sha256")) != (name, size, digest):
            self.ctx.stats.maybe_stored(name, digest, size)
            self.mine.pop(name, None)
            raise RuntimeError(f"ack {ack} does not match {name!r}, {size} bytes, {digest}")
        self.ctx.stats.acknowledged(name, digest, size)
        self.mine[name] = (digest, size)
        self.ctx.stats.bytes_up += size
        return size

    async def get(self, client: WsfilesClient) -> int:
        name = self.rng.choice(sorted(self.mine))
        digest, size = self.mine[name]
        sink = io.BytesIO()
        start = time.perf_counter()
        sent = await self.ctx.bounded(client.download(name, sink), OP_TIMEOUT)
        self.ctx.stats.latency["get"].append(time.perf_counter() - start)
        data = sink.getvalue()
        self.ctx.stats.bytes_down += len(data)
        if len(data) != size or sha256_hex(data) != digest or sent.get("size") != size:
            self.ctx.failed(
                self.who,
                f"get {name!r}: {len(data)} bytes (sent says {sent.get('size')}),"
                f" expected the {size} acknowledged ones",
            )
        return len(data)

    async def list(self, client: WsfilesClient) -> int:
        start = time.perf_counter()
        files = await self.ctx.bounded(client.list(), OP_TIMEOUT)
        self.ctx.stats.latency["list"].append(time.perf_counter() - start)
        names = [entry["name"] for entry in files]
        stats = self.ctx.stats
        if len(files) > stats.largest_list:
            stats.largest_list = len(files)
            stats.largest_list_bytes = len(json.dumps({"op": "list", "id": 1, "files": files}))
        if names != sorted(names):
            self.ctx.failed(self.who, "list is not sorted by name")
        listed = {entry["name"]: entry["size"] for entry in files}
        for name, (_, size) in self.mine.items():
            if listed.get(name) != size:
                self.ctx.failed(
                    self.who, f"list shows {name!r} as {listed.get(name)}, acknowledged {size}"
                )
        for name in sorted(self.ctx.stats.refused_names & listed.keys()):
            self.ctx.failed(self.who, f"list shows {name!r}, whose upload was refused")
        return 0


# -- misbehaving clients -------------------------------------------------


class Misbehaver:
    """Breaks the protocol in the documented ways and checks each refusal."""

    def __init__(self, ctx: Context, index: int, client: WsfilesClient) -> None:
        self.ctx = ctx
        self.index = index
        self.who = f"misbehaving {index}"
        self.client: WsfilesClient | None = client
        self.rng = random.Random(f"{ctx.seed}/misbehaving/{index}")
        self.pacer = Pacer(ctx.reactor)
        self.keeper = f"bad-{index:02d}-keeper.bin"
        self.keeper_content: tuple[str, int] | None = None
        self.fresh = 0
        self.reconnects = 0

    @property
    def live(self) -> WsfilesClient:
        if self.client is None:
            raise RuntimeError("not connected")
        return self.client

    async def run(self) -> None:
        try:
            await self._save_keeper()
            for number in range(MAX_OPS_PER_CLIENT):
                if not self.ctx.running():
                    break
                if self.client is None and not await self._reconnect():
                    break
                scenario = SCENARIOS[(self.index + number) % len(SCENARIOS)]
                self._check_notices()
                self.ctx.stats.attempts[scenario] += 1
                try:
                    await getattr(self, scenario)()
                except Exception as e:
                    self.ctx.unexpected(self.who, f"{scenario}: {describe(e)}")
                    if self.client is not None:
                        abort(self.client)
                        self.client = None
                    self.reconnects += 1
                    self.ctx.stats.reconnects += 1
                    if self.reconnects > MAX_RECONNECTS:
                        self.ctx.unexpected(self.who, "gave up after too many errors")
                        break
                await self.ctx.sleep(self.rng.uniform(0.05, 0.2))
        except Exception as e:
            self.ctx.unexpected(self.who, describe(e))
        finally:
            if self.client is not None:
                await self.ctx.close(self.client)

    async def _reconnect(self) -> bool:
        """A new connection, after one this client broke on purpose or not."""
        try:
            self.client = await self.ctx.connect()
        except Exception as e:
            self.ctx.unexpected(self.who, f"reconnect: {describe(e)}")
            return False
        return True

    def _check_notices(self) -> None:
        if self.client is not None:
            self.ctx.drain_notices(self.who, self.client)

    def _target(self) -> str:
        """The keeper now and then (it must survive), else a name never to exist."""
        if self.keeper_content is not None and self.rng.random() < 0.3:
            return self.keeper
        self.fresh += 1
        name = f"bad-{self.index:02d}-{self.fresh}.bin"
        self.ctx.stats.refused_names.add(name)
        return name

    async def _save_keeper(self) -> None:
        data = self.rng.randbytes(self.rng.randint(0, 64 * KIB))
        await self.pacer.wait()
        await self.ctx.bounded(self.live.upload(self.keeper, data), OP_TIMEOUT)
        self.keeper_content = (sha256_hex(data), len(data))
        self.ctx.stats.acknowledged(self.keeper, *self.keeper_content)

    async def _check_keeper(self) -> None:
        """The keeper still has its content (a failed upload left it alone)."""
        assert self.keeper_content is not None
        sink = io.BytesIO()
        await self.pacer.wait()
        await self.ctx.bounded(self.live.download(self.keeper, sink), OP_TIMEOUT)
        data = sink.getvalue()
        if (sha256_hex(data), len(data)) != self.keeper_content:
            self.ctx.failed(self.who, f"{self.keeper!r} changed after a refused upload")

    async def _after_failed_upload(self, name: str) -> None:
        if name == self.keeper and self.client is not None:
            await self._check_keeper()

    async def _expect_refusal(self, scenario: str, code: str, upload: Awaitable[Any]) -> bool:
        try:
            reply = await self.ctx.bounded(upload, OP_TIMEOUT)
        except WsfilesError as e:
            if e.code == code:
                self.ctx.stats.refusals[code] += 1
                return True
            self.ctx.unexpected(self.who, f"{scenario}: expected {code}, got {describe(e)}")
            return False
        self.ctx.unexpected(self.who, f"{scenario}: expected {code}, got {reply}")
        return False

    async def _expect_notice(self, scenario: str, code: str) -> None:
        """The next message that answers no command is a ``code`` error."""
        give_up = time.monotonic() + NOTICE_TIMEOUT
        for _ in range(MAX_EVENTS_SKIPPED):
            left = give_up - time.monotonic()
            notice = await self.ctx.bounded(self.live.notices.get(), max(left, 0.001))
            if notice.get("op") == "error" and notice.get("code") == code:
                self.ctx.stats.refusals[code] += 1
                return
            if not self.ctx.notice(self.who, notice):
                self.ctx.unexpected(self.who, f"{scenario}: expected a {code} error")
                return
        self.ctx.unexpected(self.who, f"{scenario}: no {code} error among {MAX_EVENTS_SKIPPED}")

    async def _expect_file_channel_closed(self, scenario: str, before: int) -> None:
        """The server closes the file channel (with 1009) after an oversized upload.

        The next transfer waits for that close unless --eager: sent at once it
        may race the close (see --eager).  The close code is tallied, not
        checked: a loaded server may give up the closing handshake and drop
        the connection (1006).
        """
        client = self.live
        if self.ctx.eager:
            return
        if not await self.ctx.poll(lambda: len(client.file_close_codes) > before, NOTICE_TIMEOUT):
            self.ctx.unexpected(self.who, f"{scenario}: the file channel stayed open")
        else:
            self.ctx.stats.close_codes[f"file channel after {scenario}"][
                client.file_close_codes[before]
            ] += 1

    async def _usable(self) -> None:
        """The command channel still answers after an error."""
        await self.pacer.wait()
        await self.ctx.bounded(self.live.list(), OP_TIMEOUT)

    # -- the scenarios ---------------------------------------------------

    async def wrong_channel(self) -> None:
        """Binary data on the command channel, small or over the 64 KiB command
        limit: refused, dropped, and the channel stays usable."""
        size = self.rng.choice(
            (self.rng.randint(1, 4 * KIB), COMMAND_MESSAGE_LIMIT + self.rng.randint(1, 64 * KIB))
        )
        await self.pacer.wait()
        self.live.send_binary_on_command(self.rng.randbytes(size))
        await self._expect_notice("wrong_channel", "wrong_channel")
        await self._usable()

    async def command_too_big(self) -> None:
        """A text message over the 64 KiB command limit closes the channel (1009)."""
        client = self.live
        padding = "x" * (COMMAND_MESSAGE_LIMIT + self.rng.randint(1, 64 * KIB))
        await self.pacer.wait()
        client.send_text(json.dumps({"op": "list", "padding": padding}))
        if not await self.ctx.poll(lambda: client._command is None, NOTICE_TIMEOUT):
            self.ctx.unexpected(self.who, "a command over 64 KiB left the channel open")
        else:
            self.ctx.stats.close_codes["command channel after command_too_big"][
                client.close_code
            ] += 1
        await self.ctx.close(client)
        self.client = None

    async def bad_request(self) -> None:
        await self.pacer.wait()
        self.live.send_text(self.rng.choice(GARBAGE))
        await self._expect_notice("bad_request", "bad_request")
        await self._usable()

    async def size_over(self) -> None:
        name = self._target()
        data = self.rng.randbytes(self.rng.randint(1, min(self.ctx.max_size, 300 * KIB)))
        declared = self.rng.randint(0, len(data) - 1)
        before = len(self.live.file_close_codes)
        await self.pacer.wait()
        upload = self.live.upload(name, data, size=declared)
        if await self._expect_refusal("size_over", "size_mismatch", upload):
            await self._expect_file_channel_closed("size_over", before)
        await self._after_failed_upload(name)

    async def size_short(self) -> None:
        name = self._target()
        data = self.rng.randbytes(self.rng.randint(0, 200 * KIB))
        declared = len(data) + self.rng.randint(1, 4 * KIB)
        await self.pacer.wait()
        upload = self.live.upload(name, data, size=declared)
        if await self._expect_refusal("size_short", "size_mismatch", upload):
            # A message that ends short leaves the file channel open.
            await self.ctx.sleep(POLL_INTERVAL)
            if not self.live.has_file_channel:
                self.ctx.unexpected(self.who, "size_short: the file channel was closed")
        await self._after_failed_upload(name)

    async def too_large_declared(self) -> None:
        name = self._target()
        data = self.rng.randbytes(self.rng.randint(0, KIB))
        declared = self.ctx.max_size + self.rng.randint(1, self.ctx.max_size)
        await self.pacer.wait()
        await self._expect_refusal(
            "too_large_declared", "too_large", self.live.upload(name, data, size=declared)
        )
        await self._after_failed_upload(name)

    async def too_large_data(self) -> None:
        name = self._target()
        data = self.rng.randbytes(self.ctx.max_size + self.rng.randint(1, CHUNK_SIZE))
        before = len(self.live.file_close_codes)
        await self.pacer.wait()
        upload = self.live.upload(name, data, size=self.ctx.max_size)
        if await self._expect_refusal("too_large_data", "too_large", upload):
            await self._expect_file_channel_closed("too_large_data", before)
        await self._after_failed_upload(name)

    async def unexpected_data(self) -> None:
        if not self.live.has_file_channel:
            await self._check_keeper()  # a get sets up the file channel
        await self.pacer.wait()
        self.live.send_on_file_channel(self.rng.randbytes(self.rng.randint(1, 4 * KIB)))
        await self._expect_notice("unexpected_data", "unexpected_data")
        await self._check_keeper()  # the file channel still carries transfers

    async def abort_file(self) -> None:
        await self._abort_upload("abort_file", command=False)

    async def abort_command(self) -> None:
        await self._abort_upload("abort_command", command=True)

    async def _abort_upload(self, scenario: str, *, command: bool) -> None:
        """Cut a connection while a 1 MiB upload is streaming."""
        client = self.live
        name = self._target()

        def trip() -> None:
            protocol = client._command if command else client._file
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()

        source = TrippingSource(self.rng.randbytes(ABORT_UPLOAD_SIZE), ABORT_AT, trip)
        await self.pacer.wait()
        # Either way the server must drop the upload; on a dropped command
        # channel the client itself reports channel_closed.
        await self._expect_refusal(scenario, "channel_closed", client.upload(name, source))
        if command:
            abort(client)
            self.client = None
            if not await self._reconnect():
                return
        await self._after_failed_upload(name)


# -- the run -------------------------------------------------------------


@dataclass
class Outcome:
    load_seconds: float = 0.0
    window_seconds: float = 0.0
    connect_seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0
    rss_idle_kib: int = 0
    rss_connected_kib: int = 0
    rss_load_max_kib: int = 0
    rss_after_load_kib: int = 0
    rss_end_kib: int = 0
    hwm_kib: int = 0
    verified_files: int = 0
    listed_files: int = 0
    disk_files: int = 0
    disk_matched: int = 0
    temp_leftovers: list[str] = field(default_factory=list)
    #: Other folders of the server's in the root (``.wsfiles-*``): files in each.
    reserved: dict[str, int] = field(default_factory=dict)


async def connect_all(ctx: Context, count: int) -> list[WsfilesClient]:
    """Open ``count`` command channels, CONNECTS_AT_ONCE at a time."""
    gate = defer.DeferredSemaphore(CONNECTS_AT_ONCE)
    attempts = [gate.run(lambda: defer.ensureDeferred(ctx.connect())) for _ in range(count)]
    results: list[tuple[bool, Any]] = await defer.DeferredList(attempts, consumeErrors=True)
    clients: list[WsfilesClient] = [value for ok, value in results if ok]
    errors: list[Failure] = [value for ok, value in results if not ok]
    if errors:
        for client in clients:
            abort(client)
        raise RuntimeError(
            f"{len(errors)} of {count} clients could not connect, first: {errors[0].value!r}"
        )
    return clients


async def verify(ctx: Context, root: Path, outcome: Outcome) -> None:
    """Every acknowledged file, through fresh clients and on disk; nothing else."""
    try:
        clients = await connect_all(ctx, VERIFIERS)
    except Exception as e:
        ctx.failed("verify", f"fresh clients could not connect: {describe(e)}")
        clients = []
    listed: dict[str, int] | None = None
    try:
        if clients:
            listed = await verify_listing(ctx, clients[0])
        if listed is not None:
            await verify_downloads(ctx, clients, listed, outcome)
    finally:
        for client in clients:
            await ctx.close(client)
    check_disk(ctx, root, listed, outcome)
    temp = root / TEMP_FOLDER
    await ctx.poll(lambda: not any(temp.iterdir()), 5.0)
    outcome.temp_leftovers = sorted(entry.name for entry in temp.iterdir())
    if outcome.temp_leftovers:
        ctx.failed("verify", f"{TEMP_FOLDER} holds {outcome.temp_leftovers[:5]}")


async def verify_listing(ctx: Context, client: WsfilesClient) -> dict[str, int] | None:
    """A fresh list: every acknowledged name and nothing else; None if it failed."""
    try:
        files = await ctx.bounded(client.list(), OP_TIMEOUT)
    except Exception as e:
        ctx.failed("verify", f"list failed: {describe(e)}")
        return None
    listed = {entry["name"]: entry["size"] for entry in files}
    expected = ctx.stats.expected
    for name in sorted(listed.keys() - expected.keys()):
        why = "its upload was refused" if name in ctx.stats.refused_names else "never saved"
        ctx.failed("verify", f"{name!r} is listed but was never acknowledged ({why})")
    for name, entry in sorted(expected.items()):
        if entry.acknowledged and name not in listed:
            ctx.failed("verify", f"acknowledged {name!r} is not listed")
    return listed


async def verify_downloads(
    ctx: Context, clients: list[WsfilesClient], listed: dict[str, int], outcome: Outcome
) -> None:
    """Download every listed file we know, spread over ``clients``, and compare."""
    expected = ctx.stats.expected
    outcome.listed_files = len(listed)
    position = iter(sorted(name for name in listed if name in expected))

    async def check(slot: int) -> None:
        pacer = Pacer(ctx.reactor)
        for name in position:
            sink = io.BytesIO()
            await pacer.wait()
            try:
                await ctx.bounded(clients[slot].download(name, sink), OP_TIMEOUT)
            except Exception as e:
                ctx.failed("verify", f"get {name!r} failed: {describe(e)}")
                if isinstance(e, WsfilesError) and clients[slot]._command is not None:
                    continue
                abort(clients[slot])
                try:
                    clients[slot] = await ctx.connect()
                except Exception as e:
                    ctx.failed("verify", f"reconnect failed: {describe(e)}")
                    return
                continue
            data = sink.getvalue()
            acceptable = expected[name].contents
            if acceptable.get(sha256_hex(data)) != len(data) or listed[name] != len(data):
                ctx.failed("verify", f"{name!r} downloads as other bytes than last acknowledged")
            outcome.verified_files += 1

    await defer.gatherResults(
        [defer.ensureDeferred(check(slot)) for slot in range(len(clients))], consumeErrors=True
    )


def check_disk(ctx: Context, root: Path, listed: dict[str, int] | None, outcome: Outcome) -> None:
    """The root holds the acknowledged files with their content, and the listed ones."""
    on_disk = {}
    for entry in root.iterdir():
        if entry.name.startswith(RESERVED_PREFIX):  # the server's own: not files
            if entry.name != TEMP_FOLDER:
                outcome.reserved[entry.name] = sum(1 for p in entry.rglob("*") if p.is_file())
            continue
        if not entry.is_file() or entry.is_symlink():
            ctx.failed("disk", f"unexpected entry {entry.name!r} in the root")
            continue
        on_disk[entry.name] = entry
    outcome.disk_files = len(on_disk)
    if listed is not None and on_disk.keys() != listed.keys():
        missing = sorted(listed.keys() - on_disk.keys())[:5]
        extra = sorted(on_disk.keys() - listed.keys())[:5]
        ctx.failed("disk", f"root and list differ: listed only {missing}, on disk only {extra}")
    for name, known in sorted(ctx.stats.expected.items()):
        if known.acknowledged and name not in on_disk:
            ctx.failed("disk", f"acknowledged {name!r} is not on disk")
    for name, path in sorted(on_disk.items()):
        last = ctx.stats.expected.get(name)
        data = path.read_bytes()
        if last is None:
            ctx.failed("disk", f"{name!r} is on disk but was never acknowledged")
        elif last.contents.get(sha256_hex(data)) != len(data):
            ctx.failed("disk", f"{name!r} on disk is not what was last acknowledged")
        else:
            outcome.disk_matched += 1


async def run_load(
    reactor: Any, args: argparse.Namespace, server: ServerProcess, root: Path, outcome: Outcome
) -> Context:
    ctx = Context(reactor, f"ws://{LOOPBACK}:{server.port}", args)
    rss_samples: list[int] = []

    def sample() -> None:
        if server.running():
            rss_samples.append(read_status_kib(server.pid, "VmRSS"))

    sampler = task.LoopingCall(sample)
    outcome.rss_idle_kib = read_status_kib(server.pid, "VmRSS")
    start = time.monotonic()
    honest = await connect_all(ctx, args.clients)
    try:
        rude = await connect_all(ctx, args.misbehaving)
    except BaseException:
        for client in honest:
            abort(client)
        raise
    outcome.connect_seconds = time.monotonic() - start
    outcome.rss_connected_kib = read_status_kib(server.pid, "VmRSS")
    print(
        f"connected {len(honest)} + {len(rude)} clients in {outcome.connect_seconds:.1f} s;"
        f" running for {args.duration:g} s...",
        flush=True,
    )
    sampler.start(RSS_SAMPLE_INTERVAL)
    cpu_before, client_before = cpu_seconds(server.pid), time.process_time()
    machine_before = machine_busy_seconds()
    start = time.monotonic()
    ctx.deadline = start + args.duration

    def window_closed() -> None:
        """CPU use within the load window (operations still finishing come after)."""
        outcome.window_seconds = time.monotonic() - start
        outcome.server_cpu = cpu_seconds(server.pid) - cpu_before
        outcome.client_cpu = time.process_time() - client_before
        outcome.machine_cpu = machine_busy_seconds() - machine_before

    closing = reactor.callLater(args.duration, window_closed)
    workers = [HonestClient(ctx, i, c).run() for i, c in enumerate(honest)]
    workers += [Misbehaver(ctx, i, c).run() for i, c in enumerate(rude)]
    results: list[tuple[bool, Any]] = await defer.DeferredList(
        [defer.ensureDeferred(worker) for worker in workers], consumeErrors=True
    )
    for ok, value in results:
        if not ok:
            ctx.unexpected("worker", repr(value.value))
    outcome.load_seconds = time.monotonic() - start
    if closing.active():  # every worker gave up early
        closing.cancel()
        window_closed()
    sampler.stop()
    outcome.rss_load_max_kib = max(rss_samples, default=0)
    outcome.rss_after_load_kib = read_status_kib(server.pid, "VmRSS")
    print(f"load done in {outcome.load_seconds:.1f} s; verifying...", flush=True)
    try:
        await ctx.bounded(verify(ctx, root, outcome), VERIFY_TIMEOUT)
    except Exception as e:
        ctx.failed("verify", f"gave up: {describe(e)}")
    if not server.running():
        ctx.unexpected("server", f"exited during the run{server.recent_output()}")
        return ctx
    outcome.rss_end_kib = read_status_kib(server.pid, "VmRSS")
    outcome.hwm_kib = read_status_kib(server.pid, "VmHWM")
    return ctx


# -- report --------------------------------------------------------------


def print_grouped(lines: list[str], top: int = 15) -> None:
    """Similar lines once each, with a count and a first example."""
    groups: Counter[str] = Counter()
    example: dict[str, str] = {}
    for line in lines:
        key = normalized(line.partition(": ")[2])
        groups[key] += 1
        example.setdefault(key, line)
    for key, n in groups.most_common(top):
        print(f"  {n} x {example[key]}")
    if len(groups) > top:
        print(f"  ... and {len(groups) - top} other kinds")


def mb(kib: int) -> str:
    return f"{kib * KIB / MB:.1f} MB"


def report(
    args: argparse.Namespace,
    ctx: Context,
    outcome: Outcome,
    server: ServerProcess,
    local_log: LocalLog,
) -> bool:
    stats = ctx.stats
    seconds = max(outcome.window_seconds, 1e-9)  # rates are over the load window
    total_ops = sum(stats.ops.values())
    window_ops = sum(stats.window_ops.values())
    print()
    print(
        f"clients: {args.clients} well-behaved + {args.misbehaving} misbehaving (seed {ctx.seed})"
    )
    print(
        f"duration: {outcome.window_seconds:.1f} s of load ({args.duration:g} s asked); the"
        f" operations in flight then ended {outcome.load_seconds - outcome.window_seconds:.1f} s"
        f" later; connecting took {outcome.connect_seconds:.1f} s"
    )
    print(
        "operations: "
        + ", ".join(f"{kind} {stats.ops[kind]}" for kind in ("list", "save", "get"))
        + f" (total {total_ops}; {window_ops / seconds:.0f}/s within the window),"
        f" reconnects after errors {stats.reconnects}"
    )
    print(
        f"folder: {outcome.disk_files} files at the end; largest list seen"
        f" {stats.largest_list} entries, about {stats.largest_list_bytes / KIB:.0f} KiB of JSON"
    )
    print(
        f"throughput: {stats.bytes_up / MB:.1f} MB up + {stats.bytes_down / MB:.1f} MB down"
        f"; {stats.window_bytes / seconds / MB:.1f} MB/s aggregate within the window"
        " (MB = 10^6 bytes)"
    )
    for kind in ("list", "save", "get"):
        values = stats.latency[kind]
        if values:
            print(
                f"latency {kind}: p50 {percentile(values, 0.5) * 1000:.1f} ms,"
                f" p99 {percentile(values, 0.99) * 1000:.1f} ms,"
                f" max {max(values) * 1000:.1f} ms (n={len(values)})"
            )
    print(
        "misbehaviour attempts: "
        + (", ".join(f"{name} {n}" for name, n in sorted(stats.attempts.items())) or "none")
    )
    print(
        "expected refusals: "
        + (", ".join(f"{code} {n}" for code, n in sorted(stats.refusals.items())) or "none")
    )
    per_entry = stats.largest_list_bytes / max(stats.largest_list, 1)
    print(
        "events pushed by the server: "
        + (", ".join(f"{op} {n}" for op, n in sorted(stats.events.items())) or "none")
        + f", listing {stats.event_entries} files in all (about"
        f" {stats.event_entries * per_entry / MB:.1f} MB of JSON)"
    )
    for what, codes in sorted(stats.close_codes.items()):
        shown = ", ".join(f"{code} x{n}" for code, n in sorted(codes.items(), key=str))
        print(f"close codes, {what}: {shown} (protocol.md: 1009)")
    print(f"unexpected errors: {len(stats.unexpected)}")
    print_grouped(stats.unexpected)
    verified = not stats.failures
    print(
        f"verification: {'PASS' if verified else 'FAIL'} ({outcome.verified_files} files"
        f" downloaded and checked of {outcome.listed_files} listed; {outcome.disk_files} on"
        f" disk, {outcome.disk_matched} as acknowledged; {len(stats.refused_names)} names of"
        " refused uploads checked;"
        f" {TEMP_FOLDER} {'empty' if not outcome.temp_leftovers else 'NOT empty'})"
    )
    for folder, count in sorted(outcome.reserved.items()):
        print(f"  note: the server's {folder} holds {count} files")
    print_grouped(stats.failures)
    print(
        f"server RSS: peak (VmHWM) {mb(outcome.hwm_kib)}; idle {mb(outcome.rss_idle_kib)},"
        f" connected {mb(outcome.rss_connected_kib)}, max under load"
        f" {mb(outcome.rss_load_max_kib)}, after load {mb(outcome.rss_after_load_kib)},"
        f" at the end {mb(outcome.rss_end_kib)}"
    )
    print(
        f"CPU within the window: server {outcome.server_cpu:.1f} s"
        f" ({outcome.server_cpu / seconds:.0%} of a core), load generator"
        f" {outcome.client_cpu:.1f} s ({outcome.client_cpu / seconds:.0%}), other processes"
        f" {max(0.0, outcome.machine_cpu - outcome.server_cpu - outcome.client_cpu):.1f} s;"
        f" machine {outcome.machine_cpu / seconds / (os.cpu_count() or 1):.0%} busy"
        f" ({os.cpu_count()} CPUs)"
    )
    levels = ", ".join(f"{level} {n}" for level, n in sorted(server.levels.items())) or "none"
    print(
        f"server log: {server.lines} lines, {server.tracebacks} 'Traceback',"
        f" {server.unhandled} 'Unhandled', {levels}; exit code {server.exit_code}"
    )
    for text, n in server.problems.most_common(15):
        print(f"  {n} x {text}")
    levels = ", ".join(f"{level} {n}" for level, n in sorted(local_log.levels.items())) or "none"
    print(f"load generator log (wsfiles.client and Autobahn, not the server): {levels}")
    for text, n in local_log.kinds.most_common(10):
        print(f"  {n} x {text}")
    clean_log = server.tracebacks == 0 and server.unhandled == 0
    ok = not stats.unexpected and verified and clean_log
    print(f"result: {'PASS' if ok else 'FAIL'}")
    return ok


# -- main ----------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200, help="well-behaved clients (200)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    parser.add_argument("--max-file", default="256K", help="largest file saved (256K)")
    parser.add_argument("--misbehaving", type=int, default=10, help="misbehaving clients (10)")
    parser.add_argument(
        "--files-per-client",
        type=int,
        default=8,
        help="names each well-behaved client saves, then overwrites (8)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--eager",
        action="store_true",
        help="after an oversized upload, send the next transfer at once instead of waiting"
        " for the server to close the file channel (it may then race that close)",
    )
    parser.add_argument("--server-log", type=Path, help="keep the server's log in this file")
    args = parser.parse_args(argv)
    try:
        args.max_file = parse_size(args.max_file)
    except ValueError as e:
        parser.error(f"--max-file: {e}")
    if args.max_file > parse_size(SERVER_MAX_SIZE):
        parser.error(f"--max-file must be at most the server's --max-size {SERVER_MAX_SIZE}")
    if not (1 <= args.clients <= 1000 and 0 <= args.misbehaving <= 100):
        parser.error("--clients must be in 1..1000, --misbehaving in 0..100")
    if not 1 <= args.files_per_client <= 1000:
        parser.error("--files-per-client must be in 1..1000")
    if not 0 < args.duration <= 3600:
        parser.error("--duration must be in (0, 3600] seconds")
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    header()
    local_log = LocalLog()
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, local_log)], redirectStandardIO=False)
    with tempfile.TemporaryDirectory(prefix="wsfiles-load-") as temp:
        root = Path(temp) / "root"
        root.mkdir()
        log_path = args.server_log or Path(temp) / "server.log"
        server_argv = twistd_wsfiles(
            root, "--max-size", SERVER_MAX_SIZE, "--max-connections-per-ip", "1024"
        )
        print(f"server: {shlex.join(server_argv)}", flush=True)
        outcome = Outcome()
        budget = CONNECT_TIMEOUT * 2 + args.duration + OP_TIMEOUT + CLOSE_TIMEOUT + VERIFY_TIMEOUT
        with ServerProcess(server_argv, log_path) as server:
            print(f"server pid {server.pid}, port {server.port}", flush=True)
            try:
                ctx = run_on_reactor(
                    lambda reactor: run_load(reactor, args, server, root, outcome), budget
                )
            except BaseException:
                print(server.recent_output(), file=sys.stderr)
                raise
    return 0 if report(args, ctx, outcome, server, local_log) else 1


if __name__ == "__main__":
    run_script(main)
