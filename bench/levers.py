"""Issue 18's upload levers, A/B in one run: each variant against the same run's baseline.

Usage: python bench/levers.py [--size 1G] [--runs 5] [--hash | --list]

Variants (interleaved: A, B, C, ..., A, B, C, ...; medians of the runs; the
first round is a warm-up, shown but not counted):

- ``base``: the server without early write-back, the client's tuned 1 MiB
  upload frames (what 7102228 did);
- ``frames-256k``/``frames-128k``/``frames-64k``: the same server, the client
  sending smaller upload frames;
- ``writeback``: the server starting write-back every WRITEBACK_EVERY bytes
  with sync_file_range (wsfiles/storage/local.py), 1 MiB frames;
- ``fdatasync``: the same with the fallback (fdatasync) instead.

With ``--hash``: BLAKE3 against SHA-256 (the negotiated ``hash``, docs/protocol.md
"Faster hashing").  One server (this tree's code, its default knobs); each
round writes the file durably with bench/_limits.py (the disk's durable write
rate, as bench/throughput.py measures it), then uploads and downloads it with
``hash="sha256"`` and with ``hash="blake3"`` (wsfiles.client, which checks
each digest), deleting the last copy before each upload.  Printed: MB/s, CPU
seconds per GiB of server, client and others per direction, each upload
against the same run's durable write rate, and BLAKE3 against SHA-256.

With ``--list``: the listing cache instead.  ``list`` round trips on one
command channel (bench/connections.py's lean client and its request), one at
a time and pipelined, alternately against a server with the cache (``cache``)
and one with it off (``no-cache``: wsfiles.changes.LISTING_TTL = 0, so every
``list`` reads and encodes the folder again), and a bare Autobahn echo (the
ratio bench/connections.py reports); ``--files N`` files in the folder.

Each server is a ``twistd wsfiles`` started through a small wrapper that sets
``wsfiles.storage`` knobs before twistd runs, so the variants differ only in
that.  Printed per variant: MB/s and CPU seconds per GiB of the server, the
client (this process) and everything else; then each median as a ratio
against ``base``.  Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    GIB,
    LOOPBACK,
    MB,
    ServerProcess,
    announced,
    bounded,
    header,
    make_source,
    run_on_reactor,
    run_script,
    size_argument,
    twistd_wsfiles,
)
from throughput import Stopwatch, Transfer

import wsfiles.client
from wsfiles.client import WsfilesError, connect
from wsfiles.tuning import tune_malloc

FILE_NAME = "lever.bin"
CONNECT_TIMEOUT = 30.0

#: Server knobs per server variant: Python run in the server before twistd.
SERVER_SETUP = {
    "off": "import wsfiles.storage.local as s; s.WRITEBACK_EVERY = 0",
    "sync_file_range": "import wsfiles.storage.local as s; assert s._sync_file_range is not None",
    "fdatasync": "import wsfiles.storage.local as s; s._sync_file_range = None",
}
#: Variant: (server, upload frame size).
VARIANTS = {
    "base": ("off", 1024 * 1024),
    "frames-256k": ("off", 256 * 1024),
    "frames-128k": ("off", 128 * 1024),
    "frames-64k": ("off", 64 * 1024),
    "writeback": ("sync_file_range", 1024 * 1024),
    "fdatasync": ("fdatasync", 1024 * 1024),
}


def server_argv(setup: str, root: Path, size: int) -> list[str]:
    twistd = twistd_wsfiles(root, "--max-size", "2G" if size <= 2 * GIB else str(size))
    code = (
        f"import sys; {setup}; from twisted.scripts.twistd import run;"
        " sys.argv = sys.argv[1:]; run()"
    )
    return [sys.executable, "-c", code, *twistd]


async def upload(server: ServerProcess, source: Path, frame: int, reactor: Any) -> Transfer:
    wsfiles.client.upload_frame_size = lambda: frame  # read at each upload
    client = await bounded(
        connect(f"ws://{LOOPBACK}:{server.port}", reactor=reactor), CONNECT_TIMEOUT, reactor
    )
    watch = Stopwatch(server.pid)
    try:
        with contextlib.suppress(WsfilesError):  # not_found the first time
            await bounded(client.delete(FILE_NAME), CONNECT_TIMEOUT, reactor)
        with source.open("rb") as f:
            watch.start()
            await bounded(client.upload(FILE_NAME, f), 600.0, reactor)
            return watch.stop()
    finally:
        await bounded(client.close(), CONNECT_TIMEOUT, reactor)


async def measure(
    servers: dict[str, ServerProcess], source: Path, variants: list[str], runs: int, reactor: Any
) -> dict[str, list[Transfer]]:
    size = source.stat().st_size
    results: dict[str, list[Transfer]] = {name: [] for name in variants}
    for number in range(0, runs + 1):
        print("warm-up (not counted):" if number == 0 else f"run {number}:", flush=True)
        for name in variants:
            server, frame = VARIANTS[name]
            transfer = await upload(servers[server], source, frame, reactor)
            if number:
                results[name].append(transfer)
            print(f"  {name:12} {transfer.describe(size)}", flush=True)
    return results


LIST_SERVERS = {
    "no-cache": "import wsfiles.changes as c; c.LISTING_TTL = 0.0",
    "cache": "import wsfiles.changes",
}


def list_main(args: argparse.Namespace) -> int:
    import connections

    connections.OFFERED_SUBPROTOCOL = "wsfiles.v1.2" if args.protocol == "1.2" else None
    options = argparse.Namespace(seconds=args.seconds, window=128)
    with tempfile.TemporaryDirectory(prefix="wsfiles-levers-list-") as temp:
        work = Path(temp)
        users = work / "users"
        (token,) = connections.make_users(users, ["bench0"])
        with contextlib.ExitStack() as stack:
            servers = {}
            for name, setup in LIST_SERVERS.items():
                folder = work / name / "bench0"
                folder.mkdir(parents=True)
                for number in range(args.files):
                    (folder / f"file-{number:05}.txt").write_bytes(b"x" * number)
                argv = server_argv(setup, work / name, GIB)
                argv += ["--users", str(users), "--rate-limit", str(connections.RATE_LIMIT)]
                servers[name] = stack.enter_context(ServerProcess(name, argv))
            echo_argv = [sys.executable, connections.__file__, "--echo-server"]
            servers["echo"] = stack.enter_context(
                ServerProcess("echo", echo_argv, ready=connections.ECHO_READY)
            )

            async def run(reactor: Any) -> dict[str, list[tuple[float, float]]]:
                rates: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
                for number in range(1, args.runs + 1):
                    print(f"run {number}:", flush=True)
                    for name, server in servers.items():
                        path, key = ("/", None) if name == "echo" else ("/command", token)
                        one, piped = await connections.round_trips(
                            reactor, server.port, server.pid, path, key, options
                        )
                        rates[name].append((one.per_second, piped.per_second))
                        print(one.line(f"{name} one at a time"))
                        print(piped.line(f"{name} pipelined"), flush=True)
                return rates

            rates = run_on_reactor(run, args.runs * len(servers) * 4 * (args.seconds + 30))
    print(f"\n{args.files} files, protocol {args.protocol}; medians of {args.runs} runs")
    print(
        "| server | lists/s one at a time | vs no-cache | vs echo"
        " | pipelined | vs no-cache | vs echo |"
    )
    print("|---|---|---|---|---|---|---|")
    median = {
        name: [statistics.median(r[i] for r in runs) for i in (0, 1)]
        for name, runs in rates.items()
    }
    for name in servers:
        one, piped = median[name]
        print(
            f"| {name} | {one:,.0f} | {one / median['no-cache'][0]:.2f}x"
            f" | {one / median['echo'][0]:.2f}x | {piped:,.0f}"
            f" | {piped / median['no-cache'][1]:.2f}x | {piped / median['echo'][1]:.2f}x |"
        )
    return 0


HASHES = ("sha256", "blake3")


async def hash_round(
    server: ServerProcess, source: Path, work: Path, expected: str, reactor: Any
) -> dict[str, Transfer]:
    """One round of --hash: the durable write, then each hash's upload and download."""
    from _common import check_copy
    from throughput import limit_run
    from twisted.internet import threads

    done = {}
    durable = work / "durable.bin"
    durable.unlink(missing_ok=True)
    done["durable write"] = await threads.deferToThread(
        limit_run, ["disk", str(source), str(durable)], 600.0
    )  # kept until just before the next round's (as throughput.py does): memory
    # freed long before is reclaimed by the host and costs far more to write into
    url = f"ws://{LOOPBACK}:{server.port}"
    client = await bounded(connect(url, reactor=reactor), CONNECT_TIMEOUT, reactor)
    watch = Stopwatch(server.pid)
    sink = work / "copy.bin"
    try:
        for name in HASHES:
            with contextlib.suppress(WsfilesError):  # not_found the first time
                await bounded(client.delete(FILE_NAME), CONNECT_TIMEOUT, reactor)
            with source.open("rb") as f:
                watch.start()
                await bounded(client.upload(FILE_NAME, f, hash=name), 600.0, reactor)
                done[f"{name} upload"] = watch.stop()
            with sink.open("wb") as f:
                watch.start()
                await bounded(client.download(FILE_NAME, f, hash=name), 600.0, reactor)
                done[f"{name} download"] = watch.stop()
            await threads.deferToThread(check_copy, f"{name} download", sink, expected)
    finally:
        await bounded(client.close(), CONNECT_TIMEOUT, reactor)
    return done


