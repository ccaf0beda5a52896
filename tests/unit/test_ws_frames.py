"""The frame reader against wsproto's own encoder: any message sequence, masked or not, fragmented,
with control frames between fragments, split at any chunk boundaries."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol

from ai_gateway.protocols.ws_frames import (
    BINARY,
    CLOSE,
    INVALID_DATA,
    PING,
    PROTOCOL_ERROR,
    TEXT,
    FrameReader,
    Message,
    Outbox,
    Oversize,
    Violation,
    close_code,
    encode_close,
    encode_frame,
)

from .conftest import examples

# Large payloads (a 64-bit length) built, not drawn byte by byte.
payloads = st.binary(max_size=300) | st.builds(
    lambda n, b: bytes([b]) * n, st.integers(65530, 65540), st.integers(0, 255)
)
texts = st.text(max_size=200)
# A message: text or binary, in one or more fragments, with pings between fragments.
messages = st.one_of(
    st.tuples(st.just(TEXT), st.lists(texts, min_size=1, max_size=4), st.lists(st.binary(max_size=125), max_size=2)),
    st.tuples(
        st.just(BINARY), st.lists(payloads, min_size=1, max_size=3), st.lists(st.binary(max_size=125), max_size=2)
    ),
)


def encode(sequence: list, masked: bool) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The stream wsproto writes for the sequence, and the messages a reader must report, in order."""
    protocol = FrameProtocol(client=masked, extensions=[])
    stream, expected = [], []
    for opcode, fragments, pings in sequence:
        for index, fragment in enumerate(fragments):
            stream.append(protocol.send_data(fragment, fin=index == len(fragments) - 1))
            if index < len(pings) and index < len(fragments) - 1:
                stream.append(protocol.ping(pings[index]))
                expected.append((PING, pings[index]))
        whole = "".join(fragments).encode() if opcode == TEXT else b"".join(fragments)
        expected.append((opcode, whole))
    return b"".join(stream), expected


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(messages, max_size=6), st.booleans(), st.lists(st.integers(0, 70000), max_size=12))
def test_any_sequence_split_anywhere_is_read_and_forwarded_unchanged(sequence, masked, cuts):
    stream, expected = encode(sequence, masked)
    reader, outbox = FrameReader(masked, max_message=1 << 20), Outbox()
    seen, forwarded = [], []
    for chunk in split(stream, cuts):
        events = reader.feed(chunk)
        assert not [e for e in events if isinstance(e, Violation)]
        seen.extend((m.opcode, m.payload) for m in events)
        outbox.add(chunk)
        forwarded.append(outbox.take(reader.safe))
        assert reader.safe == reader.boundary  # a message is forwarded only once complete
    assert seen == expected
    assert b"".join(forwarded) == stream


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(messages, min_size=1, max_size=5), st.booleans(), st.lists(st.integers(0, 70000), max_size=8))
def test_a_message_over_the_cap_is_forwarded_as_it_comes_and_reported_unread(sequence, masked, cuts):
    stream, expected = encode(sequence, masked)
    cap = 100
    reader, outbox = FrameReader(masked, max_message=cap), Outbox()
    seen, forwarded = [], []
    for chunk in split(stream, cuts):
        seen.extend(reader.feed(chunk))
        outbox.add(chunk)
        forwarded.append(outbox.take(reader.safe))
        assert len(outbox.pending) <= cap + 14 + 125 * 2 + 20  # never more than a held message and its frames
    assert [(m.opcode, m.payload if len(p) <= cap else None) for m, (_, p) in zip(seen, expected, strict=True)] == [
        (m.opcode, m.payload) for m in seen
    ]
    assert [m.size for m in seen] == [len(p) for _, p in expected]
    assert b"".join(forwarded) == stream


def relayed_editing(
    stream: bytes, masked: bool, sizes: list[int], edit: Callable[[Outbox, Message], None]
) -> list[bytes]:
    """The data messages forwarded when `stream` arrives in chunks cut at `sizes` and `edit` is given
    the outbox and each data message as it is read."""
    reader, outbox = FrameReader(masked, max_message=1 << 20), Outbox()
    forwarded = []
    for chunk in split(stream, sizes):
        outbox.add(chunk)
        for message in reader.feed(chunk):
            if message.opcode in (TEXT, BINARY):
                edit(outbox, message)
        outbox.place(reader.boundary)
        forwarded.append(outbox.take(reader.safe))
    again = FrameReader(masked, max_message=1 << 20)
    return [m.payload for m in again.feed(b"".join(forwarded)) if m.opcode in (TEXT, BINARY)]


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(messages, min_size=2, max_size=5), st.data())
def test_a_cut_message_is_gone_and_an_inserted_frame_lands_on_a_boundary(sequence, data):
    stream, _ = encode(sequence, True)
    victim = data.draw(st.integers(0, len(sequence) - 1))
    injected_payload = b'{"type":"error"}'
    injected = encode_frame(TEXT, injected_payload, mask=os.urandom(4))  # upstream, as a client frame
    kept: list[bytes | None] = []
    read = itertools.count()

    def edit(outbox: Outbox, message: Message) -> None:
        if next(read) == victim:
            outbox.cut(tuple(s for s in message.spans))
            outbox.send(injected)
        else:
            kept.append(message.payload)

    relayed = relayed_editing(stream, True, data.draw(st.lists(st.integers(0, 70000), max_size=8)), edit)
    assert [payload for payload in relayed if payload != injected_payload] == kept
    assert len(relayed) == len(kept) + 1


