"""``wsfiles sync --once`` against rsync to a local ``rsync --daemon`` (issue 19).

Run from the repository root (wsfiles and Debian's ``rsync`` installed;
tests/install-tools.sh installs rsync)::

    python bench/sync.py                          # 10,000 x 4 KiB and 10 x 100 MiB, 3 runs
    python bench/sync.py --runs 1 --small-count 1000 --big-size 10M   # a quick look
    python bench/sync.py --only small --profile /tmp/sync-prof         # and where the time goes

Scenarios, each a first sync into an empty destination and then a second run
with nothing changed (onto the just-synced destination):

- ``small``: ``--small-count`` files of ``--small-size`` (10,000 x 4 KiB) in
  folders of ``--per-folder`` files each (100);
- ``big``: ``--big-count`` files of ``--big-size`` (10 x 100 MiB).

Contenders, interleaved in each run (A, B, C, A, B, C, ...), median of ``--runs``:

- ``wsfiles sync SRC ws://127.0.0.1:PORT --once`` into a fresh ``twistd wsfiles``
  (a new root and a new sync state for every first sync; the server is
  started before, and stopped after, the timed commands);
- ``rsync -a --fsync SRC/ rsync://127.0.0.1:PORT/bench/dest/`` to one
  ``rsync --daemon --no-detach`` (rsyncd.conf in the temporary folder, running
  as the current user, ``use chroot = no``): as durable as wsfiles' saves, the
  baseline every ratio is quoted against;
- the same without ``--fsync`` (plain ``rsync -a``), reported beside it.

Every contender reads the same source tree, written once (from one
``os.urandom`` pool, every file different) before anything is timed; it is in
the page cache for all alike.  ``os.sync()`` runs before each timed command so
no contender pays for another's dirty pages.  Each first sync is checked
(every source file's bytes at the destination, nothing extra) outside the
timed region, and its destination removed once the no-change run is done.

Per command: wall seconds, and CPU seconds of the client (the command and
its children) and of the server side (``twistd``; for rsync the daemon with
the per-connection processes it forked and reaped).  With ``--profile DIR``,
one more, untimed, wsfiles first sync and no-change run of each tree
run under cProfile (the client, ``python -m cProfile -m wsfiles``) and
twistd's ``--profile`` (the server); the top functions are printed and the
``.prof`` files kept in DIR/small and DIR/big.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pstats
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    KIB,
    LOOPBACK,
    MIB,
    ServerProcess,
    announced,
    header,
    print_result,
    run_script,
    size_argument,
    twistd_wsfiles,
)

#: The pool of random bytes every file is cut from.
POOL_SIZE = 8 * MIB
#: Seconds one sync command may take before the bench gives up on it.
COMMAND_TIMEOUT = 1800.0
#: Seconds the rsync daemon has to reap the processes it forked for a connection.
REAP_TIMEOUT = 10.0
#: The folder ``wsfiles sync`` keeps its state in (never synced; rsync skips it too).
STATE_FOLDER = ".wsfiles-sync"
WSFILES = [sys.executable, "-m", "wsfiles"]


# -- the source trees ---------------------------------------------------------------


def write_small_tree(root: Path, count: int, size: int, per_folder: int, pool: bytes) -> None:
    """``count`` files of ``size`` bytes, ``per_folder`` a folder, each cut differently."""
    span = len(pool) - size
    for n in range(count):
        folder = root / f"folder-{n // per_folder:04d}"
        if n % per_folder == 0:
            folder.mkdir(parents=True)
        offset = (n * 4099) % span
        body = (n.to_bytes(8, "little") + pool[offset : offset + size])[:size]
        (folder / f"file-{n:06d}.bin").write_bytes(body)


def write_big_tree(root: Path, count: int, size: int, pool: bytes) -> None:
    """``count`` files of ``size`` bytes, each block of ``pool`` stamped with a counter."""
    root.mkdir(parents=True)
    stamp = 0
    for n in range(count):
        remaining = size
        with (root / f"big-{n:03d}.bin").open("wb") as f:
            while remaining:
                block = (stamp.to_bytes(8, "little") + pool[8:])[:remaining]
                f.write(block)
                remaining -= len(block)
                stamp += 1


def age(root: Path) -> None:
    """Date every file an hour back: none is "still being written" (sync waits ~2 s for those)."""
    then = time.time() - 3600
    for folder, _, files in os.walk(root):
        for name in files:
            os.utime(Path(folder) / name, (then, then))


def digests(root: Path) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, SHA-256) of every file under ``root``, the sync state aside."""
    found: dict[str, tuple[int, str]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".wsfiles-")]
        for name in files:
            if name.startswith(".wsfiles-"):
                continue  # the server's and the sync's own records, never user files
            path = Path(folder) / name
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(MIB):
                    digest.update(block)
            found[path.relative_to(root).as_posix()] = (path.stat().st_size, digest.hexdigest())
    return found


