"""Scale-out of wsfiles on S3: 1, 2 and 3 instances behind HAProxy, on one machine.

Run from the repository root (wsfiles installed, ``twistd wsfiles`` working,
Debian's haproxy and redis-server installed; Ceph is installed with apt-get
when missing, which needs root)::

    python bench/cluster.py                                  # 6 clients x 64 MiB, N = 1,2,3
    python bench/cluster.py --clients 6 --size 64M --instances 1,2,3

In one run, all on 127.0.0.1:

1. starts a Ceph RADOS Gateway (tests/cluster/ceph.py: mon, memstore OSD,
   radosgw) with one new bucket, and one ``redis-server`` (tests/cluster/redis.py);
2. for each N of ``--instances``: starts N ``twistd wsfiles --storage s3``
   instances (the shared bucket, ``--redis``, ``--instance-id`` a/b/c,
   ``--trusted-proxy 127.0.0.1``, ``--max-size 2G``) and HAProxy with the shipped
   contrib/haproxy/wsfiles.cfg and tickets.map.  The config always names three
   servers; with N < 3 the unused ``WSFILES_B``/``WSFILES_C`` point at live
   instances (C at a, B at a when N = 1), so every server is healthy from the
   first second (see ``haproxy_addresses``).  Then ``--clients`` clients
   (``wsfiles.client`` on one Twisted reactor in this process) connect through
   HAProxy one after the other (round robin spreads them), all upload their own
   file of ``--size`` bytes at once, then all download it at once.  Each phase's
   aggregate MB/s is all bytes moved over the wall time from the first start to
   the last finish.  The CPU seconds of every instance (utime + stime from
   /proc/PID/stat, before and after), of HAProxy, of Ceph (radosgw + OSD + mon),
   of this process (the clients) and of the whole machine are taken per phase;
   each instance's CPU is divided by the bytes its own clients moved (the
   ``channel`` offers tell which instance served a client) to give its CPU
   seconds per GiB: the figure that would hold on machines of their own.  The
   machine's busy time not accounted for by those processes or by interrupts
   (mostly our own loopback traffic) is shown as "others" (other jobs, and time
   stolen by the hypervisor); above 20% of a CPU the phase is flagged as skewed.
   Each instance's peak RSS (VmHWM) is read before it is stopped.
   The files are deleted, RGW's garbage collector is run (``radosgw-admin gc
   process --include-all``: the OSD keeps objects in memory, 1 GiB in all), and
   the instances and HAProxy are stopped before the next N;
3. the S3 overhead: one instance, one client, direct (no HAProxy): upload then
   download one file of ``--size`` with ``--storage s3`` and with local storage
   (``--root`` in a temporary folder), same flags otherwise (``--redis`` too),
   and the ratios s3/local;
4. prints a table with everything, the ratios against N = 1, and the warnings,
   errors and tracebacks found in the instances' and HAProxy's output.

The instances and this script run the wsfiles of this checkout (PYTHONPATH),
whatever checkout the editable install points at.  Every download is written to
a file whose SHA-256 is checked against the source's after the phase (outside
the timing).  MB = 10^6 bytes, GiB = 2^30.
Every wait is bounded; every process started here is stopped by its PID
(SIGTERM, a bounded wait, then SIGKILL) and the temporary folders are removed
at the end, also on errors, Ctrl-C or SIGTERM.  Exit status 0 when the
measurements completed and every SHA-256 matched (what the logs show is printed,
not judged), 1 otherwise.  Linux only (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer, threads

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# This checkout's wsfiles, whatever checkout the editable install points at (the
# instances get the same through PYTHONPATH); tests/ before bench/ (sys.path[0]):
# its ``cluster`` package, not this file.
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(BENCH)]

from _common import (  # noqa: E402
    announced,
    check_copy,
    cpu_seconds,
    machine_busy_seconds,
    make_source,
    nvx_status,
    read_status_kib,
    source_version,
    versions,
)
from cluster import free_port  # noqa: E402
from cluster.ceph import NO_MON_CONFIG, CephRGW, ensure_ceph_installed  # noqa: E402
from cluster.redis import REDIS_SERVER, RedisServer  # noqa: E402

from wsfiles.client import WsfilesClient, connect  # noqa: E402
from wsfiles.sizes import parse_size  # noqa: E402

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
MB = 1_000_000
GIB = 1024**3
CONTRIB = REPO / "contrib" / "haproxy"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
INSTANCE_IDS = "abc"  # the shipped config has servers a, b and c

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CONNECT_TIMEOUT = 30.0
GC_TIMEOUT = 60.0
#: CPUs' worth of load from processes not started here above which a phase is suspect.
BUSY_MACHINE = 0.2
LISTENING = re.compile(r"wsfiles listening on 127\.0\.0\.1:(\d+) \(")
LOG_PROBLEM = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled|\[(ALERT|WARNING)\]")


# -- processes -------------------------------------------------------------


class Process:
    """A child process whose output goes to a log file; stopped by its PID."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log = log
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it
            )
        return self

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "".join(f"\n  {self.name}| {line}" for line in self.output().splitlines()[-lines:])

    def wait_for_port(self, timeout: float = START_TIMEOUT) -> int:
        """Poll the log (another process: bounded) until twistd says where it listens."""
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while True:
            match = LISTENING.search(self.output())
            if match:
                self.port = int(match.group(1))
                return self.port
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}" + self.tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not listening after {timeout:g} s" + self.tail())
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM, a bounded wait, SIGKILL if it would not go; the exit status."""
        process = self.popen
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT:g} s; killing it")
                process.kill()
                process.wait(STOP_TIMEOUT)
        self.exit_code = process.returncode
        return self.exit_code


def twistd_argv(instance: str, root: Path, storage: list[str], redis_url: str) -> list[str]:
    bin_dir = Path(sys.executable).parent
    return [
        str(bin_dir / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-", "wsfiles",
        "--listen", f"tcp:0:interface={LOOPBACK}", "--root", str(root), *storage,
        "--redis", redis_url, "--instance-id", instance, "--trusted-proxy", LOOPBACK,
        "--max-size", "2G",
    ]  # fmt: skip


def start_instances(names: str, make_argv: Callable[[str], list[str]], logs: Path) -> list[Process]:
    """Start them all, then wait for each to listen (they start side by side)."""
    started: list[Process] = []
    try:
        for name in names:
            started.append(Process(name, make_argv(name), logs / f"twistd-{name}.log").start())
        for process in started:
            process.wait_for_port()
    except BaseException:
        for process in started:
            process.stop()
        raise
    return started


def haproxy_addresses(instances: list[Process]) -> dict[str, str]:
    """WSFILES_A/B/C for the shipped config, which always names three servers.

    An unused slot points at a live instance rather than at a closed port:
    HAProxy starts every server as UP until a health check (every 1 s here)
    fails, so meanwhile a dead slot would get /command connections that are
    refused, then retried and redispatched (``retries 3``, ``option
    redispatch``), adding their delays to the measurement; and an address
    nothing listens on is a config that works only by failing.  No ticket names b or c when no
    instance has that id, so their /file backends are simply never used.  The
    cost: round robin over three slots gives one instance two of them when
    N = 2 (4 of 6 clients on a, 2 on b); the per-instance CPU per GiB below
    divides by each instance's own bytes, so it is unaffected.
    """
    addresses = [f"{LOOPBACK}:{p.port}" for p in instances]
    slots = [addresses[i] if i < len(addresses) else addresses[0] for i in range(3)]
    return {f"WSFILES_{n.upper()}": address for n, address in zip("ABC", slots, strict=True)}


def wait_for_haproxy(proxy: Process, port: int, timeout: float = START_TIMEOUT) -> None:
    """Poll /healthz through HAProxy (another process: bounded) until it is 200."""
    assert proxy.popen is not None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proxy.popen.poll() is not None:
            raise RuntimeError(f"haproxy exited {proxy.popen.returncode}" + proxy.tail())
        if time.monotonic() > deadline:
            raise RuntimeError(f"HAProxy not answering after {timeout:g} s" + proxy.tail())
        time.sleep(0.05)


def run_rgw_gc(rgw: CephRGW) -> float:
    """Free deleted objects' data now (RGW would wait 2 h); the seconds it took."""
    began = time.monotonic()
    rgw._run(
        "radosgw-admin", "-n", "client.admin", NO_MON_CONFIG, "gc", "process", "--include-all",
        timeout=GC_TIMEOUT,
    )  # fmt: skip
    return time.monotonic() - began