def hash_main(args: argparse.Namespace) -> int:
    header()
    tune_malloc()  # as the wsfiles command does
    with tempfile.TemporaryDirectory(prefix="wsfiles-levers-hash-") as temp:
        work = Path(temp)
        source = work / "source.bin"
        with announced(f"writing a {args.size}-byte source file"):
            expected = make_source(source, args.size)
        root = work / "root"
        root.mkdir()
        argv = server_argv("import wsfiles.storage.local", root, args.size)
        with ServerProcess("wsfiles", argv) as server:

            async def run(reactor: Any) -> dict[str, list[Transfer]]:
                results: dict[str, list[Transfer]] = {}
                for number in range(0, args.runs + 1):
                    print("warm-up (not counted):" if number == 0 else f"run {number}:")
                    for name, transfer in (
                        await hash_round(server, source, work, expected, reactor)
                    ).items():
                        print(f"  {name:16} {transfer.describe(args.size)}", flush=True)
                        if number:
                            results.setdefault(name, []).append(transfer)
                return results

            results = run_on_reactor(run)
    hash_report(args.size, results)
    return 0


def hash_report(size: int, results: dict[str, list[Transfer]]) -> None:
    per_gib = GIB / size

    def median(name: str, figure: Any) -> float:
        return statistics.median(figure(t) for t in results[name])

    rate = {name: size / median(name, lambda t: t.seconds) / MB for name in results}
    durable = rate["durable write"]
    print(f"\nmedians of {len(results['durable write'])} runs; durable write {durable:.1f} MB/s")
    print(
        "| hash | direction | MB/s | vs durable write | CPU s/GiB server / client / others"
        " | vs SHA-256: MB/s, server CPU, client CPU |"
    )
    print("|---|---|---|---|---|---|")
    for direction in ("upload", "download"):
        base = f"sha256 {direction}"
        for name in HASHES:
            key = f"{name} {direction}"
            cpu = [
                median(key, lambda t, side=side: getattr(t, side)) * per_gib
                for side in ("server_cpu", "client_cpu", "other_cpu")
            ]
            base_cpu = [
                median(base, lambda t, side=side: getattr(t, side)) * per_gib
                for side in ("server_cpu", "client_cpu")
            ]
            versus = (
                f"{rate[key] / rate[base]:.2f}x, {cpu[0] / base_cpu[0]:.2f}x,"
                f" {cpu[1] / base_cpu[1]:.2f}x"
            )
            durable_ratio = f"{rate[key] / durable:.2f}x" if direction == "upload" else "-"
            print(
                f"| {name} | {direction} | {rate[key]:.1f} | {durable_ratio}"
                f" | {cpu[0]:.2f} / {cpu[1]:.2f} / {cpu[2]:.2f} | {versus} |"
            )


