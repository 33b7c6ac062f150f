"""twistd plugin: ``twistd wsfiles``. Kept tiny because every twistd run imports it."""

from twisted.application.service import ServiceMaker

wsfiles = ServiceMaker(
    "wsfiles",
    "wsfiles.tap",
    "WebSocket file service: per-client folders over paired command and file channels.",
    "wsfiles",
)
