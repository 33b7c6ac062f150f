"""The page verifies uploads end to end and hands downloads to the browser
(wsfiles/static/sha256.js, hash-worker.js, app.js; docs/protocol.md,
"Download tickets"), in headless Chromium against a real twistd.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
import test_page
from test_page import AXE, CHROMIUM, connected, expect, row

# tests/test_page.py's fixtures: a twistd per test, one Chromium per module.
web = test_page.web
browser = test_page.browser
context = test_page.context
page = test_page.page

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"
)


def test_the_pages_sha256_matches_hashlib_on_random_inputs(web, page):
    """sha256.js, fed in random splits in the page and whole in its worker."""
    srv = web()
    page.goto(srv.url)
    connected(page)
    page.add_script_tag(url="/sha256.js")  # (the worker loads it; the page itself does not)
    rng = random.Random(7)
    sizes = [0, 1, 3, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 4096 + 17]
    sizes += [rng.randrange(1, 300_000) for _ in range(4)] + [4 * 1024 * 1024 + 9]  # > a slice
    for size in sizes:
        data = rng.randbytes(size)
        hexed = data.hex()
        got = page.evaluate(
            """async ([hexed, seed]) => {
                const bytes = new Uint8Array(hexed.length / 2);
                for (let i = 0; i < bytes.length; i++) {
                    bytes[i] = parseInt(hexed.substr(2 * i, 2), 16);
                }
                const sha = new Sha256();
                let x = seed;
                for (let i = 0; i < bytes.length;) {  // pieces of 1 to 200 bytes
                    x = (x * 1103515245 + 12345) % 2147483648;
                    const n = 1 + (x % 200);
                    sha.update(bytes.subarray(i, i + n));
                    i += n;
                }
                return [sha.hex(), await hashBlob(new Blob([bytes])).promise];
            }""",
            [hexed, size],
        )
        assert got == [hashlib.sha256(data).hexdigest()] * 2, size


def test_the_worker_hands_over_the_bytes_it_hashes_and_hashes_on_alone_when_told(web, page):
    """An upload reads the file once: the hash worker feeds the socket (hashBlob's
    feed); a resume stops the feeding (unfeed) and the hash still covers the file."""
    srv = web()
    page.goto(srv.url)
    connected(page)
    size = 9 * 1024 * 1024 + 5  # two whole 4 MiB slices and a short one
    data = bytes((i * 31 + (i >> 11)) & 255 for i in range(size))
    got = page.evaluate(
        """async (size) => {
            const bytes = new Uint8Array(size);
            for (let i = 0; i < size; i++) bytes[i] = (i * 31 + (i >> 11)) & 255;
            const blob = new Blob([bytes]);
            const whole = hashBlob(blob, { feed: true });
            let position = 0, same = true;
            for (let n = 0; n < 10; n++) {  // bounded: 3 slices and the end
                const slice = await whole.take();
                if (slice === null) break;
                const got = new Uint8Array(slice.bytes);
                same = same && slice.offset === position &&
                    got.every((b, i) => b === bytes[position + i]);
                position += got.length;
            }
            const part = hashBlob(blob, { feed: true });
            const first = await part.take();
            part.unfeed();
            const afterwards = await part.take();
            const unhashed = hashBlob(blob, { hash: false, feed: true });
            let read = 0;
            for (let n = 0; n < 10; n++) {
                const slice = await unhashed.take();
                if (slice === null) break;
                read += slice.bytes.byteLength;
            }
            return [await whole.promise, same, position, first.bytes.byteLength,
                    afterwards, await part.promise, read, await unhashed.promise];
        }""",
        size,
    )
    digest = hashlib.sha256(data).hexdigest()
    assert got == [digest, True, size, 4 * 1024 * 1024, None, digest, size, None]


def test_an_upload_is_verified_and_a_lying_server_is_caught(web, page, tmp_path):
    srv = web()
    source = tmp_path / "report.bin"
    source.write_bytes(random.Random(1).randbytes(3 * 1024 * 1024 + 5))
    # A stand-in for a server that stores other bytes than it got: the ack of
    # a file named lie.bin reaches the page with another SHA-256.
    page.add_init_script(
        """(() => {
            const lying = (data) => {
                if (typeof data !== "string") return data;
                const message = JSON.parse(data);
                if (message.op !== "ack" || message.name !== "lie.bin") return data;
                message.sha256 = "0".repeat(64);
                return JSON.stringify(message);
            };
            const set = Object.getOwnPropertyDescriptor(WebSocket.prototype, "onmessage").set;
            Object.defineProperty(WebSocket.prototype, "onmessage", {
                set(handler) {
                    set.call(this, (event) => handler({data: lying(event.data)}));
                },
            });
        })()"""
    )
    page.goto(srv.url)
    connected(page)
    page.set_input_files("#picker", str(source))
    item = page.locator("#transfers li", has_text="report.bin")
    expect(item.locator(".stats")).to_have_text("uploaded · SHA-256 verified")
    assert hashlib.sha256((srv.root / "report.bin").read_bytes()).hexdigest() == (
        hashlib.sha256(source.read_bytes()).hexdigest()
    )
    assert (
        item.get_attribute("title") == "SHA-256 " + hashlib.sha256(source.read_bytes()).hexdigest()
    )

    page.set_input_files(
        "#picker", files=[{"name": "lie.bin", "mimeType": "x/y", "buffer": b"what was sent"}]
    )
    failed = page.locator("#transfers li", has_text="lie.bin")
    expect(failed).to_have_class("failed")
    expect(failed.locator(".stats")).to_contain_text(
        "Failed: verification failed: the server stored SHA-256 0000000000000000…, but the file"
        f" this page read has {hashlib.sha256(b'what was sent').hexdigest()[:16]}…"
    )
    expect(failed.locator(".stats")).to_have_attribute("role", "alert")
    expect(failed.get_by_role("button", name="Retry the upload of lie.bin")).to_be_visible()


def test_a_download_goes_through_a_ticket_to_the_browser(web, browser, tmp_path):
    srv = web()
    data = random.Random(2).randbytes(5 * 1024 * 1024 + 3)
    (srv.root / "big file.bin").write_bytes(data)
    narrow = browser.new_context(
        accept_downloads=True, viewport={"width": 390, "height": 844}, bypass_csp=True
    )
    try:
        tab = narrow.new_page()
        requests: list[dict] = []
        tab.on(
            "websocket",
            lambda ws: ws.on(
                "framesent", lambda p: requests.append(json.loads(p) if p[:1] == "{" else {})
            ),
        )
        tab.goto(srv.url)
        row(tab, "big file.bin").get_by_role("button", name="Download big file.bin").focus()
        with tab.expect_download(timeout=60_000) as download:
            tab.keyboard.press("Enter")
        assert download.value.url.startswith(srv.url + "/d/")
        assert download.value.suggested_filename == "big file.bin"
        saved = tmp_path / "saved.bin"
        download.value.save_as(saved)
        assert saved.read_bytes() == data
        assert [r["op"] for r in requests if r.get("op") in ("get", "download")] == ["download"]

        item = tab.locator("#transfers li", has_text="big file.bin")
        expect(item.locator(".stats")).to_contain_text("sent to your browser's downloads · 5.0 MiB")
        # A file put in place by other means has no recorded SHA-256: the tab says so.
        expect(item.locator(".digest")).to_have_text(
            "no SHA-256 recorded on the server for this file"
        )
        width = tab.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, f"the tab is {width} px wide"
        tab.add_script_tag(content=AXE.read_text())
        serious = tab.evaluate(
            """async () => (await axe.run(document, {resultTypes: ["violations"]}))
                .violations.filter(v => v.impact === "serious" || v.impact === "critical")
                .map(v => v.id)"""
        )
        assert serious == []
        tab.get_by_role("button", name="Dismiss the download of big file.bin").click()
        expect(item).to_have_count(0)
    finally:
        narrow.close()
