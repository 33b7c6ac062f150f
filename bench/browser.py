"""The web page's throughput and memory in headless Chromium, against the Python client.

Run from the repository root (wsfiles installed, Debian's ``/usr/bin/chromium``
present)::

    python bench/browser.py                  # 1 GiB each way (about 2-3 minutes)
    python bench/browser.py --size 64M       # quick
    python bench/browser.py --size 256M --incognito         # as Playwright's contexts
    python bench/browser.py --size 256M --devtools-network  # as under Playwright
    python bench/browser.py --curl --upload-variants default,no-verify,blob-slices
    python bench/browser.py --size 256M --trace /tmp/trace  # Chromium's tracing

In one invocation it:

1. writes a file of ``--size`` bytes (default 1G; K/M/G are powers of 1024)
   into a temporary folder;
2. starts ``twistd --nodaemon --pidfile= --logfile=- wsfiles --listen
   tcp:0:interface=127.0.0.1 ...`` as a subprocess (the command line is
   printed);
3. baseline: uploads then downloads the file with the project's Python client
   (``wsfiles.client``, on the Twisted reactor of this process), timed like
   bench/throughput.py (the ratios below are page / this client);
4. starts headless Chromium (flags from /work/shared/FIELD-NOTES.md, a fresh
   profile in the temporary folder) and drives the page at ``/`` over the
   DevTools protocol as a person would: it picks the file in the file input
   (``DOM.setFileInputFiles``; a Web Worker reads the file in 4 MiB slices,
   hashes them for the ack check and hands them to the page, which sends them
   as a protocol 1.1 ``chunked`` save, paced by ``bufferedAmount``), once per
   upload variant (``--upload-variants``: message size, high-water mark,
   verification on or off, File.slice() Blobs instead of the worker's bytes,
   set through the page's sessionStorage "wsfiles-tuning", which the
   page reads as each upload starts; from the second on, the page asks
   whether to replace the file and is answered Replace), then clicks the
   file's Download button with a real mouse event (the page asks for a
   download ticket and follows its URL: the browser's own download manager
   fetches ``/d/TICKET/NAME``);
5. checks the SHA-256 of the uploaded file on the server's disk and of the file
   Chromium saved against the source's;
6. with ``--curl``, downloads the file once more with curl from ``/files/``
   (the same ``serve_file`` as the page's ticket URL, without Chromium): a
   control that tells the server's HTTP path from Chromium's download path;
7. prints MB/s each way for the page and for the Python client, and the page's
   memory before, at peak during, right after each transfer and, for the
   download, "later": once Chromium has given the memory back (polled once a
   second for up to ``--release-wait`` seconds, default 75).

Why not Playwright (as tests/test_web.py uses): Playwright enables the
DevTools ``Network`` domain on every page, and Chromium then copies every
WebSocket message, base64-encoded, into a DevTools event.  Measured here with
``--devtools-network`` (256 MiB): the download ran at 13.5 MB/s instead of
~80 and Chromium's peak memory rose by 13x the file; with Playwright itself a
256 MiB download made its driver run out of memory.  So this benchmark speaks
the DevTools protocol itself, over ``--remote-debugging-pipe``, and enables
only Page, Runtime and Performance.

Upload time runs from handing the file to the file input until the page shows
the upload finished (after the server's ``ack``: stored and fsynced, and, with
verification, the page's own SHA-256 compared with it).
Download time runs from the click until Chromium reports the file written
(``Browser.downloadProgress`` completed); the time until the page had the
whole Blob is shown as well.  Page state is polled every 50 ms.

CPU: around each transfer the benchmark reads the user + system CPU time of
every thread of Chromium's processes and of the server from /proc (grouped by
process kind and thread name: the page's main thread, DedicatedWorker (the
hash worker), NetworkService's IO thread, the browser's ThreadPool...), the
whole machine's busy time (/proc/stat: what other jobs took), and the page's
``Performance.getMetrics`` (ProcessTime, ThreadTime, TaskDuration...).  CPU
seconds per GiB are steadier than MB/s on a shared machine.  ``--trace DIR``
also records Chromium's own tracing (``Tracing.start``/``Tracing.end`` over
the same pipe, categories in TRACE_CATEGORIES) per transfer into DIR, for
https://ui.perfetto.dev, and prints each busy thread's tasks by self time;
tracing (its sampling JS profiler above all) costs speed and memory, so time
runs without it.

Memory: a thread reads the resident set (VmRSS) of every Chromium process
started by this benchmark from /proc every 100 ms, grouped as renderers
(``--type=renderer``: the page's and Chromium's idle ones), the browser
process (which keeps Blob data), the network service, and all of Chromium
(``total``: a sum of RSS, so pages shared between processes count more than
once; its changes are what matter).  The peaks also come from VmHWM, reset
through /proc/PID/clear_refs before each transfer, so no peak between two
samples is missed.  The page's JS heap (used and total) is read with
``Performance.getMetrics`` every 250 ms; "before", "after" and "later" are
read after a forced garbage collection (``HeapProfiler.collectGarbage``).

Targets: the page's memory stays flat, i.e. does not grow with the file.  A
transfer passes when the peak increase over "before" of the renderers' RSS is
under 25% of the file, and so is that of all of Chromium together (neither the
page nor the browser held the whole file for it).  The page's fixed working
memory is tens of MB, so the verdict means something for large files only
(the default 1 GiB).  What Chromium does on its own is reported, not
excused: the WebSocket API delivers a message whole, and a download is one
message by protocol.

Downloads now go through a ``/d/`` ticket URL and Chromium's own download
manager (protocol ``download`` op), so no Blob or object URL holds the file;
the pieces path this benchmark once measured is used only against servers
without ``download``.  A download Chromium cancels (``Browser.downloadProgress``
state ``canceled``) still fails the benchmark, printing Chromium's log and
MemAvailable.

MB means 10^6 bytes throughout.  Only 127.0.0.1 is used; every wait has a
bound (a watchdog kills this benchmark's Chromium if the browser part outlives
its whole budget); the server, Chromium and the temporary folder are removed at
the end, also on errors or Ctrl-C.  The exit status is 0 when the measurements
completed (whatever the targets say), 1 when the benchmark itself failed.  The
machine this was written on was shared with other benchmarks: figures vary by
run.  Linux only (/proc).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    GIB,
    LOOPBACK,
    MB,
    ServerProcess,
    bounded,
    cpu_seconds,
    header,
    machine_busy_seconds,
    make_source,
    print_result,
    run_on_reactor,
    run_script,
    size_argument,
    twistd_wsfiles,
    verify_copy,
)

from wsfiles.client import connect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

PAGE_FILE = "browser-bench.bin"  # the page uploads the file under its own name
PYTHON_FILE = "python-bench.bin"
CONNECT_TIMEOUT = 30.0
PAGE_TIMEOUT = 30.0  # page loads, clicks, CDP calls
#: How often the page's state (and its JS heap) is looked at during a transfer.
POLL_SECONDS = 0.05
HEAP_EVERY_SECONDS = 0.25
RSS_EVERY_SECONDS = 0.1
#: How often the Chromium process list is read again.
RESCAN_SECONDS = 0.5
RELEASE_POLL_SECONDS = 1.0
#: Files smaller than this make the "% of the file" verdicts weak.
SMALL_FILE = 512 * 2**20
#: A transfer passes when the page's memory rises by less than this share of the file.
FLAT_SHARE = 0.25
#: Chromium's tracing (--trace): top-level tasks with their thread time (toplevel),
#: the page's tasks, script and timers (devtools.timeline), V8's execution and
#: garbage collection (v8), net for the download's URL request, and sampled JS stacks.
TRACE_CATEGORIES = [
    "toplevel",
    "devtools.timeline",
    "disabled-by-default-devtools.timeline",
    "v8",
    "v8.execute",
    "blink",
    "net",
    "disabled-by-default-v8.cpu_profiler",
]
#: The page's Performance.getMetrics kept per transfer (differences, seconds).
PAGE_METRICS = ("ProcessTime", "ThreadTime", "TaskDuration", "ScriptDuration", "TaskOtherDuration")
#: The page's upload tuning (sessionStorage "wsfiles-tuning") by name; the
#: page's defaults are 1 MiB messages, a 4 MiB bufferedAmount mark, verified,
#: and the bytes sent are the ones the hash worker read (16 MiB reads, "feed").
UPLOAD_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-verify": {"verify": False},
    # As before issue 20's second round: the socket gets 256 KiB File.slice()
    # Blobs and the worker reads the file a second time (4 MiB reads) for the hash.
    "blob-slices": {"feed": False, "chunk": 256 << 10, "read": 4 << 20},
    "blob-slices-no-verify": {"feed": False, "verify": False, "chunk": 256 << 10},
    # The worker's bytes, as first built: 4 MiB reads sent in 256 KiB messages.
    "4M-reads-256K-messages": {"read": 4 << 20, "chunk": 256 << 10},
    "1M-reads": {"read": 1 << 20},
    "16M-mark": {"highWater": 16 << 20},
    "256K-messages": {"chunk": 256 << 10},
    "64K-messages": {"chunk": 64 << 10, "highWater": 1 << 20},
}


# -- files ---------------------------------------------------------------


# -- Chromium's processes --------------------------------------------------


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Playwright's driver, Chromium and its children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = _parent_pid(int(name))
            if parent is not None:
                children.setdefault(parent, []).append(int(name))
    found: list[int] = []
    todo = list(children.get(root, []))
    while todo:  # bounded: a process tree has no cycles, and each pid is seen once
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def chromium_kind(pid: int) -> str | None:
    """``browser``, ``renderer``, ``network``, ``other`` for a Chromium process; else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return None
    if len(argv) == 1:  # Chromium's child processes rewrite theirs as one string
        argv = argv[0].split(b" ")
    if not argv or not argv[0].endswith(b"/chromium"):
        return None  # Playwright's node driver, or Debian's /usr/bin/chromium shell wrapper
    kind = next((a[7:] for a in argv if a.startswith(b"--type=")), None)
    if kind is None:
        return "browser"
    if kind == b"renderer":
        return "renderer"
    if kind == b"utility" and any(b"NetworkService" in a for a in argv):
        return "network"
    return "other"


