"""``wsfiles``: the commands that are not the server (the server is ``twistd wsfiles``)."""

from __future__ import annotations

import argparse
import sys

from wsfiles.users import UsersFileError, add_user


def _user_add(args: argparse.Namespace) -> int:
    try:
        token = add_user(args.users, args.name)
    except UsersFileError as e:
        sys.stderr.write(f"wsfiles: {e}\n")
        return 1
    sys.stdout.write(token + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsfiles", description="wsfiles tools. Run the server with 'twistd wsfiles'."
    )
    commands = parser.add_subparsers(dest="command", required=True)
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
    return args.run(args)