def check_copy(what: str, expected: dict[str, tuple[int, str]], copy: Path) -> None:
    """RuntimeError unless ``copy`` holds exactly the source's files with their bytes."""
    actual = digests(copy)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    differ = sorted(p for p in set(expected) & set(actual) if expected[p] != actual[p])
    if missing or extra or differ:
        raise RuntimeError(
            f"{what}: the copy differs from the source: {len(missing)} missing {missing[:3]},"
            f" {len(extra)} extra {extra[:3]}, {len(differ)} with other bytes {differ[:3]}"
        )


# -- measuring one command --------------------------------------------------------------


@dataclass
class Timing:
    wall: float
    client_cpu: float
    server_cpu: float
    #: Of ``server_cpu``, the reactor thread's (wsfiles only; the rest is its thread pool).
    reactor_cpu: float | None = None


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int, reaped_children: bool = False) -> float:
    """CPU seconds of ``pid``; with ``reaped_children``, also of the children it waited for."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After "pid (comm)": utime, stime, cutime, cstime are fields 14-17 (1-based).
    ticks = sum(int(value) for value in fields[11 : 15 if reaped_children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def reactor_thread_cpu(pid: int) -> float:
    """CPU seconds of the main thread of ``pid`` alone (twistd's reactor thread)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if parent == pid:
            found.append(int(entry))
    return found


def run_timed(
    argv: list[str],
    log: Path,
    server_cpu: Callable[[], float],
    settle: Callable[[], None] = lambda: None,
    reactor_cpu: Callable[[], float] | None = None,
) -> Timing:
    """Run ``argv`` to completion (output to ``log``); its wall and CPU seconds."""
    os.sync()  # nobody pays for the previous command's dirty pages
    client_before, server_before = children_cpu(), server_cpu()
    reactor_before = reactor_cpu() if reactor_cpu is not None else 0.0
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        started = time.perf_counter()
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
        wall = time.perf_counter() - started
    settle()
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(
            f"{argv[:4]} exited {done.returncode}; its last lines ({log}):\n  " + "\n  ".join(tail)
        )
    reactor = reactor_cpu() - reactor_before if reactor_cpu is not None else None
    return Timing(wall, children_cpu() - client_before, server_cpu() - server_before, reactor)


# -- the contenders ---------------------------------------------------------------------


@dataclass
class Destination:
    """One fresh destination: how to sync into it, where its files land."""

    sync: Callable[[], Timing]
    files: Path


class WsfilesSync:
    name = "wsfiles sync --once"

    def __init__(self, work: Path, logs: Path) -> None:
        self.work = work
        self.logs = logs

    @contextlib.contextmanager
    def destination(self, source: Path, label: str) -> Iterator[Destination]:
        root = self.work / "wsfiles-root"
        root.mkdir()
        shutil.rmtree(source / STATE_FOLDER, ignore_errors=True)
        log = self.logs / f"wsfiles-{label}.log"
        try:
            with ServerProcess("wsfiles", twistd_wsfiles(root), log_path=log) as server:
                url = f"ws://{LOOPBACK}:{server.port}"
                argv = [*WSFILES, "sync", "-q", str(source), url, "--once"]
                client_log = self.logs / f"wsfiles-client-{label}.log"
                yield Destination(
                    lambda: run_timed(
                        argv,
                        client_log,
                        lambda: process_cpu(server.pid),
                        reactor_cpu=lambda: reactor_thread_cpu(server.pid),
                    ),
                    root,
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(source / STATE_FOLDER, ignore_errors=True)


class RsyncDaemon:
    """``rsync --daemon --no-detach`` on a free loopback port, one module ``bench``."""

    def __init__(self, work: Path, logs: Path) -> None:
        self.module = work / "rsync-module"
        self.config = work / "rsyncd.conf"
        self.logs = logs
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> RsyncDaemon:
        self.module.mkdir()
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            self.port = probe.getsockname()[1]
        self.config.write_text(
            f"port = {self.port}\n"
            f"address = {LOOPBACK}\n"
            "use chroot = no\n"
            f"uid = {os.getuid()}\n"
            f"gid = {os.getgid()}\n"
            f"log file = {self.logs / 'rsyncd.log'}\n"
            "[bench]\n"
            f"path = {self.module}\n"
            "read only = no\n"
        )
        rsync = shutil.which("rsync")
        if rsync is None:
            raise RuntimeError("rsync is not installed (tests/install-tools.sh installs it)")
        shown = subprocess.run([rsync, "--version"], capture_output=True, text=True, check=False)
        print(f"{rsync}: {shown.stdout.splitlines()[0] if shown.stdout else '(no --version)'}")
        self.process = subprocess.Popen(
            [rsync, "--daemon", "--no-detach", f"--config={self.config}"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:  # bounded: until it accepts connections or the deadline
            if self.process.poll() is not None:
                raise RuntimeError(f"rsync --daemon exited {self.process.returncode}")
            with socket.socket() as probe:
                if probe.connect_ex((LOOPBACK, self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("rsync --daemon did not listen within 10 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def cpu(self) -> float:
        assert self.process is not None
        return process_cpu(self.process.pid, reaped_children=True)

    def settle(self) -> None:
        """Wait (bounded) until the daemon reaped the processes of the last connection."""
        assert self.process is not None
        deadline = time.monotonic() + REAP_TIMEOUT
        while child_pids(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.01)


@dataclass
class Rsync:
    daemon: RsyncDaemon
    logs: Path
    fsync: bool
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = "rsync -a --fsync" if self.fsync else "rsync -a"

    @contextlib.contextmanager
    def destination(self, source: Path, label: str) -> Iterator[Destination]:
        target = self.daemon.module / "dest"
        argv = [
            "rsync", "-a", *(["--fsync"] if self.fsync else []), f"--exclude=/{STATE_FOLDER}",
            f"{source}/", f"rsync://{LOOPBACK}:{self.daemon.port}/bench/dest/",
        ]  # fmt: skip
        log = self.logs / f"rsync{'-fsync' if self.fsync else ''}-{label}.log"
        try:
            yield Destination(
                lambda: run_timed(argv, log, self.daemon.cpu, self.daemon.settle), target
            )
        finally:
            shutil.rmtree(target, ignore_errors=True)


# -- the runs ----------------------------------------------------------------------------


@dataclass
class Figures:
    first: list[Timing] = field(default_factory=list)
    again: list[Timing] = field(default_factory=list)


def cpus(timing: Timing) -> str:
    shown = f"CPU client {timing.client_cpu:.2f} s, server {timing.server_cpu:.2f} s"
    if timing.reactor_cpu is not None:
        shown += f" (reactor thread {timing.reactor_cpu:.2f} s)"
    return shown


def reactor_share(timings: list[Timing]) -> str:
    """`` (reactor N s)`` where the server's reactor thread was measured apart."""
    if any(t.reactor_cpu is None for t in timings):
        return ""
    return f" (reactor {statistics.median(t.reactor_cpu or 0.0 for t in timings):.2f} s)"


def median(timings: list[Timing], what: str) -> float:
    return statistics.median(getattr(t, what) for t in timings)


def measure(
    scenario: str, source: Path, contenders: list[WsfilesSync | Rsync], runs: int
) -> dict[str, Figures]:
    expected = digests(source)
    figures = {c.name: Figures() for c in contenders}
    for run in range(1, runs + 1):
        for contender in contenders:  # interleaved: A, B, C, A, B, C, ...
            label = f"{scenario}-{run}"
            with contender.destination(source, label) as destination:
                first = destination.sync()
                check_copy(f"{contender.name} ({label})", expected, destination.files)
                again = destination.sync()
            figures[contender.name].first.append(first)
            figures[contender.name].again.append(again)
            print(
                f"  run {run} {contender.name:20} first {first.wall:7.2f} s ({cpus(first)});"
                f" no change {again.wall:6.2f} s ({cpus(again)})",
                flush=True,
            )
    return figures


def report(scenario: str, what: str, figures: dict[str, Figures]) -> None:
    baseline = figures["rsync -a --fsync"]
    print(f"\n{what}: medians")
    print(
        f"| {'':20} | first sync | vs rsync --fsync | CPU client | CPU server"
        " | no change | vs rsync --fsync | CPU client | CPU server |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in figures.items():
        cells = []
        for runs, base in ((f.first, baseline.first), (f.again, baseline.again)):
            wall = median(runs, "wall")
            cells += [
                f"{wall:.2f} s",
                f"{wall / median(base, 'wall'):.2f}x",
                f"{median(runs, 'client_cpu'):.2f} s",
                f"{median(runs, 'server_cpu'):.2f} s" + reactor_share(runs),
            ]
        print(f"| {name:20} | " + " | ".join(cells) + " |")
    ours = figures[WsfilesSync.name]
    first_ratio = median(ours.first, "wall") / median(baseline.first, "wall")
    again_ratio = median(ours.again, "wall") / median(baseline.again, "wall")
    first_goal = 1.5 if scenario == "small" else 1.0
    print_result(
        f"sync: first sync of {what} vs rsync -a --fsync",
        f"{first_ratio:.2f}x the time",
        f"<= {first_goal:.1f}x",
        first_ratio <= first_goal,
    )
    print_result(
        f"sync: no-change run of {what} vs rsync -a --fsync",
        f"{again_ratio:.2f}x the time",
        "<= 1.0x",
        again_ratio <= 1.0,
    )


def startup(runs: int) -> None:
    """The CLI's own start-up (imports, argument parsing): a floor under every wsfiles run."""
    argv = [*WSFILES, "sync", "--help"]
    walls = []
    for _ in range(max(3, runs)):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        walls.append(time.perf_counter() - started)
    print(f"CLI start-up ({' '.join(argv[1:])}): median {statistics.median(walls):.2f} s wall")


def profile(source: Path, work: Path, out: Path) -> None:
    """One untimed wsfiles first sync and no-change run under cProfile, client and server."""
    out.mkdir(parents=True, exist_ok=True)
    root = work / "wsfiles-profiled"
    root.mkdir()
    shutil.rmtree(source / STATE_FOLDER, ignore_errors=True)
    server_prof = out / "server.prof"
    argv = twistd_wsfiles(root)
    at = argv.index("wsfiles")
    argv[at:at] = [f"--profile={server_prof}", "--profiler=cprofile", "--savestats"]
    try:
        with ServerProcess("wsfiles", argv, log_path=out / "server.log") as server:
            url = f"ws://{LOOPBACK}:{server.port}"
            for step in ("first", "again"):
                prof = out / f"client-{step}.prof"
                command = [
                    sys.executable, "-m", "cProfile", "-o", str(prof),
                    *WSFILES[1:], "sync", "-q", str(source), url, "--once",
                ]  # fmt: skip
                timing = run_timed(
                    command,
                    out / f"client-{step}.log",
                    lambda: process_cpu(server.pid),
                    reactor_cpu=lambda: reactor_thread_cpu(server.pid),
                )
                print(f"\nprofiled client, {step}: {timing.wall:.2f} s wall, {cpus(timing)}")
                top(prof)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(source / STATE_FOLDER, ignore_errors=True)
    if server_prof.exists():
        print("\nprofiled server (both runs, whole life):")
        top(server_prof)
    print(f"\nprofiles kept in {out} (python -m pstats FILE)")


def top(path: Path, lines: int = 25) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="median of this many (default 3)")
    parser.add_argument("--only", choices=("small", "big"), help="one scenario")
    parser.add_argument("--small-count", type=int, default=10_000)
    parser.add_argument("--small-size", type=size_argument, default=4 * KIB)
    parser.add_argument("--per-folder", type=int, default=100, help="small files a folder")
    parser.add_argument("--big-count", type=int, default=10)
    parser.add_argument("--big-size", type=size_argument, default=100 * MIB)
    parser.add_argument("--dir", type=Path, help="where the temporary trees go (default: TMPDIR)")
    parser.add_argument("--logs", type=Path, help="keep every command's output here")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="also profile, into DIR/SCENARIO"
    )
    args = parser.parse_args(argv)
    if min(args.runs, args.small_count, args.big_count, args.per_folder) < 1:
        parser.error("--runs, --per-folder and the counts must be at least 1")
    if args.small_size < 8:
        parser.error("--small-size must be at least 8 bytes")
    header()
    scenarios = [args.only] if args.only else ["small", "big"]
    sizes = {"small": args.small_count * args.small_size, "big": args.big_count * args.big_size}
    # The source, one destination and the copy being checked; 10% and 256 MiB spare.
    need = max(sizes[s] for s in scenarios) * 2.2 + 256 * MIB
    with tempfile.TemporaryDirectory(prefix="wsfiles-bench-sync-", dir=args.dir) as temp:
        work = Path(temp)
        free = shutil.disk_usage(work).free
        print(f"free disk under {work}: {free / 2**30:.1f} GiB, needed about {need / 2**30:.1f}")
        if free < need:
            print("not enough free disk: use --dir, or smaller --big-size/--small-count")
            return 1
        logs = args.logs or work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        pool = os.urandom(POOL_SIZE)
        startup(args.runs)
        with RsyncDaemon(work, logs) as daemon:
            contenders = [
                WsfilesSync(work, logs),
                Rsync(daemon, logs, fsync=True),
                Rsync(daemon, logs, fsync=False),
            ]
            for scenario in scenarios:
                source = work / f"source-{scenario}"
                if scenario == "small":
                    what = f"{args.small_count:,} files of {args.small_size / KIB:g} KiB"
                    with announced(f"writing {what}"):
                        write_small_tree(
                            source, args.small_count, args.small_size, args.per_folder, pool
                        )
                else:
                    what = f"{args.big_count:,} files of {args.big_size / MIB:g} MiB"
                    with announced(f"writing {what}"):
                        write_big_tree(source, args.big_count, args.big_size, pool)
                age(source)
                os.sync()
                print(f"{what}: {args.runs} runs, interleaved", flush=True)
                figures = measure(scenario, source, contenders, args.runs)
                report(scenario, what, figures)
                if args.profile:
                    profile(source, work, args.profile / scenario)
                shutil.rmtree(source)
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    run_script(main)