def mem_available_mb() -> float:
    """The machine's MemAvailable (/proc/meminfo), in MB: other jobs' memory pressure."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / MB
    return math.nan


def status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


KINDS = ("renderer", "browser", "network", "total")


def process_label(pid: int) -> str | None:
    """A finer name than ``chromium_kind`` for CPU accounting: gpu, zygote, utility services."""
    kind = chromium_kind(pid)
    if kind != "other":
        return kind
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().replace(b"\0", b" ").decode(errors="replace").split()
    except OSError:
        return None
    for arg in argv:
        if arg.startswith("--type="):
            kind = arg[7:]
        if arg.startswith("--utility-sub-type="):
            return "utility:" + arg.rpartition(".")[2]
    return kind


def thread_cpu(pids: dict[int, str]) -> dict[tuple[str, str], float]:
    """CPU seconds (user + system) so far per (process label, thread name), from /proc.

    Thread names are the kernel's (15 characters): CrRendererMain, DedicatedWorker
    (the hash worker), NetworkService, ThreadPoolForeg, Chrome_ChildIOT...
    """
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[str, str], float] = {}
    for pid, label in pids.items():
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        head, _, rest = f.read().rpartition(")")
                except OSError:
                    continue  # the thread ended
                name = head.partition("(")[2]
                fields = rest.split()
                key = (label, name)
                out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


class CpuMeter:
    """CPU seconds per process and thread of Chromium and the server over one transfer."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def pids(self) -> dict[int, str]:
        found = {self.server_pid: "server"}
        for pid in descendants(os.getpid()):
            label = process_label(pid)
            if label is not None:
                found[pid] = label
        return found

    def snapshot(self) -> CpuUse:
        """CPU seconds so far: per thread, and the whole machine's busy time."""
        return CpuUse(time.perf_counter(), machine_busy_seconds(), thread_cpu(self.pids()))

    def since(self, before: CpuUse) -> CpuUse:
        """What was used from ``before`` until now (threads that ended are not counted)."""
        now = self.snapshot()
        return CpuUse(
            now.wall - before.wall,
            now.busy - before.busy,
            {k: v - before.threads.get(k, 0.0) for k, v in now.threads.items()},
        )


