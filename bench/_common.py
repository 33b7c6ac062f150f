"""What every benchmark in bench/ shares: server subprocesses, /proc readings, the report header.

Benchmarks are scripts run as ``python bench/NAME.py``, so this folder is
``sys.path[0]`` and they import this module as ``_common``.  Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

import wsfiles
from wsfiles.sizes import parse_size

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
MB = 1_000_000
KIB = 1024
MIB = 1024 * 1024
GIB = 1024**3
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 15.0
HASH_BLOCK = 1024 * 1024

#: The line ``twistd wsfiles`` logs once it listens (wsfiles/tap.py).
WSFILES_READY = re.compile(r"wsfiles listening on 127\.0\.0\.1:(\d+) \(")


# -- /proc ----------------------------------------------------------------


def read_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status, e.g. VmHWM (peak RSS) or VmRSS."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return int(value.split()[0])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After "pid (comm)": state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time every CPU of the machine spent busy so far (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(value) for value in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


# -- files ----------------------------------------------------------------


def size_argument(text: str) -> int:
    """argparse ``type`` for sizes: bytes with K/M/G/T (powers of 1024), at least 1."""
    try:
        size = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < 1:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return size


def make_source(path: Path, size: int) -> str:
    """Write ``size`` random-ish bytes to ``path``; return their SHA-256."""
    pool = os.urandom(8 * 1024 * 1024)
    digest = hashlib.sha256()
    remaining = size
    counter = 0
    with path.open("wb") as f:
        while remaining:
            # Vary each block a little so no two 8 MiB blocks are identical.
            block = (counter.to_bytes(8, "little") + pool[8:])[:remaining]
            f.write(block)
            digest.update(block)
            remaining -= len(block)
            counter += 1
    return digest.hexdigest()


def verify_copy(what: str, path: Path, expected: str) -> str:
    """Compare a copy with the source's SHA-256: a line saying it matches, or RuntimeError."""
    actual = sha256_of(path)
    if actual != expected:
        raise RuntimeError(f"{what}: SHA-256 {actual} differs from the source's {expected}")
    return f"{what}: SHA-256 matches ({actual[:16]}...)"


