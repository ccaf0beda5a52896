"""The "OpenAI Realtime" content view, through mitmproxy's own view selection, and strip_audio."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import contentviews, http
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from ai_gateway.proxy.contentview import realtime_view
from ai_gateway.proxy.history import AUDIO_FIELDS, audio_placeholder, strip_audio
from ai_gateway_tools.simulators.realtime import EXAMPLE_USAGE

from .conftest import examples

VIEW = "OpenAI Realtime"
REFERENCE_TABLE = """\
══ usage: response.done, completed ══
          total  text  audio  image
input       132   119     13      0
  cached     64    64      0      0
output      121    30     91      -"""


def frame(event: object, **dumps: Any) -> bytes:
    return json.dumps(event, **dumps).encode()


def b64(size: int) -> str:
    return base64.b64encode(bytes(range(256)) * (size // 256) + bytes(size % 256)).decode()


def output_delta(audio: str, kind: str = "response.output_audio.delta") -> dict[str, Any]:
    return {"type": kind, "event_id": "event_1", "response_id": "resp_1", "item_id": "item_1", "delta": audio}


RESPONSE_DONE = {
    "type": "response.done",
    "event_id": "e1",
    "response": {"id": "r1", "status": "completed", "usage": EXAMPLE_USAGE},
}


@pytest.fixture(scope="module", autouse=True)
def mitmproxy_options() -> Iterator[None]:
    """prettify_message reads mitmproxy's options, as it does inside mitmweb."""
    with taddons.context():
        yield


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The view registered as the addon does, in a copy of mitmproxy's registry that the test then drops."""
    monkeypatch.setattr(contentviews.registry, "_by_name", dict(contentviews.registry._by_name))
    contentviews.add(realtime_view)


def websocket(content: bytes, path: str = "/v1/realtime?model=gpt-realtime", from_client: bool = False):
    flow = tflow.twebsocketflow()
    flow.request.path = path
    message = WebSocketMessage(Opcode.TEXT, from_client, content)
    flow.websocket.messages.append(message)
    return flow, message


def show(content: bytes, **kwargs: Any) -> contentviews.ContentviewResult:
    """What mitmweb shows for a WebSocket message in its "auto" view."""
    flow, message = websocket(content, **kwargs)
    return contentviews.prettify_message(message, flow)


def sse_response(body: bytes) -> tuple[http.HTTPFlow, http.Response]:
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "text/event-stream; charset=utf-8"
    flow.response.content = body
    return flow, flow.response


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


# mitmproxy's selection, as mitmweb uses it


def test_mitmproxy_picks_the_view_for_an_audio_delta_and_shows_its_size(registry):
    shown = show(frame(output_delta(b64(9600))))
    assert shown.view_name == VIEW
    assert '"delta": "<audio pcm16 24 kHz: 9,600 bytes, 200 ms>"' in shown.text
    assert shown.text.startswith('{\n  "type": "response.output_audio.delta",')


def test_mitmproxy_picks_the_view_for_response_done_and_shows_its_usage(registry):
    shown = show(frame(RESPONSE_DONE))
    assert shown.view_name == VIEW
    assert shown.text.endswith("}\n\n" + REFERENCE_TABLE)


def test_the_event_type_comes_first(registry):
    shown = show(b'{"event_id":"e1","type":"session.update","session":{}}', from_client=True)
    assert shown.view_name == VIEW
    assert shown.text.splitlines()[1] == '  "type": "session.update",'


def test_a_client_event_with_its_type_last_is_still_shown_on_a_realtime_socket(registry):
    shown = show(frame({"audio": "AAAA", "type": "input_audio_buffer.append"}), from_client=True)
    assert shown.view_name == VIEW
    assert '"audio": "<audio pcm16 24 kHz: 3 bytes, 0.1 ms>"' in shown.text


@pytest.mark.parametrize("content", [b'{"type":"connection_init"}', b'{"foo":1}', b"\x00\x01"])
def test_other_websockets_are_left_to_other_views(registry, content):
    assert show(content, path="/graphql").view_name != VIEW


def test_http_bodies_are_not_claimed():
    body = frame(RESPONSE_DONE)
    assert realtime_view.render_priority(body, Metadata(content_type="application/json")) == 0
    assert realtime_view.render_priority(body, Metadata()) == 0


def test_an_openai_sse_stream_is_shown_event_by_event_with_its_usage(registry):
    usage = {"input_tokens": 20, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 2}}
    flow, response = sse_response(
        sse(
            {"type": "response.created", "response": {"id": "r1", "status": "in_progress"}},
            {"type": "response.audio.delta", "delta": b64(480)},
            {"type": "response.completed", "response": {"id": "r1", "model": "gpt-x", "usage": usage}},
        )
    )
    shown = contentviews.prettify_message(response, flow)
    assert shown.view_name == VIEW
    blocks = shown.text.split("\n\n── ")
    assert [block.split(" ──", 1)[0] for block in blocks] == [
        "── response.created",
        "response.audio.delta",
        "response.completed",
    ]
    assert '"delta": "<audio pcm16 24 kHz: 480 bytes, 10 ms>"' in blocks[1]
    assert blocks[2].endswith(
        "══ usage: gpt-x, completed ══\n             total  text\ninput           20    20\noutput           5     5\n  reasoning      2     -"
    )


