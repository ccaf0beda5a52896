"""Issue 14 point 1: on every adapter the per-modality splits add up to their totals (input,
cached, output), text being what the reported audio and image parts leave; parts exceeding a
total make the usage invalid rather than a split that does not add up."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_gateway.accounting.items import Malformed, ResponseDone, TranscriptionDone
from ai_gateway.accounting.usage import InvalidUsage, TokenUsage
from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.gemini_live import parse_usage_metadata
from ai_gateway.protocols.openai_http import SseStream, read_body
from ai_gateway.protocols.openai_realtime import RealtimeProtocol
from ai_gateway.protocols.openai_responses_socket import ResponsesSocketProtocol

counts = st.integers(0, 5000)


@st.composite
def details(draw: st.DrawFn, total: int, modalities: tuple[str, ...]) -> dict[str, int]:
    """A details object as an upstream might send it: some modality parts, sometimes a text part
    (trusted or not), sometimes parts that exceed the total."""
    out = {}
    for modality in modalities:
        if draw(st.booleans()):
            out[f"{modality}_tokens"] = draw(st.integers(0, total + 50 if draw(st.booleans()) else total))
    return out


@st.composite
def openai_usage(draw: st.DrawFn, names: tuple[str, str | None, str, str | None]) -> dict[str, Any]:
    """A usage object named as one OpenAI API names it (input, output, input details, output details)."""
    input_key, output_key, input_details, output_details = names
    total = draw(counts)
    usage: dict[str, Any] = {input_key: total}
    found = draw(details(total, ("text", "audio", "image")))
    if draw(st.booleans()):
        cached = draw(st.integers(0, total))
        found["cached_tokens"] = cached
        if draw(st.booleans()):
            found["cached_tokens_details"] = draw(details(cached, ("text", "audio", "image")))
    if found or draw(st.booleans()):
        usage[input_details] = found
    if output_key is not None:
        usage[output_key] = output = draw(counts)
        if output_details is not None and draw(st.booleans()):
            usage[output_details] = draw(details(output, ("text", "audio", "image")))
    return usage


def assert_complete(usage: TokenUsage) -> None:
    for total, split in (
        (usage.input, usage.input_by_modality),
        (usage.cache_read, usage.cache_read_by_modality),
        (usage.output, usage.output_by_modality),
    ):
        if total is None:
            assert split == ()
        else:
            assert sum(n for _, n in split) == total and all(n >= 0 for _, n in split)
            assert split[0][0] == "text"


def exceeds(usage: dict[str, Any], names: tuple[str, str | None, str, str | None], output: str) -> bool:
    """Whether a reported split's parts other than what remains (text; for output, `output`)
    exceed their total (the oracle's view)."""
    input_key, output_key, input_details, output_details = names
    inputs = usage.get(input_details) or {}
    groups = [
        (usage[input_key], inputs, "text"),
        (inputs.get("cached_tokens"), inputs.get("cached_tokens_details") or {}, "text"),
    ]
    if output_key is not None:
        groups.append((usage[output_key], (usage.get(output_details) or {}) if output_details else {}, output))
    return any(
        total is not None and sum(part.get(f"{m}_tokens", 0) for m in ("text", "audio", "image") if m != rest) > total
        for total, part, rest in groups
    )


def check(
    item: Any, usage: dict[str, Any], names: tuple[str, str | None, str, str | None], output: str = "text"
) -> None:
    if exceeds(usage, names, output):
        assert (
            isinstance(item, Malformed)
            and item.reason == "invalid_usage"
            or (isinstance(item, ResponseDone) and item.usage is None and item.unread == "invalid_usage")
        )
        return
    assert isinstance(item, ResponseDone | TranscriptionDone) and isinstance(item.usage, TokenUsage)
    assert_complete(item.usage)
    details = (usage.get(names[3]) or {}) if names[3] else {}
    if (
        output != "text"
        and usage.get(names[1])
        and not any(f"{m}_tokens" in details for m in ("text", "audio", "image") if m != output)
    ):
        assert dict(item.usage.output_by_modality)[output] == usage[names[1]]  # images make image tokens


CHAT = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
RESPONSES = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
EMBEDDINGS = ("prompt_tokens", None, "prompt_tokens_details", None)
REALTIME = ("input_tokens", "output_tokens", "input_token_details", "output_token_details")
TRANSCRIPTION = ("input_tokens", "output_tokens", "input_token_details", None)


@pytest.mark.parametrize(
    ("route_type", "names", "output"),
    [
        (RouteType.COMPLETIONS, CHAT, "text"),
        (RouteType.TEXT_COMPLETIONS, CHAT, "text"),
        (RouteType.RESPONSES, RESPONSES, "text"),
        (RouteType.EMBEDDINGS, EMBEDDINGS, "text"),
        (RouteType.IMAGES, RESPONSES, "image"),
    ],
)
@given(data=st.data())
def test_http_json_bodies(route_type: RouteType, names: Any, output: str, data: st.DataObject) -> None:
    usage = data.draw(openai_usage(names))
    check(read_body(route_type, json.dumps({"model": "m", "usage": usage}).encode()), usage, names, output)


@pytest.mark.parametrize("route_type", [RouteType.TRANSCRIPTIONS, RouteType.TRANSLATIONS])
@given(data=st.data())
def test_http_transcription_body_and_stream(route_type: RouteType, data: st.DataObject) -> None:
    usage = {"type": "tokens", **data.draw(openai_usage(TRANSCRIPTION))}
    check(read_body(route_type, json.dumps({"text": "hi", "usage": usage}).encode()), usage, TRANSCRIPTION)
    event = {"type": "transcript.text.done", "text": "hi", "usage": usage}
    check(SseStream(route_type).feed(f"data: {json.dumps(event)}\n\n".encode())[0], usage, TRANSCRIPTION)


@pytest.mark.parametrize(
    ("route_type", "final", "output"),
    [(RouteType.SPEECH, "speech.audio.done", "audio"), (RouteType.IMAGES, "image_edit.completed", "image")],
)
@given(data=st.data())
def test_speech_and_image_streams(route_type: RouteType, final: str, output: str, data: st.DataObject) -> None:
    usage = data.draw(openai_usage(RESPONSES))
    event = {"type": final, "usage": usage}
    check(SseStream(route_type).feed(f"data: {json.dumps(event)}\n\n".encode())[0], usage, RESPONSES, output)


@pytest.mark.parametrize("route_type", [RouteType.COMPLETIONS, RouteType.TEXT_COMPLETIONS])
@given(data=st.data())
def test_chat_and_legacy_completions_streams(route_type: RouteType, data: st.DataObject) -> None:
    usage = data.draw(openai_usage(CHAT))
    chunk = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    items = SseStream(route_type).feed(f"data: {json.dumps(chunk)}\n\n".encode())
    check(items[0], usage, CHAT)


@given(usage=openai_usage(RESPONSES))
def test_responses_stream_and_websocket_mode(usage: dict[str, Any]) -> None:
    event = {"type": "response.completed", "response": {"id": "r", "model": "m", "usage": usage}}
    check(SseStream(RouteType.RESPONSES).feed(f"data: {json.dumps(event)}\n\n".encode())[0], usage, RESPONSES)
    check(ResponsesSocketProtocol().server_frame(json.dumps(event).encode(), True), usage, RESPONSES)


@given(usage=openai_usage(REALTIME))
def test_realtime_response_done(usage: dict[str, Any]) -> None:
    event = {"type": "response.done", "response": {"id": "r", "status": "completed", "usage": usage}}
    check(RealtimeProtocol().server_frame(json.dumps(event).encode(), True), usage, REALTIME)


@given(usage=openai_usage(TRANSCRIPTION))
def test_realtime_transcription(usage: dict[str, Any]) -> None:
    event = {"type": "conversation.item.input_audio_transcription.completed", "usage": {"type": "tokens", **usage}}
    check(RealtimeProtocol().server_frame(json.dumps(event).encode(), True), usage, TRANSCRIPTION)


GEMINI_MODALITIES = ("TEXT", "AUDIO", "IMAGE", "VIDEO", "DOCUMENT")


@st.composite
def gemini_details(draw: st.DrawFn, total: int) -> list[dict[str, Any]] | None:
    if draw(st.booleans()):
        return None
    modalities = draw(st.lists(st.sampled_from(GEMINI_MODALITIES), max_size=3, unique=True))
    return [{"modality": m, "tokenCount": draw(st.integers(0, total))} for m in modalities]


@given(data=st.data())
def test_gemini_live(data: st.DataObject) -> None:
    metadata: dict[str, Any] = {}
    for count, detail in (
        ("promptTokenCount", "promptTokensDetails"),
        ("toolUsePromptTokenCount", "toolUsePromptTokensDetails"),
        ("responseTokenCount", "responseTokensDetails"),
        ("cachedContentTokenCount", "cacheTokensDetails"),
    ):
        if data.draw(st.booleans()):
            metadata[count] = n = data.draw(counts)
            if (found := data.draw(gemini_details(n))) is not None:
                metadata[detail] = found
    if data.draw(st.booleans()):
        metadata["thoughtsTokenCount"] = data.draw(counts)
    try:
        usage = parse_usage_metadata(metadata)
    except InvalidUsage:
        return  # parts beyond their totals, or cached beyond the prompt: rejected whole
    assert_complete(usage)


def test_parts_beyond_the_total_are_invalid_not_a_negative_text():
    with pytest.raises(InvalidUsage, match="input audio and image tokens 12 exceed input tokens 10"):
        TokenUsage(10, 0, input_by_modality=(("audio", 8), ("image", 4)))


def test_text_is_the_remainder_and_cached_without_details_are_text():
    usage = TokenUsage(100, 30, 40, input_by_modality=(("text", 99), ("audio", 20)))
    assert usage.input_by_modality == (("text", 80), ("audio", 20))
    assert usage.cache_read_by_modality == (("text", 40),)
    assert usage.output_by_modality == (("text", 30),)
