"""The S3 backend against a real Ceph RADOS Gateway on loopback.

The same protocol, the same client; only the storage behind the session changes.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import xml.etree.ElementTree as ElementTree

import pytest
import pytest_twisted
from conftest import InProcessServer, _TrackingFactory
from twisted.internet import defer, endpoints, reactor

from wsfiles.client import WsfilesError
from wsfiles.config import Settings
from wsfiles.storage.s3 import PART_SIZE, S3Client, S3Storage
from wsfiles.web import WsfilesSite

pytestmark = pytest.mark.timeout(300)  # the first test pays for installing and starting Ceph


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest_twisted.async_yield_fixture
async def s3_server(ceph_rgw, tmp_path):
    bucket = "wsfiles-" + secrets.token_hex(6)
    ceph_rgw.create_bucket(bucket)
    client = S3Client(reactor, ceph_rgw.endpoint, bucket, ceph_rgw.access_key, ceph_rgw.secret_key)
    storage = S3Storage(client)
    site = WsfilesSite(Settings(max_size=64 * 1024**2), storage, None, reactor)
    tracker = _TrackingFactory(site)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(tracker)
    server = InProcessServer(site, tmp_path, f"ws://127.0.0.1:{port.getHost().port}", port, tracker)
    server.bucket = bucket
    server.rgw = ceph_rgw
    yield server
    await server.stop()
    await storage.close()


async def settled_uploads(server) -> list[str]:
    """Unfinished multipart uploads, once the aborts under way are done."""
    await server.site.storage.client.idle()
    return unfinished_uploads(server)


def unfinished_uploads(server) -> list[str]:
    response = server.rgw.request("GET", server.bucket, query={"uploads": ""})
    assert response.status == 200, response.body
    root = ElementTree.fromstring(response.body)
    return [e.text for e in root.iter() if e.tag.endswith("UploadId")]


@pytest_twisted.ensureDeferred
async def test_small_and_multipart_files_round_trip(s3_server):
    client = await s3_server.connect()
    assert client.hello["files"] == []
    small, big = os.urandom(100_000), os.urandom(2 * PART_SIZE + 12345)
    assert (await client.upload("small.bin", small))["sha256"] == sha(small)
    assert (await client.upload("big.bin", big))["sha256"] == sha(big)
    files = {f["name"]: f["size"] for f in await client.list()}
    assert files == {"small.bin": len(small), "big.bin": len(big)}
    for name, data in (("small.bin", small), ("big.bin", big)):
        sink = io.BytesIO()
        sent = await client.download(name, sink)
        assert sink.getvalue() == data and sent["sha256"] == sha(data)
    assert await settled_uploads(s3_server) == []


@pytest_twisted.ensureDeferred
async def test_ranged_get_and_empty_file(s3_server):
    client = await s3_server.connect()
    await client.upload("empty", b"")
    sink = io.BytesIO()
    assert (await client.download("empty", sink))["size"] == 0 and sink.getvalue() == b""
    data = os.urandom(300_000)
    await client.upload("f", data)
    from test_protocol_11 import raw_get

    replies, received = await raw_get(client, {"op": "get", "name": "f", "offset": 1000})
    assert received == data[1000:] and replies[-1]["sha256"] == sha(data)


@pytest_twisted.ensureDeferred
async def test_a_refused_upload_leaves_nothing_in_the_store(s3_server):
    client = await s3_server.connect()
    await client.upload("keep", b"old")
    data = os.urandom(PART_SIZE + 1000)
    with pytest.raises(WsfilesError) as refused:
        await client.upload("keep", data, size=len(data) - 10)  # more than declared
    assert refused.value.code == "size_mismatch"
    request_id = client.send(
        {"op": "save", "name": "keep", "size": len(data), "sha256": sha(b"other")}
    )
    reply = await client.reply(request_id)
    if reply["op"] == "channel":
        await client._open_file_channel(reply["url"])
        reply = await client.reply(request_id)
    assert reply["op"] == "ready"
    client.send_on_file_channel(data)
    assert (await client.reply(request_id))["code"] == "checksum_mismatch"
    sink = io.BytesIO()
    await client.download("keep", sink)
    assert sink.getvalue() == b"old"
    assert [f["name"] for f in await client.list()] == ["keep"]
    assert await settled_uploads(s3_server) == []


@pytest_twisted.ensureDeferred
async def test_delete_and_rename_in_the_store(s3_server):
    client = await s3_server.connect()
    await client.upload("a", b"A")
    await client.upload("b", b"B")
    with pytest.raises(WsfilesError) as refused:
        await client.rename("a", "b")
    assert refused.value.code == "exists"
    await client.rename("a", "c")
    await client.rename("c", "b", overwrite=True)
    assert [f["name"] for f in await client.list()] == ["b"]
    sink = io.BytesIO()
    await client.download("b", sink)
    assert sink.getvalue() == b"A"
    await client.delete("b")
    with pytest.raises(WsfilesError) as refused:
        await client.delete("b")
    assert refused.value.code == "not_found"
    assert await client.list() == []


@pytest_twisted.ensureDeferred
async def test_twistd_with_storage_s3(ceph_rgw, twistd_factory, tmp_path):
    from wsfiles.client import connect

    bucket = "wsfiles-" + secrets.token_hex(6)
    ceph_rgw.create_bucket(bucket)
    keys = tmp_path / "s3-keys"
    keys.write_text(f"{ceph_rgw.access_key} {ceph_rgw.secret_key}\n")
    srv = await twistd_factory(
        "--storage", "s3", "--s3-endpoint", ceph_rgw.endpoint, "--s3-bucket", bucket,
        "--s3-credentials", str(keys),
    )  # fmt: skip
    client = await connect(srv.url)
    try:
        data = os.urandom(PART_SIZE + 5)
        await client.upload("via-twistd", data)
        sink = io.BytesIO()
        await client.download("via-twistd", sink)
        assert sink.getvalue() == data
    finally:
        await client.close()
    assert await srv.stop() in (0, -15)
    assert "Traceback" not in srv.output


@pytest_twisted.ensureDeferred
async def test_a_resumable_upload_carries_on_from_the_stored_parts(s3_server):
    from test_protocol_11 import cut_file_channel, resume_offset, start_resumable

    client = await s3_server.connect()
    data = os.urandom(2 * PART_SIZE + 777)
    first = await start_resumable(client, "big", data, PART_SIZE + 1000)
    await cut_file_channel(s3_server, client)
    assert (await client.reply(first))["code"] == "channel_closed"
    assert await client.list() == []  # nothing visible yet
    request_id, offset = await resume_offset(client, "big", len(data))
    # What the store holds: whole parts (a part takes what had arrived when it
    # filled); bytes still buffered when the cut came are sent again.
    assert PART_SIZE <= offset <= PART_SIZE + 1000
    client.send_on_file_channel(data[offset:])
    ack = await client.reply(request_id)
    assert ack["op"] == "ack" and ack["sha256"] == sha(data)
    sink = io.BytesIO()
    await client.download("big", sink)
    assert sink.getvalue() == data
    assert [f["name"] for f in await client.list()] == ["big"]
    assert await settled_uploads(s3_server) == []


@pytest_twisted.ensureDeferred
async def test_a_resumed_upload_with_a_wrong_checksum_is_refused(s3_server):
    from test_protocol_11 import cut_file_channel, resume_offset, start_resumable

    client = await s3_server.connect()
    data = os.urandom(PART_SIZE + 10)
    wrong = sha(b"something else")
    first = await start_resumable(client, "f", data, PART_SIZE, sha256=wrong)
    await cut_file_channel(s3_server, client)
    await client.reply(first)
    request_id, offset = await resume_offset(client, "f", len(data), sha256=wrong)
    assert offset >= PART_SIZE
    client.send_on_file_channel(data[offset:])
    assert (await client.reply(request_id))["code"] == "checksum_mismatch"
    assert await client.list() == []


@pytest_twisted.ensureDeferred
async def test_expired_resumable_uploads_are_swept_from_the_store(s3_server):
    import time

    from test_protocol_11 import cut_file_channel, resume_offset, start_resumable

    client = await s3_server.connect()
    data = os.urandom(2 * PART_SIZE + 10)
    first = await start_resumable(client, "f", data, PART_SIZE + 1000)
    await cut_file_channel(s3_server, client)
    await client.reply(first)
    storage = s3_server.site.storage
    await defer.gatherResults(list(storage.settling.values()))
    assert await storage.sweep_partials(3600) == 0
    assert len(await settled_uploads(s3_server)) == 1
    assert await storage.sweep_partials(3600, now=time.time() + 3601) == 1
    assert await settled_uploads(s3_server) == []
    request_id, offset = await resume_offset(client, "f", len(data))
    assert offset == 0
    client.send_on_file_channel(data)
    assert (await client.reply(request_id))["sha256"] == sha(data)


# -- the store down when a client connects -------------------------------------


@pytest_twisted.async_yield_fixture
async def store_behind_a_door(ceph_rgw, tmp_path):
    """A server whose S3 store is reached through a StoreDoor (forward, refuse, silent)."""
    from cluster.door import StoreDoor
    from conftest import start_server

    bucket = "wsfiles-" + secrets.token_hex(6)
    ceph_rgw.create_bucket(bucket)
    host, port = ceph_rgw.endpoint.split("://")[1].split(":")
    door = StoreDoor(host, int(port))
    await door.forward()
    client = S3Client(reactor, door.url, bucket, ceph_rgw.access_key, ceph_rgw.secret_key)
    client.request_timeout = 2.0  # the deadline for a silent store (10 s by default)
    server = await start_server(tmp_path / "root", storage=S3Storage(client))
    server.door = door
    yield server
    await server.stop()
    await door.close()
    await server.storage.close()


async def refused_at_connect(url: str) -> tuple[list[dict], int | None]:
    """Connect a command channel that ends before hello: what it was told, and the close code."""
    from wsfiles.client import WsfilesClient

    client = WsfilesClient(url, reactor, None)
    with pytest.raises(WsfilesError) as ended:
        await defer.ensureDeferred(client._connect(None, False, {})).addTimeout(30, reactor)
    assert ended.value.code == "connection_failed"
    told = []
    while client.notices.pending:
        told.append(await client.notices.get())
    return told, client.close_code


@pytest.mark.parametrize("outage", ["refuse", "silent"])
@pytest_twisted.ensureDeferred
async def test_a_client_connecting_while_the_store_is_down_is_told_and_closed(
    store_behind_a_door, outage
):
    from twisted.logger import globalLogPublisher

    server = store_behind_a_door
    first = await server.connect()  # the store works: hello
    assert first.hello["files"] == []
    await server.close_client(first)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await getattr(server.door, outage)()
        told, code = await refused_at_connect(server.url)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [m["op"] for m in told] == ["error"] and told[0]["code"] == "storage_error"
    assert code == 1013
    if outage == "silent":
        assert "did not answer within 2 s" in told[0]["message"]
    logged = [e for e in events if "cannot list its files" in e.get("log_format", "")]
    assert len(logged) == 1 and logged[0]["log_level"].name == "warn"
    assert not [e for e in events if "log_failure" in e], "a traceback was logged"
    # The store is back: a client that reconnects is greeted.
    await server.door.forward()
    again = await server.connect()
    assert again.hello["files"] == []


# -- multipart uploads abandoned by a crashed instance --------------------------


async def part_stored(storage: S3Storage, name: str, resume: bool = False) -> object:
    """An upload of ``name`` (two parts) whose first part is in the store."""
    upload = await storage.folder(None).begin_upload(name, 2 * PART_SIZE, resume=resume)
    await upload.write(os.urandom(PART_SIZE))
    return upload


@pytest_twisted.async_yield_fixture
async def instances(ceph_rgw):
    """Three S3Storage objects on one bucket, as three instances would have."""
    bucket = "wsfiles-" + secrets.token_hex(6)
    ceph_rgw.create_bucket(bucket)
    made = []

    def instance(name: str, alive: dict[str, bool | None] | None = None) -> S3Storage:
        client = S3Client(
            reactor, ceph_rgw.endpoint, bucket, ceph_rgw.access_key, ceph_rgw.secret_key
        )
        storage = S3Storage(client)
        if alive is not None:  # what Redis would say about each instance
            storage.share_instance(name, lambda other: defer.succeed(alive.get(other)))
        else:
            client.instance_id = name
        made.append(storage)
        return storage

    instance.bucket = bucket
    yield instance
    for storage in made:
        await storage.close()


def uploads_in(rgw, bucket: str) -> set[str]:
    """The keys of the bucket's unfinished multipart uploads."""
    response = rgw.request("GET", bucket, query={"uploads": ""})
    root = ElementTree.fromstring(response.body)
    return {e.text for e in root.iter() if e.tag.endswith("}Key")}


