"""WebSocket frames read from a relayed byte stream, on the side (RFC 6455): pure, no I/O.

With `gateway_relay=frames` mitmproxy relays an admitted session's bytes with its TCP layer and
the gateway reads the frames out of the chunks it is handed (issue #22). Chunks fall anywhere:
a frame may be split across chunks, a chunk may hold several frames. `FrameReader` follows one
direction of the stream and reports each complete message (a data message reassembled from its
fragments, or a control frame) with the stream offsets of its frames; `Outbox` decides what of
the stream is forwarded: complete messages only (a message is held until its last byte arrived,
as mitmproxy's WebSocket layer holds it, so that a refused `response.create` can be cut out
whole), with the gateway's own frames spliced in at frame boundaries.

Memory is bounded per direction: a data message larger than `max_message` bytes is not held or
read, its frames are passed on as they arrive and it is reported unread (`payload` None). A reader
given `head_bytes` (the client's) first holds such a message until that many bytes of its payload
arrived and reports them (`Oversize`), so that the relay can still refuse it from its head, as the
adapters read a frame over their limit, and cut it out whole as it streams past.

Unmasking uses `websockets.speedups.apply_mask` (C, 6 us for 64 KiB here, 0.16 us for 200 B);
the portable fallback XORs the payload as one Python integer, C inside CPython but a hundred
times slower (600 us for 64 KiB), used only where that extension was not built.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets ships wheels with its C extension

    def apply_mask(data: bytes, mask: bytes) -> bytes:
        size = len(data)
        key = (mask * (size // 4 + 1))[:size]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = frozenset((TEXT, BINARY))
CONTROL_OPCODES = frozenset((CLOSE, PING, PONG))
PROTOCOL_ERROR, INVALID_DATA = 1002, 1007
NO_STATUS = 1005  # a close frame without a code, as wsproto and mitmproxy report it
MAX_CONTROL_PAYLOAD = 125
_SHORT = struct.Struct("!H")
_LONG = struct.Struct("!Q")


class Message(NamedTuple):
    """A complete message: `payload` unmasked (None when larger than the reader's cap: passed on
    unread), `size` its length, `spans` the stream offsets of its frames (to cut it out whole)."""

    opcode: int
    payload: bytes | None
    size: int
    spans: tuple[tuple[int, int], ...]


class Head(bytes):
    """The first bytes of a data message too large to hold, standing for all of it: its length is
    the message's (as far as known), so a reader takes it for a frame over its limit and reads its
    head; the bytes themselves are the head only (no tail to read)."""

    size: int

    def __new__(cls, head: bytes, size: int) -> Head:
        self = super().__new__(cls, head)
        self.size = size
        return self

    def __len__(self) -> int:
        return self.size


class Oversize(NamedTuple):
    """The head of a data message over the reader's cap, before any of it is forwarded: read as a
    Message whose payload is the Head; its one span is open (end None) until the message ends, so
    that cutting it drops the message's bytes as they arrive."""

    opcode: int
    payload: Head
    size: int
    spans: tuple[tuple[int, int | None], ...]


class Violation(NamedTuple):
    """The stream broke the protocol at `start` (a frame boundary): the session ends with `code`."""

    code: int
    reason: str
    start: int


Read = Message | Oversize | Violation
"""What a reader reports."""


@dataclass
class _Open:
    """The data message being assembled."""

    opcode: int
    start: int
    parts: list[bytes] | None  # None once it outgrew the cap
    size: int = 0
    head: bytearray | None = None  # of an over-cap message, while its head is read (and held)
    spans: list[tuple[int, int]] = field(default_factory=list)