# -- the reactor, in a thread of its own -------------------------------------


class ReactorThread:
    """The global reactor runs in a thread; the main thread starts and stops processes."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self._thread = threading.Thread(
            target=lambda: reactor.run(installSignalHandlers=False), name="reactor", daemon=True
        )

    def __enter__(self) -> ReactorThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.reactor.running:
            self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(STOP_TIMEOUT)

    def run(self, make: Callable[[Any], Coroutine[Any, Any, T]], timeout: float) -> T:
        """Run ``make(reactor)`` on the reactor and wait for it, at most ``timeout`` s."""

        def start() -> defer.Deferred:
            d = defer.ensureDeferred(make(self.reactor))
            return d.addTimeout(timeout, self.reactor)

        return threads.blockingCallFromThread(self.reactor, start)


# -- measurements -------------------------------------------------------------


@dataclass
class Phase:
    """One phase (all uploads, or all downloads): wall time and CPU seconds."""

    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # name -> CPU s
    busy: float = 0.0  # CPU s the whole machine was busy, steal included
    irq: float = 0.0  # of which in (soft) interrupts: mostly our own loopback traffic
    steal: float = 0.0  # of which taken by the hypervisor for other guests

    @property
    def others(self) -> float:
        """CPU s of processes not measured here (other jobs on the machine), and steal."""
        return max(0.0, self.busy - self.irq - sum(self.cpu.values()))

    @property
    def quiet(self) -> bool:
        return self.others <= BUSY_MACHINE * self.seconds


class Marks:
    """CPU seconds of named PIDs, this process and the machine, at two moments."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._then = self._now()

    def _now(self) -> tuple[float, dict[str, float], float, tuple[float, float, float]]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return time.perf_counter(), cpu, time.process_time(), machine_seconds()

    def start(self) -> None:
        self._then = self._now()

    def stop(self) -> Phase:
        wall0, cpu0, own0, machine0 = self._then
        wall1, cpu1, own1, machine1 = self._now()
        cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
        cpu["bench"] = own1 - own0
        busy, irq, steal = (b - a for a, b in zip(machine0, machine1, strict=True))
        return Phase(wall1 - wall0, cpu, busy, irq, steal)


