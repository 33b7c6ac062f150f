"""wsfiles: a WebSocket file service for Twisted."""

__version__ = "0.1.0"