class FrameReader:
    """One direction of a WebSocket stream: `masked` for what a client sends (RFC 6455 5.3)."""

    def __init__(self, masked: bool, max_message: int, head_bytes: int = 0) -> None:
        self.masked = masked
        self.max_message = max_message
        self.head_bytes = head_bytes
        self.offset = 0  # stream bytes fed so far
        self.boundary = 0  # the last offset where no frame and no data message was open
        self.failed = False
        self._header = b""  # the bytes of a frame header split across chunks
        self._frame: tuple[int, bool, int, bytes | None, int] | None = None  # opcode, fin, start, mask, length
        self._remaining = 0
        self._frame_parts: list[bytes] = []
        self._frame_head = b""  # the current frame's masked payload bytes, while its message's head is read
        self._frame_mask: bytes | None = None
        self._frame_fin = False
        self._message: _Open | None = None

    @property
    def safe(self) -> int:
        """Up to where the stream may be forwarded: all of it but an incomplete message or frame,
        which is held, unless it is one too large to hold (once its head was reported)."""
        message = self._message
        if message is not None and message.parts is None and message.head is None:
            return self.offset
        return self.boundary

    def feed(self, chunk: bytes) -> list[Read]:
        out: list[Read] = []
        if self.failed:
            self.offset += len(chunk)
            return out
        base = self.offset
        i, n = 0, len(chunk)
        while i < n and not self.failed:
            if self._frame is None:
                i = self._read_header(chunk, i, base, out)
                continue
            take = min(self._remaining, n - i)
            if self._collecting():
                self._frame_parts.append(chunk[i : i + take])
            elif self._heading():
                self._frame_head += chunk[i : i + min(take, self._head_needed())]
                if not self._head_needed():
                    self._headed(out, self._frame)
            self._remaining -= take
            i += take
            if self._remaining == 0:
                self._end_frame(base + i, out)
        self.offset = base + n
        return out

    def _collecting(self) -> bool:
        opcode = self._frame[0]  # type: ignore[index]
        return opcode in CONTROL_OPCODES or (self._message is not None and self._message.parts is not None)

    def _heading(self) -> bool:
        return self._message is not None and self._message.head is not None

    def _head_needed(self) -> int:
        return self.head_bytes - len(self._message.head) - len(self._frame_head)  # type: ignore[union-attr]

    def _headed(self, out: list[Read], frame: tuple[int, bool, int, bytes | None, int] | None) -> None:
        """The part of the head read from `frame` (in progress; None once it ended, its length
        counted) joins the head; once complete, or the message ended, the head is reported."""
        message = self._message
        assert message is not None and message.head is not None
        mask = self._frame_mask
        if self._frame_head:
            message.head += apply_mask(self._frame_head, mask) if mask is not None else self._frame_head
            self._frame_head = b""
        ended = frame is None and self._frame_fin
        if len(message.head) >= self.head_bytes or ended:
            known = message.size + (frame[4] if frame is not None else 0)
            head = Head(bytes(message.head), max(known, self.max_message + 1))
            message.head = None
            out.append(Oversize(message.opcode, head, len(head), ((message.start, None),)))

    def _read_header(self, chunk: bytes, i: int, base: int, out: list[Read]) -> int:
        """Parse a frame header at chunk[i:], completing one begun in an earlier chunk; returns
        where the payload starts (or the chunk's end, when the header is still incomplete)."""
        data = self._header + chunk[i : i + 14] if self._header else chunk[i : i + 14]
        need = header_length(data)
        if need is None or len(data) < need:
            self._header = data
            return len(chunk)
        consumed = need - len(self._header)
        start = base + i - len(self._header)
        self._header = b""
        b0, b1 = data[0], data[1]
        opcode, fin, masked = b0 & 0x0F, bool(b0 & 0x80), bool(b1 & 0x80)
        length = b1 & 0x7F
        if length == 126:
            length = _SHORT.unpack_from(data, 2)[0]
        elif length == 127:
            length = _LONG.unpack_from(data, 2)[0]
        problem = self._problem(b0, opcode, fin, masked, length)
        if problem is not None:
            self._fail(PROTOCOL_ERROR, problem, out)
            return len(chunk)
        mask = data[need - 4 : need] if masked else None
        grown, head = False, b""  # grown: over the cap from this frame on, its head to be read
        if opcode in DATA_OPCODES:
            holdable = length <= self.max_message
            self._message = _Open(opcode, start, [] if holdable else None)
            grown = not holdable and bool(self.head_bytes)
        elif opcode == CONTINUATION:
            message = self._message
            assert message is not None
            if message.parts is not None and message.size + length > self.max_message:
                grown = bool(self.head_bytes)
                head = b"".join(message.parts)[: self.head_bytes] if grown else b""
                message.parts = None  # outgrew the cap: what was held goes on, the rest as it comes
        self._frame = (opcode, fin, start, mask, length)
        self._frame_mask, self._frame_fin = mask, fin
        self._remaining = length
        self._frame_parts = []
        if grown:
            message = self._message
            assert message is not None
            message.head = bytearray(head)
            if len(message.head) >= self.head_bytes:
                self._headed(out, self._frame)
        if length == 0:
            self._end_frame(base + i + consumed, out)
        return i + consumed

    def _problem(self, b0: int, opcode: int, fin: bool, masked: bool, length: int) -> str | None:
        if b0 & 0x70:
            return "reserved bits set without an extension"
        if masked != self.masked:
            return "client frames must be masked, server frames must not" if self.masked else "masked server frame"
        if opcode in CONTROL_OPCODES:
            return None if fin and length <= MAX_CONTROL_PAYLOAD else "fragmented or oversized control frame"
        if opcode in DATA_OPCODES:
            return None if self._message is None else "data frame inside a fragmented message"
        if opcode == CONTINUATION:
            return None if self._message is not None else "continuation without a message"
        return f"unknown opcode {opcode}"

    def _end_frame(self, end: int, out: list[Read]) -> None:
        opcode, fin, start, mask, length = self._frame  # type: ignore[misc]
        self._frame = None
        payload = b"".join(self._frame_parts) if len(self._frame_parts) != 1 else self._frame_parts[0]
        self._frame_parts = []
        if mask is not None and payload:
            payload = apply_mask(payload, mask)
        if opcode in CONTROL_OPCODES:
            if opcode == CLOSE and not valid_close(payload):
                self._fail(PROTOCOL_ERROR if len(payload) == 1 else INVALID_DATA, "invalid close frame", out, start)
                return
            out.append(Message(opcode, payload, len(payload), ((start, end),)))
            if self._message is None:
                self.boundary = end
            return
        message = self._message
        assert message is not None
        message.size += length
        message.spans.append((start, end))
        if message.parts is not None:
            message.parts.append(payload)
        elif message.head is not None:
            self._headed(out, None)
        if not fin:
            return
        self._message = None
        self.boundary = end
        if message.parts is None:
            out.append(Message(message.opcode, None, message.size, tuple(message.spans)))
            return
        content = message.parts[0] if len(message.parts) == 1 else b"".join(message.parts)
        if message.opcode == TEXT and not is_utf8(content):
            self._fail(INVALID_DATA, "text message is not UTF-8", out, message.start)
            return
        out.append(Message(message.opcode, content, len(content), tuple(message.spans)))

    def _fail(self, code: int, reason: str, out: list[Read], start: int | None = None) -> None:
        """Nothing after a violation is read; the stream is cut where the offending message began."""
        self.failed = True
        where = self.boundary if start is None else start
        if self._message is not None:
            where = min(where, self._message.start)
        out.append(Violation(code, reason, where))