@dataclass
class CpuUse:
    """Wall seconds, the machine's busy CPU seconds, CPU seconds per (process, thread)."""

    wall: float = 0.0
    busy: float = 0.0
    threads: dict[tuple[str, str], float] = field(default_factory=dict)

    def by_process(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (label, _), seconds in self.threads.items():
            out[label] = out.get(label, 0.0) + seconds
        return out


@dataclass
class Memory:
    """Bytes per kind of Chromium process (``total``: all of them), and the JS heap."""

    rss: dict[str, int] = field(default_factory=dict)
    js_used: int = 0
    js_total: int = 0


class ChromiumMemory:
    """Samples the RSS of this benchmark's Chromium processes on a thread."""

    def __init__(self) -> None:
        self._processes: dict[int, str] = {}
        self._scanned = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak: dict[str, int] = {}
        self.samples = 0

    def rescan(self) -> None:
        found = {}
        for pid in descendants(os.getpid()):
            kind = chromium_kind(pid)
            if kind is not None:
                found[pid] = kind
        self._processes = found
        self._scanned = time.monotonic()

    def browser_pids(self) -> list[int]:
        return list(self._processes)

    def kinds(self) -> list[str]:
        return sorted(self._processes.values())

    def read(self, field_name: str = "VmRSS") -> dict[str, int]:
        if time.monotonic() - self._scanned > RESCAN_SECONDS:
            self.rescan()
        sums = dict.fromkeys(KINDS, 0)
        for pid, kind in list(self._processes.items()):
            value = status_kib(pid, (field_name,)).get(field_name, 0) * 1024
            if kind in sums:
                sums[kind] += value
            sums["total"] += value
        return sums

    def reset_peaks(self) -> bool:
        """Reset every process's VmHWM (clear_refs 5); False where the kernel refused."""
        ok = True
        self.rescan()
        for pid in self._processes:
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                ok = False
        return ok

    def hwm(self) -> dict[str, int]:
        """Peak RSS per kind since ``reset_peaks`` (a sum of per-process peaks)."""
        return self.read("VmHWM")

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_SECONDS):
            now = self.read()
            with self._lock:
                self.samples += 1
                for kind, value in now.items():
                    self.peak[kind] = max(self.peak.get(kind, 0), value)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        with self._lock:
            self.peak = {}
            self.samples = 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join(5)


class Watchdog:
    """Kills this benchmark's Chromium if the whole budget runs out (a hung call returns)."""

    def __init__(self, memory: ChromiumMemory, seconds: float) -> None:
        self._memory = memory
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        print("watchdog: the browser part overran its budget; killing Chromium", file=sys.stderr)
        self._memory.rescan()
        for pid in self._memory.browser_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()


# -- Chromium over the DevTools protocol ---------------------------------------


#: The DevTools events kept (a download's progress events are dropped but for its end).
KEPT_EVENTS = frozenset(
    {
        "Browser.downloadWillBegin",
        "Browser.downloadProgress",
        "Runtime.exceptionThrown",
        "Tracing.tracingComplete",
    }
)


class CdpError(RuntimeError):
    pass