def test_chat_completions_audio_chunks_and_the_usage_chunk(registry):
    chunk = {"object": "chat.completion.chunk", "model": "gpt-4o-audio", "choices": []}
    audio = {**chunk, "choices": [{"index": 0, "delta": {"audio": {"id": "a1", "data": b64(96)}}}]}
    final = {**chunk, "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
    body = b"".join(b"data: " + frame(c) + b"\n\n" for c in (audio, final)) + b"data: [DONE]\n\n"
    flow, response = sse_response(body)
    shown = contentviews.prettify_message(response, flow)
    assert shown.view_name == VIEW
    assert '"data": "<audio pcm16 24 kHz: 96 bytes, 2 ms>"' in shown.text
    assert "══ usage: gpt-4o-audio, completed ══" in shown.text
    assert shown.text.endswith("── [DONE] ──")


def test_other_sse_streams_are_not_claimed():
    body = b'event: ping\ndata: {"type":"ping"}\n\n'
    assert realtime_view.render_priority(body, Metadata(content_type="text/event-stream")) == 0


# what prettify says beyond the JSON


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"type": "duration", "seconds": 3.2}, "══ usage: transcription ══\n3.2 s of audio, billed by duration"),
        (
            {
                "type": "tokens",
                "input_tokens": 13,
                "output_tokens": 9,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 13},
            },
            "══ usage: transcription ══\n        total  text  audio\ninput      13     0     13\noutput      9     9      -",
        ),
    ],
)
def test_transcription_usage(usage, expected):
    event = {"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1", "usage": usage}
    assert realtime_view.prettify(frame(event), Metadata()).endswith("\n\n" + expected)


def test_usage_the_gateway_rejects_says_why():
    event = {**RESPONSE_DONE, "response": {"status": "completed", "usage": {"input_tokens": 1, "output_tokens": "2"}}}
    assert realtime_view.prettify(frame(event), Metadata()).endswith(
        "══ usage: response.done, completed, not metered ══\noutput_tokens is '2', expected a token count"
    )


def test_invalid_json_is_shown_as_text_with_a_note():
    text = realtime_view.prettify(b'{"type": "error", oops', Metadata())
    assert text.startswith("(not an OpenAI event: Expecting property name")
    assert text.endswith('\n{"type": "error", oops')


def test_binary_is_shown_as_a_hexdump():
    lines = realtime_view.prettify(b"\xff\x00" * 2560, Metadata()).splitlines()
    assert lines[0].startswith("(not an OpenAI event: ")
    assert lines[0].endswith("; binary, first 4,096 of 5,120 bytes)")
    assert lines[1] == "0000000000 ff 00 ff 00 ff 00 ff 00 ff 00 ff 00 ff 00 ff 00 ................"
    assert len(lines) == 1 + 4096 // 16


# the placeholder


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 4800, 9600])
@pytest.mark.parametrize("padded", [True, False])
def test_placeholder_size_from_base64_length_and_padding(size, padded):
    text = base64.b64encode(bytes(size)).decode()
    text = text if padded else text.rstrip("=")
    assert f": {size:,} bytes, " in audio_placeholder(text)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (9600, "<audio pcm16 24 kHz: 9,600 bytes, 200 ms>"),
        (48_000, "<audio pcm16 24 kHz: 48,000 bytes, 1,000 ms>"),
        (100, "<audio pcm16 24 kHz: 100 bytes, 2.1 ms>"),
        (0, "<audio pcm16 24 kHz: 0 bytes, 0 ms>"),
    ],
)
def test_placeholder_text(size, expected):
    assert audio_placeholder(base64.b64encode(bytes(size)).decode()) == expected


# strip_audio


def stripped(event: dict[str, Any], field: str) -> dict[str, Any]:
    return {**event, field: audio_placeholder(event[field])}


@pytest.mark.parametrize(("kind", "field"), AUDIO_FIELDS.items())
def test_strip_audio_keeps_every_other_byte(kind, field):
    event = {"type": kind, "event_id": "event_1", field: b64(4800), "item_id": "item_1"}
    content = frame(event, separators=(",", ":"))
    assert strip_audio(content) == frame(stripped(event, field), separators=(",", ":"))


@pytest.mark.parametrize(
    "content",
    [
        frame(output_delta(b64(30))).replace(b"/", b"\\/"),  # escaped slashes, as some encoders write them
        frame({"audio": b64(30), "type": "input_audio_buffer.append"}),  # type last
        frame({"type": "response.audio.delta", "meta": {"delta": "x"}, "delta": b64(30)}),  # nested key first
        frame({"type": "response.audio.delta", "ids": ["a", "b"], "delta": b64(30)}),
    ],
)
def test_strip_audio_decodes_frames_whose_bytes_are_not_plain(content):
    event = json.loads(content)
    field = AUDIO_FIELDS[event["type"]]
    assert json.loads(strip_audio(content)) == stripped(event, field)


