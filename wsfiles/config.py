"""The settings a running service is built from (filled in by tap.Options)."""

from __future__ import annotations

from dataclasses import dataclass

SUBPROTOCOL = "wsfiles.v1"
COMMAND_MESSAGE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything the protocols need to know about the service's configuration."""

    max_size: int = 1024**3
    channel_timeout: float = 30.0
    open_handshake_timeout: float = 30.0
    auto_ping_interval: float = 60.0
    auto_ping_timeout: float = 30.0