def check_copy(what: str, path: Path, expected: str) -> None:
    """verify_copy, then delete the copy (also when it differs)."""
    try:
        verify_copy(what, path, expected)
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def announced(step: str) -> Iterator[None]:
    """Print ``step...`` and, once it is done, how long it took."""
    print(f"{step}...", end=" ", flush=True)
    start = time.perf_counter()
    yield
    print(f"{time.perf_counter() - start:.1f} s", flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# -- server subprocesses ----------------------------------------------------


def twistd_wsfiles(root: Path, *options: str) -> list[str]:
    """The command line of a ``twistd wsfiles`` on an ephemeral loopback port."""
    twistd = Path(sys.executable).parent / "twistd"
    return [
        str(twistd), "--nodaemon", "--pidfile=", "--logfile=-", "wsfiles",
        "--listen", f"tcp:0:interface={LOOPBACK}", "--root", str(root), *options,
    ]  # fmt: skip


class ServerProcess:
    """A server started as a subprocess, ready once it prints its port.

    Its output is drained by a thread into ``output`` (the last lines), into
    ``log_path`` when given, and through ``on_line`` (override to scan it).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready: re.Pattern[str] = WSFILES_READY,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self._ready = ready
        self._ports: queue.Queue[int | None] = queue.Queue()
        self.output: deque[str] = deque(maxlen=200)
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self.port = 0
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> ServerProcess:
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=self.env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it
        )
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-output", daemon=True)
        self._reader.start()
        try:
            self.port = self._wait_for_port(SERVER_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def on_line(self, line: str) -> None:
        """Called on the reader thread for every line of output."""

    def on_end(self) -> None:
        """Called on the reader thread after the last line."""

    def _read(self) -> None:
        """Keep the pipe drained; report the port from the ready line."""
        assert self._process is not None and self._process.stdout is not None
        log = self.log_path.open("w") if self.log_path is not None else None
        announced = False
        try:
            for line in self._process.stdout:
                if log is not None:
                    log.write(line)
                line = line.rstrip("\n")
                self.output.append(line)
                self.on_line(line)
                match = None if announced else self._ready.search(line)
                if match:
                    announced = True
                    self._ports.put(int(match.group(1)))
            self.on_end()
        finally:
            if log is not None:
                log.close()
            self._ports.put(None)

    def _wait_for_port(self, timeout: float) -> int:
        try:
            port = self._ports.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"{self.name} did not announce its port within {timeout:g} s" + self.recent_output()
            ) from None
        if port is None:
            raise RuntimeError(f"{self.name} exited before it was ready" + self.recent_output())
        return port

    def recent_output(self, lines: int = 30) -> str:
        tail = list(self.output)[-lines:]
        return "".join(f"\n  {self.name}| {line}" for line in tail)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """SIGTERM, wait (bounded), SIGKILL if it would not go."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM; killing it", file=sys.stderr)
                process.kill()
                process.wait(SERVER_STOP_TIMEOUT)
        self.exit_code = process.returncode
        if self._reader is not None:
            self._reader.join(SERVER_STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


# -- the reactor ------------------------------------------------------------


@contextlib.contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Put back this process's signal handlers after the Twisted reactor has run.

    ``reactor.run()`` installs its own SIGINT/SIGTERM/SIGCHLD handlers (and a
    wakeup fd) and leaves them behind when it stops: Ctrl-C would then only
    ask a stopped reactor to stop.
    """
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
    saved = {signum: signal.getsignal(signum) for signum in watched}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: not set from Python; leave it
                signal.signal(signum, handler)
        signal.set_wakeup_fd(-1)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_on_reactor(make: Callable[[Any], Coroutine[Any, Any, T]], budget: float | None = None) -> T:
    """Run ``make(reactor)`` on the global reactor (at most ``budget`` s); return its result.

    Like ``twisted.internet.task.react``, but returns (or raises) instead of
    calling sys.exit, so ``with`` blocks around it clean up as usual.
    """
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    outcome: list[object] = []

    def finished(result: object) -> None:
        outcome.append(result)
        reactor.stop()

    def start() -> None:
        d = defer.ensureDeferred(make(reactor))
        if budget is not None:
            d.addTimeout(budget, reactor)
        d.addBoth(finished)

    reactor.callWhenRunning(start)
    with own_signal_handlers():
        reactor.run()
    if not outcome:
        raise KeyboardInterrupt("the reactor stopped before the benchmark finished")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[return-value]


async def bounded(coroutine: Coroutine[Any, Any, T], seconds: float, reactor: Any) -> T:
    """Await ``coroutine``, cancelling it (TimeoutError) after ``seconds``."""
    d = defer.ensureDeferred(coroutine)
    d.addTimeout(seconds, reactor)
    return await d


# -- reports ------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def nvx_status() -> str:
    try:
        from autobahn.websocket import HAS_NVX, USES_NVX
    except ImportError:
        return "unknown (autobahn.websocket has no HAS_NVX)"
    setting = os.environ.get("AUTOBAHN_USE_NVX")
    shown = "unset" if setting is None else repr(setting)
    return f"available {HAS_NVX}, in use {USES_NVX} (AUTOBAHN_USE_NVX {shown})"


def versions() -> str:
    return (
        f"Python {platform.python_version()}, Twisted {version('twisted')},"
        f" Autobahn {version('autobahn')}, {os.cpu_count()} CPUs, {platform.platform()}"
    )


def source_version() -> str:
    """The git commit of the wsfiles package measured, and whether it was edited."""
    package = Path(wsfiles.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=package, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return f"{package} (not a git checkout)"
    return f"{package} at git {commit}" + (" + uncommitted changes" if dirty else "")


def header() -> None:
    """What every benchmark prints first: how it was run and on what.

    It also makes SIGTERM (bench/run_all.py's time limit) act like Ctrl-C, so
    the ``with`` blocks around servers and temporary folders clean up.
    """
    import shlex

    signal.signal(signal.SIGTERM, _interrupted)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(versions())
    print(f"Autobahn NVX: {nvx_status()}")
    print(f"wsfiles: {source_version()}", flush=True)


#: Prefix of the machine-readable result lines that bench/run_all.py collects.
RESULT_PREFIX = "RESULT "


def print_result(target: str, figure: str, goal: str, ok: bool | None) -> None:
    """One target's outcome, human-readable and as a ``RESULT {json}`` line for run_all.py.

    ``figure`` is what was measured (a ratio against the same run's baseline where
    the target is one), ``goal`` the target, ``ok`` None when there is no target.
    """
    import json

    shown = "" if ok is None else verdict(ok)
    print(f"{target}: {figure}   target {goal}  {shown}".rstrip(), flush=True)
    record = {"target": target, "figure": figure, "goal": goal, "ok": ok}
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def run_script(main: Callable[[list[str]], int]) -> None:
    """``sys.exit(main(argv))``; Ctrl-C (or run_all's SIGTERM) exits 1 after the
    ``with`` blocks in ``main`` stopped the servers and removed the files."""
    try:
        code = main(sys.argv[1:])
    except KeyboardInterrupt:
        print("interrupted; servers stopped, temporary files removed", file=sys.stderr)
        code = 1
    sys.exit(code)
