"""``wsfiles sync`` end to end: a real ``twistd wsfiles`` and ``wsfiles sync`` processes.

Two live syncs on two local folders against one server must converge after
edits, renames, deletes and conflicts; a sync killed mid-transfer, or a server
restarted mid-sync, must converge too.  Convergence is polled on a deadline
(the processes cannot signal us), never slept for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import free_port
from conftest import BIN, TEARDOWN_TIMEOUT, run_process, spawn_process
from twisted.internet import defer, reactor, task

from wsfiles.client import WsfilesError

#: Every convergence must happen within this (the issue's bound).
CONVERGE_SECONDS = 10.0
MiB = 1024 * 1024
CONFLICT = re.compile(r"^a \(conflict [^ ()]+ \d{4}-\d\d-\d\d \d{6}\)\.txt$")


def tree(root: Path, hidden: str = ".wsfiles-sync") -> dict[str, bytes]:
    """Every file under ``root`` by relative path, the sync's state folder (or,
    for a server's root, its ``.wsfiles-`` folders) left out.  A sync may be
    changing the tree meanwhile: what vanishes during the walk is left out
    (os.walk skips a folder it cannot list), so callers poll until it holds."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if rel.startswith(hidden) or path.is_symlink() or not path.is_file():
                continue  # (a FIFO is not read: it would block)
            try:
                files[rel] = path.read_bytes()
            except (FileNotFoundError, IsADirectoryError):
                continue
    return files