@settings(max_examples=60, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5), st.booleans(), st.data())
def test_a_message_over_the_cap_is_held_until_its_head_is_read_and_can_then_be_cut_whole(sequence, masked, data):
    """A reader with head_bytes (the client's) reports an over-cap message's head before any of it
    is forwarded; cut then, the message is gone from the stream, whichever way it was split."""
    stream, expected = encode(sequence, masked)
    cap, head_bytes = 100, 16
    reader, outbox = FrameReader(masked, max_message=cap, head_bytes=head_bytes), Outbox()
    heads, kept, forwarded, streaming = [], [], [], False
    for chunk in split(stream, data.draw(st.lists(st.integers(0, 70000), max_size=8))):
        outbox.add(chunk)
        for event in reader.feed(chunk):
            if isinstance(event, Oversize):
                assert outbox.base <= event.spans[0][0]  # nothing of it forwarded yet
                assert len(event.payload) == event.size > cap
                heads.append(bytes(event.payload))
                if data.draw(st.booleans()):
                    outbox.cut(event.spans)
                else:
                    kept.append(len(heads) - 1)
                streaming = True
            elif event.opcode in (TEXT, BINARY) and event.payload is None:
                assert streaming
                outbox.end_cut(event.spans[-1][1])
                streaming = False
        forwarded.append(outbox.take(reader.safe))
    over = [whole for opcode, whole in expected if opcode in (TEXT, BINARY) and len(whole) > cap]
    assert heads == [whole[:head_bytes] for whole in over]
    under = [whole for opcode, whole in expected if opcode in (TEXT, BINARY) and len(whole) <= cap]
    again = FrameReader(masked, max_message=1 << 20)
    relayed = [m.payload for m in again.feed(b"".join(forwarded)) if m.opcode in (TEXT, BINARY)]
    assert sorted(relayed) == sorted(under + [over[i] for i in kept])


def test_close_frames_are_encoded_as_peers_read_them():
    frame = encode_close(1008, "budget spent", mask=os.urandom(4))
    (message,) = FrameReader(True, 1000).feed(frame)
    assert isinstance(message, Message) and message.opcode == CLOSE
    assert close_code(message.payload or b"") == 1008 and message.payload[2:] == b"budget spent"
    (bare,) = FrameReader(False, 1000).feed(FrameProtocol(client=False, extensions=[]).close())
    assert close_code(bare.payload or b"") == 1005  # type: ignore[union-attr]


def test_an_invalid_text_message_ends_the_stream_with_1007_where_it_began():
    protocol = FrameProtocol(client=False, extensions=[])
    good = protocol.send_data("hello")
    bad = encode_frame(TEXT, b"caf\xe9")
    events = FrameReader(False, 1000).feed(good + bad + good)
    assert [type(e) for e in events] == [Message, Violation]
    assert events[1] == Violation(INVALID_DATA, "text message is not UTF-8", len(good))


def test_unmasked_client_frames_and_reserved_bits_are_protocol_errors():
    unmasked = FrameProtocol(client=False, extensions=[]).send_data("hi")
    assert FrameReader(True, 1000).feed(unmasked)[0].code == PROTOCOL_ERROR  # type: ignore[union-attr]
    compressed = bytes([0xC1, 0x00])
    assert FrameReader(False, 1000).feed(compressed)[0].code == PROTOCOL_ERROR  # type: ignore[union-attr]


def test_a_close_frame_body_is_capped_at_125_bytes():
    (message,) = FrameReader(False, 1000).feed(encode_close(1008, "x" * 200))
    assert message.size == 125  # type: ignore[union-attr]


@settings(max_examples=examples(40), deadline=None)
@given(st.lists(messages, min_size=2, max_size=5), st.booleans(), st.data())
def test_a_replaced_message_is_relayed_in_its_place_whatever_follows_in_the_chunk(sequence, masked, data):
    """A guard's edit (a response.done without its output) takes the message's place, not the
    next boundary's: the messages after it in the same chunk stay after it."""
    stream, _ = encode(sequence, masked)
    victim = data.draw(st.integers(0, len(sequence) - 1))
    edited = b'{"type":"response.done","response":{"output":[]}}'
    expected: list[bytes | None] = []
    read = itertools.count()

    def edit(outbox: Outbox, message: Message) -> None:
        if next(read) == victim:
            first = outbox.replace(message.spans, encode_frame(TEXT, b"first edit", os.urandom(4) if masked else None))
            outbox.replace(message.spans, encode_frame(TEXT, edited, os.urandom(4) if masked else None), first)
            expected.append(edited)
        else:
            expected.append(message.payload)

    assert relayed_editing(stream, masked, data.draw(st.lists(st.integers(0, 70000), max_size=8)), edit) == expected
