"""Operations: /healthz, /metrics, a graceful stop, and the JSON transfer log."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess

import pytest
import pytest_twisted
from conftest import BIN, TEARDOWN_TIMEOUT, add_user_with_cli, http_get, spawn_process
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from wsfiles.client import WsfilesError, connect


def json_events(output: bytes) -> list[dict]:
    """Twisted's JSON log: one event per line, each after an RS (0x1e) separator."""
    lines = output.decode().split("\x1e")
    return [json.loads(line) for line in lines if line.strip()]


def http(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://", 1)


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


# -- health -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_healthz_is_ok_when_the_root_can_be_listed_and_written(server):
    code, body = await http_get(http(server.url) + "/healthz")
    assert code == 200
    health = json.loads(body)
    assert health["status"] == "ok" and health["free_bytes"] > 0


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_when_the_disk_is_nearly_full(server_factory):
    srv = await server_factory(min_free=2**62)
    code, body = await http_get(http(srv.url) + "/healthz")
    assert code == 503
    assert "disk nearly full" in json.loads(body)["reason"]


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_when_the_root_is_gone(server):
    import shutil

    shutil.rmtree(server.root)
    code, body = await http_get(http(server.url) + "/healthz")
    assert code == 503
    assert "missing" in json.loads(body)["reason"]


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_when_the_root_is_read_only(server):
    temp = server.root / ".wsfiles-tmp"
    if subprocess.run(["chattr", "+i", str(temp)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        code, body = await http_get(http(server.url) + "/healthz")
    finally:
        subprocess.run(["chattr", "-i", str(temp)], check=True)
    assert code == 503
    assert json.loads(body)["status"] == "unavailable"


# -- metrics ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_count_connections_transfers_bytes_and_refusals(server):
    client = await server.connect()
    await client.upload("a.bin", b"x" * 5000)
    await client.download("a.bin", io.BytesIO())
    with pytest.raises(WsfilesError):
        await client.download("missing", io.BytesIO())
    code, body = await http_get(http(server.url) + "/metrics")
    assert code == 200
    found = samples(body)
    assert found[("wsfiles_connections", (("channel", "command"),))] == 1
    assert found[("wsfiles_connections", (("channel", "file"),))] == 1
    assert found[("wsfiles_transfers_started_total", (("op", "save"),))] == 1
    assert found[("wsfiles_transfers_finished_total", (("op", "get"),))] == 1
    assert found[("wsfiles_bytes_received_total", ())] == 5000
    assert found[("wsfiles_bytes_sent_total", ())] == 5000
    assert found[("wsfiles_refusals_total", (("code", "not_found"),))] == 1
    assert found[("wsfiles_transfer_size_bytes_count", (("op", "save"),))] == 1
    assert found[("wsfiles_transfer_duration_seconds_count", (("op", "get"),))] == 1
    assert found[("wsfiles_pending_tickets", ())] == 0
    assert found[("wsfiles_storage_free_bytes", ())] > 0


@pytest_twisted.ensureDeferred
async def test_metrics_listen_moves_metrics_off_the_main_listener(twistd_factory, tmp_path):
    from cluster import free_port

    port = free_port()  # for the second listener
    srv = await twistd_factory("--metrics-listen", f"tcp:{port}:interface=127.0.0.1")
    assert (await http_get(http(srv.url) + "/metrics"))[0] == 404
    code, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200 and b"wsfiles_connections" in body
    assert (await http_get(f"http://127.0.0.1:{port}/healthz"))[0] == 200


# -- graceful stop ------------------------------------------------------------


async def begin_upload(client, name: str, data: bytes, sent: int) -> int:
    request_id = client.send({"op": "save", "name": name, "size": len(data)})
    reply = await client.reply(request_id)
    await client._open_file_channel(reply["url"])
    assert (await client.reply(request_id))["op"] == "ready"
    client._file.beginMessage(isBinary=True)
    client._file.sendMessageFrame(data[:sent])
    return request_id


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_a_transfer_in_flight_finish(twistd_factory):
    srv = await twistd_factory("--grace", "20")
    client = await connect(srv.url)
    data = os.urandom(2_000_000)
    request_id = await begin_upload(client, "kept.bin", data, 1_000_000)
    srv.process.signalProcess("TERM")
    # New transfers are refused while the stop waits...
    refused = await client.reply(client.send({"op": "get", "name": "kept.bin"}))
    assert refused["code"] in ("unavailable", "not_found")
    # ...but the one in flight completes.
    client._file.sendMessageFrame(data[1_000_000:])
    client._file.endMessage()
    ack = await client.reply(request_id)
    assert ack["op"] == "ack" and ack["sha256"] == hashlib.sha256(data).hexdigest()
    await srv.stop()
    assert (srv.root / "kept.bin").read_bytes() == data
    await client.close()


@pytest_twisted.ensureDeferred
async def test_after_the_grace_period_the_rest_is_aborted_cleanly(twistd_factory):
    srv = await twistd_factory("--grace", "0.5")
    (srv.root / "doc").write_bytes(b"previous")
    client = await connect(srv.url)
    request_id = await begin_upload(client, "doc", os.urandom(2_000_000), 1_000_000)
    srv.process.signalProcess("TERM")
    error = await client.reply(request_id)  # never finished: cut when the grace ran out
    assert error["op"] == "error"
    await srv.stop()
    assert client.close_code == 1001
    assert (srv.root / "doc").read_bytes() == b"previous"
    assert os.listdir(srv.root / ".wsfiles-tmp") == []
    assert "grace period over" in srv.output
    await client.close()


# -- logs ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_json_log_records_each_transfer_and_no_secrets(tmp_path):
    users = tmp_path / "users"
    token = add_user_with_cli(users, "alice")
    argv = [
        str(BIN / "twist"), "--log-format=json", "--log-file=-", "wsfiles",
        "--listen", "tcp:0:interface=127.0.0.1", "--root", str(tmp_path / "root"),
        "--users", str(users),
    ]  # fmt: skip
    process, proto = spawn_process(argv, cwd=tmp_path)
    try:
        await proto.when_output_contains(b"wsfiles listening on").addTimeout(30, reactor)
        events = json_events(proto.out)
        port = next(e["port"] for e in events if "port" in e and "host" in e)
        client = await connect(f"ws://127.0.0.1:{port}", token, token_in_query=True)
        offers: list[str] = []
        original = client._received

        def record_offers(message: dict) -> None:
            if message.get("op") == "channel":
                offers.append(message["url"])
            original(message)

        client._received = record_offers
        data = b"logged" * 1000
        await client.upload("notes.txt", data)
        await client.rename("notes.txt", "kept.txt")
        await client.delete("kept.txt")
        await client.close()
    finally:
        process.signalProcess("TERM")
        await proto.ended.addTimeout(TEARDOWN_TIMEOUT, reactor)
    log = proto.out.decode()
    records = json_events(proto.out)
    (transfer,) = [r for r in records if r.get("transfer")]
    assert transfer["op"] == "save" and transfer["name"] == "notes.txt"
    assert transfer["client"] == "alice" and transfer["result"] == "ok"
    assert transfer["size"] == len(data)
    assert transfer["sha256"] == hashlib.sha256(data).hexdigest()
    assert transfer["duration"] >= 0
    # What changes stored files is logged, with who did it.
    (renamed,) = [r for r in records if r.get("to") == "kept.txt"]
    assert renamed["name"] == "notes.txt" and renamed["client"] == "alice"
    (deleted,) = [r for r in records if str(r.get("log_format", "")).startswith("deleted")]
    assert deleted["name"] == "kept.txt" and deleted["client"] == "alice"
    assert token not in log and token.split(".")[1] not in log
    tickets = [url.split("ticket=")[1] for url in offers]
    assert tickets and all(ticket not in log for ticket in tickets)
