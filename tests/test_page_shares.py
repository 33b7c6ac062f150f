"""The page's share links: Share… on a row, the link, the list with Revoke.

Driven in Debian's Chromium by Playwright against a real ``twistd wsfiles``
(the fixtures of tests/test_page.py).  The link is opened in a second
browser context that has no token.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import test_page
from conftest import add_user_with_cli
from test_page import AXE, CHROMIUM, connected, expect, log_in, row

# tests/test_page.py's fixtures: a twistd per test, one Chromium per module.
web = test_page.web
browser = test_page.browser
context = test_page.context
page = test_page.page

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed"
)


def share_from_keyboard(tab: Any, name: str, expiry: str, limit: str = "") -> str:
    """Share ``name`` with the keyboard only; the link the dialog shows."""
    row(tab, name).locator("button[data-action='share']").focus()
    tab.keyboard.press("Enter")
    dialog = tab.locator("#share-dialog")
    expect(dialog).to_be_visible()
    expect(tab.locator("#share-expires")).to_be_focused()
    tab.locator("#share-expires").select_option(label=expiry)
    tab.keyboard.press("Tab")
    expect(tab.locator("#share-max")).to_be_focused()
    if limit:
        tab.keyboard.type(limit)
    tab.keyboard.press("Enter")  # Enter in a field creates the link
    expect(tab.locator("#share-copy")).to_be_focused()
    link = tab.locator("#share-url").input_value()
    tab.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    return link


def test_a_shared_file_opens_in_a_browser_without_a_token_until_revoked(
    web, page, browser, tmp_path
):
    users = tmp_path / "users"
    token = add_user_with_cli(users, "alice")
    srv = web("--users", str(users))
    data = os.urandom(70_000)
    (srv.root / "alice" / "docs").mkdir(parents=True)
    (srv.root / "alice" / "report.bin").write_bytes(data)
    (srv.root / "alice" / "docs" / "notes.txt").write_bytes(b"folder file")
    log_in(page, token)
    page.goto(srv.url)
    connected(page)
    expect(page.locator("#no-shares")).to_be_visible()

    link = share_from_keyboard(page, "report.bin", "1 hour", "5")
    assert link.startswith(srv.url + "/s/")
    item = page.locator("#share-list li")
    expect(item).to_have_count(1)
    expect(item).to_contain_text("report.bin")
    expect(item).to_contain_text("0 of 5 downloads")
    expect(row(page, "report.bin").locator("button[data-action='share']")).to_be_focused()

    stranger = browser.new_context(accept_downloads=True)  # no token, no cookies
    try:
        other = stranger.new_page()
        with other.expect_download() as started:
            try:
                other.goto(link)
            except Exception as e:  # a download, not a page
                assert "Download is starting" in str(e)
        download = started.value
        assert download.suggested_filename == "report.bin"
        with open(download.path(), "rb") as f:
            assert f.read() == data

        folder_link = share_from_keyboard(page, "docs", "1 day")
        other.goto(folder_link)
        expect(other.locator("h1")).to_have_text("docs")
        with other.expect_download() as started:
            other.get_by_role("link", name="notes.txt").click()
        with open(started.value.path(), "rb") as f:
            assert f.read() == b"folder file"

        # Revoke the file's link from the keyboard: dead at once.
        revoke = page.locator("#share-list li").first.locator("button[data-action='revoke']")
        revoke.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#share-list li")).to_have_count(1)
        expect(page.locator("#share-list li")).to_contain_text("docs (folder)")
        expect(page.locator("#share-list li button[data-action='revoke']")).to_be_focused()
        assert stranger.request.get(link).status == 404
    finally:
        stranger.close()


def test_the_share_dialog_and_list_fit_a_phone_and_axe_finds_nothing_serious(
    web,
    browser,
):
    if not AXE.exists():
        pytest.fail("axe-core is missing: run npm ci --prefix tests/page --no-audit --no-fund")
    srv = web()
    (srv.root / ("L" * 200 + ".txt")).write_bytes(b"x")
    phone = browser.new_context(viewport={"width": 390, "height": 844}, bypass_csp=True)
    try:
        tab = phone.new_page()
        tab.goto(srv.url)
        connected(tab)
        share_from_keyboard(tab, "L" * 200 + ".txt", "7 days", "3")
        row(tab, "L" * 200 + ".txt").locator("button[data-action='share']").click()
        expect(tab.locator("#share-dialog")).to_be_visible()
        tab.locator("#share-password").fill("pw")
        tab.locator("#share-create").click()
        expect(tab.locator("#share-url")).to_be_visible()
        width = tab.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide"
        for locator in (tab.locator("#share-url"), tab.locator("#share-copy")):
            box = locator.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        tab.add_script_tag(content=AXE.read_text())
        found = {"dialog": _violations(tab)}
        tab.keyboard.press("Escape")
        expect(tab.locator("#share-list li")).to_have_count(2)
        expect(tab.locator("#share-list li").last).to_contain_text("password")
        found["list"] = _violations(tab)
        for button in tab.locator("#share-list button").all():
            box = button.bounding_box()
            assert box is not None and box["x"] + box["width"] <= 390
        assert found == {"dialog": [], "list": []}
    finally:
        phone.close()


def _violations(tab: Any) -> list[str]:
    return tab.evaluate(
        """async () => (await axe.run(document, {resultTypes: ["violations"]}))
            .violations.filter(v => v.impact === "serious" || v.impact === "critical")
            .map(v => v.id + ": " + v.nodes.map(n => n.target.join(" ")).join(", "))"""
    )
