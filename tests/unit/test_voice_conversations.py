"""Gemini Live and GPT-Live sessions as turns: their readers on event sequences (any key order and
spelling, interleaved tool calls, barge-ins), the meters' records pricing them, and mitmweb's views."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import contentviews, ctx
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.observer import ResponseRecord
from ai_gateway.config.policy import WireProtocol
from ai_gateway.protocols import conversation as conv
from ai_gateway.protocols.conversation import ASSISTANT, ERROR, TOOL, USER, Conversation
from ai_gateway.protocols.gemini_conversation import GeminiConversation
from ai_gateway.protocols.gemini_live import audio_slots, parse_usage_metadata
from ai_gateway.protocols.live_conversation import LiveConversation
from ai_gateway.proxy.contentview import conversation_view, gemini_view, render_conversation
from ai_gateway.proxy.conversation import KIND_METADATA, replay

from .conftest import configured_gateway

AUDIO = base64.b64encode(bytes(9600)).decode()  # 200 ms of 24 kHz PCM16
MODEL = "gemini-live-2.5-flash-preview"  # one the price database knows


def usage(prompt: int, response: int) -> dict[str, Any]:
    return {"promptTokenCount": prompt, "responseTokenCount": response, "totalTokenCount": prompt + response}


U1, U2, U3 = usage(100, 20), usage(180, 7), usage(230, 12)


def audio_part(data_first: bool = False) -> dict[str, Any]:
    inline = {"data": AUDIO, "mimeType": "audio/pcm;rate=24000"}
    return {"inlineData": inline if data_first else {"mimeType": inline["mimeType"], "data": AUDIO}}


def gemini_session() -> list[tuple[bool, dict[str, Any]]]:
    """(from the client, message): a typed turn with two interleaved tool calls, a spoken turn the
    user interrupts, the barge-in's turn answered with a report after turnComplete."""
    calls = [{"id": "fc_1", "name": "get_weather", "args": {"city": "Paris"}}, {"id": "fc_2", "name": "get_time"}]
    return [
        (True, {"setup": {"model": f"models/{MODEL}", "inputAudioTranscription": {}}}),
        (False, {"setupComplete": {}}),
        (True, {"client_content": {"turn_complete": True,
                                   "turns": [{"role": "user", "parts": [{"text": "Weather and time in Paris?"}]}]}}),
        (False, {"toolCall": {"functionCalls": calls}}),
        (True, {"tool_response": {"function_responses": [{"id": "fc_2", "name": "get_time", "response": {"t": "9h"}}]}}),
        (True, {"toolResponse": {"functionResponses": [{"response": {"temp": 18}, "name": "get_weather", "id": "fc_1"}]}}),
        (False, {"serverContent": {"modelTurn": {"parts": [{"text": "It is 18 degrees"}, {"text": " at 9h."}]}}}),
        (False, {"usageMetadata": U1, "serverContent": {"turnComplete": True}}),  # usage first
        (True, {"realtimeInput": {"audio": {"data": AUDIO, "mimeType": "audio/pcm;rate=16000"}}}),
        (True, {"realtimeInput": {"audioStreamEnd": True}}),
        (False, {"serverContent": {"inputTranscription": {"text": "Tell me"}}}),
        (False, {"serverContent": {"inputTranscription": {"text": " a story"}}}),
        (False, {"serverContent": {"modelTurn": {"parts": [audio_part()]}}}),
        (False, {"serverContent": {"outputTranscription": {"text": "Once upon"}}}),
        (False, {"serverContent": {"modelTurn": {"parts": [audio_part(data_first=True)]}}}),
        (False, {"serverContent": {"interrupted": True}}),
        (False, {"serverContent": {"inputTranscription": {"text": "Stop."}}}),
        (False, {"serverContent": {"turnComplete": True}, "usageMetadata": U2}),
        (False, {"serverContent": {"modelTurn": {"parts": [audio_part()]}}}),
        (False, {"serverContent": {"outputTranscription": {"text": "Okay."}}}),
        (False, {"serverContent": {"generationComplete": True}}),
        (False, {"serverContent": {"turnComplete": True}}),
        (False, {"usageMetadata": U3}),  # after its turn ended, as Google's servers may send it
    ]  # fmt: skip


def fed(conversation: Conversation, messages: list[tuple[bool, dict[str, Any]]], binary: bool = True) -> Conversation:
    for n, (from_client, message) in enumerate(messages):
        conversation.frame(json.dumps(message).encode(), not binary or n % 2 == 0, from_client, 1000.0 + n)
    return conversation


