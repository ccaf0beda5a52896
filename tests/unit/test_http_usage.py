"""Reading usage from OpenAI-style HTTP bodies and SSE streams, including hostile input."""

import gzip
import json
import zlib

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai_gateway.accounting.items import FirstDelta, Malformed, ResponseDone, SpeechInput
from ai_gateway.accounting.usage import TokenUsage
from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.encoding import BodyDecoder, BodyTooLarge, UnsupportedEncoding, decode_body, zstd
from ai_gateway.protocols.openai_http import (
    SseStream,
    StreamReader,
    read_body,
    read_request,
    read_response,
    read_responses_event,
)

from .conftest import examples

CHAT_USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 40,
    "total_tokens": 140,
    "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 10},
    "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 5},
}
RESPONSES_USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"cached_tokens": 20},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 7},
    "total_tokens": 80,
}


def sse(*events: object, done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def test_completions_body():
    body = json.dumps({"object": "chat.completion", "model": "gpt-4o-2024-08-06", "usage": CHAT_USAGE}).encode()
    assert read_body(RouteType.COMPLETIONS, body) == ResponseDone(
        TokenUsage(100, 40, 64, (("audio", 10),), (), (("audio", 5),), reasoning=12),
        response_model="gpt-4o-2024-08-06",
    )


def test_responses_and_embeddings_bodies():
    body = json.dumps({"object": "response", "model": "gpt-5", "usage": RESPONSES_USAGE}).encode()
    assert read_body(RouteType.RESPONSES, body) == ResponseDone(
        TokenUsage(50, 30, 20, reasoning=7), response_model="gpt-5"
    )
    body = json.dumps(
        {"object": "list", "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    ).encode()
    assert read_body(RouteType.EMBEDDINGS, body) == ResponseDone(
        TokenUsage(8, None), response_model="text-embedding-3-small"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"[]", "invalid_json"),
        (b'{"model": "m"}', "missing_usage"),
        (b'{"usage": {"prompt_tokens": "9", "completion_tokens": 1}}', "invalid_usage"),
        (b'{"usage": {"prompt_tokens": 1, "completion_tokens": -1}}', "invalid_usage"),
    ],
)
def test_bad_bodies(body, reason):
    result = read_body(RouteType.COMPLETIONS, body)
    assert isinstance(result, Malformed) and result.reason == reason


def test_completions_stream_in_arbitrary_chunks():
    body = sse(
        {"model": "m-1", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"model": "m-1", "choices": [{"delta": {"content": "Hi"}}]},
        {"model": "m-1", "choices": [], "usage": CHAT_USAGE},
    ).replace(b"\n", b"\r\n")
    for size in (1, 7, 64, len(body)):
        stream = SseStream(RouteType.COMPLETIONS)
        items = [item for i in range(0, len(body), size) for item in stream.feed(body[i : i + size])]
        assert items[0] == FirstDelta()
        assert isinstance(items[1], ResponseDone) and items[1].usage.input == 100 and items[1].response_model == "m-1"
        assert len(items) == 2 and stream.finished


def test_responses_stream_events():
    events = b"".join(
        f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
        for kind, data in [
            ("response.created", {"type": "response.created", "response": {"model": "gpt-5"}}),
            ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
            (
                "response.completed",
                {"type": "response.completed", "response": {"model": "gpt-5", "usage": RESPONSES_USAGE}},
            ),
        ]
    )
    stream = SseStream(RouteType.RESPONSES)
    items = stream.feed(events)
    assert items == [FirstDelta(), ResponseDone(TokenUsage(50, 30, 20, reasoning=7), response_model="gpt-5")]
    assert stream.finished


def test_failed_response_without_usage_still_counts_as_a_response():
    event = {"type": "response.failed", "response": {"id": "resp_1", "status": "failed", "usage": None}}
    assert read_responses_event(event) == ResponseDone(None, "failed", "resp_1", unread="missing_usage")


def test_malformed_sse_line_is_reported_and_the_stream_goes_on():
    stream = SseStream(RouteType.COMPLETIONS)
    items = stream.feed(b"data: {broken\n\n" + sse({"choices": [], "usage": CHAT_USAGE}))
    assert isinstance(items[0], Malformed) and items[0].reason == "invalid_json"
    assert isinstance(items[1], ResponseDone)


def test_an_event_without_end_is_bounded():
    stream = SseStream(RouteType.COMPLETIONS)
    items = stream.feed(b"data: " + b"x" * (5 * 1024 * 1024))
    assert [i.reason for i in items if isinstance(i, Malformed)] == ["invalid_sse"]


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODINGS = [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", raw_deflate),
    ("br", brotli.compress),
    ("zstd", zstd.compress),
    ("identity", lambda data: data),
]


@pytest.mark.parametrize(("encoding", "compress"), ENCODINGS)
def test_decoders_work_chunk_by_chunk(encoding, compress):
    original = sse({"choices": [], "usage": CHAT_USAGE}) * 20
    compressed = compress(original)
    for size in (1, 13, len(compressed)):
        decoder = BodyDecoder(encoding, len(original))
        assert b"".join(decoder.feed(compressed[i : i + size]) for i in range(0, len(compressed), size)) == original


@pytest.mark.parametrize(("encoding", "compress"), ENCODINGS)
def test_decoding_stops_at_the_limit(encoding, compress):
    """A bomb (8 MiB of zeros, a few KB compressed) is decoded to the limit and no further (at most 3 MiB)."""
    bomb = compress(bytes(8 * 2**20))
    limit = 2**20
    decoder = BodyDecoder(encoding, limit)
    with pytest.raises(BodyTooLarge):
        decoder.feed(bomb)
    assert limit < decoder.decoded <= limit + 2 * 2**20  # at most about one step past the limit
    assert len(decode_body(compress(b"x" * limit), encoding, limit)) == limit


def test_unknown_and_chained_encodings_are_refused():
    for encoding in ("gzip, br", "compress", "utf-8"):
        with pytest.raises(UnsupportedEncoding):
            BodyDecoder(encoding, 100)


def test_identity_body_is_not_copied():
    body = b'{"usage": null}' * 10
    assert decode_body(body, "", len(body)) is body


def test_response_bodies_past_the_limit_or_corrupt_are_not_read():
    body = json.dumps({"model": "m", "usage": CHAT_USAGE}).encode()
    assert isinstance(read_response(RouteType.COMPLETIONS, gzip.compress(body), "gzip", len(body)), ResponseDone)
    problems = [
        read_response(RouteType.COMPLETIONS, gzip.compress(body), "gzip", len(body) - 1),
        read_response(RouteType.COMPLETIONS, body, "identity", len(body) - 1),
        read_response(RouteType.COMPLETIONS, body[:5] + b"garbage", "gzip", 10**6),
        read_response(RouteType.COMPLETIONS, body, "gzip, br", 10**6),
    ]
    assert [p.reason for p in problems] == ["too_large", "too_large", "invalid_encoding", "unsupported_encoding"]


def test_stream_past_the_limit_is_read_no_more():
    events = sse({"choices": [{"delta": {"content": "Hi"}}]}) + sse({"choices": [], "usage": CHAT_USAGE})
    reader = StreamReader(RouteType.COMPLETIONS, "gzip", len(events) // 2)
    compressed = gzip.compress(events)
    items = reader.feed(compressed[: len(compressed) // 2]) + reader.feed(compressed[len(compressed) // 2 :])
    assert not reader.readable
    assert not any(isinstance(item, ResponseDone) for item in items)
    assert [item.reason for item in items if isinstance(item, Malformed)] == ["too_large"]
    assert reader.feed(b"more") == []


def test_response_body_reads_only_usage_and_model():
    body = b'{"data": [{"embedding": [1e400, -0.5, {"a": [1, 2]}]}], "model": "m", "usage": {"prompt_tokens": 8}}'
    assert read_body(RouteType.EMBEDDINGS, body) == ResponseDone(TokenUsage(8, None), response_model="m")
    assert isinstance(read_body(RouteType.EMBEDDINGS, body + b" trailing"), Malformed)
    assert isinstance(read_body(RouteType.EMBEDDINGS, b"\xff" + body), Malformed)


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=400), st.sampled_from([RouteType.COMPLETIONS, RouteType.RESPONSES]))
def test_arbitrary_stream_bytes_never_raise(data, route_type):
    stream = SseStream(route_type)
    for item in stream.feed(data) + stream.feed(b"\n\n"):
        assert isinstance(item, (ResponseDone, FirstDelta, Malformed))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["usage", "model", "choices", "delta", "prompt_tokens", "completion_tokens", "type", "response"]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=15,
)


@settings(max_examples=examples(300), deadline=None)
@given(json_values, st.sampled_from(list(RouteType)[:3]))
def test_arbitrary_json_bodies_never_raise_and_bill_only_valid_counts(value, route_type):
    result = read_body(route_type, json.dumps(value).encode())
    assert isinstance(result, (ResponseDone, Malformed))
    if isinstance(result, ResponseDone):
        assert type(result.usage.input) is int and result.usage.input >= 0


def multipart(*fields: tuple[str, str], file_bytes: int = 0) -> bytes:
    """A multipart upload as httpx (the openai SDK) writes it: fields first, then the file."""
    parts = [f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in fields]
    upload = '--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    return "".join(parts).encode() + upload.encode() + b"\0" * file_bytes + b"\r\n--b--\r\n"


def test_a_transcription_upload_is_read_for_its_model_only():
    body = multipart(("model", "gpt-4o-transcribe"), ("stream", "true"), file_bytes=2**20)
    assert read_request(RouteType.TRANSCRIPTIONS, body, "", None, 1024) == ("gpt-4o-transcribe", None, None)


def test_the_model_override_replaces_the_upload_field_and_nothing_else():
    body = multipart(("model", "whisper-1"), ("language", "en"), file_bytes=100)
    model, rewritten, problem = read_request(RouteType.TRANSLATIONS, body, "", "gpt-4o-mini-transcribe", 1024)
    assert (model, problem) == ("gpt-4o-mini-transcribe", None)
    assert rewritten == body.replace(b"whisper-1", b"gpt-4o-mini-transcribe")


def test_a_model_field_after_the_head_or_a_compressed_upload_is_not_searched():
    late = multipart(("prompt", "x" * 70_000), ("model", "whisper-1"))
    assert read_request(RouteType.TRANSCRIPTIONS, late, "", None, 2**20) == (None, None, None)
    early = multipart(("model", "whisper-1"))
    assert read_request(RouteType.TRANSCRIPTIONS, early, "gzip", "gpt-4o-transcribe", 2**20) == (None, None, None)


def test_image_edits_are_multipart_and_generations_json():
    edit = multipart(("model", "gpt-image-1"), ("prompt", "a hat"))
    assert read_request(RouteType.IMAGES, edit, "", None, 1024)[0] == "gpt-image-1"
    generation = b'{"model": "gpt-image-1", "prompt": "a cat"}'
    assert read_request(RouteType.IMAGES, generation, "", None, 1024) == ("gpt-image-1", None, None)


def test_speech_counts_the_characters_of_its_input_and_reads_no_audio():
    body = json.dumps({"model": "tts-1", "input": "naïve ✓", "voice": "alloy"}).encode()
    assert read_request(RouteType.SPEECH, body, "", None, 1024) == ("tts-1", None, SpeechInput(7))
    assert read_response(RouteType.SPEECH, b"ID3\xff\xfb", "", 1024) is None


def test_a_text_transcript_has_no_usage():
    done = read_body(RouteType.TRANSCRIPTIONS, b"Hello there")
    assert isinstance(done, Malformed) and done.reason == "missing_usage"


def test_image_output_is_image_and_speech_output_is_audio():
    usage = {"input_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}, "output_tokens": 4160}
    done = read_body(RouteType.IMAGES, json.dumps({"created": 1, "data": [], "usage": usage}).encode())
    assert isinstance(done, ResponseDone) and done.usage is not None
    assert done.usage.input_by_modality == (("text", 10), ("image", 40))
    assert done.usage.output_by_modality == (("text", 0), ("image", 4160))
    event = {"type": "speech.audio.done", "usage": {"input_tokens": 5, "output_tokens": 90, "total_tokens": 95}}
    (speech,) = SseStream(RouteType.SPEECH).feed(f"data: {json.dumps(event)}\n\n".encode())
    assert speech.usage.output_by_modality == (("text", 0), ("audio", 90))