@pytest_twisted.ensureDeferred
async def test_a_crashed_instances_plain_uploads_are_swept_and_live_ones_kept(instances, ceph_rgw):
    alive = {"a": False, "b": True}  # a crashed (its liveness key is gone), b runs
    crashed, running, sweeper = instances("a"), instances("b"), instances("c", alive)
    await part_stored(crashed, "cut.bin")  # never finished: the instance died
    live = await part_stored(running, "live.bin")
    kept = await part_stored(sweeper, "resumable.bin", resume=True)
    await kept.interrupt()  # kept for --partial-ttl
    before = uploads_in(ceph_rgw, instances.bucket)
    assert {"@anonymous/cut.bin", "@anonymous/live.bin"} <= before and len(before) == 3

    assert await sweeper.sweep_partials(3600) == 0  # no resumable upload expired
    after = uploads_in(ceph_rgw, instances.bucket)
    assert after == before - {"@anonymous/cut.bin"}
    # The other instance's upload was not touched: it completes.
    await live.write(os.urandom(PART_SIZE))
    await live.commit()
    await running.client.idle()
    assert [f.name for f in await sweeper.folder(None).list()] == ["live.bin"]
    # Only the resumable partial is left: no upload and no marker of the others.
    assert len(uploads_in(ceph_rgw, instances.bucket)) == 1
    listing = ceph_rgw.request("GET", instances.bucket, query={"list-type": "2"}).body
    assert b"@uploads/" not in listing


