"""sd_notify without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

A no-op when the variable is unset (not started by systemd with
``Type=notify``), so it is always safe to call.
"""

from __future__ import annotations

import os
import socket

from twisted.logger import Logger

_log = Logger()


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``); return whether a socket was there to hear it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        _log.warn("sd_notify({state}) failed: {error}", state=state, error=e)
        return False
    return True