def write(path: Path, data: bytes, age: float = 60.0) -> None:
    """Write a file as finished a while ago (past the sync's 2 s quiet time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age
    os.utime(path, (then, then))


async def until(
    condition: Callable[[], bool],
    what: str,
    seconds: float = CONVERGE_SECONDS,
    every: float = 0.1,
) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds, at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        await task.deferLater(reactor, every, lambda: None)
    raise AssertionError(f"not within {seconds} s: {what}")


class Syncs:
    """``wsfiles sync`` processes of one test; any still running is killed at teardown."""

    def __init__(self) -> None:
        self.running: list[tuple[Any, Any]] = []

    def start(self, local: Path, url: str, *args: str) -> tuple[Any, Any]:
        child = spawn_process([str(BIN / "wsfiles"), "sync", str(local), url, *args])
        self.running.append(child)
        return child

    async def stop(self, child: tuple[Any, Any], signal_name: str = "INT") -> int:
        """Ctrl-C (or SIGTERM): the sync must stop with one line; its status."""
        process, proto = child
        process.signalProcess(signal_name)
        code = await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
        self.running.remove(child)
        return code

    async def kill(self, child: tuple[Any, Any]) -> None:
        process, proto = child
        process.signalProcess(signal.SIGKILL)
        await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
        self.running.remove(child)


@pytest.fixture
def syncs():
    started = Syncs()
    yield started
    for process, proto in started.running:
        if not proto.ended.called:
            process.signalProcess(signal.SIGKILL)
            pytest_twisted.blockon(proto.ended)


async def sync_once(local: Path, url: str, *args: str) -> tuple[int, str, str]:
    return await run_process([str(BIN / "wsfiles"), "sync", str(local), url, "--once", *args])


@pytest_twisted.ensureDeferred
async def test_two_live_syncs_converge_after_edits_renames_deletes_and_conflicts(
    twistd_factory, tmp_path, syncs
):
    srv = await twistd_factory()
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "a.txt", b"first")
    write(a / "docs" / "report.txt", b"report")
    write(a / "gone.txt", b"to be deleted")
    write(b / "from-b.txt", b"b was here")
    one, two = syncs.start(a, srv.url, "docs-root"), syncs.start(b, srv.url, "docs-root")
    everything = {
        "a.txt": b"first",
        "docs/report.txt": b"report",
        "gone.txt": b"to be deleted",
        "from-b.txt": b"b was here",
    }
    await until(lambda: tree(a) == tree(b) == everything, "the first sync")
    assert tree(srv.root / "docs-root", ".wsfiles-") == everything

    # An edit on b, a rename (to another folder) on a, a delete on b; a file
    # written just now (inside the quiet time) arrives too.
    write(b / "a.txt", b"second")
    (a / "docs" / "report.txt").rename(a / "report-final.txt")
    (b / "gone.txt").unlink()
    (a / "fresh.txt").write_bytes(b"just written")
    expected = {
        "a.txt": b"second",
        "report-final.txt": b"report",
        "from-b.txt": b"b was here",
        "fresh.txt": b"just written",
    }
    await until(lambda: tree(a) == tree(b) == expected, "edits, a rename and a delete")
    assert not (b / "docs").exists()  # emptied by the sync's rename: removed

    # A conflict made on b's side: b stops, both change a.txt, b comes back.
    # The server's copy (a's) keeps the name; b's is kept under a conflict name,
    # on both sides.
    assert await syncs.stop(two) == 130
    assert "interrupted" in two[1].err.decode() and "Traceback" not in two[1].err.decode()
    write(a / "a.txt", b"third, from a")
    await until(lambda: tree(srv.root / "docs-root").get("a.txt") == b"third, from a", "a's edit")
    write(b / "a.txt", b"third, from b", age=30)
    two = syncs.start(b, srv.url, "docs-root")
    await until(lambda: tree(a) == tree(b) and len(tree(a)) == 5, "the conflict resolved")
    copies = [name for name in tree(a) if name.startswith("a (")]
    assert len(copies) == 1 and CONFLICT.match(copies[0]), copies
    assert tree(a)["a.txt"] == b"third, from a" and tree(a)[copies[0]] == b"third, from b"
    assert "conflict: a.txt changed on both sides" in two[1].err.decode()

    # The same on a's side: a loses this time (the server has b's edit).  a is
    # stopped as systemd or docker would: SIGTERM ends it by that signal.
    assert await syncs.stop(one, "TERM") == -signal.SIGTERM
    said = one[1].err.decode()
    assert "wsfiles sync: terminated; what was done is recorded" in said and "Traceback" not in said
    write(b / "from-b.txt", b"b edits")
    await until(lambda: tree(srv.root / "docs-root")["from-b.txt"] == b"b edits", "b's edit")
    write(a / "from-b.txt", b"a edits", age=30)
    one = syncs.start(a, srv.url, "docs-root")
    await until(lambda: tree(a) == tree(b) and len(tree(a)) == 6, "the second conflict")
    loser = [n for n in tree(b) if n.startswith("from-b (conflict ")]
    assert (
        len(loser) == 1 and tree(b)[loser[0]] == b"a edits" and tree(b)["from-b.txt"] == b"b edits"
    ), (tree(b), one[1].out.decode(), one[1].err.decode())
    assert tree(srv.root / "docs-root") == tree(a)


@pytest_twisted.ensureDeferred
async def test_a_sync_killed_mid_download_resumes_and_never_leaves_half_a_file(
    twistd_factory, tmp_path, syncs
):
    srv = await twistd_factory()
    big = os.urandom(96 * MiB)
    write(srv.root / "big.bin", big)
    local = tmp_path / "here"
    local.mkdir()
    partials = local / ".wsfiles-sync" / "partial"

    def held() -> int:
        return sum(p.stat().st_size for p in partials.glob("*")) if partials.exists() else 0

    child = syncs.start(local, srv.url, "--once")
    await until(lambda: held() > 8 * MiB or child[1].ended.called, "a partial download", every=0.01)
    await syncs.kill(child)
    assert not (local / "big.bin").exists()  # never half a file in place
    code, _, err = await sync_once(local, srv.url)
    assert code == 0, err
    assert hashlib.sha256((local / "big.bin").read_bytes()).digest() == hashlib.sha256(big).digest()
    assert list(partials.glob("*")) == []
    last_get = srv.output.split("get 'big.bin'")[-1].split("\n")[0]
    assert "(from offset 0)" not in last_get  # resumed, not fetched again
    # The local file has the server's mtime, and a second run has nothing to do.
    assert int((local / "big.bin").stat().st_mtime) == int((srv.root / "big.bin").stat().st_mtime)
    code, out, err = await sync_once(local, srv.url, "--json")
    assert (code, out, err) == (0, "", "")


@pytest_twisted.ensureDeferred
async def test_a_sync_killed_mid_upload_resumes_and_the_server_never_shows_half_a_file(
    twistd_factory, tmp_path, syncs
):
    srv = await twistd_factory()
    local = tmp_path / "here"
    big = os.urandom(96 * MiB)
    write(local / "big.bin", big)
    partials = srv.root / ".wsfiles-partial" / "@anonymous"

    def received() -> int:
        return sum(p.stat().st_size for p in partials.glob("*")) if partials.exists() else 0

    child = syncs.start(local, srv.url, "--once")
    await until(
        lambda: received() > 8 * MiB or child[1].ended.called, "a partial upload", every=0.01
    )
    await syncs.kill(child)
    assert not (srv.root / "big.bin").exists()  # a save appears whole or not at all
    code, out, err = await sync_once(local, srv.url)
    assert (code, out) == (0, "upload    big.bin (96.0 MiB)\n"), err
    assert (srv.root / "big.bin").read_bytes() == big
    last_save = srv.output.split("save 'big.bin'")[-1].split("\n")[0]
    assert "(from offset 0)" not in last_save  # resumed, not sent again


@pytest_twisted.ensureDeferred
async def test_a_live_sync_rides_out_a_server_restart(twistd_factory, tmp_path, syncs):
    port = free_port()
    listen = ("--listen", f"tcp:{port}:interface=127.0.0.1")
    root = tmp_path / "server"
    srv = await twistd_factory(*listen, root=root)
    url = f"ws://127.0.0.1:{port}"
    local = tmp_path / "here"
    write(local / "before.txt", b"before")
    child = syncs.start(local, url)
    await until(lambda: (root / "before.txt").exists(), "the first upload")
    await srv.stop()
    write(local / "while-down.txt", b"made while the server was down")
    # Not a save through the server, so no `changed` event: only the full
    # reconcile after reconnecting finds it.
    write(root / "from-server.txt", b"put on the server")
    srv = await twistd_factory(*listen, root=root)
    await until(
        lambda: (root / "while-down.txt").exists() and (local / "from-server.txt").exists(),
        "both ways after the restart",
    )
    assert (root / "while-down.txt").read_bytes() == b"made while the server was down"
    assert "reconnect" in child[1].err.decode()


@pytest_twisted.ensureDeferred
async def test_a_live_sync_with_poll_uploads_local_changes(twistd_factory, tmp_path, syncs):
    """``--poll``, for network file systems (inotify misses other machines'
    changes there): no inotify, and local changes still go up.  That the
    rescans come on time is pinned with a fake clock in test_sync_watch.py."""
    local = tmp_path / "here"
    for value, refused in (("0", "must be from 0.1 to 86400 seconds"), ("x", "not a number")):
        argv = [str(BIN / "wsfiles"), "sync", str(local), "ws://h", "--poll", value]
        code, _, err = await run_process(argv)
        assert code == 2 and f"--poll: {refused}" in err and repr(value) in err, err
    code, _, err = await sync_once(local, "ws://127.0.0.1:9", "--poll", "5")
    assert code == 2 and "--poll is for live mode: not with --once or --dry-run" in err, err
    srv = await twistd_factory()
    child = syncs.start(local, srv.url, "--poll", "0.2")
    write(local / "first.txt", b"found by a rescan")
    await until(lambda: tree(srv.root, ".wsfiles-") == {"first.txt": b"found by a rescan"}, "poll")
    write(local / "first.txt", b"and its edit")
    await until(lambda: tree(srv.root, ".wsfiles-") == {"first.txt": b"and its edit"}, "the edit")
    assert "inotify" not in child[1].err.decode()  # asked for: no notice


@pytest_twisted.ensureDeferred
async def test_a_round_that_would_delete_most_files_stops_until_allowed(
    twistd_factory, tmp_path, syncs
):
    """The mass-delete guard (--max-delete, 50% by default): most local files
    deleted by mistake must not empty the server without a second word, in
    live mode (the deletion seen whole) as with --once."""
    srv = await twistd_factory()
    local = tmp_path / "here"
    for i in range(20):
        write(local / f"f{i:02}.txt", b"%d" % i)
    live = syncs.start(local, srv.url)
    await until(lambda: len(tree(srv.root, ".wsfiles-")) == 20, "the first sync")
    for i in range(15):
        (local / f"f{i:02}.txt").unlink()
    code = await live[1].ended.addTimeout(CONVERGE_SECONDS, reactor)
    syncs.running.remove(live)
    stopped = "stopped before deleting 15 of the 20 files on the server (75%, more than"
    assert code == 1 and stopped in live[1].err.decode(), live[1].err.decode()
    assert len(tree(srv.root, ".wsfiles-")) == 20  # nothing was deleted
    code, out, err = await sync_once(local, srv.url, "--dry-run")
    assert code == 1 and out.count("delete ") == 15 and stopped in err, out  # the plan, and why
    code, _, err = await sync_once(local, srv.url, "--max-delete", "70")
    assert code == 1 and stopped in err and len(tree(srv.root, ".wsfiles-")) == 20, err
    code, _, err = await sync_once(local, srv.url, "--max-delete", "75")
    assert code == 0, err
    assert tree(srv.root, ".wsfiles-") == tree(local) and len(tree(local)) == 5
    code, _, err = await sync_once(local, srv.url, "--max-delete", "101")
    assert code == 2 and "--max-delete: must be from 0 to 100: '101'" in err, err
    code, _, err = await sync_once(local, srv.url, "--max-delete", "half")
    assert code == 2 and "--max-delete: not a percentage: 'half'" in err, err


@pytest_twisted.ensureDeferred
async def test_a_move_done_as_copy_then_delete_is_not_stopped_as_a_mass_delete(
    twistd_factory, tmp_path, syncs
):
    """Copies still inside the quiet time cannot pair with the deleted files
    as renames yet: the guard looks again once they settle, and sees renames."""
    srv = await twistd_factory()
    local = tmp_path / "here"
    files = {f"{i:02}.txt": b"%d" % i for i in range(12)}
    for name, data in files.items():
        write(local / "a" / name, data)
    child = syncs.start(local, srv.url)
    await until(lambda: len(tree(srv.root, ".wsfiles-")) == 12, "the first sync")
    for name, data in files.items():  # cp -r a b; rm -r a
        write(local / "b" / name, data, age=0)
        (local / "a" / name).unlink()
    moved = {f"b/{name}": data for name, data in files.items()}
    await until(lambda: tree(srv.root, ".wsfiles-") == moved, "the move")
    assert not child[1].ended.called and "stopped" not in child[1].err.decode()


@pytest_twisted.ensureDeferred
async def test_dry_run_changes_nothing_and_refused_names_are_warned_and_skipped(
    twistd_factory, tmp_path
):
    srv = await twistd_factory()
    write(srv.root / "remote.txt", b"remote")
    local = tmp_path / "here"
    write(local / "local.txt", b"local")
    write(local / "back\\slash.txt", b"refused")
    write(local / ".wsfiles-mine", b"reserved prefix")
    before_local, before_remote = tree(local), tree(srv.root, ".wsfiles-")

    code, out, err = await sync_once(local, srv.url, "--dry-run", "--json")
    assert code == 0, err
    planned = [json.loads(line) for line in out.splitlines()]
    assert {(e["event"], e.get("action"), e["path"]) for e in planned if e["event"] == "plan"} == {
        ("plan", "upload", "local.txt"),
        ("plan", "download", "remote.txt"),
    }
    assert tree(local) == before_local and tree(srv.root, ".wsfiles-") == before_remote
    assert not (local / ".wsfiles-sync").exists()

    # --up-only changes only the server; --down-only then only the local side.
    code, out, err = await sync_once(local, srv.url, "--up-only")
    assert code == 0, err
    assert out == "upload    local.txt (5 B)\n"
    assert set(tree(srv.root, ".wsfiles-")) == {"remote.txt", "local.txt"}
    assert tree(local) == before_local
    write(local / "local.txt", b"local, edited")
    code, out, err = await sync_once(local, srv.url, "--down-only")
    assert code == 0, err
    assert out == "download  remote.txt (6 B)\n"
    assert tree(srv.root, ".wsfiles-")["local.txt"] == b"local"

    code, out, err = await sync_once(local, srv.url)
    assert code == 0, err
    assert out == "upload    local.txt (13 B)\n"
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and all(line.startswith("wsfiles sync: skipped ") for line in skipped)
    assert "back\\slash.txt" in err and ".wsfiles-mine" in err
    assert tree(srv.root, ".wsfiles-") == {"remote.txt": b"remote", "local.txt": b"local, edited"}
    assert tree(local)["remote.txt"] == b"remote"


@pytest_twisted.ensureDeferred
async def test_many_deletes_wait_for_the_command_rate_limit(twistd_factory, tmp_path):
    """Deletes are charged to --rate-limit (transfers are not): a sync that
    deletes more than a burst waits for the limit instead of failing."""
    srv = await twistd_factory("--rate-limit", "5")
    local = tmp_path / "here"
    for i in range(12):
        write(local / "many" / f"{i}.txt", b"%d" % i)
    code, _, err = await sync_once(local, srv.url)
    assert code == 0, err
    assert len(tree(srv.root / "many")) == 12
    for path in (local / "many").iterdir():
        path.unlink()
    code, out, err = await sync_once(local, srv.url, "--max-delete", "100")  # all, on purpose
    assert (code, err) == (0, ""), err
    assert out.count("(on the server)") == 12 and tree(srv.root, ".wsfiles-") == {}


@pytest_twisted.ensureDeferred
async def test_pipelined_downloads_each_get_their_own_bytes_when_some_fail_without_any(
    server_factory, monkeypatch
):
    """What the sync's downloads rely on: many gets in flight on one
    connection, some failing without a message (their file gone by the time
    their turn comes in the server's queue), and every download still gets
    exactly its own file's bytes."""
    from wsfiles.storage import NotFound
    from wsfiles.storage.local import LocalFolder

    srv = await server_factory()
    files = {f"f{i:03d}": os.urandom(500 + 37 * i) for i in range(40)}
    for name, data in files.items():
        await srv.put(name, data)
    doomed = set(list(files)[::5])
    opened = LocalFolder.open_download

    def gone_when_its_turn_comes(self, name, *args, **kwargs):
        if name in doomed:
            return defer.fail(NotFound(name))
        return opened(self, name, *args, **kwargs)

    monkeypatch.setattr(LocalFolder, "open_download", gone_when_its_turn_comes)
    client = await srv.connect()
    # The command channel lags 20 ms behind the file channel (two
    # connections: nothing orders one against the other), so a file's
    # not_found comes after the next file's bytes.
    lagging: deque[dict[str, Any]] = deque()
    deliver = client._received

    def lag(message: dict[str, Any]) -> None:
        lagging.append(message)
        reactor.callLater(0.02, lambda: deliver(lagging.popleft()))

    client._received = lag
    sinks = {name: io.BytesIO() for name in files}

    async def get(name: str) -> str:
        try:
            await client.download(name, sinks[name], pipelined=True)
        except WsfilesError as e:
            return e.code
        return "ok"

    outcomes = await defer.gatherResults([defer.ensureDeferred(get(name)) for name in sinks])
    assert dict(zip(sinks, outcomes, strict=True)) == {
        name: "not_found" if name in doomed else "ok" for name in sinks
    }
    assert {name: sinks[name].getvalue() for name in files if name not in doomed} == {
        name: data for name, data in files.items() if name not in doomed
    }


@pytest_twisted.ensureDeferred
async def test_one_file_over_max_size_does_not_keep_the_small_files_from_uploading(
    twistd_factory, tmp_path
):
    """A file the server refuses as too_large is that file's problem: the small
    files around it (sent together in a save_batch) are still uploaded."""
    srv = await twistd_factory("--max-size", "64K")
    local = tmp_path / "here"
    write(local / "big.bin", b"b" * 100_000)
    write(local / "small.txt", b"small")
    code, _, err = await sync_once(local, srv.url)
    assert tree(srv.root, ".wsfiles-") == {"small.txt": b"small"}
    assert code != 0 and "big.bin" in err


@pytest_twisted.ensureDeferred
async def test_a_partial_download_longer_than_the_servers_file_is_started_over(
    twistd_factory, tmp_path
):
    """A killed run left a partial of an older, longer version of the file:
    the next run fetches the new one instead of failing on every round."""
    from wsfiles.sync.state import partial_path

    srv = await twistd_factory()
    write(srv.root / "doc.txt", b"the new, shorter text")
    local = tmp_path / "here"
    partial = partial_path(local, "doc.txt")  # (makes its folder)
    partial.write_bytes(b"an older version of the text, killed part way " * 10)
    code, _, err = await sync_once(local, srv.url)
    assert code == 0, err
    assert tree(local) == {"doc.txt": b"the new, shorter text"}


@pytest_twisted.ensureDeferred
async def test_a_batch_refused_whole_for_quota_falls_back_to_single_saves(twistd_factory, tmp_path):
    """Three small files over the client's byte quota together: the server
    refuses their save_batch whole; the sync saves them one by one, so the
    two that fit are stored and the third's refusal names it."""
    srv = await twistd_factory("--quota", "10K")
    local = tmp_path / "here"
    for name in ("a.bin", "b.bin", "c.bin"):
        write(local / name, b"q" * 4000)
    code, _, err = await sync_once(local, srv.url)
    assert code == 1
    stored = tree(srv.root, ".wsfiles-")
    assert len(stored) == 2 and set(stored.values()) == {b"q" * 4000}
    (refused,) = {"a.bin", "b.bin", "c.bin"} - set(stored)
    assert "quota_exceeded" in err and refused in err
    assert "Traceback" not in err
