"""``wsfiles user list | add | remove | rotate | set``: the users file from the shell.

Every command is safe while servers run: a change is written to a temporary
file beside the users file and renamed over it under a lock
(``wsfiles.users.editing``), and each server notices it within about a
second.  ``add`` and ``rotate`` print the new token, alone, once; nothing
else ever shows a secret or a hash.  Every refusal is one line on stderr and
exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from wsfiles.sizes import parse_size
from wsfiles.users import (
    NO_QUOTA,
    SETTINGS,
    UserEntry,
    UsersFileError,
    add_user,
    check_client_name,
    editing,
    format_expiry,
    format_size,
    parse_expiry,
    read_users_file,
    rotate_user,
)

#: ``--unset`` takes either spelling: the option's (quota-files) or the file's.
_KEYS = {key.replace("_", "-"): key for key in SETTINGS}


class Refused(Exception):
    """A bad argument: one line for the operator."""


def _size(option: str, text: str, allow_none: bool) -> str:
    if allow_none and text.lower() == "none":
        return "none"
    try:
        return format_size(parse_size(text))
    except ValueError as e:
        raise Refused(f"{option}: {e}") from None


def _count(option: str, text: str) -> str:
    if text.lower() == "none":
        return "none"
    if not text.isdigit():
        raise Refused(f"{option}: {text!r} is not a whole number (or none)")
    return str(int(text))


def _changes(args: argparse.Namespace) -> tuple[dict[str, str], set[str]]:
    """The settings to write and the ones to remove, each value as the file spells it."""
    put: dict[str, str] = {}
    drop: set[str] = set()
    if args.quota is not None:
        put["quota"] = _size("--quota", args.quota, allow_none=True)
    if args.quota_files is not None:
        put["quota_files"] = _count("--quota-files", args.quota_files)
    if args.max_size is not None:
        put["max_size"] = _size("--max-size", args.max_size, allow_none=False)
    if args.access == "read-only":
        put["read_only"] = "yes"
    elif args.access == "read-write":
        drop.add("read_only")
    if args.expires is not None:
        if args.expires.lower() == "never":
            drop.add("expires")
        else:
            try:
                put["expires"] = format_expiry(parse_expiry(args.expires))
            except (ValueError, OverflowError, OSError) as e:
                raise Refused(f"--expires: {e}") from None
    for key in getattr(args, "unset", None) or []:
        setting = _KEYS.get(key.lower().replace("_", "-"))
        if setting is None:
            raise Refused(f"--unset: no setting {key!r} (one of {', '.join(_KEYS)})")
        if setting in put:
            raise Refused(f"--unset {key} and a new value for it at once")
        drop.add(setting)
    return put, drop


def _add(args: argparse.Namespace) -> str:
    put, _ = _changes(args)
    token = add_user(args.users, args.name, put)
    return token


def _remove(args: argparse.Namespace) -> str:
    with editing(args.users) as users:
        users.fields(args.name)  # unknown: refused
        users.remove(args.name)
    return f"removed {args.name}; its open connections close within about a second"


def _rotate(args: argparse.Namespace) -> str:
    return rotate_user(args.users, args.name)


def _set(args: argparse.Namespace) -> str:
    put, drop = _changes(args)
    if not put and not drop:
        raise Refused(
            "nothing to change: give --quota, --quota-files, --max-size, --read-only,"
            " --read-write, --expires or --unset KEY"
        )
    with editing(args.users) as users:
        token_id, hashed, settings = users.fields(args.name)
        settings = {k: v for k, v in settings.items() if k not in drop} | put
        users.put(args.name, token_id, hashed, settings)
    shown = " ".join(f"{k}={settings[k]}" for k in SETTINGS if k in settings)
    return f"{args.name}: {shown or 'the server options'} (token unchanged)"


def _settings_of(entry: UserEntry) -> dict[str, Any]:
    """The settings a line has, for JSON: sizes in bytes, ``"none"`` for unlimited."""
    settings: dict[str, Any] = {}
    for key in ("quota", "quota_files", "max_size"):
        value = getattr(entry, key)
        if value is not None:
            settings[key] = "none" if value == NO_QUOTA else value
    if entry.read_only:
        settings["read_only"] = True
    if entry.expires is not None:
        settings["expires"] = format_expiry(entry.expires)
    return settings


def _written(key: str, value: Any) -> str:
    if key in ("quota", "max_size") and value != "none":
        return f"{key}={format_size(value)}"
    if key == "read_only":
        return "read_only=yes"
    return f"{key}={value}"


def _list(args: argparse.Namespace) -> str:
    entries = list(read_users_file(args.users).values())
    now = time.time()
    rows = [
        {
            "name": e.name,
            "token_id": e.token_id,
            "settings": _settings_of(e),
            "expired": e.expired(now),
        }
        for e in entries
    ]
    if args.json:
        return json.dumps(rows)
    if not rows:
        return f"no users in {args.users}"
    table = [("NAME", "TOKEN ID", "EXPIRES", "SETTINGS")]
    for row in rows:
        settings = dict(row["settings"])
        expires = settings.pop("expires", "never")
        if row["expired"]:
            expires += " (expired)"
        shown = " ".join(_written(k, v) for k, v in settings.items())
        table.append((row["name"], row["token_id"], expires, shown))
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    return "\n".join(
        "  ".join([*(line[i].ljust(widths[i]) for i in range(3)), line[3]]).rstrip()
        for line in table
    )


def _runner(action: Callable[[argparse.Namespace], str]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            if getattr(args, "name", None) is not None:
                check_client_name(args.name)
            output = action(args)
        except (UsersFileError, Refused) as e:
            sys.stderr.write(f"wsfiles user {args.user_command}: {e}\n")
            return 1
        sys.stdout.write(output + "\n")
        return 0

    return run


def _setting_options(parser: argparse.ArgumentParser, *, changing: bool) -> None:
    parser.add_argument(
        "--quota", metavar="SIZE", help="bytes in its folder (K/M/G/T; none: unlimited)"
    )
    parser.add_argument(
        "--quota-files", metavar="N", help="files and folders in its folder (none: unlimited)"
    )
    parser.add_argument("--max-size", metavar="SIZE", help="largest upload (K/M/G/T)")
    access = parser.add_mutually_exclusive_group()
    access.add_argument(
        "--read-only",
        dest="access",
        action="store_const",
        const="read-only",
        help="list and get only; save, delete, rename, mkdir, rmdir are forbidden",
    )
    access.add_argument(
        "--read-write",
        dest="access",
        action="store_const",
        const="read-write",
        help="allow changes again (the default)",
    )
    parser.add_argument(
        "--expires",
        metavar="DATE",
        help="ISO 8601 date (that day 00:00 UTC) or UTC date-time; 'never' removes it",
    )
    if changing:
        parser.add_argument(
            "--unset",
            metavar="KEY",
            action="append",
            help="back to the server's option: quota, quota-files, max-size, read-only,"
            " expires (repeatable)",
        )


def add_user_commands(user_commands: Any) -> None:
    """The ``wsfiles user`` subcommands, on the parser's ``user`` subparsers."""

    def command(name: str, help_text: str, action: Callable[[argparse.Namespace], str]) -> Any:
        sub = user_commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--users", required=True, metavar="FILE", help="users file (created mode 0600)"
        )
        sub.set_defaults(run=_runner(action))
        return sub

    listing = command(
        "list", "list users: name, token id, settings, expiry (never a secret)", _list
    )
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    add = command("add", "add a client with a fresh token; prints the token alone on stdout", _add)
    add.add_argument("name", help="client name: 1-64 of A-Z a-z 0-9 _ . -, no leading dot")
    _setting_options(add, changing=False)
    remove = command(
        "remove", "remove a client; its open connections close within about a second", _remove
    )
    remove.add_argument("name")
    rotate = command(
        "rotate",
        "give a client a new token (printed alone on stdout); the old one stops working,"
        " and its open connections close within about a second",
        _rotate,
    )
    rotate.add_argument("name")
    change = command(
        "set",
        "change a client's settings, keeping its token (open connections go on with them)",
        _set,
    )
    change.add_argument("name")
    _setting_options(change, changing=True)