def header_length(data: bytes) -> int | None:
    """A frame header's length from its first two bytes (None before they arrived)."""
    if len(data) < 2:
        return None
    length = data[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + 4 if data[1] & 0x80 else size


def is_utf8(content: bytes) -> bool:
    """RFC 6455 8.1: text is UTF-8. JSON events are nearly always ASCII, which isascii checks in C
    without decoding; anything else is decoded (C too) and the text dropped."""
    if content.isascii():
        return True
    try:
        content.decode()
    except UnicodeDecodeError:
        return False
    return True


def valid_close(payload: bytes) -> bool:
    """A close frame's body: empty, or a code and a UTF-8 reason (RFC 6455 5.5.1)."""
    return not payload or (len(payload) >= 2 and is_utf8(payload[2:]))


def close_code(payload: bytes) -> int:
    return _SHORT.unpack_from(payload)[0] if len(payload) >= 2 else NO_STATUS


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; `mask` (4 bytes) for a frame the gateway sends upstream as the client."""
    length = len(payload)
    b1 = 0x80 if mask is not None else 0
    if length < 126:
        header = bytes((0x80 | opcode, b1 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, b1 | 126)) + _SHORT.pack(length)
    else:
        header = bytes((0x80 | opcode, b1 | 127)) + _LONG.pack(length)
    if mask is None:
        return header + payload
    return header + mask + apply_mask(payload, mask)


def encode_close(code: int, reason: str, mask: bytes | None = None) -> bytes:
    return encode_frame(CLOSE, _SHORT.pack(code) + reason.encode()[: MAX_CONTROL_PAYLOAD - 2], mask)


Edit = tuple[int, bytes, bool]  # a frame of the gateway's at a stream position; final: a close


class Outbox:
    """What of one direction's stream is forwarded: the bytes fed, up to a limit the reader gives,
    minus cut messages, with the gateway's frames spliced in at frame boundaries.

    `send` queues a frame for the next boundary at or after what was already forwarded; `close`
    does the same for a close frame, after which nothing more of the stream is forwarded."""

    def __init__(self) -> None:
        self.base = 0  # stream offset of the first byte not yet forwarded
        self.pending = b""  # the stream from `base` on (and then `_more`)
        self._more: list[bytes] = []  # chunks behind `pending` not yet needed: a held message grows linearly
        self.closed = False
        self._cuts: list[tuple[int, int]] = []
        self._open_cut: int | None = None  # a message cut out as it streams past, from here on
        self._inserts: list[tuple[int, bytes, bool]] = []  # position, frame, final
        self._waiting: list[tuple[bytes, bool]] = []

    @property
    def idle(self) -> bool:
        return not (self.pending or self._cuts or self._inserts or self._waiting or self._open_cut is not None)

    def add(self, chunk: bytes) -> None:
        if self.pending:
            self._more.append(chunk)  # joined once something after `pending` is forwarded (take)
        else:
            self.pending = chunk

    def cut(self, spans: tuple[tuple[int, int | None], ...]) -> None:
        """Cut spans out; one without an end (an Oversize's) runs on until `end_cut`."""
        for start, end in spans:
            if end is None:
                self._open_cut = start
            else:
                self._cuts.append((start, end))

    def end_cut(self, end: int) -> None:
        if self._open_cut is not None:
            self._cuts.append((self._open_cut, end))
            self._open_cut = None

    def send(self, frame: bytes, final: bool = False) -> None:
        self._waiting.append((frame, final))

    def replace(self, spans: tuple[tuple[int, int | None], ...], frame: bytes, previous: Edit | None = None) -> Edit:
        """A message's frames cut out and `frame` put where it began (in its place, not after the
        rest of the chunk as `send` would); `previous`, an earlier replacement of it, undone."""
        if previous is None:
            self.cut(spans)
        else:
            self.unplace(previous)
        edit = (max(spans[0][0], self.base), frame, False)
        self._inserts.append(edit)
        return edit

    def unplace(self, edit: Edit) -> None:
        """A replacement not yet forwarded taken back."""
        if edit in self._inserts:
            self._inserts.remove(edit)

    def close(self, frame: bytes, at: int | None = None) -> None:
        """The close frame, last: at the next boundary, or at `at` (where a violating message began)."""
        if at is None:
            self.send(frame, final=True)
        else:
            self._inserts.append((max(at, self.base), frame, True))

    def place(self, boundary: int) -> None:
        """Queued frames go at `boundary` once it is one not yet forwarded."""
        if self._waiting and boundary >= self.base:
            self._inserts.extend((boundary, frame, final) for frame, final in self._waiting)
            self._waiting.clear()

    def take(self, limit: int) -> bytes:
        """The bytes to forward now: the stream up to `limit`, edited."""
        if self._more and limit >= self.base + len(self.pending):
            self.pending = b"".join([self.pending, *self._more])
            self._more.clear()
        if self._open_cut is not None and limit > self._open_cut:
            self._cuts.append((self._open_cut, limit))
            self._open_cut = limit
        if self.closed:
            self.pending, self.base = self.pending[limit - self.base :], limit
            return b""
        if not self._cuts and not self._inserts:
            if limit == self.base + len(self.pending):
                out, self.pending = self.pending, b""
            else:
                out, self.pending = self.pending[: limit - self.base], self.pending[limit - self.base :]
            self.base = limit
            return out
        edits = sorted(
            [(p, 0, p, frame, final) for p, frame, final in self._inserts if p <= limit]
            + [(s, 1, e, b"", False) for s, e in self._cuts if e <= limit]
        )
        parts: list[bytes] = []
        at = self.base
        for position, kind, end, frame, final in edits:
            parts.append(self.pending[at - self.base : position - self.base])
            if kind:
                self._cuts.remove((position, end))
                at = end
                continue
            self._inserts.remove((position, frame, final))
            parts.append(frame)
            at = position
            if final:
                self.closed = True
                break
        if not self.closed:
            parts.append(self.pending[at - self.base : limit - self.base])
        self.pending, self.base = self.pending[limit - self.base :], limit
        return b"".join(parts)
