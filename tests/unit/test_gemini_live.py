"""The Gemini Live adapter on frames shaped as Google's servers send them: what each bills, once."""

from __future__ import annotations

import base64
import json

import pytest

from ai_gateway.accounting.items import Malformed, ResponseDone, SessionModels
from ai_gateway.config.policy import PolicyError, parse_policy
from ai_gateway.protocols import gemini_live
from ai_gateway.protocols.gemini_live import GeminiLiveProtocol, parse_usage_metadata

AUDIO = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": base64.b64encode(bytes(48_000)).decode()}}
USAGE = {
    "promptTokenCount": 120,
    "cachedContentTokenCount": 40,
    "responseTokenCount": 90,
    "toolUsePromptTokenCount": 10,
    "thoughtsTokenCount": 5,
    "totalTokenCount": 225,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 70}, {"modality": "AUDIO", "tokenCount": 30},
                            {"modality": "VIDEO", "tokenCount": 20}],
    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 40}],
    "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 80}, {"modality": "TEXT", "tokenCount": 10}],
    "toolUsePromptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}],
}  # fmt: skip


def frame(message: dict) -> bytes:
    return json.dumps(message).encode()


def audio(**extra: object) -> bytes:
    return frame({"serverContent": {"modelTurn": {"parts": [AUDIO]}}, **extra})


def feed(protocol: GeminiLiveProtocol, *frames: bytes) -> list:
    return [item for f in frames if (item := protocol.server_frame(f, False)) is not None]


def test_usage_maps_tool_use_to_input_thoughts_to_text_output_and_video_to_image():
    usage = parse_usage_metadata(USAGE)
    assert (usage.input, usage.cache_read, usage.output, usage.reasoning) == (130, 40, 95, 5)
    assert dict(usage.input_by_modality) == {"text": 80, "audio": 30, "image": 20}
    assert dict(usage.output_by_modality) == {"audio": 80, "text": 15}
    assert sum(dict(usage.input_by_modality).values()) == usage.input
    assert sum(dict(usage.output_by_modality).values()) == usage.output


def test_vertex_spelling_and_omitted_zeros():
    usage = parse_usage_metadata(
        {"promptTokenCount": 7, "candidatesTokenCount": 3, "candidatesTokensDetails": [{"modality": "AUDIO"}]}
    )
    assert (usage.input, usage.output, usage.cache_read) == (7, 3, None)
    assert usage.output_by_modality == (("text", 3), ("audio", 0))  # text: what audio leaves
    assert usage.input_by_modality == (("text", 7),)  # no details: text


@pytest.mark.parametrize(
    "bad",
    [
        {"promptTokenCount": -1},
        {"promptTokenCount": "12"},
        {"promptTokenCount": 5, "cachedContentTokenCount": 6},
        {"promptTokensDetails": {"modality": "TEXT"}},
        {"promptTokensDetails": [{"modality": 3, "tokenCount": 1}]},
        [],
    ],
)
def test_invalid_usage_is_malformed_and_bills_nothing(bad):
    protocol = GeminiLiveProtocol()
    (item,) = feed(protocol, frame({"serverContent": {"turnComplete": True}, "usageMetadata": bad}))
    assert isinstance(item, Malformed) and item.reason == "invalid_usage"


def test_repeated_cumulative_reports_bill_the_turns_last_once():
    protocol = GeminiLiveProtocol()
    partial = {"promptTokenCount": 120, "responseTokenCount": 30}
    items = feed(
        protocol,
        audio(usageMetadata=partial),
        audio(usageMetadata={**partial, "responseTokenCount": 60}),
        frame({"serverContent": {"generationComplete": True}}),
        frame({"serverContent": {"turnComplete": True}, "usageMetadata": USAGE}),
    )
    assert items == [ResponseDone(parse_usage_metadata(USAGE), "completed")]


def test_a_report_after_turn_complete_is_billed_at_once_and_an_interrupted_turn_as_cancelled():
    protocol = GeminiLiveProtocol()
    late = feed(protocol, audio(), frame({"serverContent": {"turnComplete": True}}), frame({"usageMetadata": USAGE}))
    assert [i.status for i in late] == ["completed"]
    cut = feed(protocol, audio(usageMetadata=USAGE), frame({"serverContent": {"interrupted": True}}), audio())
    assert [i.status for i in cut] == ["cancelled"]
    assert feed(protocol, frame({"serverContent": {"turnComplete": True}})) == []  # nothing billed twice
    feed(protocol, audio(usageMetadata=USAGE))
    assert protocol.closed() == ResponseDone(parse_usage_metadata(USAGE), "incomplete")
    assert protocol.closed() is None


def test_audio_frames_are_classified_without_decoding(monkeypatch):
    decoded = []
    monkeypatch.setattr(gemini_live, "decode_json", lambda data, **_: decoded.append(data) or {})
    protocol = GeminiLiveProtocol()
    assert feed(protocol, audio(), audio(), audio().replace(b'": "', b'":"')) == []
    assert decoded == []
    feed(protocol, audio(usageMetadata=USAGE))
    assert len(decoded) == 1


def test_setup_names_the_model_without_its_resource_path_in_text_or_binary_frames():
    for model, name in [
        ("models/gemini-2.0-flash-live-001", "gemini-2.0-flash-live-001"),
        ("projects/p/locations/us-central1/publishers/google/models/gemini-live-2.5-flash", "gemini-live-2.5-flash"),
    ]:
        for is_text in (True, False):
            protocol = GeminiLiveProtocol()
            item = protocol.client_frame(frame({"setup": {"model": model}}), is_text)
            assert item == SessionModels(model=name, transcription_model=None)
            assert protocol.client_frame(frame({"setup": {"model": "models/other"}}), is_text) is None


@pytest.mark.parametrize(
    ("route", "error"),
    [
        ("type: Completions\n    protocol: gemini-live", "p.yaml:4: routes./x.type: expected Realtime for protocol gemini-live"),
        ("type: Realtime\n    protocol: grpc", "p.yaml:5: routes./x.protocol: expected one of openai, gemini-live, openai-live, got 'grpc'"),
        ("type: Realtime\n    protocol: gemini-live\n    model: m", "p.yaml:6: routes./x.model: not supported for protocol gemini-live"),
        ("type: Realtime\n    protocol: openai-live\n    model: m", "p.yaml:6: routes./x.model: not supported for protocol openai-live"),
        ("type: Responses\n    protocol: openai-live", "p.yaml:4: routes./x.type: expected Realtime for protocol openai-live"),
        ("type: Realtime\n    provider: 3", "p.yaml:5: routes./x.provider: expected a non-empty string, got int 3"),
    ],
)  # fmt: skip
def test_route_protocol_and_provider_are_validated(route, error):
    with pytest.raises(PolicyError) as e:
        parse_policy(f"provider: openai\nroutes:\n  /x:\n    {route}\n", "p.yaml")
    assert str(e.value).startswith(error)


def test_route_provider_overrides_the_policys():
    policy = parse_policy(
        "provider: gcp.gemini\nroutes:\n  /a:\n    type: Realtime\n    provider: x_ai\n  /b: Realtime\n", "p"
    )
    assert [policy.provider_for(policy.match(p)) for p in ("/a", "/b")] == ["x_ai", "gcp.gemini"]