def _high_fd(fd: int) -> int:
    """``fd`` moved to 10 or above, so the shell can place the pipe on 3 and 4 freely."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fds 3 and 4).

    Not Playwright: Playwright enables the DevTools ``Network`` domain on every
    page, and Chromium then copies every WebSocket message, base64-encoded, into
    a DevTools event: CPU for every upload slice, and a 256 MiB download made
    Playwright's driver run out of memory.  This client enables only what it
    uses (Page, Runtime, Performance).
    """

    def __init__(self, profile: Path, downloads: Path, extra_args: list[str]) -> None:
        to_chrome_r, to_chrome_w = (_high_fd(fd) for fd in os.pipe())
        from_chrome_r, from_chrome_w = (_high_fd(fd) for fd in os.pipe())
        # bash (dash takes single-digit fds only) puts the pipe on fds 3 and 4 for Chromium.
        script = (
            f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
            f" {to_chrome_r}<&- {from_chrome_w}>&-"
        )
        argv = [
            CHROMIUM, *CHROMIUM_ARGS, *extra_args, "--headless", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", "--no-default-browser-check", "about:blank",
        ]  # fmt: skip
        self.argv = argv
        self.log_path = profile.with_name("chromium.log")
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["/bin/bash", "-c", script, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(to_chrome_r, from_chrome_w),
            start_new_session=True,  # Ctrl-C reaches us only; we stop it
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._out = os.fdopen(to_chrome_w, "wb", buffering=0)
        self._in = from_chrome_r
        self._next_id = 0
        self._cond = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._eof = False
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        self.downloads = downloads

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        parts: list[bytes] = []  # of the message being read (joined once: no quadratic copy)
        try:
            while chunk := os.read(self._in, 1 << 20):
                while (end := chunk.find(b"\0")) >= 0:
                    parts.append(chunk[:end])
                    chunk = chunk[end + 1 :]
                    self._dispatch(json.loads(b"".join(parts)))
                    parts = []
                if chunk:
                    parts.append(chunk)
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()
            os.close(self._in)

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._cond:
            if "id" in message:
                self._replies[message["id"]] = message
            elif (
                message.get("method") in KEPT_EVENTS
                and message["params"].get("state") != "inProgress"
            ):
                self.events.append(message)
            self._cond.notify_all()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = PAGE_TIMEOUT,
    ) -> dict[str, Any]:
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
        message: dict[str, Any] = {"id": request_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        try:
            self._out.write(json.dumps(message).encode() + b"\0")
        except OSError as e:
            raise CdpError(f"{method}: Chromium is gone ({e})") from None
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self._replies:  # bounded by the deadline
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "Chromium exited" if self._eof else f"no answer within {timeout:g} s"
                    raise CdpError(f"{method}: {why}")
                self._cond.wait(remaining)
            reply = self._replies.pop(request_id)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(
        self, method: str, match: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """The first event ``method`` (received so far or later) whose params ``match``."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:  # bounded by the deadline
                for event in self.events[seen:]:
                    if event.get("method") == method and match(event.get("params", {})):
                        return event["params"]
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "Chromium exited" if self._eof else f"not within {timeout:g} s"
                    raise CdpError(f"waiting for {method}: {why}")
                self._cond.wait(remaining)

    def trace_start(self, categories: list[str]) -> None:
        """Chromium's own tracing, every process, until ``trace_end``."""
        self.send(
            "Tracing.start",
            {
                "transferMode": "ReturnAsStream",
                "traceConfig": {
                    "recordMode": "recordAsMuchAsPossible",
                    "includedCategories": categories,
                },
            },
        )

    def trace_end(self, path: Path, timeout: float) -> None:
        """Stop tracing and write the trace (Trace Event JSON, for Perfetto) to ``path``."""
        with self._cond:
            seen = sum(e.get("method") == "Tracing.tracingComplete" for e in self.events)
        self.send("Tracing.end")
        count = [0]

        def new(_: dict[str, Any]) -> bool:
            count[0] += 1
            return count[0] > seen

        handle = self.wait_event("Tracing.tracingComplete", new, timeout)["stream"]
        with path.open("wb") as f:
            for _ in range(1 << 20):  # bounded: 1 TiB of 1 MiB reads
                chunk = self.send("IO.read", {"handle": handle, "size": 1 << 20}, timeout=timeout)
                data = chunk.get("data", "")
                f.write(base64.b64decode(data) if chunk.get("base64Encoded") else data.encode())
                if chunk.get("eof"):
                    break
        self.send("IO.close", {"handle": handle})

    def errors(self) -> list[str]:
        with self._cond:
            return [
                json.dumps(e["params"].get("exceptionDetails", {}))[:500]
                for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"
            ]

    def close(self) -> None:
        """Browser.close, bounded; kill Chromium's process group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(CdpError):
                self.send("Browser.close", timeout=5)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        with contextlib.suppress(OSError):
            self._out.close()
        self._reader.join(5)
        self.log.close()

    def recent_output(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        tail = [line for line in text if "dbus" not in line][-lines:]  # no D-Bus here
        return "".join(f"\n  chromium| {line}" for line in tail)


# -- the page ---------------------------------------------------------------

#: The finished transfer item with this label: its stats text ("uploaded ·
#: SHA-256 verified", "sent to your browser's downloads ..."), or null while it runs.
FINISHED_JS = """(label) => {
    const kind = label.startsWith("↑") ? "upload" : "download", name = label.slice(2);
    for (const item of document.querySelectorAll('#transfers li.done, #transfers li.failed')) {
        if (item.dataset.kind === kind && item.dataset.name === name)
            return item.querySelector('.stats').textContent;
    }
    return null;
}"""

#: Polls ``check(arg)`` in the page every POLL ms until it is truthy or MS ms pass.
WAIT_JS = """new Promise((resolve) => {
    const check = %s, arg = %s, end = performance.now() + %d;
    (function poll() {
        let value = null;
        try { value = check(arg); } catch (e) { value = null; }
        if (value || performance.now() > end) resolve(value || null);
        else setTimeout(poll, %d);
    })();
})"""


@dataclass
class PagePhase:
    """One transfer through the page: times and memory."""

    seconds: float = 0.0
    received_seconds: float = 0.0  # downloads: until the page had the whole Blob
    before: Memory = field(default_factory=Memory)
    peak: Memory = field(default_factory=Memory)
    after: Memory = field(default_factory=Memory)
    rss_samples: int = 0
    heap_samples: int = 0
    hwm_reset: bool = False
    #: Seconds after the transfer until Chromium's memory was back near "before"
    #: (None: not within the wait; NaN: not waited for).
    released_after: float | None = math.nan
    released: Memory = field(default_factory=Memory)
    release_bound: float = 0.0
    #: CPU per process and thread over the transfer (/proc), and the page's own
    #: Performance.getMetrics differences (ProcessTime, ThreadTime, TaskDuration...).
    cpu: CpuUse = field(default_factory=CpuUse)
    page_metrics: dict[str, float] = field(default_factory=dict)
    trace: Path | None = None


class PageDriver:
    def __init__(
        self, chromium: Chromium, session: str, memory: ChromiumMemory, timeout: float
    ) -> None:
        self.chromium = chromium
        self.session = session
        self.memory = memory
        self.timeout = timeout
        self.cpu: CpuMeter | None = None
        self.trace_dir: Path | None = None
        self.traces = 0

    def send(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return self.chromium.send(method, params, self.session, **kw)

    def evaluate(self, expression: str, timeout: float = PAGE_TIMEOUT) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            raise CdpError(f"in the page: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, check_js: str, arg: object, seconds: float) -> Any:
        """The truthy value of ``check_js(arg)`` in the page, or None after ``seconds``."""
        js = WAIT_JS % (check_js, json.dumps(arg), seconds * 1000, POLL_SECONDS * 1000)
        return self.evaluate(js, timeout=seconds + PAGE_TIMEOUT)

    def heap(self) -> tuple[int, int]:
        metrics = {m["name"]: m["value"] for m in self.send("Performance.getMetrics")["metrics"]}
        return int(metrics.get("JSHeapUsedSize", 0)), int(metrics.get("JSHeapTotalSize", 0))

    def metrics(self) -> dict[str, float]:
        """The page's Performance.getMetrics (seconds for *Time and *Duration)."""
        return {m["name"]: m["value"] for m in self.send("Performance.getMetrics")["metrics"]}

    def settled(self) -> Memory:
        """Memory after a forced garbage collection in the page."""
        self.send("HeapProfiler.collectGarbage")
        used, total = self.heap()
        return Memory(self.memory.read(), used, total)

    def wait_released(self, phase: PagePhase, size: int, bound: float) -> None:
        """Time until all of Chromium is back within FLAT_SHARE of the file over "before".

        Polls once a second (with a garbage collection in the page), for at
        most ``bound`` seconds.
        """
        phase.release_bound = bound
        started = time.perf_counter()
        while True:  # bounded by ``bound``
            phase.released = self.settled()
            elapsed = time.perf_counter() - started
            if phase.released.rss["total"] - phase.before.rss["total"] < FLAT_SHARE * size:
                phase.released_after = elapsed
                return
            if elapsed > bound:
                phase.released_after = None
                return
            time.sleep(RELEASE_POLL_SECONDS)  # a bounded poll of /proc: nothing to wait on

    def set_input_file(self, selector: str, path: Path) -> None:
        root = self.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.send("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node})

    def click(self, selector: str) -> None:
        """A real (trusted) mouse click in the middle of the element."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def wait_finished(self, label: str, phase: PagePhase, started: float) -> str:
        """Poll the page until the transfer ``label`` is done; sample the JS heap meanwhile."""
        deadline = started + self.timeout
        while True:  # bounded by the deadline
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{label}: not finished after {self.timeout:g} s")
            used, total = self.heap()
            phase.heap_samples += 1
            phase.peak.js_used = max(phase.peak.js_used, used)
            phase.peak.js_total = max(phase.peak.js_total, total)
            outcome = self.wait_for(FINISHED_JS, label, HEAP_EVERY_SECONDS)
            if outcome:
                return str(outcome)

    def transfer(
        self, label: str, start: Callable[[], None], finish: Callable[[], None] | None = None
    ) -> PagePhase:
        """Time and watch one transfer: ``start`` it, wait for the page, then ``finish``."""
        phase = PagePhase()
        phase.before = self.settled()
        phase.hwm_reset = self.memory.reset_peaks()
        if self.trace_dir is not None:
            self.chromium.trace_start(TRACE_CATEGORIES)
        metrics = self.metrics()
        cpu = self.cpu.snapshot() if self.cpu else None
        with self.memory.sampling():
            started = time.perf_counter()
            start()
            outcome = self.wait_finished(label, phase, started)
            phase.received_seconds = time.perf_counter() - started
            if not outcome.startswith(("uploaded", "downloaded", "sent to your browser")):
                raise RuntimeError(f"{label}: the page says {outcome!r}")
            if finish is not None:
                finish()
            phase.seconds = time.perf_counter() - started
        if self.cpu and cpu:
            phase.cpu = self.cpu.since(cpu)
        after = self.metrics()
        phase.page_metrics = {k: after[k] - metrics.get(k, 0.0) for k in PAGE_METRICS if k in after}
        if self.trace_dir is not None:
            self.traces += 1
            direction = "up" if label.startswith("↑") else "down"
            phase.trace = self.trace_dir / f"{self.traces}-{direction}.json"
            self.chromium.trace_end(phase.trace, self.timeout)
        hwm = self.memory.hwm() if phase.hwm_reset else {}
        phase.peak.rss = {
            kind: max(self.memory.peak.get(kind, 0), hwm.get(kind, 0)) for kind in KINDS
        }
        phase.rss_samples = self.memory.samples
        phase.after = self.settled()
        for m in (phase.before, phase.after):
            phase.peak.js_used = max(phase.peak.js_used, m.js_used)
            phase.peak.js_total = max(phase.peak.js_total, m.js_total)
        return phase


def browser_round(
    url: str, source: Path, work: Path, timeout: float, options: argparse.Namespace, server_pid: int
) -> tuple[dict[str, PagePhase], PagePhase, Path]:
    """Upload then download ``source`` through the page; return both phases and the saved file."""
    memory = ChromiumMemory()
    downloads = work / "downloads"
    downloads.mkdir()
    chromium = Chromium(work / "profile", downloads, [])
    try:
        budget = (1 + len(options.upload_variants)) * timeout + options.release_wait + 120
        with Watchdog(memory, budget) as watchdog:
            phases = drive_page(chromium, memory, url, source, timeout, options, server_pid)
        if watchdog.fired:
            raise TimeoutError("the browser part overran its budget")
        errors = chromium.errors()
        if errors:
            raise RuntimeError(f"errors in the page: {errors}")
    except BaseException:
        available = mem_available_mb()
        chromium.close()
        print(chromium.recent_output(), file=sys.stderr)
        print(f"MemAvailable when it failed: {available:.0f} MB", file=sys.stderr)
        raise
    chromium.close()
    return phases


def drive_page(
    chromium: Chromium,
    memory: ChromiumMemory,
    url: str,
    source: Path,
    timeout: float,
    options: argparse.Namespace,
    server_pid: int,
) -> tuple[dict[str, PagePhase], PagePhase, Path]:
    version = chromium.send("Browser.getVersion")["product"]
    context: dict[str, str] = {}
    if options.incognito:  # what Playwright's browser.new_context() makes
        context = chromium.send("Target.createBrowserContext")
    target = chromium.send("Target.createTarget", {"url": "about:blank", **context})["targetId"]
    session = chromium.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"
    ]
    chromium.send(
        "Browser.setDownloadBehavior",
        {
            "behavior": "allowAndName",
            "downloadPath": str(chromium.downloads),
            "eventsEnabled": True,
            **context,
        },
    )
    driver = PageDriver(chromium, session, memory, timeout)
    driver.cpu = CpuMeter(server_pid)
    driver.trace_dir = options.trace
    for domain in ("Page", "Runtime", "Performance"):
        driver.send(f"{domain}.enable")
    if options.devtools_network:
        driver.send("Network.enable")
    driver.send("Page.navigate", {"url": url})
    if not driver.wait_for("() => !!document.querySelector('#status.ok')", None, PAGE_TIMEOUT):
        raise TimeoutError(f"the page did not connect within {PAGE_TIMEOUT:g} s")
    memory.rescan()
    kinds = memory.kinds()
    print(
        f"{version} (pid {chromium.pid}), {'incognito' if context else 'default'} profile,"
        f" DevTools Network domain {'ON' if options.devtools_network else 'off'};"
        f" processes: {', '.join(kinds)}; MemAvailable {mem_available_mb():.0f} MB",
        flush=True,
    )

    size = source.stat().st_size
    uploads: dict[str, PagePhase] = {}
    for variant in options.upload_variants:
        tuning = UPLOAD_VARIANTS[variant]
        stored = json.dumps(json.dumps(tuning))  # read by the page as the upload starts
        driver.evaluate(f"sessionStorage.setItem('wsfiles-tuning', {stored})")

        driver.evaluate("document.querySelectorAll('#transfers li').forEach((e) => e.remove())")
        if uploads:  # the page asks before replacing a file it lists: wait until it lists it
            listed = f"#files tbody tr[data-name='{PAGE_FILE}']"
            if not driver.wait_for(f"() => !!document.querySelector({listed!r})", None, 30):
                raise TimeoutError(f"{PAGE_FILE} was not listed in the page within 30 s")

        def pick() -> None:
            driver.set_input_file("#picker", source)
            if uploads:  # the file is there from the last variant: the page asks first
                replace = "#transfers li.asking button"
                if not driver.wait_for(f"() => !!document.querySelector({replace!r})", None, 30):
                    raise TimeoutError("the page did not ask whether to replace the file")
                driver.evaluate(f"document.querySelector({replace!r}).click()")

        phase = driver.transfer("↑ " + PAGE_FILE, pick)
        uploads[variant] = phase
        print(
            f"page up {variant:24} {size / phase.seconds / MB:8.1f} MB/s  {phase.seconds:6.2f} s",
            flush=True,
        )
        report_cpu(f"page up {variant}", phase)

    saved: list[Path] = []

    def saved_by_browser() -> None:
        begun = chromium.wait_event(
            "Browser.downloadWillBegin", lambda p: p["suggestedFilename"] == PAGE_FILE, 30
        )
        guid = begun["guid"]
        done = chromium.wait_event(
            "Browser.downloadProgress",
            lambda p: p["guid"] == guid and p["state"] != "inProgress",
            timeout,
        )
        if done["state"] != "completed":
            raise RuntimeError(f"the download ended {done['state']}: {done}")
        saved.append(chromium.downloads / guid)

    selector = f"#files tbody tr[data-name='{PAGE_FILE}'] button[data-action='download']"
    # The list shows the new file once the server's `changed` event arrives.
    if not driver.wait_for(f"() => !!document.querySelector({json.dumps(selector)})", None, 30):
        raise TimeoutError(f"{PAGE_FILE} was not listed in the page within 30 s")
    down = driver.transfer("↓ " + PAGE_FILE, lambda: driver.click(selector), saved_by_browser)
    print(
        f"page down          {size / down.seconds / MB:8.1f} MB/s  {down.seconds:6.2f} s"
        f"  (handed to the download manager after {down.received_seconds:.2f} s)",
        flush=True,
    )
    report_cpu("page down", down)
    if options.release_wait > 0:
        driver.wait_released(down, size, options.release_wait)
    return uploads, down, saved[0]


# -- reading a trace ---------------------------------------------------------------

#: Top-level task events: their thread time (tdur) is a thread's busy CPU.
TOP_LEVEL = frozenset({"ThreadControllerImpl::RunTask", "ThreadPool_RunTask", "RunTask"})


def summarize_trace(path: Path, top: int = 6) -> list[str]:
    """Per busy thread: its tasks' wall and CPU time, and the names with the most self time.

    Self time = an event's duration less its direct children's (``X`` events on one
    thread nest), so the names say where a thread's seconds went.
    """
    with path.open("rb") as f:
        events = json.load(f)
    if isinstance(events, dict):
        events = events.get("traceEvents", [])
    processes: dict[int, str] = {}
    threads: dict[tuple[int, int], str] = {}
    spans: dict[tuple[int, int], list[tuple[float, float, float, str]]] = {}
    first, last = math.inf, -math.inf
    for e in events:
        ph = e.get("ph")
        if ph == "M":
            name = e.get("args", {}).get("name", "")
            if e.get("name") == "process_name":
                processes[e["pid"]] = name
            elif e.get("name") == "thread_name":
                threads[(e["pid"], e["tid"])] = name
        elif ph == "X" and "dur" in e:
            ts, dur = float(e["ts"]), float(e["dur"])
            first, last = min(first, ts), max(last, ts + dur)
            spans.setdefault((e["pid"], e["tid"]), []).append(
                (ts, dur, float(e.get("tdur", 0.0)), e.get("name", "?"))
            )
    wall = (last - first) / 1e6 if spans else 0.0
    rows = []
    for key, items in spans.items():
        items.sort(key=lambda x: (x[0], -x[1]))
        busy = cpu = 0.0
        self_time: dict[str, float] = {}
        stack: list[list[Any]] = []  # [end, name, self]
        for ts, dur, tdur, name in items:
            while stack and stack[-1][0] <= ts:
                _, n, own = stack.pop()
                self_time[n] = self_time.get(n, 0.0) + own
            if stack:
                stack[-1][2] -= dur
            else:
                busy += dur
            if name in TOP_LEVEL and not any(s[1] in TOP_LEVEL for s in stack):
                cpu += tdur
            stack.append([ts + dur, name, dur])
        for _, n, own in stack:
            self_time[n] = self_time.get(n, 0.0) + own
        rows.append((busy, cpu, key, self_time))
    rows.sort(key=lambda r: -r[0])
    out = [f"trace {path.name}: {wall:.2f} s traced, {len(events)} events"]
    for busy, cpu, (pid, tid), self_time in rows:
        if busy / 1e6 < max(0.02 * wall, 0.05):
            continue
        where = f"{processes.get(pid, pid)} / {threads.get((pid, tid), tid)}"
        names = sorted(self_time.items(), key=lambda x: -x[1])[:top]
        out.append(
            f"  {where[:60]:60} busy {busy / 1e6:7.2f} s, task CPU {cpu / 1e6:7.2f} s: "
            + ", ".join(f"{n} {t / 1e6:.2f}" for n, t in names)
        )
    return out


def report_cpu(label: str, phase: PagePhase, top: int = 8) -> None:
    """CPU seconds per process and busiest threads over one transfer (from /proc)."""
    use = phase.cpu
    if not use.threads:
        return
    cores = os.cpu_count() or 1
    ours = sum(use.threads.values())
    print(
        f"{label} CPU over {use.wall:.2f} s: this benchmark's processes {ours:.2f} s,"
        f" the whole machine {use.busy:.2f} s of {use.wall * cores:.2f} s"
        f" ({cores} CPUs; others' share {max(0.0, use.busy - ours):.2f} s)"
    )
    procs = sorted(use.by_process().items(), key=lambda x: -x[1])
    print("  per process: " + ", ".join(f"{k} {v:.2f}" for k, v in procs if v >= 0.01))
    threads = sorted(use.threads.items(), key=lambda x: -x[1])[:top]
    print(
        "  busiest threads: "
        + ", ".join(f"{p}/{t} {v:.2f} ({v / use.wall:.0%})" for (p, t), v in threads)
    )
    if phase.page_metrics:
        print(
            "  page Performance.getMetrics: "
            + ", ".join(f"{k} {v:.2f}" for k, v in phase.page_metrics.items())
        )
    if phase.trace is not None:
        for line in summarize_trace(phase.trace):
            print("  " + line)


# -- the Python client baseline ------------------------------------------------


async def python_round(
    port: int, source: Path, sink: Path, timeout: float, reactor: Any, server_pid: int
) -> tuple[float, float, list[str]]:
    """Upload then download seconds, and a line of CPU per direction (server, this client)."""
    client = await bounded(connect(f"ws://{LOOPBACK}:{port}", reactor=reactor), 30, reactor)
    cpu: list[str] = []

    def used(label: str, wall: float, server: float, me: float, busy: float) -> None:
        cpu.append(
            f"python client {label} CPU over {wall:.2f} s:"
            f" server {cpu_seconds(server_pid) - server:.2f} s,"
            f" client {cpu_seconds(os.getpid()) - me:.2f} s, whole machine"
            f" {machine_busy_seconds() - busy:.2f} s"
        )

    try:
        with source.open("rb") as f:
            marks = cpu_seconds(server_pid), cpu_seconds(os.getpid()), machine_busy_seconds()
            started = time.perf_counter()
            await bounded(client.upload(PYTHON_FILE, f), timeout, reactor)
            up = time.perf_counter() - started
            used("up", up, *marks)
        with sink.open("wb") as f:
            marks = cpu_seconds(server_pid), cpu_seconds(os.getpid()), machine_busy_seconds()
            started = time.perf_counter()
            await bounded(client.download(PYTHON_FILE, f), timeout, reactor)
            down = time.perf_counter() - started
            used("down", down, *marks)
    finally:
        await bounded(client.close(), CONNECT_TIMEOUT, reactor)
    return up, down, cpu


def curl_round(port: int, server_pid: int, sink: Path, timeout: float) -> float:
    """Control for the page's download: curl fetches the same file over the same HTTP path.

    ``/files/NAME`` (the anonymous folder: no --users) is served by the same
    ``serve_file`` as the page's ``/d/TICKET/NAME``; curl writes it to the same
    disk as Chromium's download folder.  Seconds, and a CPU line printed.
    """
    url = f"http://{LOOPBACK}:{port}/files/{PAGE_FILE}"
    server, busy = cpu_seconds(server_pid), machine_busy_seconds()
    before = os.times()
    started = time.perf_counter()
    subprocess.run(
        ["curl", "-sSf", "--max-time", str(int(timeout)), "-o", str(sink), url],
        check=True,
        timeout=timeout + 10,
    )
    seconds = time.perf_counter() - started
    after = os.times()
    child = after.children_user + after.children_system
    child -= before.children_user + before.children_system
    print(
        f"curl down          {sink.stat().st_size / seconds / MB:8.1f} MB/s  {seconds:6.2f} s;"
        f" CPU: server {cpu_seconds(server_pid) - server:.2f} s, curl {child:.2f} s,"
        f" whole machine {machine_busy_seconds() - busy:.2f} s"
        f" of {seconds * (os.cpu_count() or 1):.2f}"
    )
    return seconds


# -- report ----------------------------------------------------------------------


def mb(value: float) -> str:
    return f"{value / MB:9.1f}"


def report_memory(label: str, phase: PagePhase, size: int) -> dict[str, float]:
    """Print one transfer's memory table; return each kind's peak increase / file size."""
    waited = not (isinstance(phase.released_after, float) and math.isnan(phase.released_after))
    columns = [("before", phase.before), ("peak", phase.peak), ("after", phase.after)]
    if waited:
        columns.append(("later", phase.released))
    print(
        f"{label} memory, MB      "
        + "".join(f"{name:>10}" for name, _ in columns)
        + "  peak-before (% of file)"
        f"   [{phase.rss_samples} RSS samples, {phase.heap_samples} heap samples,"
        f" VmHWM {'reset' if phase.hwm_reset else 'NOT reset'}]"
    )
    shares: dict[str, float] = {}
    rows: list[tuple[str, Callable[[Memory], int]]] = [
        *((f"{kind} RSS", lambda m, kind=kind: m.rss.get(kind, 0)) for kind in KINDS),
        ("JS heap used", lambda m: m.js_used),
        ("JS heap total", lambda m: m.js_total),
    ]
    for title, pick in rows:
        values = [pick(m) for _, m in columns]
        rise = values[1] - values[0]
        shares[title] = rise / size
        print(
            f"  {title:22}"
            + "".join(f"{v / MB:10.1f}" for v in values)
            + f"  {rise / MB:11.1f} ({rise / size:6.1%})"
        )
    if waited:
        if phase.released_after is None:
            print(
                f"  later: Chromium still held more than {FLAT_SHARE:.0%} of the file over"
                f" 'before' {phase.release_bound:.0f} s after the transfer"
            )
        else:
            print(
                f"  later: all of Chromium back within {FLAT_SHARE:.0%} of the file over"
                f" 'before' {phase.released_after:.0f} s after the transfer"
            )
    return shares


# -- main ----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=size_argument, default="1G", help="file size, e.g. 64M or 1G (default 1G)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds allowed per transfer (120)"
    )
    parser.add_argument(
        "--release-wait",
        type=float,
        default=75.0,
        help="seconds to watch for the download's memory to be given back (75; 0: skip)",
    )
    parser.add_argument(
        "--incognito",
        action="store_true",
        help="run the page in an off-the-record context (as Playwright's new_context does)",
    )
    parser.add_argument(
        "--devtools-network",
        action="store_true",
        help="enable the DevTools Network domain on the page (as Playwright does), to see its cost",
    )
    parser.add_argument(
        "--upload-variants",
        default="default,no-verify",
        help="comma-separated upload tunings, run in this order (the first is the page's"
        f" figure): {', '.join(UPLOAD_VARIANTS)} (default: default,no-verify)",
    )
    parser.add_argument(
        "--curl",
        action="store_true",
        help="also download the file with curl from /files/ (the server's HTTP path"
        " without Chromium), as a control for the page's download",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="record Chromium's own tracing during each transfer into DIR/N-up.json,"
        " N-down.json (open in https://ui.perfetto.dev) and print a per-thread summary;"
        " tracing costs speed and memory: time runs without it",
    )
    args = parser.parse_args(argv)
    if args.trace is not None:
        args.trace.mkdir(parents=True, exist_ok=True)
    args.upload_variants = [v.strip() for v in args.upload_variants.split(",") if v.strip()]
    unknown = [v for v in args.upload_variants if v not in UPLOAD_VARIANTS]
    if unknown or not args.upload_variants:
        parser.error(f"--upload-variants: unknown {unknown}; known: {', '.join(UPLOAD_VARIANTS)}")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    size: int = args.size
    if not os.path.exists(CHROMIUM):
        print(f"{CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 1
    header()
    with tempfile.TemporaryDirectory(prefix="wsfiles-bench-browser-") as temp:
        work = Path(temp)
        root = work / "root"
        root.mkdir()
        source = work / PAGE_FILE
        started = time.perf_counter()
        print(f"writing a {size}-byte source file...", end=" ", flush=True)
        expected = make_source(source, size)
        print(f"{time.perf_counter() - started:.1f} s", flush=True)
        argv_server = twistd_wsfiles(root, "--max-size", "2G" if size <= 2 * GIB else str(size))
        print(f"wsfiles server: {shlex.join(argv_server)}", flush=True)
        with ServerProcess("wsfiles", argv_server) as server:
            print(f"wsfiles server: pid {server.pid}, port {server.port}", flush=True)
            try:
                copy = work / "python-copy.bin"
                py_up, py_down, py_cpu = run_on_reactor(
                    lambda reactor: python_round(
                        server.port, source, copy, args.timeout, reactor, server.pid
                    )
                )
                print(f"python client up   {size / py_up / MB:8.1f} MB/s  {py_up:6.2f} s")
                print(f"python client down {size / py_down / MB:8.1f} MB/s  {py_down:6.2f} s")
                print("\n".join(py_cpu))
                print(verify_copy("python client download", copy, expected))
                copy.unlink()
                (root / PYTHON_FILE).unlink()
                uploads, down, saved = browser_round(
                    f"http://{LOOPBACK}:{server.port}/",
                    source,
                    work,
                    args.timeout,
                    args,
                    server.pid,
                )
            except BaseException:
                print(server.recent_output(), file=sys.stderr)
                raise
            print(verify_copy("page upload, on the server's disk", root / PAGE_FILE, expected))
            print(verify_copy("page download, as saved by Chromium", saved, expected))
            saved.unlink()
            curl_seconds = None
            if args.curl:
                curl_seconds = curl_round(server.port, server.pid, work / "curl.bin", args.timeout)
                print(verify_copy("curl download (/files/)", work / "curl.bin", expected))
        print()
        print(f"{size} bytes, MB = 10^6 bytes; the machine may be shared, figures are as measured")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"load average at the end: {load} ({os.cpu_count()} CPUs)")
        if size < SMALL_FILE:
            print(
                f"note: below {SMALL_FILE // 2**20} MiB the page's fixed working memory"
                " (tens of MB) weighs more than the file: the flat verdicts mean little"
            )
        up = uploads[args.upload_variants[0]]
        for variant, phase in uploads.items():
            print_result(
                f"browser upload [{variant}] MB/s (page / python client)",
                f"{size / phase.seconds / MB:.1f} MB/s vs {size / py_up / MB:.1f} MB/s"
                f" = {py_up / phase.seconds:.3g}x",
                "none (same-run baseline)",
                None,
            )
        if curl_seconds is not None:
            print_result(
                "curl download of /files/ MB/s (curl / python client)",
                f"{size / curl_seconds / MB:.1f} MB/s vs {size / py_down / MB:.1f} MB/s"
                f" = {py_down / curl_seconds:.3g}x",
                "none (control: the server's HTTP path without Chromium)",
                None,
            )
        for label, phase, python_s in (("download", down, py_down),):
            print_result(
                f"browser {label} MB/s (page / python client)",
                f"{size / phase.seconds / MB:.1f} MB/s vs {size / python_s / MB:.1f} MB/s"
                f" = {python_s / phase.seconds:.3g}x",
                "none (same-run baseline)",
                None,
            )
        for label, phase in (("upload", up), ("download", down)):
            shares = report_memory(label, phase, size)
            for kind in ("renderer", "total"):
                print_result(
                    f"browser {label}: Chromium {kind} RSS peak increase",
                    f"{(phase.peak.rss[kind] - phase.before.rss[kind]) / MB:.1f} MB"
                    f" = {shares[f'{kind} RSS']:.1%} of the {size / MB:.0f} MB file",
                    f"< {FLAT_SHARE:.0%} of the file (flat)",
                    shares[f"{kind} RSS"] < FLAT_SHARE,
                )
    return 0


if __name__ == "__main__":
    run_script(main)
