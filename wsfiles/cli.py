"""``wsfiles``: the command line (the server itself is ``twistd wsfiles``).

    wsfiles ls URL [--json]
    wsfiles get URL NAME [-o PATH] [--resume]
    wsfiles put URL PATH... [--name N] [--resume]
    wsfiles rm URL NAME
    wsfiles mv URL NAME NEW [--overwrite]
    wsfiles user add --users FILE NAME

URL is the server's base, e.g. ``ws://localhost:8080`` or ``wss://...``.  The
token comes from ``--token`` or ``WSFILES_TOKEN``.  Exit status 0 on success;
otherwise one line on stderr naming the error code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from wsfiles.tuning import tune_malloc
from wsfiles.users import UsersFileError, add_user

#: Suffix of a download in progress; ``get --resume`` continues it.
PARTIAL_SUFFIX = ".wsfiles-part"


class CommandFailed(Exception):
    """Ends the command with a one-line message and exit status 1."""


def _user_add(args: argparse.Namespace) -> int:
    try:
        token = add_user(args.users, args.name)
    except UsersFileError as e:
        sys.stderr.write(f"wsfiles: {e}\n")
        return 1
    sys.stdout.write(token + "\n")
    return 0


@contextlib.contextmanager
def _progress_bar(label: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar on stderr when it is a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh() if done == total else bar.update(0)

    try:
        yield update
    finally:
        bar.close()


async def _connected(args: argparse.Namespace) -> Any:
    from wsfiles.client import connect

    token = args.token or os.environ.get("WSFILES_TOKEN") or None
    return await connect(args.url, token)


async def _ls(client: Any, args: argparse.Namespace) -> None:
    files = await client.list()
    if args.json:
        sys.stdout.write(json.dumps(files) + "\n")
        return
    for info in files:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["mtime"]))
        sys.stdout.write(f"{info['size']:>14}  {stamp}  {info['name']}\n")


async def _get(client: Any, args: argparse.Namespace) -> None:
    """Download to ``PATH.wsfiles-part``; rename only once the SHA-256 checks out."""
    target = args.output or args.name
    if target == "-":
        await client.download(args.name, sys.stdout.buffer)
        return
    if os.path.isdir(target):
        target = os.path.join(target, args.name)
    partial = target + PARTIAL_SUFFIX
    mode = "a+b" if args.resume and os.path.exists(partial) else "w+b"
    with open(partial, mode) as sink, _progress_bar(args.name, args.quiet) as progress:
        sink.seek(0, os.SEEK_END)
        try:
            await client.download(args.name, sink, resume=args.resume, progress=progress)
        except BaseException:
            sink.close()
            if not args.resume:
                os.unlink(partial)
            raise
    os.replace(partial, target)


async def _put(client: Any, args: argparse.Namespace) -> None:
    if args.name and len(args.paths) > 1:
        raise CommandFailed("--name needs exactly one PATH")
    for path in args.paths:
        name = args.name or os.path.basename(path)
        with open(path, "rb") as source, _progress_bar(name, args.quiet) as progress:
            await client.upload(name, source, resume=args.resume, progress=progress)


async def _rm(client: Any, args: argparse.Namespace) -> None:
    await client.delete(args.name)


async def _mv(client: Any, args: argparse.Namespace) -> None:
    await client.rename(args.name, args.new, overwrite=args.overwrite)


def _run_remote(action: Callable[[Any, argparse.Namespace], Any]) -> Callable[..., int]:
    """Run ``action`` on a connected client under the reactor; map errors to exit 1."""

    def run(args: argparse.Namespace) -> int:
        from twisted.internet import defer, task

        from wsfiles.client import WsfilesError

        outcome: list[str] = []

        async def main(reactor: Any) -> None:
            try:
                client = await _connected(args)
            except WsfilesError as e:
                outcome.append(f"{e.code}: {e.message}")
                return
            try:
                await action(client, args)
            except WsfilesError as e:
                outcome.append(f"{e.code}: {e.message}")
            except (CommandFailed, OSError) as e:
                outcome.append(str(e))
            finally:
                with contextlib.suppress(Exception):
                    await client.close()

        try:
            task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
        except SystemExit as e:
            if e.code not in (0, None):
                outcome.append(f"internal error (exit {e.code})")
        if outcome:
            sys.stderr.write(f"wsfiles {args.command}: {outcome[0]}\n")
            return 1
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsfiles",
        description="wsfiles client and tools. Run the server with 'twistd wsfiles'.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def remote(name: str, help_text: str, action: Callable[..., Any]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("url", metavar="URL", help="server base URL, e.g. ws://localhost:8080")
        sub.add_argument("--token", help="client token (default: $WSFILES_TOKEN)")
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        sub.set_defaults(run=_run_remote(action))
        return sub

    ls = remote("ls", "list your files", _ls)
    ls.add_argument("--json", action="store_true", help="print the list as JSON")
    get = remote("get", "download a file", _get)
    get.add_argument("name", metavar="NAME")
    get.add_argument("-o", "--output", metavar="PATH", help="where to write ('-': stdout)")
    get.add_argument("--resume", action="store_true", help="continue an interrupted download")
    put = remote("put", "upload files", _put)
    put.add_argument("paths", metavar="PATH", nargs="+")
    put.add_argument("--name", help="store under this name (one PATH only)")
    put.add_argument("--resume", action="store_true", help="resume an interrupted upload")
    rm = remote("rm", "delete a file", _rm)
    rm.add_argument("name", metavar="NAME")
    mv = remote("mv", "rename a file", _mv)
    mv.add_argument("name", metavar="NAME")
    mv.add_argument("new", metavar="NEW")
    mv.add_argument("--overwrite", action="store_true", help="replace NEW if it exists")

    user = commands.add_parser("user", help="manage the users file")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser(
        "add", help="add a client with a fresh token; prints the token alone on stdout"
    )
    add.add_argument(
        "--users", required=True, metavar="FILE", help="users file (created mode 0600)"
    )
    add.add_argument("name", help="client name: 1-64 of A-Z a-z 0-9 _ . -, no leading dot")
    add.set_defaults(run=_user_add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # big buffers reused: cheaper uploads (wsfiles.tuning)
    return args.run(args)