def report(size: int, results: dict[str, list[Transfer]]) -> None:
    per_gib = GIB / size

    def medians(name: str) -> tuple[float, float, float, float]:
        runs = results[name]
        return (
            size / statistics.median(t.seconds for t in runs) / MB,
            statistics.median(t.server_cpu for t in runs) * per_gib,
            statistics.median(t.client_cpu for t in runs) * per_gib,
            statistics.median(t.other_cpu for t in runs) * per_gib,
        )

    base = medians("base")
    print(
        "\n| variant | upload MB/s | vs base | CPU s/GiB server / client / others"
        " | server CPU vs base |"
    )
    print("|---|---|---|---|---|")
    for name in results:
        rate, server, client, others = medians(name)
        print(
            f"| {name} | {rate:.1f} | {rate / base[0]:.2f}x"
            f" | {server:.2f} / {client:.2f} / {others:.2f} | {server / base[1]:.2f}x |"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=size_argument, default=GIB, help="upload size (default 1G)")
    parser.add_argument("--runs", type=int, default=5, help="counted rounds (default 5)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--list", action="store_true", help="measure the listing cache instead")
    parser.add_argument("--hash", action="store_true", help="BLAKE3 against SHA-256 instead")
    parser.add_argument("--files", type=int, default=0, help="--list: files in the folder (0)")
    parser.add_argument("--seconds", type=float, default=2.0, help="--list: per figure (2)")
    parser.add_argument("--protocol", choices=["1.1", "1.2"], default="1.1", help="--list")
    args = parser.parse_args(argv)
    if args.list:
        header()
        return list_main(args)
    if args.hash:
        return hash_main(args)
    variants = [name for name in args.variants.split(",") if name]
    if "base" not in variants or any(name not in VARIANTS for name in variants):
        parser.error(f"--variants: 'base' and names from {', '.join(VARIANTS)}")
    header()
    tune_malloc()  # as the wsfiles command does
    with tempfile.TemporaryDirectory(prefix="wsfiles-levers-") as temp:
        work = Path(temp)
        source = work / "source.bin"
        with announced(f"writing a {args.size}-byte source file"):
            make_source(source, args.size)
        with contextlib.ExitStack() as stack:
            servers = {}
            for setup in dict.fromkeys(VARIANTS[name][0] for name in variants):
                root = work / f"{setup}-root"
                root.mkdir()
                servers[setup] = stack.enter_context(
                    ServerProcess(setup, server_argv(SERVER_SETUP[setup], root, args.size))
                )
            results = run_on_reactor(
                lambda reactor: measure(servers, source, variants, args.runs, reactor)
            )
    report(args.size, results)
    return 0


if __name__ == "__main__":
    run_script(main)
