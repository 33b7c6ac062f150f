"""XOR-masking of WebSocket payloads (RFC 6455 section 5.3) in two passes over the bytes.

Autobahn's native masker (NVX) allocates a zeroed buffer, copies the payload
into it, masks it and copies it out again: four passes over every byte, plus
a native object per frame.  File data is most of what wsfiles moves, so the
file channels mask with this instead: one copy into a ``bytearray`` and the
XOR done in place, by the same native routine when Autobahn ships it, else
by Python's big integers (still fast enough for gigabytes, where Autobahn's
pure-Python fallback manages about 13 MB/s).  ``docs/performance.md`` has the
before and after.
"""

from __future__ import annotations

from typing import Any

try:  # Autobahn's compiled masker (cffi); absent on platforms without a wheel
    from _nvx_xormasker import ffi as _ffi
    from _nvx_xormasker import lib as _lib
except ImportError:  # pragma: no cover - every supported wheel has it
    _ffi = _lib = None

#: WebSocket opcodes (RFC 6455 section 5.2).
_CONTINUATION, _TEXT, _BINARY = 0, 1, 2


def _python_mask(key: bytes, position: int, data: bytes) -> bytes:
    """The reference: ``data`` masked as the payload bytes from ``position`` on."""
    return bytes(byte ^ key[(position + i) % 4] for i, byte in enumerate(data))


class Masker:
    """Masks (or unmasks: XOR is its own inverse) consecutive pieces of one
    frame's payload with its 4-byte key, carrying the key's phase across pieces.

    ``rekey`` starts the next frame on the same native state: every call into
    the native library releases and retakes the GIL, and while a writer
    thread holds it each retake waits, so a protocol keeps one Masker and
    makes as few native calls per frame as it can (one per piece, one per frame).
    """

    __slots__ = ("_key", "_native", "_native_key", "_position")

    def __init__(self, key: bytes = b"\0\0\0\0") -> None:
        self._native: Any = None
        self._native_key: Any = None
        if _lib is not None:
            self._native = _ffi.gc(_lib.nvx_xormask_new(bytes(4)), _lib.nvx_xormask_free)
            # The key is the state's first member, so at offset 0 (C11 6.7.2.1).
            self._native_key = _ffi.cast("uint8_t *", self._native)
        self.rekey(key)

    def rekey(self, key: bytes) -> None:
        """Start masking a new frame with ``key``."""
        if len(key) != 4:
            raise ValueError("a WebSocket masking key is 4 bytes")
        self._key = bytes(key)
        self._position = 0
        if self._native is not None:
            _ffi.memmove(self._native_key, self._key, 4)  # not a native call
            _lib.nvx_xormask_reset(self._native)

    def process(self, data: bytes | bytearray | memoryview) -> bytearray:
        """The masked copy of ``data`` (the next bytes of the frame's payload)."""
        out = bytearray(data)
        length = len(out)
        if not length:
            return out
        if self._native is not None:
            _lib.nvx_xormask_process(self._native, _ffi.from_buffer(out), length)
        else:
            phase = self._position % 4
            key = self._key[phase:] + self._key[:phase]
            stream = key * (length // 4 + 1)
            mixed = int.from_bytes(out, "little") ^ int.from_bytes(stream[:length], "little")
            out[:] = mixed.to_bytes(length, "little")
        self._position += length
        return out


def _native_agrees() -> bool:
    """Check the native path against the reference once, at import.

    It relies on Autobahn's private masker (its state's layout, its
    functions); should a future Autobahn change them, wsfiles falls back to
    the Python path rather than store wrongly unmasked uploads.
    """
    global _lib
    sample = bytes(range(251)) * 3
    try:
        masker = Masker(b"\x9a\x17\xe3\x5c")
        pieces = [masker.process(sample[:5]), masker.process(sample[5:])]
        masker.rekey(b"\x01\x02\x03\x04")
        again = masker.process(sample[:7])
    except Exception:  # any failure of the private API means: do not use it
        agrees = False
    else:
        agrees = bytes(pieces[0] + pieces[1]) == _python_mask(
            b"\x9a\x17\xe3\x5c", 0, sample
        ) and bytes(again) == _python_mask(b"\x01\x02\x03\x04", 0, sample[:7])
    if not agrees:
        _lib = None
    return agrees


NATIVE = _lib is not None and _native_agrees()


class Unmasking:
    """Mixin for a server protocol whose factory sets ``applyMask=False``: unmasks
    every received payload (control frames' included) with :class:`Masker`.

    Binary data stays a ``bytearray`` (whoever takes it must accept any
    buffer); text and control frames become ``bytes``, which Autobahn's UTF-8
    validator and its close and ping handling need.
    """

    current_frame: Any
    _masker: Masker | None = None
    _unmasking = False
    _binary_message = False
    _binary_frame = False

    def onFrameBegin(self) -> None:
        frame = self.current_frame
        if frame.opcode in (_TEXT, _BINARY):
            self._binary_message = frame.opcode == _BINARY
        self._binary_frame = frame.opcode == _BINARY or (
            frame.opcode == _CONTINUATION and self._binary_message
        )
        self._unmasking = bool(frame.mask and frame.length)
        if self._unmasking:
            if self._masker is None:
                self._masker = Masker(frame.mask)
            else:
                self._masker.rekey(frame.mask)
        super().onFrameBegin()  # type: ignore[misc]

    def onFrameData(self, payload: bytes) -> bool | None:
        if self._unmasking:
            assert self._masker is not None
            unmasked = self._masker.process(payload)
            payload = unmasked if self._binary_frame else bytes(unmasked)  # type: ignore[assignment]
        return super().onFrameData(payload)  # type: ignore[misc]