def test_a_gemini_live_session_reads_as_turns():
    conversation = fed(GeminiConversation(), gemini_session())
    assert [(t.role, t.text, t.voice) for t in conversation.turns] == [
        (USER, "Weather and time in Paris?", False),
        (ASSISTANT, "", False),
        (TOOL, '{"t": "9h"}', False),
        (TOOL, '{"temp": 18}', False),
        (ASSISTANT, "It is 18 degrees at 9h.", False),
        (USER, "Tell me a story", True),
        (ASSISTANT, "Once upon", True),
        (USER, "Stop.", True),
        (ASSISTANT, "Okay.", True),
    ]
    _, called, later, first, answer, spoken, cut, barge_in, last = conversation.turns
    assert [(c.name, c.call_id, c.arguments) for c in called.calls] == [
        ("get_weather", "fc_1", '{"city": "Paris"}'),
        ("get_time", "fc_2", ""),
    ]
    assert called.status == "tool call" and (later.call_id, first.call_id) == ("fc_2", "fc_1")
    assert answer.status == "completed" and answer.usage == parse_usage_metadata(U1)
    assert cut.status == "cancelled" and cut.notes == ["interrupted: the user spoke"]
    assert cut.usage == parse_usage_metadata(U2) and cut.ended_at == 1017.0, "its line goes under turnComplete"
    assert last.usage == parse_usage_metadata(U3), "a report after turnComplete is the ended turn's"
    assert last.status == "completed" and last.ended_at == 1021.0
    assert (answer.ttft, cut.ttft, cut.turn_latency) == (1006.0 - 1005.0, 1012.0 - 1009.0, 1012.0 - 1009.0)
    assert answer.turn_latency is None, "a typed turn has no voice-turn latency"
    assert (cut.duration, last.duration) == (1017.0 - 1009.0, 1021.0 - 1018.0)
    assert not barge_in.notes and spoken.voice


def test_text_and_binary_frames_and_any_key_order_read_alike():
    as_text = fed(GeminiConversation(), gemini_session(), binary=False)
    reordered = [(c, dict(reversed(list(m.items())))) for c, m in gemini_session()]
    for other in (as_text, fed(GeminiConversation(), reordered)):
        assert [(t.role, t.text, t.status, t.usage) for t in other.turns] == [
            (t.role, t.text, t.status, t.usage) for t in fed(GeminiConversation(), gemini_session()).turns
        ]


def test_gemini_records_price_the_answers_that_hold_their_usage():
    conversation = fed(GeminiConversation(), gemini_session())
    for n, (status, report) in enumerate([("completed", U1), ("cancelled", U2), ("completed", U3)]):
        conversation.priced(record(None, status, parse_usage_metadata(report), cost=0.001 * (n + 1)))
    answers = [t for t in conversation.turns if t.role == ASSISTANT and t.usage is not None]
    assert [t.cost for t in answers] == [0.001, 0.002, 0.003]
    assert answers[1].ttft == 3.0, "a record without timing keeps the frames' timing"


def test_an_audio_chunk_is_never_decoded_and_a_huge_server_frame_is_skipped():
    conversation = GeminiConversation()
    chunk = json.dumps({"realtimeInput": {"audio": {"data": AUDIO, "mimeType": "audio/pcm"}}}).encode()
    conversation.frame(chunk + b"garbage", False, True, 1.0)  # never decoded, so never an error
    conversation.frame(b'{"serverContent": {"x": "' + b"A" * 100_000 + b'"}}', False, False, 2.0)
    conversation.frame(b"\xff not json", False, False, 3.0)
    assert not conversation.turns


def live_session() -> list[tuple[bool, dict[str, Any]]]:
    """(from the client, event): speech both ways, a delegated response with a function call whose
    output the client sends, a delegation to the client, an error."""
    wrapped = lambda event: {"type": "response.event", "delegation_id": "dlg_1", "event": event}  # noqa: E731
    arguments = {"item_id": "item_f", "call_id": "call_1", "output_index": 0}
    response = {"id": "resp_1", "object": "response", "model": "gpt-5-mini"}
    done = {**response, "status": "completed", "usage": {"input_tokens": 50, "output_tokens": 9}}
    return [
        (False, {"type": "session.started", "session": {"model": "gpt-live-1"}}),
        (True, {"type": "session.input_audio.append", "audio": AUDIO}),
        (False, {"event_id": "e1", "type": "session.input_transcript.delta", "delta": "What time", "start_ms": 0}),
        (False, {"type": "session.input_transcript.delta", "delta": " is it?", "start_ms": 400, "event_id": "e2"}),
        (False, {"type": "session.output_audio.delta", "delta": AUDIO}),
        (False, {"type": "session.output_transcript.delta", "delta": "Let me look."}),
        (False, {"type": "session.delegation.created", "offset_ms": 900,
                 "delegation": {"id": "dlg_1", "type": "delegation", "target": "responses", "response_id": "resp_1"}}),
        (False, wrapped({"type": "response.created", "response": {**response, "status": "in_progress"}})),
        (False, wrapped({"type": "response.output_item.added", "output_index": 0,
                         "item": {"id": "item_f", "type": "function_call", "name": "get_time", "call_id": "call_1"}})),
        (False, {"type": "session.output_transcript.delta", "delta": "One moment."}),  # speech meanwhile
        (False, wrapped({"type": "response.function_call_arguments.delta", **arguments, "delta": '{"tz": '})),
        (False, wrapped({"type": "response.function_call_arguments.done", **arguments,
                         "arguments": '{"tz": "UTC"}'})),
        (False, wrapped({"type": "response.completed", "response": done})),
        (True, {"type": "response.item.create",
                "item": {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}}),
        (False, {"type": "session.delegation.created", "offset_ms": 2000,
                 "delegation": {"id": "dlg_2", "type": "delegation", "target": "client"}}),
        (False, {"type": "session.output_transcript.delta", "delta": "It is noon."}),
        (False, {"type": "error", "error": {"type": "invalid_request_error", "code": "bad_event", "message": "no"}}),
    ]  # fmt: skip