def machine_seconds() -> tuple[float, float, float]:
    """CPU s all CPUs were busy (as throughput.py counts it), in irq + softirq, and stolen."""
    with open("/proc/stat") as f:
        ticks = [int(value) for value in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    tick = os.sysconf("SC_CLK_TCK")
    return machine_busy_seconds(), (ticks[5] + ticks[6]) / tick, ticks[7] / tick


@dataclass
class ClusterRun:
    instances: int
    clients: int
    size: int
    upload: Phase
    download: Phase
    served: dict[str, int]  # instance id -> clients it served
    haproxy_env: dict[str, str]
    peak_rss_kib: dict[str, int] = field(default_factory=dict)  # instance id -> VmHWM
    gc_seconds: float = 0.0

    @property
    def moved(self) -> int:
        return self.clients * self.size

    def mb_s(self, phase: Phase) -> float:
        return self.moved / phase.seconds / MB

    def instances_cpu(self, phase: Phase) -> float:
        return sum(phase.cpu[name] for name in self.served)

    def per_gib(self, phase: Phase, name: str) -> float:
        """CPU s per GiB one instance moved (its own clients' bytes)."""
        moved = self.served[name] * self.size
        return phase.cpu[name] / (moved / GIB) if moved else float("nan")


def watch_offers(client: WsfilesClient) -> list[str]:
    """The instance ids of the tickets the client is offered (as tests/test_cluster.py)."""
    offers: list[str] = []
    original = client._received

    def spy(message: dict[str, Any]) -> None:
        if message.get("op") == "channel":
            offers.append(message["url"].split("ticket=")[1].split(".")[0])
        original(message)

    client._received = spy  # type: ignore[method-assign]
    return offers


async def transfers(
    reactor: Any,
    url: str,
    sources: list[Path],
    copies: list[Path],
    names: list[str],
    marks: Marks,
    timeout: float,
) -> tuple[Phase, Phase, list[str]]:
    """Connect one client per source, upload all at once, download all at once.

    Returns both phases and, per client, the instance that served it.
    """
    clients: list[WsfilesClient] = []
    offers: list[list[str]] = []
    try:
        for _ in sources:  # one after the other: round robin spreads them in order
            d = defer.ensureDeferred(connect(url, reactor=reactor))
            clients.append(await d.addTimeout(CONNECT_TIMEOUT, reactor))
            offers.append(watch_offers(clients[-1]))

        async def upload(client: WsfilesClient, source: Path, name: str) -> None:
            with source.open("rb") as f:
                await client.upload(name, f)

        async def download(client: WsfilesClient, copy: Path, name: str) -> None:
            with copy.open("wb") as f:
                await client.download(name, f)

        marks.start()
        await _all(upload(c, s, n) for c, s, n in zip(clients, sources, names, strict=True))
        up = marks.stop()
        marks.start()
        await _all(download(c, p, n) for c, p, n in zip(clients, copies, names, strict=True))
        down = marks.stop()
        for name in names:  # free the store for the next round
            await clients[0].delete(name)
        served = []
        for client_offers in offers:
            if len(set(client_offers)) != 1:
                raise RuntimeError(f"a client was offered tickets of {client_offers}")
            served.append(client_offers[0])
        return up, down, served
    finally:
        closing = [defer.ensureDeferred(c.close()) for c in clients]
        await defer.DeferredList(closing, consumeErrors=True).addTimeout(CONNECT_TIMEOUT, reactor)


async def _all(coroutines: Iterator[Coroutine[Any, Any, None]]) -> None:
    """Run them side by side; the first failure is raised once all have ended."""
    results = await defer.DeferredList(
        [defer.ensureDeferred(c) for c in coroutines], consumeErrors=True
    )
    for ok, value in results:
        if not ok:
            value.raiseException()


# -- the benchmark ------------------------------------------------------------


@dataclass
class Setup:
    work: Path
    rgw: CephRGW
    redis: RedisServer
    bucket: str
    keys: Path
    sources: list[Path]
    digests: list[str]
    reactor: ReactorThread
    timeout: float
    logs: list[Process] = field(default_factory=list)  # every instance and proxy started

    def s3_flags(self) -> list[str]:
        return [
            "--storage", "s3", "--s3-endpoint", self.rgw.endpoint, "--s3-bucket", self.bucket,
            "--s3-credentials", str(self.keys),
        ]  # fmt: skip

    def other_pids(self) -> dict[str, int]:
        ceph = {f"ceph-{n}": p.pid for n, p in self.rgw.processes.items()}
        assert self.redis.process is not None
        return {**ceph, "redis": self.redis.process.pid}

    def verify(self, copies: list[Path], digests: list[str]) -> None:
        for copy, digest in zip(copies, digests, strict=True):
            check_copy(f"download {copy.name}", copy, digest)


def cluster_round(setup: Setup, n: int, clients: int, size: int) -> ClusterRun:
    work = setup.work / f"n{n}"
    work.mkdir()
    ids = INSTANCE_IDS[:n]
    print(f"\nN={n}: starting {n} instance(s) and HAProxy...", flush=True)
    instances = start_instances(
        ids,
        lambda i: twistd_argv(i, work / f"root-{i}", setup.s3_flags(), setup.redis.url),
        work,
    )
    for p in instances:
        p.name = f"n{n}-{p.name}"  # in the log report
    setup.logs += instances
    proxy: Process | None = None
    try:
        for i, p in zip(ids, instances, strict=True):
            print(f"  instance {i}: pid {p.pid}, {LOOPBACK}:{p.port}")
        if n == 1:
            print(f"  command: {shlex.join(instances[0].argv)}")
        port = free_port()
        env = {
            "WSFILES_BIND": f"{LOOPBACK}:{port}",
            "WSFILES_TICKET_MAP": str(CONTRIB / "tickets.map"),
            **haproxy_addresses(instances),
        }
        argv = [HAPROXY, "-db", "-f", str(CONTRIB / "wsfiles.cfg")]
        proxy = Process(f"haproxy-n{n}", argv, work / "haproxy.log", env).start()
        setup.logs.append(proxy)
        wait_for_haproxy(proxy, port)
        shown = " ".join(f"{k}={v}" for k, v in env.items() if k != "WSFILES_TICKET_MAP")
        print(f"  haproxy: pid {proxy.pid}, {shown}", flush=True)
        pids = {i: p.pid for i, p in zip(ids, instances, strict=True)}
        pids |= {"haproxy": proxy.pid} | setup.other_pids()
        sources = setup.sources[:clients]
        copies = [work / f"copy-{i}.bin" for i in range(clients)]
        names = [f"cluster-n{n}-client{i}.bin" for i in range(clients)]
        up, down, served_by = setup.reactor.run(
            lambda reactor: transfers(
                reactor, f"ws://{LOOPBACK}:{port}", sources, copies, names, Marks(pids),
                setup.timeout,
            ),
            setup.timeout * 2 + 60,
        )  # fmt: skip
        setup.verify(copies, setup.digests[:clients])
        served = {i: served_by.count(i) for i in ids}
        run = ClusterRun(n, clients, size, up, down, served, env)
        for i, p in zip(ids, instances, strict=True):
            run.peak_rss_kib[i] = read_status_kib(p.pid, "VmHWM")
        for label, phase in (("upload", up), ("download", down)):
            print(f"  {label:8} {describe(run, phase)}", flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
        for p in instances:
            p.stop()
    run.gc_seconds = run_rgw_gc(setup.rgw)
    rss = ", ".join(f"{i} {kib / 1024:.0f} MiB" for i, kib in run.peak_rss_kib.items())
    print(f"  all {clients} SHA-256 match; peak RSS {rss}; files deleted, RGW gc", end=" ")
    print(f"{run.gc_seconds:.1f} s")
    return run


def describe(run: ClusterRun, phase: Phase) -> str:
    per = ", ".join(f"{i} {run.per_gib(phase, i):.2f}" for i in run.served)
    ceph = sum(v for k, v in phase.cpu.items() if k.startswith("ceph-"))
    return (
        f"{run.mb_s(phase):7.1f} MB/s {phase.seconds:6.2f} s | CPU s: instances"
        f" {run.instances_cpu(phase):5.2f} (per GiB of their own: {per}), haproxy"
        f" {phase.cpu['haproxy']:5.2f}, ceph {ceph:5.2f}, redis {phase.cpu['redis']:4.2f},"
        f" bench {phase.cpu['bench']:5.2f}, irq {phase.irq:4.2f}, others {phase.others:5.2f}"
        + ("" if phase.quiet else " (machine not quiet: skewed)")
    )


@dataclass
class DirectRun:
    storage: str
    size: int
    upload: Phase
    download: Phase
    peak_rss_kib: int

    def mb_s(self, phase: Phase) -> float:
        return self.size / phase.seconds / MB


def direct_round(setup: Setup, storage: str, size: int) -> DirectRun:
    """One instance, one client, no HAProxy: the S3 overhead against local storage."""
    work = setup.work / f"direct-{storage}"
    work.mkdir()
    flags = setup.s3_flags() if storage == "s3" else ["--storage", "local"]
    (instance,) = start_instances(
        "a", lambda i: twistd_argv(i, work / "root", flags, setup.redis.url), work
    )
    instance.name = f"direct-{storage}"
    setup.logs.append(instance)
    try:
        print(f"\ndirect, --storage {storage}: {shlex.join(instance.argv)}", flush=True)
        pids = {"a": instance.pid} | setup.other_pids()
        copy = work / "copy.bin"
        up, down, _ = setup.reactor.run(
            lambda reactor: transfers(
                reactor, f"ws://{LOOPBACK}:{instance.port}", setup.sources[:1], [copy],
                [f"direct-{storage}.bin"], Marks(pids), setup.timeout,
            ),
            setup.timeout * 2 + 60,
        )  # fmt: skip
        setup.verify([copy], setup.digests[:1])
        peak = read_status_kib(instance.pid, "VmHWM")
    finally:
        instance.stop()
    result = DirectRun(storage, size, up, down, peak)
    for label, phase in (("upload", up), ("download", down)):
        print(
            f"  {label:8} {result.mb_s(phase):7.1f} MB/s {phase.seconds:6.2f} s"
            f" | CPU s: instance {phase.cpu['a']:5.2f} ({phase.cpu['a'] / (size / GIB):.2f}"
            f" per GiB), bench {phase.cpu['bench']:5.2f}, irq {phase.irq:4.2f},"
            f" others {phase.others:5.2f}"
            + ("" if phase.quiet else " (machine not quiet: skewed)"),
            flush=True,
        )
    print(f"  SHA-256 matches; peak RSS {peak / 1024:.0f} MiB")
    return result


# -- the report -----------------------------------------------------------------


def report(runs: list[ClusterRun], direct: dict[str, DirectRun], clients: int, size: int) -> None:
    ncpu = os.cpu_count() or 1
    base = runs[0]

    def cost(run: ClusterRun, phase: Phase, names: Iterable[str]) -> float:
        return sum(phase.cpu[n] for n in names) / (run.moved / GIB)

    def ceph(phase: Phase) -> list[str]:
        return [n for n in phase.cpu if n.startswith("ceph-")]

    print(f"\n== scale-out: {clients} clients x {size} bytes each way, MB = 10^6 bytes ==")
    print(
        f"{'N':>2} {'clients':>7} {'upload':>11} {'vs N=1':>6} {'download':>11} {'vs N=1':>6}"
        f" {'inst CPU s/GiB up':>17} {'vs N=1':>6} {'down':>5} {'vs N=1':>6}"
        f" {'peak RSS':>8} {'others up/down':>14}"
    )
    for run in runs:
        spread = "/".join(str(run.served[i]) for i in run.served)
        up, down = run.mb_s(run.upload), run.mb_s(run.download)
        up_cost, down_cost = cost(run, run.upload, run.served), cost(run, run.download, run.served)
        base_up = cost(base, base.upload, base.served)
        base_down = cost(base, base.download, base.served)
        others = [p.others / p.seconds for p in (run.upload, run.download)]
        print(
            f"{run.instances:>2} {spread:>7} {up:6.1f} MB/s {up / base.mb_s(base.upload):5.2f}x"
            f" {down:6.1f} MB/s {down / base.mb_s(base.download):5.2f}x"
            f" {up_cost:17.2f} {up_cost / base_up:5.2f}x"
            f" {down_cost:5.2f} {down_cost / base_down:5.2f}x"
            f" {max(run.peak_rss_kib.values()) / 1024:4.0f} MiB {others[0]:6.2f} / {others[1]:4.2f}"
        )
    print(
        "clients: per instance (a/b/c); inst CPU s/GiB: all instances' CPU s (utime+stime)"
        " over all GiB moved; peak RSS: the largest instance's VmHWM; others: CPUs busy"
        " with processes not measured here (other jobs) or stolen by the hypervisor"
    )
    print("\nCPU s per GiB moved, by process (up / down):")
    print(
        f"{'N':>2} {'each instance (own bytes)':>34} {'haproxy':>11} {'ceph':>11} {'clients':>11}"
    )
    for run in runs:
        each = " ".join(
            f"{run.per_gib(run.upload, i):.2f}/{run.per_gib(run.download, i):.2f}"
            for i in run.served
        )
        cells = [
            f"{cost(run, run.upload, names):.2f}/{cost(run, run.download, names):.2f}"
            for names in (["haproxy"], ceph(run.upload), ["bench"])
        ]
        print(f"{run.instances:>2} {each:>34} {cells[0]:>11} {cells[1]:>11} {cells[2]:>11}")
    if base.instances != 1:
        print("(the first N measured is the base of the ratios, not N=1)")
    print(
        f"note: {ncpu} CPUs here, shared by the clients (one Python process), HAProxy, Ceph"
        " and the instances, so little gain from more instances is expected; the per-instance"
        " CPU s/GiB is what would scale on machines of their own."
    )
    if "s3" in direct and "local" in direct:
        s3, local = direct["s3"], direct["local"]
        print(f"\n== S3 overhead: 1 instance, 1 client, direct (no HAProxy), {size} bytes ==")
        print(
            f"{'':9} {'s3':>11} {'local':>11} {'s3/local':>8}"
            f" {'s3 CPU s/GiB':>12} {'local CPU s/GiB':>15} {'peak RSS s3/local':>17}"
        )
        for label in ("upload", "download"):
            p3, pl = getattr(s3, label), getattr(local, label)
            print(
                f"{label:9} {s3.mb_s(p3):6.1f} MB/s {local.mb_s(pl):6.1f} MB/s"
                f" {s3.mb_s(p3) / local.mb_s(pl):7.2f}x"
                f" {p3.cpu['a'] / (size / GIB):12.2f} {pl.cpu['a'] / (size / GIB):15.2f}"
                f" {s3.peak_rss_kib / 1024:6.0f} / {local.peak_rss_kib / 1024:3.0f} MiB"
            )
    phases = [p for r in runs for p in (r.upload, r.download)]
    phases += [p for d in direct.values() for p in (d.upload, d.download)]
    noisy = sum(not p.quiet for p in phases)
    if noisy:
        print(
            f"\nWARNING: in {noisy} of {len(phases)} phases other processes used more than"
            f" {BUSY_MACHINE:.0%} of a CPU: the machine was not quiet, those figures are skewed"
        )


def scan_logs(processes: list[Process]) -> int:
    """Print the warnings, errors and tracebacks in the logs; how many lines matched."""
    found = 0
    print("\n== server logs: warnings, errors, tracebacks ==")
    for process in processes:
        lines = process.output().splitlines()
        bad = [line for line in lines if LOG_PROBLEM.search(line)]
        found += len(bad)
        tracebacks = sum("Traceback" in line for line in lines)
        # twistd re-raises the SIGTERM that stopped it (-15); HAProxy exits 0 on it.
        code = process.exit_code
        odd = "" if code in (0, -signal.SIGTERM) else f" (exit status {code}: unexpected)"
        found += bool(odd)
        print(
            f"{process.name}: {len(lines)} lines, {len(bad)} flagged,"
            f" {tracebacks} tracebacks, exit {code}{odd}"
        )
        for line in bad[:8]:
            print(f"  | {line[:200]}")
        if len(bad) > 8:
            print(f"  | ... and {len(bad) - 8} more")
    return found


# -- main -----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients (6)")
    parser.add_argument("--size", default="64M", help="bytes per client, e.g. 64M (default)")
    parser.add_argument("--instances", default="1,2,3", help="the Ns to run, from 1,2,3")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds allowed per phase (120)"
    )
    parser.add_argument("--no-direct", action="store_true", help="skip the s3/local comparison")
    args = parser.parse_args(argv)
    try:
        args.size = parse_size(args.size)
    except ValueError as e:
        parser.error(f"--size: {e}")
    if not 1 <= args.size <= 2 * GIB:
        parser.error("--size must be 1 byte to 2G (the instances' --max-size)")
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    try:
        args.instances = [int(n) for n in args.instances.split(",")]
    except ValueError:
        parser.error("--instances: a comma-separated list such as 1,2,3")
    if not args.instances or any(not 1 <= n <= len(INSTANCE_IDS) for n in args.instances):
        parser.error("--instances: each N must be 1, 2 or 3 (the shipped config's servers)")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(versions())
    print(f"Autobahn NVX: {nvx_status()}")
    print(f"wsfiles: {source_version()}")
    print(f"haproxy: {HAPROXY}, redis-server: {REDIS_SERVER}, config: {CONTRIB / 'wsfiles.cfg'}")
    for tool in (HAPROXY, REDIS_SERVER):
        if not os.path.exists(tool):
            raise RuntimeError(f"{tool} is not installed")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsfiles-cluster-")))
        with announced(f"writing {args.clients} source files of {args.size} bytes"):
            sources = [work / f"source-{i}.bin" for i in range(args.clients)]
            digests = [make_source(path, args.size) for path in sources]
        with announced("Ceph RGW (install if missing, start)"):
            ensure_ceph_installed()
            rgw = CephRGW().start(work)  # from the main thread: PDEATHSIG follows it
            stack.callback(rgw.stop)
        bucket = "wsfiles-bench-" + secrets.token_hex(4)
        rgw.create_bucket(bucket)
        keys = work / "s3-keys"
        keys.write_text(f"{rgw.access_key} {rgw.secret_key}\n")
        redis = RedisServer(work / "redis", free_port())
        redis.start()
        stack.callback(redis.stop)
        print(f"ceph rgw: {rgw.endpoint} bucket {bucket}; redis: {redis.url}")
        reactor = stack.enter_context(ReactorThread())
        setup = Setup(work, rgw, redis, bucket, keys, sources, digests, reactor, args.timeout)
        try:
            runs = [cluster_round(setup, n, args.clients, args.size) for n in args.instances]
            direct = {}
            if not args.no_direct:
                for storage in ("s3", "local"):
                    direct[storage] = direct_round(setup, storage, args.size)
        finally:
            flagged = scan_logs(setup.logs)
    report(runs, direct, args.clients, args.size)
    print(f"\ntotal {time.monotonic() - began:.0f} s; log lines flagged: {flagged}")
    return 0


def _terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the clean-up run
    raise SystemExit(f"signal {signum}: stopping")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(1)