@pytest_twisted.ensureDeferred
async def test_without_redis_abandoned_uploads_are_swept_by_age(instances, ceph_rgw):
    import time

    other, sweeper = instances("other"), instances("sweeper")  # nobody says who is alive
    await part_stored(other, "cut.bin")
    # An upload that was never tagged (its instance died right after creating it).
    raw = ceph_rgw.request(
        "POST", instances.bucket, "@anonymous/untagged.bin", query={"uploads": ""}
    )
    assert raw.status == 200
    await sweeper.sweep_partials(3600)
    assert uploads_in(ceph_rgw, instances.bucket) == {
        "@anonymous/cut.bin",
        "@anonymous/untagged.bin",
    }
    await sweeper.sweep_partials(3600, now=time.time() + 3601)
    assert uploads_in(ceph_rgw, instances.bucket) == set()


@pytest_twisted.ensureDeferred
async def test_a_sweep_while_the_store_is_down_is_one_warning(store_behind_a_door):
    from twisted.logger import globalLogPublisher

    storage = store_behind_a_door.storage
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        await store_behind_a_door.door.refuse()
        assert await storage.sweep_partials(3600) == 0
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e["log_level"].name in ("warn", "error", "critical")]
    assert len(warnings) == 1 and "could not sweep" in warnings[0]["log_format"]
    assert "refused" in str(warnings[0]["e"])


