"""Scale-out, end to end on one machine: Ceph RGW, three twistd instances, HAProxy.

Everything listens on 127.0.0.1.  HAProxy runs the shipped
contrib/haproxy/wsfiles.cfg with the instances' addresses in its environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import free_port
from conftest import TEARDOWN_TIMEOUT, http_get, spawn_process
from twisted.internet import reactor, task

from wsfiles.client import connect

HAPROXY = shutil.which("haproxy")
CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "haproxy"

pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="Debian's haproxy is not installed"),
    pytest.mark.timeout(300),
]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_offers(client: Any) -> list[str]:
    """The instance ids of the tickets the client is offered, in order."""
    instances: list[str] = []
    original = client._received

    def spy(message: dict[str, Any]) -> None:
        if message.get("op") == "channel":
            instances.append(message["url"].split("ticket=")[1].split(".")[0])
        original(message)

    client._received = spy
    return instances


@pytest_twisted.async_yield_fixture
async def cluster(ceph_rgw, redis_server, twistd_factory, tmp_path):
    bucket = "wsfiles-" + secrets.token_hex(6)
    ceph_rgw.create_bucket(bucket)
    keys = tmp_path / "s3-keys"
    keys.write_text(f"{ceph_rgw.access_key} {ceph_rgw.secret_key}\n")
    instances = {}
    for name in "abc":
        instances[name] = await twistd_factory(
            "--storage", "s3", "--s3-endpoint", ceph_rgw.endpoint, "--s3-bucket", bucket,
            "--s3-credentials", str(keys), "--instance-id", name,
            "--trusted-proxy", "127.0.0.1", "--redis", redis_server.url,
            "--quota", "70M",
            root=tmp_path / f"root-{name}",
        )  # fmt: skip
    async with haproxy(instances) as url:
        yield {"url": url, "instances": instances, "redis": redis_server}


@contextlib.asynccontextmanager
async def haproxy(instances: dict[str, Any]) -> AsyncIterator[str]:
    """The shipped contrib/haproxy/wsfiles.cfg in front of instances a, b, c; its ws:// URL."""
    port = free_port()
    env = {
        "WSFILES_BIND": f"127.0.0.1:{port}",
        "WSFILES_TICKET_MAP": str(CONTRIB / "tickets.map"),
        **{f"WSFILES_{n.upper()}": srv.url.split("://")[1] for n, srv in instances.items()},
    }
    process, proto = spawn_process([HAPROXY, "-db", "-f", str(CONTRIB / "wsfiles.cfg")], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        # HAProxy is another process: poll until it answers through a healthy
        # instance, bounded.
        for _ in range(500):
            try:
                if (await http_get(url + "/healthz"))[0] == 200:
                    break
            except Exception:
                pass
            await task.deferLater(reactor, 0.02, lambda: None)
        else:
            raise AssertionError(f"HAProxy never became ready: {proto.err.decode()}")
        yield f"ws://127.0.0.1:{port}"
    finally:
        process.signalProcess("TERM")
        await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)


async def logged(server: Any, text: str) -> None:
    """Wait (bounded) until the twistd process has written ``text``."""
    for _ in range(500):
        if text in server.output:
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"never logged {text!r}:\n{server.output}")


@pytest_twisted.ensureDeferred
async def test_health_checks_stay_out_of_the_access_log(twistd_factory):
    """HAProxy asks /healthz every second: that must not be a log line each."""
    srv = await twistd_factory()
    async with haproxy({"a": srv, "b": srv, "c": srv}) as url:
        base = url.replace("ws://", "http://")
        for _ in range(3):
            assert (await http_get(base + "/healthz"))[0] == 200
        assert (await http_get(base + "/"))[0] == 200  # a page: logged
        await logged(srv, '"GET / HTTP/1.0" 200')
    assert "/healthz" not in srv.output


@pytest_twisted.ensureDeferred
async def test_clients_on_different_instances_share_files(cluster):
    writer = await connect(cluster["url"])
    reader = await connect(cluster["url"])
    writer_offers, reader_offers = record_offers(writer), record_offers(reader)
    try:
        data = os.urandom(10 * 1024 * 1024)
        await writer.upload("shared.bin", data)
        sink = io.BytesIO()
        sent = await reader.download("shared.bin", sink)
        assert sink.getvalue() == data and sent["sha256"] == sha(data)
        # Round robin put them on two instances, and each file channel went
        # to the instance that issued its ticket (or the transfer would fail).
        assert writer_offers and reader_offers and writer_offers[0] != reader_offers[0]
    finally:
        await writer.close()
        await reader.close()


