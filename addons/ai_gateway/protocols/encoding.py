"""Bounded, incremental decoding of compressed bodies (gzip, deflate, br, zstd).

A 2 MB gzip body can inflate to gigabytes, and every hook runs on the relay's event loop: the
gateway reads a body only through a `BodyDecoder`, which decodes in small steps and stops as
soon as the decoded total passes its limit, so at most the limit (plus one step) ever exists
decoded. The client and the upstream always get the original bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import brotli

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd  # what mitmproxy installs before 3.14

# Decoding steps: input is fed in slices of INPUT_STEP and each call yields at most OUTPUT_STEP,
# so a bomb never gets a large buffer allocated at once (and no step copies much).
INPUT_STEP = 64 * 1024
OUTPUT_STEP = 256 * 1024
# Decoded bytes the gateway reads of one body (gateway_max_body_bytes): far above any usage-bearing
# JSON body or SSE stream, far below what a 2 MB gzip body can inflate to.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class BodyTooLarge(Exception):
    """The decoded body passed the limit; nothing more of it is decoded."""


class UnsupportedEncoding(Exception):
    """A Content-Encoding this module cannot decode (chained encodings included)."""


class _Codec(Protocol):
    def decode(self, data: bytes | memoryview, max_length: int) -> bytes:
        """Up to max_length bytes from the pending input plus data (b"" drains what is pending)."""
        ...

    @property
    def needs_input(self) -> bool:
        """False while output from the input already given is still pending."""
        ...


class _Identity:
    """Not compressed: bytes pass through in bounded slices."""

    def __init__(self) -> None:
        self._pending = b""

    def decode(self, data: bytes | memoryview, max_length: int) -> bytes:
        pending = self._pending + data
        self._pending = pending[max_length:]
        return pending[:max_length]

    @property
    def needs_input(self) -> bool:
        return not self._pending


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._decompressor = zlib.decompressobj(wbits)
        self._full = False  # the last call filled its output: more may be pending inside zlib

    def decode(self, data: bytes | memoryview, max_length: int) -> bytes:
        decompressor = self._decompressor
        out = decompressor.decompress(decompressor.unconsumed_tail + data, max_length)
        self._full = len(out) >= max_length
        return out

    @property
    def needs_input(self) -> bool:
        return not self._decompressor.unconsumed_tail and not self._full


class _Deflate:
    """HTTP's deflate is zlib-wrapped, but some servers send raw deflate: decide on the first bytes."""

    def __init__(self) -> None:
        self._codec: _Zlib | None = None
        self._start = b""  # the first bytes, until there are two to decide on

    def decode(self, data: bytes | memoryview, max_length: int) -> bytes:
        if self._codec is None:
            self._start += data
            if len(self._start) < 2:
                return b""
            first, second = self._start[:2]
            zlib_wrapped = (first & 0x0F) == 8 and (first << 8 | second) % 31 == 0
            self._codec = _Zlib(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            data, self._start = self._start, b""
        return self._codec.decode(data, max_length)

    @property
    def needs_input(self) -> bool:
        return self._codec is None or self._codec.needs_input


class _Brotli:
    def __init__(self) -> None:
        self._decompressor = brotli.Decompressor()
        self._full = False  # brotli accepts input again before its pending output is out

    def decode(self, data: bytes | memoryview, max_length: int) -> bytes:
        out = self._decompressor.process(bytes(data), output_buffer_limit=max_length)
        self._full = len(out) >= max_length
        return out

    @property
    def needs_input(self) -> bool:
        return self._decompressor.can_accept_more_data() and not self._full


class _Zstd:
    def __init__(self) -> None:
        self._decompressor = zstd.ZstdDecompressor()

    def decode(self, data: bytes | memoryview, max_length: int) -> bytes:
        return self._decompressor.decompress(data, max_length)

    @property
    def needs_input(self) -> bool:
        return self._decompressor.needs_input or self._decompressor.eof


_CODECS: dict[str, Callable[[], _Codec]] = {
    "identity": _Identity,
    "gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}


def _codec(content_encoding: str) -> _Codec:
    factory = _CODECS.get(content_encoding.strip().lower() or "identity")
    if factory is None:
        raise UnsupportedEncoding(content_encoding[:64])
    return factory()


def is_identity(content_encoding: str) -> bool:
    return content_encoding.strip().lower() in ("", "identity")


class BodyDecoder:
    """Decodes one body incrementally; raises BodyTooLarge once more than `limit` bytes came out.

    Raises UnsupportedEncoding when created for an encoding it cannot decode, and the codec's
    own error (zlib.error, brotli.error, ZstdError, EOFError) on a corrupt body.
    """

    def __init__(self, content_encoding: str, limit: int) -> None:
        self._codec = _codec(content_encoding)
        self.limit = limit
        self.decoded = 0  # bytes decoded so far

    def feed(self, data: bytes) -> bytes:
        """The decoded bytes that `data` completes."""
        view = memoryview(data)
        out = [self._step(view[start : start + INPUT_STEP]) for start in range(0, len(view), INPUT_STEP)]
        return b"".join(out)

    def _step(self, data: memoryview) -> bytes:
        pieces = [self._take(self._codec.decode(data, self._room()))]
        while not self._codec.needs_input:
            pieces.append(self._take(self._codec.decode(b"", self._room())))
        return b"".join(pieces)

    def _room(self) -> int:
        # One byte more than the limit allows, to tell "exactly the limit" from "past it".
        return min(OUTPUT_STEP, self.limit - self.decoded + 1)

    def _take(self, piece: bytes) -> bytes:
        self.decoded += len(piece)
        if self.decoded > self.limit:
            raise BodyTooLarge(f"more than {self.limit} bytes decoded")
        return piece


def decode_body(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """A whole body decoded, at most `limit` bytes of it (else BodyTooLarge); identity is never copied."""
    if is_identity(content_encoding):
        if len(raw) > limit:
            raise BodyTooLarge(f"{len(raw)} bytes, more than {limit}")
        return raw
    return BodyDecoder(content_encoding, limit).feed(raw)
