"""The ``wsfiles`` command's share links (docs/protocol.md, "Share links").

    wsfiles share URL PATH [--expires 1d] [--max-downloads N] [--password | --password-stdin]
    wsfiles shares URL [--json]
    wsfiles unshare URL ID

``share`` prints the link alone on stdout (``http(s)://HOST/s/ID``), so a
script can capture it.  A password is read with getpass (asked twice), or as
one line from stdin with ``--password-stdin``; never from the command line,
where other users could see it.

Only the standard library is imported at module level (see wsfiles.cli).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from wsfiles.cli import CommandFailed


def page_base_url(url: str) -> str:
    """The server's web address (``http(s)://HOST``) for links, from any form of URL."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


def _duration(text: str) -> int:
    from wsfiles.shares import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def _when(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _prepare_share(args: argparse.Namespace) -> None:
    """Check PATH and read the password before anything is connected."""
    from wsfiles.client_tree import PathError, check_path

    args.path = args.path.strip("/")
    if args.path:
        try:
            check_path(args.path)
        except PathError as e:
            raise CommandFailed(f"invalid_name: {args.path!r}: {e}") from None
    args.secret = None
    if args.password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise CommandFailed("--password-stdin: no password on stdin")
        args.secret = line
    elif args.password:
        import getpass

        try:
            first = getpass.getpass("Password for the link: ")
            again = getpass.getpass("Again: ")
        except EOFError:
            raise CommandFailed("no password given (use --password-stdin in scripts)") from None
        if not first:
            raise CommandFailed("the password is empty")
        if first != again:
            raise CommandFailed("the passwords differ")
        args.secret = first


async def _share(client: Any, args: argparse.Namespace) -> None:
    message: dict[str, Any] = {"op": "share", "path": args.path}
    if args.expires is not None:
        message["expires"] = args.expires
    if args.max_downloads is not None:
        message["max_downloads"] = args.max_downloads
    if args.secret is not None:
        message["password"] = args.secret
    reply = await client.request(message)
    link = page_base_url(args.url) + reply["url"]
    if args.json:
        sys.stdout.write(json.dumps({**reply, "link": link}) + "\n")
        return
    sys.stdout.write(link + "\n")
    if not args.quiet:
        limit = f", at most {reply['max_downloads']} downloads" if reply["max_downloads"] else ""
        lock = ", with a password" if reply["password"] else ""
        sys.stderr.write(f"{reply['kind']} {reply['path'] or '/'!r} shared until")
        sys.stderr.write(f" {_when(reply['expires_at'])}{limit}{lock}\n")


async def _shares(client: Any, args: argparse.Namespace) -> None:
    reply = await client.request({"op": "shares"})
    base = page_base_url(args.url)
    if args.json:
        for share in reply["shares"]:
            share["link"] = base + share["url"]
        sys.stdout.write(json.dumps(reply["shares"]) + "\n")
        return
    for share in reply["shares"]:
        downloads = str(share["downloads"])
        if share["max_downloads"]:
            downloads += f"/{share['max_downloads']}"
        lock = "  password" if share["password"] else ""
        name = share["path"] + ("/" if share["kind"] == "folder" and share["path"] else "")
        sys.stdout.write(
            f"{share['share']}  {_when(share['expires_at'])}  {downloads:>7} downloads"
            f"  {name or '/'}{lock}\n"
        )


def share_id_argument(text: str) -> str:
    """An ID, or a whole link (``https://host/s/ID``): people paste either."""
    if "/s/" in text:
        text = text.split("/s/", 1)[1]
    return text.split("/", 1)[0].split("?", 1)[0]


async def _unshare(client: Any, args: argparse.Namespace) -> None:
    from wsfiles.client import WsfilesError

    try:
        await client.request({"op": "unshare", "share": share_id_argument(args.id)})
    except WsfilesError as e:
        if e.code == "not_found":
            raise CommandFailed(
                "not_found: no share of yours with that id (expired, or revoked already?)"
            ) from None
        raise


def add_share_commands(remote: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``share``, ``shares`` and ``unshare`` through wsfiles.cli's ``remote``."""
    share = remote(
        "share",
        "make a share link to a file or folder",
        _share,
        _prepare_share,
        description="Make a link anyone can download PATH with (a file, or a folder's files: "
        "read-only), until it expires or you unshare it. Prints the link on stdout. "
        "The link follows the name: a file replaced under PATH is served as it is now; "
        "renamed or deleted, the link answers 404.",
    )
    share.add_argument("path", metavar="PATH", help="a file or folder ('/': your top folder)")
    share.add_argument(
        "--expires",
        type=_duration,
        metavar="DURATION",
        help="how long the link works: 3600, 90m, 12h, 1d, 2w (default: the server's, often 1d)",
    )
    share.add_argument(
        "--max-downloads",
        type=_positive,
        metavar="N",
        help="the link stops after N downloads (each GET of a file counts)",
    )
    secret = share.add_mutually_exclusive_group()
    secret.add_argument(
        "--password", action="store_true", help="ask for a password the link will need"
    )
    secret.add_argument(
        "--password-stdin", action="store_true", help="read that password from stdin"
    )
    share.add_argument("--json", action="store_true", help="print the server's reply as JSON")
    shares = remote("shares", "list your share links", _shares)
    shares.add_argument("--json", action="store_true", help="print the list as JSON")
    unshare = remote("unshare", "revoke a share link at once", _unshare)
    unshare.add_argument("id", metavar="ID", help="the share's id, or its whole link")