@pytest_twisted.ensureDeferred
async def test_an_instance_killed_mid_upload_the_client_completes_elsewhere(cluster):
    client = await connect(cluster["url"])
    offers = record_offers(client)
    killed: list[str] = []
    original = client._received

    def kill_on_ready(message: dict[str, Any]) -> None:
        original(message)
        if message.get("op") == "ready" and not killed:
            killed.append(offers[-1])
            cluster["instances"][offers[-1]].process.signalProcess("KILL")

    client._received = kill_on_ready
    try:
        data = os.urandom(32 * 1024 * 1024)
        ack = await client.upload("survivor.bin", data, resume=True, retries=10)
        assert ack["sha256"] == sha(data)
        assert killed and offers[-1] != killed[0]
        check = await connect(cluster["url"])
        try:
            sink = io.BytesIO()
            await check.download("survivor.bin", sink)
            assert sink.getvalue() == data
        finally:
            await check.close()
    finally:
        await client.close()


async def two_instances(url: str) -> tuple[Any, Any]:
    """Two clients that round robin put on different instances (told by their tickets)."""
    first, second = await connect(url), await connect(url)
    offers = [record_offers(first), record_offers(second)]
    await first.upload("probe-1", b"1")
    await second.upload("probe-2", b"2")
    assert offers[0][0] != offers[1][0]
    return first, second


async def next_change_naming(client: Any, name: str) -> list[dict[str, Any]]:
    """The next ``changed`` event that lists ``name`` (earlier ones are skipped)."""
    for _ in range(20):
        files = await client.changes.get().addTimeout(20, reactor)
        if any(f["name"] == name for f in files):
            return files
    raise AssertionError(f"no changed event named {name}")


@pytest_twisted.ensureDeferred
async def test_changed_events_cross_instances_and_survive_a_redis_restart(cluster):
    writer, watcher = await two_instances(cluster["url"])
    try:
        await writer.upload("news.txt", b"first")
        files = await next_change_naming(watcher, "news.txt")
        assert {"news.txt", "probe-1", "probe-2"} <= {f["name"] for f in files}

        cluster["redis"].stop()
        await writer.upload("offline.txt", b"no bus")  # still stored while Redis is down
        cluster["redis"].start()
        # Once the instances are back on Redis, events cross again.
        await writer.upload("after.txt", b"second")
        files = await next_change_naming(watcher, "after.txt")
        assert {"news.txt", "offline.txt", "after.txt"} <= {f["name"] for f in files}
    finally:
        await writer.close()
        await watcher.close()


@pytest_twisted.ensureDeferred
async def test_the_quota_holds_across_instances_under_concurrent_saves(cluster):
    from twisted.internet import defer

    from wsfiles.client import WsfilesError

    first, second = await two_instances(cluster["url"])
    try:
        data = os.urandom(40 * 1024 * 1024)  # two of these exceed the 70M quota
        results = await defer.DeferredList(
            [
                defer.ensureDeferred(first.upload("one.bin", data)),
                defer.ensureDeferred(second.upload("two.bin", data)),
            ],
            consumeErrors=True,
        )
        outcomes = [ok for ok, _ in results]
        assert outcomes.count(True) == 1, results
        failure = next(value for ok, value in results if not ok)
        assert failure.check(WsfilesError) and failure.value.code == "quota_exceeded"
    finally:
        await first.close()
        await second.close()


@pytest_twisted.ensureDeferred
async def test_folders_across_instances_nested_save_move_listing_and_events(cluster):
    """Protocol 1.2 on S3 behind HAProxy: what one instance does, another lists,
    and the folder's changed event crosses instances through Redis."""
    from wsfiles.client import COMMAND_SUBPROTOCOLS

    writer = await connect(cluster["url"], subprotocols=COMMAND_SUBPROTOCOLS)
    watcher = await connect(cluster["url"], subprotocols=COMMAND_SUBPROTOCOLS)
    offers = [record_offers(writer), record_offers(watcher)]
    try:
        await writer.upload("probe-w", b"w")
        await watcher.upload("probe-r", b"r")
        assert offers[0][0] != offers[1][0]  # two instances
        data = os.urandom(300_000)
        await writer.upload("albums/2026/photo.jpg", data)
        for _ in range(20):  # skip other folders' events, bounded
            event = await watcher.folder_changes.get().addTimeout(20, reactor)
            if event.get("path") == "albums/2026":
                break
        assert [e["name"] for e in event["files"]] == ["photo.jpg"]
        await writer.rename("albums", "archive/albums")
        tree = await watcher.list("archive", recursive=True)
        assert [e["name"] for e in tree] == [
            "albums",
            "albums/2026",
            "albums/2026/photo.jpg",
        ]
        sink = io.BytesIO()
        await watcher.download("archive/albums/2026/photo.jpg", sink)
        assert sink.getvalue() == data
        assert "albums" not in [e["name"] for e in await watcher.list()]
    finally:
        await writer.close()
        await watcher.close()