# -- wsfiles s3 mkbucket --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wsfiles_s3_mkbucket_creates_the_bucket_once(ceph_rgw, tmp_path):
    from conftest import BIN, run_process

    bucket = "wsfiles-" + secrets.token_hex(6)
    keys = tmp_path / "s3-keys"
    keys.write_text(f"{ceph_rgw.access_key} {ceph_rgw.secret_key}\n")
    argv = [str(BIN / "wsfiles"), "s3", "mkbucket", "--s3-endpoint", ceph_rgw.endpoint]
    argv += ["--s3-bucket", bucket, "--s3-credentials", str(keys)]
    assert ceph_rgw.request("HEAD", bucket).status == 404
    code, out, err = await run_process(argv)
    assert (code, out, err) == (0, f"created bucket {bucket} at {ceph_rgw.endpoint}\n", "")
    assert ceph_rgw.request("HEAD", bucket).status == 200
    code, out, err = await run_process(argv)  # again: nothing to do
    assert (code, err) == (0, "") and "already exists" in out
    keys.write_text(f"{ceph_rgw.access_key} wrong-secret\n")
    code, out, err = await run_process(argv)  # the same file, now with a wrong secret
    assert code == 1 and out == "" and err.startswith("wsfiles: the store refused to show bucket")
    assert "403" in err and len(err.splitlines()) == 1
    code, out, err = await run_process(
        [*argv[:4], "http://127.0.0.1:1", *argv[5:]]  # nothing listens there
    )
    assert (
        code == 1 and err.startswith("wsfiles: cannot reach the store") and "Traceback" not in err
    )