def test_a_gpt_live_session_reads_as_turns():
    conversation = fed(LiveConversation(), live_session(), binary=False)
    assert [(t.role, t.text) for t in conversation.turns] == [
        (USER, "What time is it?"),
        (ASSISTANT, "Let me look."),
        (ASSISTANT, ""),
        (ASSISTANT, "One moment."),
        (TOOL, "12:00"),
        (ASSISTANT, ""),
        (ASSISTANT, "It is noon."),
        (ERROR, "bad_event: no"),
    ]
    _, spoken, delegated, _, _, client, _, _ = conversation.turns
    assert spoken.voice and spoken.status is None, "speech is billed by the session's time, not per turn"
    assert (delegated.response_id, delegated.status, delegated.notes) == (
        "resp_1",
        "completed",
        ["delegated to responses"],
    )
    assert [(c.name, c.call_id, c.arguments) for c in delegated.calls] == [("get_time", "call_1", '{"tz": "UTC"}')]
    assert (client.item_id, client.notes, client.status) == ("dlg_2", ["delegated to client"], None)
    conversation.priced(record("resp_1", "completed", None, cost=0.0042))
    assert delegated.cost == 0.0042
    text = render_conversation(conversation)
    assert "assistant: Let me look.\n\n" in text, "no usage line under speech"
    assert "assistant: (a tool call)\n    → calls get_time" in text and "completed · $0.0042" in text


def test_a_wrapped_event_naming_no_delegation_is_the_latest_delegations_and_an_unbilled_record_prices_nothing():
    delegation = {"type": "session.delegation.created", "delegation": {"id": "dlg_1", "target": "responses"}}
    text = {"type": "response.event", "event": {"type": "response.output_text.delta", "delta": "Done."}}
    conversation = fed(LiveConversation(), [(False, delegation), (False, text), (False, text)], binary=False)
    (turn,) = conversation.turns
    assert turn.text == "Done.Done."
    conversation.priced(record(None, "failed", None, cost=0.0))
    assert turn.cost is None and turn.status == "in_progress"


def record(response_id: str | None, status: str, usage: Any, cost: float) -> ResponseRecord:
    return ResponseRecord(
        "f", "realtime", None, "realtime", "gcp.gemini", MODEL, MODEL, response_id, status, usage, cost, 0.0
    )


@pytest.fixture
def gemini_gateway(tmp_path: Path):
    policy = tmp_path / "gemini.yaml"
    policy.write_text(
        "provider: gcp.gemini\nroutes:\n  BidiGenerateContent:\n    type: Realtime\n    protocol: gemini-live\n"
    )
    with configured_gateway(gateway_conversations="on", gateway_websocket_history="all") as gateway:
        ctx.options.update(gateway_policy=str(policy))
        yield gateway


def relayed_gemini_session(gateway):
    flow = tflow.twebsocketflow()
    flow.request.path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    flow.websocket.messages.clear()
    gateway.session_metering.websocket_start(flow)
    for n, (from_client, message) in enumerate(gemini_session()):
        flow.websocket.messages.append(WebSocketMessage(n % 2 + 1, from_client, json.dumps(message).encode()))
        gateway.session_metering.websocket_message(flow)
    gateway.session_metering.websocket_end(flow)
    return flow


