"""A Twisted FTP server on 127.0.0.1, the baseline for bench/throughput.py.

    python bench/_ftp_server.py ROOT USER PASSWORD

Serves folder ROOT (read-write) to USER/PASSWORD with Twisted's own
``twisted.protocols.ftp``, listens on a free port of 127.0.0.1, and prints
``ftp listening on 127.0.0.1:PORT`` once it is ready.  Passive data ports
are bound to 127.0.0.1 too (Twisted's default would be every interface).
Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.cred import portal
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor
from twisted.protocols import ftp
from twisted.python import filepath

LOOPBACK = "127.0.0.1"


class LoopbackFTP(ftp.FTP):
    """Twisted's FTP protocol, with passive data ports on the loopback only."""

    def getDTPPort(self, factory: Any, interface: str = "") -> Any:
        return super().getDTPPort(factory, interface=LOOPBACK)


class FolderRealm(ftp.BaseFTPRealm):
    """Every authenticated user gets the same home folder."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self._home = filepath.FilePath(root)

    def getHomeDirectory(self, avatarId: Any) -> filepath.FilePath:
        return self._home


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    root, user, password = argv[1:]
    checker = InMemoryUsernamePasswordDatabaseDontUse(**{user: password.encode()})
    factory = ftp.FTPFactory(portal.Portal(FolderRealm(root), [checker]))
    factory.protocol = LoopbackFTP
    factory.allowAnonymous = False
    port = reactor.listenTCP(0, factory, interface=LOOPBACK)  # type: ignore[attr-defined]
    print(f"ftp listening on {LOOPBACK}:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
