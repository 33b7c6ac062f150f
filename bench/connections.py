"""Many idle authenticated connections, and ``list`` round trips, against a real wsfiles server.

Run from the repository root (wsfiles must be installed, ``twistd wsfiles`` must work)::

    python bench/connections.py                     # 10,000 connections, 3 s per rate figure
    python bench/connections.py --connections 2000 --seconds 2
    python bench/connections.py --help              # --clients, --window, ...

It makes a users file with ``--clients`` names (``wsfiles user add --users FILE
NAME``, the ``wsfiles`` next to this Python, which prints each token) and starts,
as subprocesses on 127.0.0.1:

- A: ``twistd --nodaemon --pidfile= --logfile=- wsfiles --listen
  tcp:0:interface=127.0.0.1 --root TMP --users FILE`` with ``--max-connections``,
  ``--max-connections-per-ip`` and ``--max-connections-per-client`` raised so
  that ``--connections`` fit;
- B: the same with ``--rate-limit 1000000``: the default of 50 commands per
  second per channel would refuse almost every ``list`` of the rate figures;
- C: a bare Autobahn echo server (this script with ``--echo-server``:
  ``WebSocketServerFactory`` on a TCP port, ``sendMessage`` of every message
  received, Autobahn's default options), the baseline of the rate figures.

Then, on one Twisted reactor in this process:

1. **Idle connections** (server A): reads A's VmRSS idle, then opens
   ``--connections`` command channels, the tokens of the ``--clients`` names in
   turn (``Authorization: Bearer``), at most ``--batch`` handshakes in flight
   (Twisted's listen backlog is 50); each counts once its ``hello`` arrived.
   With all open it reads A's VmRSS and VmHWM (peak) from /proc and prints kB
   per connection ((VmRSS open - VmRSS idle) / N).  Then it sends one ``list``
   on EACH connection and counts the answers (every one must be a ``list``
   answer).  Target: VmRSS < 200 MB with all open, and all lists answered.
   The time connecting took is printed, with the server's CPU seconds.
2. **Round trips** on one command channel of server B: ``list`` one at a time
   (send, wait for the answer, send the next) for ``--seconds``, then pipelined
   (``--window`` lists in flight at most, topped up in one write whenever half
   of them were answered) for ``--seconds``, each after a short warm-up.
   Targets: >= 5,000/s one at a time and >= 25,000/s pipelined.  The same two
   measurements against the echo server C (with the same client, the same
   requests) give the "ratio vs bare Autobahn echo".

The client is deliberately lean so that it does not set the figure: a
hand-written RFC 6455 client on a plain Twisted ``Protocol`` (HTTP upgrade
request, masked text frames with a random key per connection, answers pings),
not ``wsfiles.client``.  Each rate figure is printed with the CPU seconds the
server and this process (the client) used meanwhile, and those of the rest of
the machine: a side whose CPU is close to the wall time is the bottleneck, and
a large "others" says the machine was busy.

Only 127.0.0.1 is used, every wait has a bound (no sleeps), and the servers
and the temporary folder are removed at the end, also on errors or Ctrl-C.  The
exit status is 0 when the measurements completed (whatever the targets say),
1 when the benchmark itself failed.  Linux only (/proc).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import random
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    LOOPBACK,
    MB,
    ServerProcess,
    cpu_seconds,
    header,
    machine_busy_seconds,
    print_result,
    read_status_kib,
    run_on_reactor,
    run_script,
    twistd_wsfiles,
)
from twisted.internet import defer, protocol, threads
from twisted.internet.defer import Deferred

RSS_TARGET_MB = 200
SEQUENTIAL_TARGET = 5_000
PIPELINED_TARGET = 25_000
RATE_LIMIT = 1_000_000  # for server B: far above anything measured
HANDSHAKE_TIMEOUT = 20.0  # one connection, TCP connect to hello
CONNECT_BUDGET = 240.0  # all --connections
LIST_ALL_BUDGET = 120.0
RATE_BUDGET_SLACK = 30.0
WARM_UP_SECONDS = 0.5
MAX_ROUND_TRIPS = 10_000_000  # per figure, whatever the time says
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 64 * 1024
ECHO_READY = re.compile(r"echo listening on 127\.0\.0\.1:(\d+)")

#: The start of every answer to a ``list`` (json.dumps of {"op": "list", ...}).
LIST_ANSWER = b'{"op": "list"'


# -- the lean client ------------------------------------------------------------


#: The subprotocol the lean client offers (``--protocol 1.2``: folders); None
#: offers none, as a 1.1 client may.  Set once by main() before any connection.
OFFERED_SUBPROTOCOL: str | None = None


class HandshakeRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"handshake answered HTTP {status}")
        self.status = status


class LeanWebSocket(protocol.Protocol):
    """A minimal RFC 6455 client: upgrade, masked text frames out, whole messages in.

    ``opened`` fires with the protocol once the first message (wsfiles'
    ``hello``) arrived, or right after the 101 when ``wait_first`` is false.
    Later messages go to ``on_message``.
    """

    def __init__(self, host: str, path: str, token: str | None, wait_first: bool) -> None:
        self.host = host
        self.path = path
        self.token = token
        self.wait_first = wait_first
        self.opened: Deferred = Deferred()
        self.on_message: Callable[[bytes], None] = lambda payload: None
        self.first: bytes | None = None
        self.closed = False
        self._head = b""
        self._upgraded = False
        self._buffer = bytearray()
        self._fragments: list[bytes] = []
        self._mask = random.getrandbits(32).to_bytes(4, "big")
        self._mask_int = int.from_bytes(self._mask * 32, "big")  # covers 128 bytes
        self._expected_accept = b""

    # -- handshake --

    def connectionMade(self) -> None:
        key = base64.b64encode(os.urandom(16))
        self._expected_accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if self.token is not None:
            lines.append(f"Authorization: Bearer {self.token}")
        if OFFERED_SUBPROTOCOL is not None:
            lines.append(f"Sec-WebSocket-Protocol: {OFFERED_SUBPROTOCOL}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def dataReceived(self, data: bytes) -> None:
        if not self._upgraded:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._fail(HandshakeRefused(0))
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            status_line, *header_lines = head.split(b"\r\n")
            parts = status_line.split()
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in header_lines)
            }
            if status != 101 or headers.get(b"sec-websocket-accept") != self._expected_accept:
                self._fail(HandshakeRefused(status))
                return
            self._upgraded = True
            if not self.wait_first:
                self.opened.callback(self)
            if not data:
                return
        self._frames(data)

    def _fail(self, error: Exception) -> None:
        self.transport.abortConnection()
        if not self.opened.called:
            self.opened.errback(error)

    # -- frames --

    def _frames(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        pos = 0
        while size - pos >= 2:
            b0, b1 = buffer[pos], buffer[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            payload = bytes(buffer[start:end])
            pos = end
            if b1 & 0x80:  # a server never masks
                self._fail(ValueError("masked frame from the server"))
                return
            opcode = b0 & 0x0F
            if opcode <= 2:  # continuation, text, binary
                if not b0 & 0x80:
                    self._fragments.append(payload)
                    continue
                if self._fragments:
                    payload = b"".join([*self._fragments, payload])
                    self._fragments.clear()
                self._message(payload)
            elif opcode == 9:
                self.transport.write(self.frame(payload, opcode=0xA))
            elif opcode == 8:
                self.closed = True
                self.transport.write(self.frame(payload[:2], opcode=0x8))
                self.transport.loseConnection()
                if not self.opened.called:
                    self.opened.errback(ConnectionError("closed before its first message"))
                return
        del buffer[:pos]

    def _message(self, payload: bytes) -> None:
        if not self.opened.called:
            self.first = payload
            self.opened.callback(self)
            return
        self.on_message(payload)

    def frame(self, payload: bytes, opcode: int = 0x1) -> bytes:
        """One masked, final frame (payloads under 64 KiB)."""
        length = len(payload)
        if length < 126:
            head = bytes((0x80 | opcode, 0x80 | length))
        else:
            head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
        if length <= 128:
            mask = self._mask_int >> (8 * (128 - length))
            masked = (int.from_bytes(payload, "big") ^ mask).to_bytes(length, "big")
        else:
            key = (self._mask * (length // 4 + 1))[:length]
            masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
                length, "big"
            )
        return head + self._mask + masked

    def send_text(self, payload: bytes) -> None:
        self.transport.write(self.frame(payload))

    def connectionLost(self, reason: Any) -> None:
        self.closed = True
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"connection lost: {reason.getErrorMessage()}"))


class LeanFactory(protocol.ClientFactory):
    def __init__(self, host: str, path: str, token: str | None, wait_first: bool) -> None:
        self.host, self.path, self.token, self.wait_first = host, path, token, wait_first
        self.pending: Deferred | None = None

    def buildProtocol(self, addr: Any) -> LeanWebSocket:
        proto = LeanWebSocket(self.host, self.path, self.token, self.wait_first)
        proto.factory = self
        assert self.pending is not None
        proto.opened.chainDeferred(self.pending)
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if self.pending is not None and not self.pending.called:
            self.pending.errback(reason)


async def open_lean(
    reactor: Any, port: int, path: str, token: str | None, *, wait_first: bool = True
) -> LeanWebSocket:
    """Connect, upgrade and (wsfiles) wait for ``hello``; bounded by HANDSHAKE_TIMEOUT."""
    factory = LeanFactory(f"{LOOPBACK}:{port}", path, token, wait_first)
    factory.pending = Deferred()
    factory.pending.addTimeout(HANDSHAKE_TIMEOUT, reactor)
    connector = reactor.connectTCP(LOOPBACK, port, factory, timeout=HANDSHAKE_TIMEOUT)
    try:
        return await factory.pending
    except BaseException:
        connector.disconnect()
        raise


# -- part 1: idle connections ------------------------------------------------------


@dataclass
class IdleFigures:
    opened: int
    refused: dict[str, int]
    connect_seconds: float
    connect_server_cpu: float
    idle_rss_kib: int
    open_rss_kib: int
    open_hwm_kib: int
    answered: int
    wrong_answers: int
    list_seconds: float
    after_hwm_kib: int


async def open_many(
    reactor: Any, port: int, tokens: list[str], count: int, batch: int
) -> tuple[list[LeanWebSocket], dict[str, int]]:
    """``count`` command channels, at most ``batch`` handshakes in flight."""
    opened: list[LeanWebSocket] = []
    refused: dict[str, int] = {}
    done: Deferred = Deferred()
    state = {"next": 0, "in_flight": 0}

    def start_more() -> None:
        while state["in_flight"] < batch and state["next"] < count:
            index = state["next"]
            state["next"] += 1
            state["in_flight"] += 1
            d = defer.ensureDeferred(
                open_lean(reactor, port, "/command", tokens[index % len(tokens)])
            )
            d.addCallbacks(succeeded, failed)
            d.addBoth(settled)
        if state["in_flight"] == 0 and state["next"] >= count and not done.called:
            done.callback(None)

    def succeeded(proto: LeanWebSocket) -> None:
        opened.append(proto)

    def failed(failure: Any) -> None:
        error = failure.value
        key = (
            f"HTTP {error.status}" if isinstance(error, HandshakeRefused) else type(error).__name__
        )
        refused[key] = refused.get(key, 0) + 1

    def settled(_: object) -> None:
        state["in_flight"] -= 1
        start_more()

    start_more()
    await done
    return opened, refused


async def list_on_each(reactor: Any, connections: list[LeanWebSocket]) -> tuple[int, int]:
    """One ``list`` on every connection; (list answers, other answers)."""
    counts = {"answered": 0, "wrong": 0}
    done: Deferred = Deferred()
    expected = len(connections)

    def answer(payload: bytes) -> None:
        if payload.startswith(LIST_ANSWER):
            counts["answered"] += 1
        else:
            counts["wrong"] += 1
        if counts["answered"] + counts["wrong"] >= expected and not done.called:
            done.callback(None)

    for index, proto in enumerate(connections):
        proto.on_message = answer
        proto.send_text(b'{"op":"list","id":%d}' % index)
    if expected == 0:
        return 0, 0
    done.addTimeout(LIST_ALL_BUDGET, reactor)
    try:
        await done
    except defer.TimeoutError:
        print(f"  gave up waiting for answers after {LIST_ALL_BUDGET:g} s", flush=True)
    return counts["answered"], counts["wrong"]


async def idle_connections(
    reactor: Any, server: ServerProcess, tokens: list[str], count: int, batch: int
) -> IdleFigures:
    idle_rss = read_status_kib(server.pid, "VmRSS")
    print(f"server A: pid {server.pid}, port {server.port}, idle VmRSS {idle_rss} kB", flush=True)
    cpu_before = cpu_seconds(server.pid)
    started = time.perf_counter()
    connecting = defer.ensureDeferred(open_many(reactor, server.port, tokens, count, batch))
    connecting.addTimeout(CONNECT_BUDGET, reactor)
    connections, refused = await connecting
    connect_seconds = time.perf_counter() - started
    connect_cpu = cpu_seconds(server.pid) - cpu_before
    try:
        open_rss = read_status_kib(server.pid, "VmRSS")
        open_hwm = read_status_kib(server.pid, "VmHWM")
        print(
            f"  opened {len(connections)} of {count} in {connect_seconds:.1f} s"
            f" ({len(connections) / connect_seconds:.0f}/s, server CPU {connect_cpu:.1f} s)"
            + (f"; refused or failed: {refused}" if refused else ""),
            flush=True,
        )
        started = time.perf_counter()
        answered, wrong = await list_on_each(reactor, connections)
        list_seconds = time.perf_counter() - started
        after_hwm = read_status_kib(server.pid, "VmHWM")
    finally:
        for proto in connections:
            if proto.transport is not None:
                proto.transport.abortConnection()
    return IdleFigures(
        opened=len(connections),
        refused=refused,
        connect_seconds=connect_seconds,
        connect_server_cpu=connect_cpu,
        idle_rss_kib=idle_rss,
        open_rss_kib=open_rss,
        open_hwm_kib=open_hwm,
        answered=answered,
        wrong_answers=wrong,
        list_seconds=list_seconds,
        after_hwm_kib=after_hwm,
    )


# -- part 2: round trips ---------------------------------------------------------------


@dataclass
class Rate:
    round_trips: int
    seconds: float
    wrong: int
    server_cpu: float
    client_cpu: float
    others_cpu: float

    @property
    def per_second(self) -> float:
        return self.round_trips / self.seconds if self.seconds > 0 else 0.0

    def line(self, label: str) -> str:
        return (
            f"  {label:<26} {self.per_second:>9,.0f}/s"
            f"  {self.round_trips:>8,} in {self.seconds:.2f} s"
            f"   CPU s: server {self.server_cpu:5.2f}, client {self.client_cpu:5.2f},"
            f" others {self.others_cpu:5.2f}"
            + (f"   {self.wrong} unexpected answers" if self.wrong else "")
        )


def request(number: int) -> bytes:
    return b'{"op":"list","id":%d}' % number


async def measure(
    reactor: Any,
    proto: LeanWebSocket,
    server_pid: int,
    seconds: float,
    window: int,
    expect: bytes,
) -> Rate:
    """Round trips for ``seconds``: one at a time (window 1) or pipelined."""
    done: Deferred = Deferred()
    state = {"sent": 0, "answered": 0, "wrong": 0, "stopping": False}
    refill = max(1, window // 2)

    def send(n: int) -> None:
        first = state["sent"]
        if n == 1:
            proto.send_text(request(first))
        else:
            proto.transport.write(
                b"".join(proto.frame(request(i)) for i in range(first, first + n))
            )
        state["sent"] = first + n

    def answer(payload: bytes) -> None:
        state["answered"] += 1
        if not payload.startswith(expect):
            state["wrong"] += 1
        outstanding = state["sent"] - state["answered"]
        if not state["stopping"]:
            if time.perf_counter() >= deadline or state["sent"] >= MAX_ROUND_TRIPS:
                state["stopping"] = True
            elif window - outstanding >= refill:
                send(window - outstanding)
        if state["stopping"] and outstanding == 0 and not done.called:
            done.callback(None)

    proto.on_message = answer
    server_cpu = cpu_seconds(server_pid)
    client_cpu = cpu_seconds(os.getpid())
    busy = machine_busy_seconds()
    started = time.perf_counter()
    deadline = started + seconds
    send(window)
    done.addTimeout(seconds + RATE_BUDGET_SLACK, reactor)
    await done
    elapsed = time.perf_counter() - started
    server_cpu = cpu_seconds(server_pid) - server_cpu
    client_cpu = cpu_seconds(os.getpid()) - client_cpu
    others = max(0.0, machine_busy_seconds() - busy - server_cpu - client_cpu)
    return Rate(state["answered"], elapsed, state["wrong"], server_cpu, client_cpu, others)


async def round_trips(
    reactor: Any, port: int, pid: int, path: str, token: str | None, args: argparse.Namespace
) -> tuple[Rate, Rate]:
    wait_first = path == "/command"
    proto = await open_lean(reactor, port, path, token, wait_first=wait_first)
    expect = LIST_ANSWER if wait_first else b'{"op":"list"'
    try:
        await measure(reactor, proto, pid, WARM_UP_SECONDS, 1, expect)
        sequential = await measure(reactor, proto, pid, args.seconds, 1, expect)
        await measure(reactor, proto, pid, WARM_UP_SECONDS, args.window, expect)
        pipelined = await measure(reactor, proto, pid, args.seconds, args.window, expect)
    finally:
        proto.transport.abortConnection()
    return sequential, pipelined


# -- the echo baseline -------------------------------------------------------------------


def echo_server() -> int:
    """``--echo-server``: a bare Autobahn echo server on 127.0.0.1, until SIGTERM."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.sendMessage(payload, isBinary)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    port: Any = reactor.listenTCP(0, factory, interface=LOOPBACK)  # type: ignore[attr-defined]
    print(f"echo listening on {LOOPBACK}:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    return 0


# -- the run ---------------------------------------------------------------------------


def make_users(path: Path, names: list[str]) -> list[str]:
    wsfiles_command = str(Path(sys.executable).parent / "wsfiles")
    tokens = []
    for name in names:
        result = subprocess.run(
            [wsfiles_command, "user", "add", "--users", str(path), name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"wsfiles user add {name} failed: {result.stderr.strip()}")
        tokens.append(result.stdout.strip())
    return tokens


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed <= hard or (soft < hard and hard == resource.RLIM_INFINITY):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise RuntimeError(
            f"--connections needs about {needed} file descriptors; ulimit -n is {soft}"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000, help="idle connections (10000)")
    parser.add_argument("--clients", type=int, default=5, help="client names sharing them (5)")
    parser.add_argument("--batch", type=int, default=50, help="handshakes in flight at most (50)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per rate figure (3)")
    parser.add_argument("--window", type=int, default=128, help="pipelined lists in flight (128)")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--protocol",
        choices=["1.1", "1.2"],
        default="1.1",
        help="1.2: the connections offer wsfiles.v1.2 (folders; per-folder events)",
    )
    args = parser.parse_args(argv)
    if args.connections < 1 or args.clients < 1 or args.batch < 1 or args.window < 2:
        parser.error("--connections, --clients, --batch must be >= 1 and --window >= 2")
    if not 0 < args.seconds <= 60:
        parser.error("--seconds must be in (0, 60]")
    return args


def report(idle: IdleFigures, count: int, rates: dict[str, tuple[Rate, Rate]]) -> None:
    print()
    print(
        f"idle connections: {idle.opened} of {count} open, {idle.connect_seconds:.1f} s to connect"
    )
    per_connection = (idle.open_rss_kib - idle.idle_rss_kib) * 1024 / 1000 / max(1, idle.opened)
    print(
        f"  server VmRSS idle {idle.idle_rss_kib * 1024 / MB:.1f} MB, with all open"
        f" {idle.open_rss_kib * 1024 / MB:.1f} MB (VmHWM {idle.open_hwm_kib * 1024 / MB:.1f} MB,"
        f" after the lists {idle.after_hwm_kib * 1024 / MB:.1f} MB);"
        f" {per_connection:.1f} kB per connection"
    )
    print(
        f"  list on each: {idle.answered} answered, {idle.wrong_answers} other answers,"
        f" in {idle.list_seconds:.2f} s"
    )
    all_open = idle.opened == count
    print_result(
        "idle connections server RSS",
        f"{idle.open_rss_kib * 1024 / MB:.1f} MB with {idle.opened} open"
        f" ({per_connection:.1f} kB each, idle {idle.idle_rss_kib * 1024 / MB:.1f} MB,"
        f" peak {idle.after_hwm_kib * 1024 / MB:.1f} MB)",
        f"< {RSS_TARGET_MB} MB with {count} open",
        all_open and idle.open_rss_kib * 1024 / MB < RSS_TARGET_MB,
    )
    print_result(
        "idle connections list answered",
        f"{idle.answered} of {count}",
        f"all {count}",
        idle.answered == count and idle.wrong_answers == 0,
    )
    print_result("idle connections connect time", f"{idle.connect_seconds:.1f} s", "none", None)
    wsfiles_seq, wsfiles_pipe = rates["wsfiles"]
    echo_seq, echo_pipe = rates["echo"]
    for label, measured, baseline, target in (
        ("list one at a time", wsfiles_seq, echo_seq, SEQUENTIAL_TARGET),
        ("list pipelined", wsfiles_pipe, echo_pipe, PIPELINED_TARGET),
    ):
        ratio = measured.per_second / baseline.per_second if baseline.per_second else 0.0
        print_result(
            label,
            f"{measured.per_second:,.0f}/s (ratio vs bare Autobahn echo {ratio:.2f}x,"
            f" echo {baseline.per_second:,.0f}/s)",
            f">= {target:,}/s",
            measured.per_second >= target and measured.wrong == 0,
        )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.echo_server:
        return echo_server()
    global OFFERED_SUBPROTOCOL
    OFFERED_SUBPROTOCOL = "wsfiles.v1.2" if args.protocol == "1.2" else None
    header()
    print(f"protocol {args.protocol}", flush=True)
    raise_fd_limit(args.connections + 200)
    print(
        "client: lean hand-written RFC 6455 client on a Twisted Protocol (raw socket,"
        " masked text frames), not wsfiles.client",
        flush=True,
    )
    count = args.connections
    per_client = -(-count // args.clients)
    with contextlib.ExitStack() as stack:
        temp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsfiles-bench-conn-")))
        users = temp / "users"
        names = [f"bench{i}" for i in range(args.clients)]
        tokens = make_users(users, names)
        print(f"users file: {len(names)} clients ({', '.join(names)})", flush=True)
        limits = [
            "--max-connections", str(count + 100),
            "--max-connections-per-ip", str(count + 100),
            "--max-connections-per-client", str(per_client + 100),
            # The rate limit is per client: 2,000 connections of one client
            # sending one list each at once would be mostly rate_limited.
            "--rate-limit", str(RATE_LIMIT),
        ]  # fmt: skip
        argv_a = twistd_wsfiles(temp / "root-a", "--users", str(users), *limits)
        argv_b = twistd_wsfiles(
            temp / "root-b", "--users", str(users), "--rate-limit", str(RATE_LIMIT)
        )
        argv_c = [sys.executable, str(Path(__file__).resolve()), "--echo-server"]
        print(f"server A (idle connections): {shlex.join(argv_a)}")
        print(f"server B (round trips): {shlex.join(argv_b)}")
        print(
            f"  --rate-limit raised from the default 50/s to {RATE_LIMIT}/s for the round trips:"
            " at 50/s almost every list would be refused"
        )
        print(f"server C (bare Autobahn echo baseline): {shlex.join(argv_c)}", flush=True)
        server_a = stack.enter_context(ServerProcess("server A", argv_a))
        server_b = stack.enter_context(ServerProcess("server B", argv_b))
        server_c = stack.enter_context(ServerProcess("echo", argv_c, ready=ECHO_READY))

        async def run(reactor: Any) -> tuple[IdleFigures, dict[str, tuple[Rate, Rate]]]:
            print(f"\n1. {count} idle authenticated command channels on server A", flush=True)
            idle = await idle_connections(reactor, server_a, tokens, count, args.batch)
            await threads.deferToThread(server_a.stop)  # frees its 10,000 sockets' memory
            print(
                f"\n2. list round trips on one command channel, {args.seconds:g} s each,"
                f" pipelined window {args.window}",
                flush=True,
            )
            rates: dict[str, tuple[Rate, Rate]] = {}
            for label, server, path, token in (
                ("wsfiles", server_b, "/command", tokens[0]),
                ("echo", server_c, "/", None),
            ):
                sequential, pipelined = await round_trips(
                    reactor, server.port, server.pid, path, token, args
                )
                print(sequential.line(f"{label} one at a time"))
                print(pipelined.line(f"{label} pipelined"), flush=True)
                rates[label] = (sequential, pipelined)
            return idle, rates

        budget = CONNECT_BUDGET + LIST_ALL_BUDGET + 4 * (args.seconds + RATE_BUDGET_SLACK) + 120
        idle, rates = run_on_reactor(run, budget)
        report(idle, count, rates)
    return 0


if __name__ == "__main__":
    run_script(main)