@pytest.mark.parametrize(
    "content",
    [
        frame(RESPONSE_DONE),
        frame({"type": "response.output_audio_transcript.delta", "delta": "Hello"}),
        frame({"type": "response.audio.delta", "response_id": "r1"}),  # no payload
        frame({"type": "response.audio.delta", "delta": 3}),
        frame({"type": "response.output_audio.delta", "delta": audio_placeholder(b64(30))}),  # already stripped
        b"",
        b"[]",
        b"\xff\x00",
    ],
)
def test_strip_audio_returns_none_without_an_audio_payload(content):
    assert strip_audio(content) is None


def test_strip_audio_is_idempotent():
    once = strip_audio(frame(output_delta(b64(4800))))
    assert once is not None and strip_audio(once) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=examples(150), deadline=None)
@given(
    kind=st.sampled_from(sorted(AUDIO_FIELDS)),
    audio=st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
    unpadded=st.booleans(),
    others=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    position=st.integers(min_value=0),
    type_first=st.booleans(),
    compact=st.booleans(),
    ensure_ascii=st.booleans(),
)
def test_strip_audio_replaces_only_the_audio(
    kind, audio, unpadded, others, position, type_first, compact, ensure_ascii
):
    field = AUDIO_FIELDS[kind]
    members = [(k, v) for k, v in others.items() if k not in ("type", field)]
    members.insert(position % (len(members) + 1), (field, audio.rstrip("=") if unpadded else audio))
    members.insert(0 if type_first else len(members), ("type", kind))
    event = dict(members)
    content = frame(event, separators=(",", ":") if compact else None, ensure_ascii=ensure_ascii)
    result = strip_audio(content)
    assert result is not None
    assert json.loads(result) == stripped(event, field)


# hostile input never raises

FLOW, _ = websocket(b"")
METADATA = [
    Metadata(flow=FLOW, websocket_message=FLOW.websocket.messages[-1]),
    Metadata(content_type="text/event-stream"),
    Metadata(),
]
PREFIXES = [
    b'{"type":"response.output_audio.delta","delta":"',
    b'{"type":"input_audio_buffer.append","x":{"audio":"',
    b'{"type":"response.done","response":',
    b'data: {"object":"chat.completion.chunk","choices":',
    b'data: {"type":"response.completed","response":',
    b'{"audio":"input_audio_buffer.append","type":',
]
events = st.builds(
    lambda kind, body: json.dumps({"type": kind, **body}).encode(),
    st.sampled_from(
        [*AUDIO_FIELDS, "response.done", "response.completed", "conversation.item.input_audio_transcription.completed"]
    ),
    st.dictionaries(
        st.sampled_from(["response", "usage", "delta", "audio", "choices", "object"]), json_values, max_size=3
    ),
)
hostile = (
    st.binary(max_size=200) | st.builds(bytes.__add__, st.sampled_from(PREFIXES), st.binary(max_size=100)) | events
)


@settings(max_examples=examples(300), deadline=None)
@given(data=hostile, metadata=st.sampled_from(METADATA))
def test_arbitrary_bytes_never_raise(data, metadata):
    assert isinstance(realtime_view.render_priority(data, metadata), float | int)
    assert isinstance(realtime_view.prettify(data, metadata), str)
    result = strip_audio(data)
    assert result is None or isinstance(result, bytes)


# GPT-Live


@pytest.mark.parametrize("path", ["/v1/live/sessions", "/v1/live/sessions/sess_1/attach?graceful_close=true"])
def test_gpt_live_events_show_audio_sizes_and_session_time(registry, path):
    delta = show(frame(output_delta(b64(9600), "session.output_audio.delta")), path=path)
    assert delta.view_name == VIEW and '"delta": "<audio pcm16 24 kHz: 9,600 bytes, 200 ms>"' in delta.text
    append = show(frame({"audio": b64(48), "type": "session.input_audio.append"}), path=path, from_client=True)
    assert append.view_name == VIEW and '"audio": "<audio pcm16 24 kHz: 48 bytes, 1 ms>"' in append.text
    report = {"type": "session.usage.updated", "usage": {"seconds": 60.0, "active_seconds": 20, "paused_seconds": 40}}
    assert show(frame(report), path=path).text.endswith(
        "══ usage: session time so far ══\n60 s: 20 active, 40 paused (cumulative)"
    )
    closed = {"type": "session.closed", "reason": "expired", "session": {}, "usage": {"seconds": True}}
    assert show(frame(closed), path=path).text.endswith(
        "══ usage: session.closed, not metered ══\nsession.closed: seconds is True, expected seconds"
    )


def test_a_delegated_responses_completion_shows_its_usage_under_its_model(registry):
    usage = {"input_tokens": 10, "output_tokens": 3}
    completed = {"type": "response.completed", "response": {"id": "r1", "model": "gpt-5-mini", "usage": usage}}
    shown = show(frame({"type": "response.event", "delegation_id": "d1", "event": completed}), path="/v1/live/sessions")
    assert "══ usage: gpt-5-mini, completed ══\n" in shown.text
