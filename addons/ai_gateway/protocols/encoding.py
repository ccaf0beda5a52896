"""Incremental decoding of compressed streamed bodies, so a gzip/br/zstd SSE stream can be metered
chunk by chunk while the client receives the original bytes untouched."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli

try:
    from compression import zstd  # Python 3.14
except ImportError:
    from backports import zstd  # what mitmproxy installs before 3.14

Decoder = Callable[[bytes], bytes]


def _zlib(wbits: int) -> Decoder:
    return zlib.decompressobj(wbits).decompress


def _deflate() -> Decoder:
    """HTTP's deflate is zlib-wrapped, but some servers send raw deflate: decide on the first bytes."""
    decoder: Decoder | None = None

    def decode(data: bytes) -> bytes:
        nonlocal decoder
        if decoder is None:
            if not data:
                return b""
            zlib_wrapped = len(data) >= 2 and (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0
            decoder = _zlib(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
        return decoder(data)

    return decode


_DECODERS: dict[str, Callable[[], Decoder]] = {
    "identity": lambda: lambda data: data,
    "gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _zlib(16 + zlib.MAX_WBITS),
    "deflate": _deflate,
    "br": lambda: brotli.Decompressor().process,
    "zstd": lambda: zstd.ZstdDecompressor().decompress,
}


def stream_decoder(content_encoding: str) -> Decoder | None:
    """A decoder for one response body; None for an encoding we cannot decode incrementally."""
    factory = _DECODERS.get(content_encoding.strip().lower() or "identity")
    return factory() if factory else None