def test_a_relayed_gemini_session_is_priced_by_the_meter_and_shown_on_its_handshake(gemini_gateway):
    flow = relayed_gemini_session(gemini_gateway)
    assert flow.metadata[KIND_METADATA] == WireProtocol.GEMINI_LIVE
    conversation = gemini_gateway.state.conversations.get(flow.id)
    answers = [t for t in conversation.turns if t.role == ASSISTANT and t.usage is not None]
    assert len(answers) == 3 and all(t.cost is not None and t.cost > 0 for t in answers)
    assert [t.status for t in answers] == ["completed", "cancelled", "completed"]
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == "Realtime conversation"
    assert "user: Weather and time in Paris?" in shown.text and "user (voice): Tell me a story" in shown.text
    assert f"cancelled · 187 tokens (180 in, 0 cached, 7 out) · ${answers[1].cost:,.4f} · TTFT" in shown.text
    assert '    → calls get_weather({"city": "Paris"}) fc_1' in shown.text


def test_each_gemini_turn_end_shows_its_turn_and_audio_is_a_size(gemini_gateway):
    flow = relayed_gemini_session(gemini_gateway)
    ends = [m for m in flow.websocket.messages if b'"turnComplete": true' in m.content]
    views = [contentviews.prettify_message(m, flow) for m in ends]
    assert {v.view_name for v in views} == {"Gemini Live"}
    assert [v.text.count("══ usage: turn ══") for v in views] == [1, 1, 1]
    assert "completed · 120 tokens (100 in, 0 cached, 20 out) · $" in views[0].text
    assert "══ usage: usageMetadata ══" in views[0].text
    audio = next(m for m in flow.websocket.messages if b"inlineData" in m.content)
    text = contentviews.prettify_message(audio, flow).text
    assert AUDIO not in text and "<audio audio/pcm;rate=24000: 9,600 bytes, 200 ms>" in text


def test_a_gemini_flow_read_from_a_file_is_read_as_gemini():
    flow = tflow.twebsocketflow()
    flow.request.path = "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained"
    flow.websocket.messages = [WebSocketMessage(2, c, json.dumps(m).encode()) for c, m in gemini_session()]
    assert isinstance(replay(flow), GeminiConversation)
    assert [t.text for t in replay(flow).turns] == [t.text for t in fed(GeminiConversation(), gemini_session()).turns]
    assert conversation_view.render_priority(b"", contentviews.make_metadata(flow.response, flow)) > 0
    message = flow.websocket.messages[0]
    assert gemini_view.render_priority(message.content, contentviews.make_metadata(message, flow)) > 0


def test_a_relayed_gpt_live_session_prices_its_delegated_turn_and_shows_it_under_the_final_event():
    with configured_gateway(gateway_conversations="on", gateway_websocket_history="all") as gateway:
        flow = tflow.twebsocketflow()
        flow.request.path = "/v1/live/sessions"
        flow.websocket.messages.clear()
        gateway.session_metering.websocket_start(flow)
        for from_client, event in live_session():
            flow.websocket.messages.append(WebSocketMessage(1, from_client, json.dumps(event).encode()))
            gateway.session_metering.websocket_message(flow)
        gateway.session_metering.websocket_end(flow)
        (delegated,) = [t for t in gateway.state.conversations.get(flow.id).turns if t.response_id == "resp_1"]
        assert delegated.cost is not None and delegated.cost > 0 and delegated.usage.input == 50
        final = next(m for m in flow.websocket.messages if b'"response.completed"' in m.content)
        text = contentviews.prettify_message(final, flow).text
        assert f"══ usage: turn ══\ncompleted · 59 tokens (50 in, 0 cached, 9 out) · ${delegated.cost:,.4f}" in text
        shown = contentviews.prettify_message(flow.response, flow)
        assert shown.view_name == "Realtime conversation" and "user (voice): What time is it?" in shown.text


def test_a_long_gemini_session_stays_within_the_caps():
    turn = [
        (True, {"clientContent": {"turns": [{"parts": [{"text": "q" * 900}]}], "turnComplete": True}}),
        (False, {"serverContent": {"outputTranscription": {"text": "a" * 900}}}),
        (False, {"serverContent": {"outputTranscription": {"text": "a" * 1500}}}),
        (False, {"serverContent": {"turnComplete": True}, "usageMetadata": U1}),
    ]
    conversation = fed(GeminiConversation(), turn * conv.MAX_TURNS)
    assert len(conversation.turns) <= conv.MAX_TURNS and conversation.dropped > 0
    assert conversation.chars == sum(t.chars for t in conversation.turns) <= conv.MAX_CHARS
    assert all(len(t.text) == conv.MAX_TURN_CHARS and t.clipped for t in conversation.turns if t.role == ASSISTANT)


def test_a_deeply_nested_gemini_message_is_shown_and_exported_without_recursing():
    nested: Any = {"data": AUDIO, "mimeType": "audio/pcm"}
    for _ in range(5000):
        nested = {"x": [nested]}
    assert list(audio_slots(nested)) == []
    shallow = {"serverContent": {"modelTurn": {"parts": [audio_part(), {"text": "hi"}, audio_part()]}}}
    assert len(list(audio_slots(shallow))) == 2
