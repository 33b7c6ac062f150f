import io

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_roundtrip(server):
    client = await server.connect()
    assert client.hello["files"] == []
    ack = await client.upload("a.txt", b"hello world" * 100000)
    print(ack)
    sink = io.BytesIO()
    sent = await client.download("a.txt", sink)
    assert sink.getvalue() == b"hello world" * 100000
    print(sent, await client.list())
