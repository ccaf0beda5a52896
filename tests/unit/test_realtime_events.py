"""Reading usage and models from Realtime server frames, including hostile input."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai_gateway.accounting.items import (
    FirstDelta,
    Malformed,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    SessionModels,
    TranscriptionDone,
    TurnEnded,
    UpstreamError,
)
from ai_gateway.accounting.usage import MAX_TOKENS, DurationUsage, TokenUsage
from ai_gateway.protocols.json_events import event_type, may_name
from ai_gateway.protocols.openai_realtime import RealtimeProtocol, delta_response_id, needs_decoding, read_server_event
from ai_gateway_tools.simulators.realtime import EXAMPLE_USAGE

from .conftest import examples

REFERENCE_USAGE = EXAMPLE_USAGE  # the reference documentation's response.done usage


def frame(event: object) -> bytes:
    return json.dumps(event).encode()


def response_done(usage: object, status: str = "completed") -> bytes:
    return frame(
        {"type": "response.done", "event_id": "e1", "response": {"id": "r1", "status": status, "usage": usage}}
    )


def read(content: bytes):
    assert needs_decoding(event_type(content))
    return read_server_event(content)


def test_response_done_usage_with_modality_and_cache_split():
    event = read(response_done(REFERENCE_USAGE))
    assert event == ResponseDone(
        usage=TokenUsage(
            input=132,
            output=121,
            cache_read=64,
            input_by_modality=(("text", 119), ("audio", 13), ("image", 0)),
            cache_read_by_modality=(("text", 64), ("audio", 0), ("image", 0)),
            output_by_modality=(("text", 30), ("audio", 91)),
        ),
        status="completed",
        response_id="r1",
    )


@pytest.mark.parametrize("status", ["cancelled", "failed", "incomplete"])
def test_unfinished_responses_keep_their_usage(status):
    event = read(response_done({"input_tokens": 5, "output_tokens": 1}, status))
    assert event == ResponseDone(TokenUsage(5, 1), status, "r1")


def test_response_created_and_delta_response_ids():
    created = frame(
        {"type": "response.created", "event_id": "e", "response": {"id": "resp_9", "status": "in_progress"}}
    )
    assert read(created) == ResponseStarted("resp_9")
    delta = frame(
        {"type": "response.output_audio.delta", "event_id": "e", "response_id": "resp_9", "delta": "AAAA" * 5000}
    )
    assert delta_response_id(delta) == "resp_9"
    assert delta_response_id(frame({"type": "response.output_audio.delta", "delta": "AAAA"})) is None


def test_unknown_status_is_bounded():
    assert read(response_done({"input_tokens": 5, "output_tokens": 1}, "x" * 50)).status == "other"


def test_session_models_ga_and_beta():
    ga = {
        "type": "session.created",
        "session": {
            "model": "gpt-realtime-2025-08-28",
            "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
        },
    }
    beta = {"type": "session.updated", "session": {"input_audio_transcription": {"model": "whisper-1"}}}
    assert read(frame(ga)) == SessionModels("gpt-realtime-2025-08-28", "gpt-4o-transcribe")
    assert read(frame(beta)) == SessionModels(None, "whisper-1")


def test_transcription_usage_tokens_and_duration():
    tokens = {
        "type": "tokens",
        "input_tokens": 13,
        "output_tokens": 9,
        "total_tokens": 22,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 13},
    }
    event = read(frame({"type": "conversation.item.input_audio_transcription.completed", "usage": tokens}))
    assert event == TranscriptionDone(TokenUsage(13, 9, None, (("text", 0), ("audio", 13))))
    event = read(
        frame(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "usage": {"type": "duration", "seconds": 3.2},
            }
        )
    )
    assert event == TranscriptionDone(DurationUsage(3.2))


def test_type_need_not_be_the_first_key():
    content = frame(
        {"event_id": "e", "response": {"usage": {"input_tokens": 1, "output_tokens": 2}}, "type": "response.done"}
    )
    assert read(content) == ResponseDone(TokenUsage(1, 2), "other")


def test_events_with_their_type_far_from_either_end_are_decoded_and_ignored():
    event = {"event_id": "e", "padding": "x" * 1000, "type": "response.output_text.delta", "delta": "hi"}
    assert read(frame(event)) is None


@pytest.mark.parametrize(
    "content",
    [
        frame({"type": "response.output_audio.delta", "delta": "A" * 48_000}),  # OpenAI
        frame({"event_id": "event_1", "type": "response.output_audio.delta", "delta": "A" * 48_000}),  # DashScope
        json.dumps({"type": "response.output_audio.delta", "delta": "A" * 48_000}, sort_keys=True).encode(),
        b'{\n  "event_id" : "e1" ,\n  "type" : "response.output_audio.delta", "delta": "AAAA"\n}\n',
    ],
)
def test_the_type_is_found_without_decoding_first_after_event_id_or_last(content):
    assert event_type(content) == "response.output_audio.delta"
    assert not needs_decoding(event_type(content))


@pytest.mark.parametrize(
    "content",
    [
        frame({"response": {"type": "response.done"}, "x": 1}),  # a nested type is not the event's
        frame({"items": [{"type": "response.done"}], "type2": 1}),
        frame({"response": {"status": "x", "type": "response.done"}}),  # nested, last: `}}` at the end
        b'{"type":"response\\u002edone","response":{}}',  # escaped: only decoding can tell
        b'{"delta":"\\"type\\":\\"response.done\\"}"}',  # a type inside a string
    ],
)
def test_a_type_that_is_not_plainly_the_events_own_is_left_to_decoding(content):
    assert event_type(content) is None


def test_sorted_keys_response_done_is_read_and_its_type_found_last():
    content = json.dumps(
        {
            "type": "response.done",
            "event_id": "e",
            "response": {"id": "r", "status": "completed", "usage": REFERENCE_USAGE},
        },
        sort_keys=True,
    ).encode()
    assert event_type(content) == "response.done"
    assert read(content).usage.input == REFERENCE_USAGE["input_tokens"]


def test_deltas_are_not_decoded():
    delta = frame({"type": "response.output_audio.delta", "delta": "A" * 64000})
    assert not needs_decoding(event_type(delta))
    assert not needs_decoding(event_type(frame({"type": "response.output_text.delta", "delta": "response.done"})))


@pytest.mark.parametrize(
    "usage",
    [
        None,
        "lots",
        [],
        {"input_tokens": -1, "output_tokens": 1},
        {"input_tokens": 1.0, "output_tokens": 1},
        {"input_tokens": True, "output_tokens": 1},
        {"input_tokens": 10**20, "output_tokens": 1},
        {"input_tokens": MAX_TOKENS + 1, "output_tokens": 1},
        {"input_tokens": 1},
        {"input_tokens": 1, "output_tokens": 1, "input_token_details": "x"},
        {"input_tokens": 1, "output_tokens": 1, "input_token_details": {"cached_tokens": 2}},
        {"input_tokens": 1, "output_tokens": 1, "output_token_details": {"audio_tokens": "9"}},
    ],
)
def test_invalid_usage_counts_the_response_and_bills_nothing(usage):
    event = read(response_done(usage))
    reason = "missing_usage" if usage is None else "invalid_usage"
    assert event == ResponseDone(None, "completed", "r1", unread=reason)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json response.done", "invalid_json"),
        (b'{"type":"response.done","response":{"usage":{"input_tokens":1', "invalid_json"),
        (b'{"type":"response.done"}', "invalid_event"),
        (b'{"type":"session.created","session":[]}', "invalid_event"),
        (b'"response.done"', "invalid_event"),
        (b"[]", "invalid_event"),
        (b'{"type":"response.done",' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
        (b'{"type":"response.done","x":"\xff\xfe"}', "invalid_json"),
    ],
)
def test_malformed_frames(content, reason):
    event = read(content)
    assert isinstance(event, Malformed) and event.reason == reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=20,
)
usage_keys = st.sampled_from(
    [
        "input_tokens",
        "output_tokens",
        "cached_tokens",
        "text_tokens",
        "audio_tokens",
        "input_token_details",
        "output_token_details",
        "cached_tokens_details",
        "type",
        "seconds",
    ]
)
usage_like = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=3),
    lambda children: st.dictionaries(usage_keys, children, max_size=6),
    max_leaves=15,
)


def is_valid_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKENS


@settings(max_examples=examples(300), deadline=None)
@given(usage_like, st.sampled_from(["response.done", "conversation.item.input_audio_transcription.completed"]))
def test_arbitrary_usage_never_raises_and_counts_only_valid_numbers(usage, kind):
    key = "response" if kind == "response.done" else "usage"
    body = {"usage": usage} if key == "response" else usage
    event = read_server_event(frame({"type": kind, key: body}))
    if isinstance(event, (ResponseDone, TranscriptionDone)) and isinstance(event.usage, TokenUsage):
        assert is_valid_count(usage["input_tokens"]) and is_valid_count(usage["output_tokens"])
        assert event.usage.input == usage["input_tokens"] and event.usage.output == usage["output_tokens"]
        counts = [
            event.usage.cache_read or 0,
            *(n for _, n in event.usage.input_by_modality + event.usage.output_by_modality),
        ]
        assert all(is_valid_count(n) for n in counts)
    elif isinstance(event, ResponseDone):  # counted as a response, nothing billed from its usage
        assert event.usage is None and event.unread in ("missing_usage", "invalid_usage")
    else:
        assert event is None or isinstance(event, (Malformed, TranscriptionDone))


@settings(max_examples=examples(300), deadline=None)
@given(json_values)
def test_arbitrary_json_events_never_raise(value):
    content = frame({"type": "response.done", "response": value}) if isinstance(value, dict) else frame(value)
    if needs_decoding(event_type(content)):
        read_server_event(content)


@settings(max_examples=examples(500), deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(content):
    for candidate in (content, b'{"type":"response.done"' + content):
        if needs_decoding(event_type(candidate)):
            event = read_server_event(candidate)
            assert event is None or isinstance(event, (Malformed, ResponseDone, SessionModels, TranscriptionDone))


@pytest.mark.parametrize(
    "content",
    [
        b'{"type":"response.create","event_id":"c1"}',  # OpenAI's SDKs
        b'{"event_id":"c1","type":"response.create","response":{}}',  # pipecat
        json.dumps(
            {"type": "response.create", "event_id": "c1", "response": {"instructions": "x"}}, sort_keys=True
        ).encode(),
        b'{"event_id":"c1","type":"response\\u002ecreate"}',  # escaped
        b'{"event_id":"c1","type":"input_audio_buffer.append","audio":"","type":"response.create"}',  # named twice
        b'{"event_id":"c1","type":"response.create","type":"input_audio_buffer.append","audio":""}',
        b'{"event_id":"c1","padding":"' + b"x" * 4096 + b'","type":"response.create","response":{}}',
    ],
)
def test_a_response_create_is_recognised_in_any_key_order_and_spelling(content):
    assert RealtimeProtocol().client_frame(content, True) == ResponseRequested(None, "c1")


@pytest.mark.parametrize(
    "content",
    [
        frame({"type": "input_audio_buffer.append", "audio": "A" * 6400}),
        frame({"type": "session.update", "session": {"type": "realtime", "instructions": "response.create"}}),
        frame({"type": "conversation.item.create", "item": {"type": "response.create"}}),  # nested: not a request
        b"not json",
    ],
)
def test_other_client_frames_are_not_response_requests(content):
    assert RealtimeProtocol().client_frame(content, True) is None
    assert RealtimeProtocol().client_frame(b'{"type":"response.create"}', False) is None  # binary


def test_error_events_name_the_client_event_they_refuse():
    error = {"type": "invalid_request_error", "code": "conversation_already_has_active_response", "event_id": "c2"}
    for content in (
        frame({"type": "error", "event_id": "e", "error": error}),
        json.dumps({"type": "error", "event_id": "e", "error": error}, sort_keys=True).encode(),
    ):
        item = RealtimeProtocol().server_frame(content, True)
        assert item == UpstreamError("c2", "conversation_already_has_active_response")


def test_the_first_delta_of_each_started_response_is_reported_once():
    protocol = RealtimeProtocol()
    created = frame({"type": "response.created", "response": {"id": "r1"}})
    delta = frame({"type": "response.output_audio.delta", "response_id": "r1", "delta": "AAAA"})
    assert protocol.server_frame(created, True) == ResponseStarted("r1")
    assert protocol.server_frame(delta, True) == FirstDelta("r1")
    assert protocol.server_frame(delta, True) is None


def test_a_turn_ends_when_server_vad_hears_speech_stop_or_the_client_commits():
    protocol = RealtimeProtocol()
    stopped = {"type": "input_audio_buffer.speech_stopped", "event_id": "e", "audio_end_ms": 900, "item_id": "i"}
    assert protocol.server_frame(frame(stopped), True) == TurnEnded("speech_stopped")
    assert protocol.server_frame(json.dumps(stopped, sort_keys=True).encode(), True) == TurnEnded("speech_stopped")
    started = {"type": "input_audio_buffer.speech_started", "event_id": "e", "audio_start_ms": 0, "item_id": "i"}
    assert protocol.server_frame(frame(started), True) is None
    for commit in (b'{"type":"input_audio_buffer.commit"}', b'{"event_id":"c1","type":"input_audio_buffer.commit"}'):
        assert protocol.client_frame(commit, True) == TurnEnded("commit")
    assert protocol.client_frame(frame({"type": "input_audio_buffer.clear"}), True) is None


# Frames put together from the pieces that matter: keys and values named type or audio, quotes,
# escapes, base64; may_name must agree with searching the whole frame.
frame_pieces = st.lists(
    st.sampled_from(
        [b'"type"', b'"audio"', b'"', b":", b",", b"{", b"}", b'\\"', b"type", b"audio", b"QUJD", b" ", b'"x"']
    ),
    max_size=24,
).map(b"".join)


@given(frame_pieces)
def test_may_name_agrees_with_searching_the_whole_frame(content):
    assert may_name(content, [b'"type"']) == (b'"type"' in content)


@pytest.mark.parametrize(
    "content",
    [
        b'{"type":"input_audio_buffer.append","audio":"QUJD","type":"response.create"}',
        b'{"type":"input_audio_buffer.append","x":"audio","type":"response.create","audio":"QUJD"}',
        b'{"type":"input_audio_buffer.append","audio":"QUJD","typ\\u0065":"response.create"}',
        b'{"audio":"QUJD","type":"input_audio_buffer.append","type":"response.create"}',
        b'{"type":"input_audio_buffer.append","audio":"QUJD","typ\\u0065":"response\\u002ecreate"}',
    ],
)
def test_a_second_type_beside_the_audio_is_found(content):
    assert may_name(content, [b'"response.create"'])
    assert RealtimeProtocol().client_frame(content, True) == ResponseRequested()
    assert not may_name(b'{"type":"input_audio_buffer.append","audio":"QUJD"}', [b'"response.create"'])
