"""A Realtime session as turns: the pure turn list, its bounds, and what mitmweb's views make of it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mitmproxy import contentviews
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.observer import ResponseRecord
from ai_gateway.config.policy import WireProtocol
from ai_gateway.protocols import conversation as conv
from ai_gateway.protocols.conversation import ASSISTANT, ERROR, TOOL, USER
from ai_gateway.protocols.realtime_conversation import RealtimeConversation
from ai_gateway.proxy.addon import Gateway
from ai_gateway.proxy.contentview import conversation_view, realtime_view, render_conversation
from ai_gateway.proxy.conversation import MAX_SESSIONS, replay

from .conftest import configured_gateway

USAGE = {"input_tokens": 1200, "output_tokens": 30, "input_token_details": {"cached_tokens": 1000}}


def session_events() -> list[tuple[bool, dict[str, Any]]]:
    """(from the client, event): a voice turn answered, a barge-in, a tool call and its result, an error."""
    where = {"item_id": "item_a1", "output_index": 0, "content_index": 0}
    arguments = {"response_id": "resp_3", "item_id": "item_f", "call_id": "call_1"}
    return [
        (False, {"type": "input_audio_buffer.speech_started", "item_id": "item_u1"}),
        (False, {"type": "input_audio_buffer.speech_stopped", "item_id": "item_u1"}),
        (False, {"type": "input_audio_buffer.committed", "item_id": "item_u1"}),
        (False, {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}),
        (False, {"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u1",
                 "transcript": "What's the weather?"}),
        (False, {"type": "response.output_audio.delta", "response_id": "resp_1", "delta": "AAAA"}),
        (False, {"type": "response.output_audio_transcript.delta", "response_id": "resp_1", **where,
                 "delta": "Let me"}),
        (False, {"type": "response.output_audio_transcript.delta", "response_id": "resp_1", **where,
                 "delta": " check."}),
        (False, {"type": "response.done", "response": {"id": "resp_1", "status": "completed", "usage": USAGE}}),
        (False, {"type": "response.created", "response": {"id": "resp_2"}}),
        (False, {"type": "response.output_audio_transcript.delta", "response_id": "resp_2", "item_id": "item_a2",
                 "delta": "It is"}),
        (False, {"type": "input_audio_buffer.speech_started", "item_id": "item_u2"}),
        (True, {"type": "response.cancel"}),
        (True, {"type": "conversation.item.truncate", "item_id": "item_a2", "audio_end_ms": 640}),
        (False, {"type": "conversation.item.truncated", "item_id": "item_a2", "audio_end_ms": 640}),
        (False, {"type": "response.done", "response": {"id": "resp_2", "status": "cancelled", "usage": USAGE}}),
        (False, {"type": "response.created", "response": {"id": "resp_3"}}),
        (False, {"type": "response.output_item.added", "response_id": "resp_3",
                 "item": {"id": "item_f", "type": "function_call", "name": "get_weather", "call_id": "call_1"}}),
        (False, {"type": "response.function_call_arguments.delta", **arguments, "delta": '{"city": '}),
        (False, {"type": "response.function_call_arguments.delta", **arguments, "delta": '"Oslo"}'}),
        (False, {"type": "response.function_call_arguments.done", **arguments, "name": "get_weather",
                 "arguments": '{"city": "Oslo"}'}),
        (False, {"type": "response.done", "response": {"id": "resp_3", "status": "completed", "usage": USAGE}}),
        (True, {"type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 4}'}}),
        (False, {"type": "error", "error": {"code": "invalid_value", "message": "bad audio_end_ms"}}),
    ]  # fmt: skip


def fed(events: list[tuple[bool, dict[str, Any]]]) -> RealtimeConversation:
    conversation = RealtimeConversation()
    for at, (from_client, event) in enumerate(events):
        (conversation.client_event if from_client else conversation.server_event)(event, 1000.0 + at)
    return conversation


def test_a_session_reads_as_turns():
    conversation = fed(session_events())
    turns = [(t.role, t.text) for t in conversation.turns]
    assert turns == [
        (USER, "What's the weather?"),
        (ASSISTANT, "Let me check."),
        (ASSISTANT, "It is"),
        (USER, ""),  # the barge-in: speech without a transcript (none came)
        (ASSISTANT, ""),
        (TOOL, '{"temp": 4}'),
        (ERROR, "invalid_value: bad audio_end_ms"),
    ]
    user, answer, cut, _, called, result, _ = conversation.turns
    assert user.voice and user.item_id == "item_u1" and answer.status == "completed"
    assert answer.usage is not None and (answer.usage.input, answer.usage.output) == (1200, 30)
    assert cut.status == "cancelled"
    assert cut.notes == [
        "interrupted: the user spoke",
        "cancelled by the client",
        "truncated at 640 ms of audio (what the user heard)",
    ]
    (call,) = called.calls
    assert (call.name, call.call_id, call.arguments) == ("get_weather", "call_1", '{"city": "Oslo"}')
    assert result.call_id == "call_1"


def test_the_meters_record_gives_a_turn_its_cost_and_latency():
    conversation = fed(session_events()[:9])
    record = ResponseRecord(
        "flow", "realtime", None, "realtime", "openai", "gpt-realtime", "gpt-realtime", "resp_1", "completed",
        None, 0.0123, 0.0, duration=1.5, ttft=0.25, turn_latency=0.4,
    )  # fmt: skip
    conversation.priced(record)
    answer = conversation.turns[1]
    assert (answer.cost, answer.ttft, answer.turn_latency, answer.duration) == (0.0123, 0.25, 0.4, 1.5)
    assert answer.usage is not None, "a record without usage keeps what response.done said"


def test_a_function_call_only_in_response_done_is_a_call_too():
    call = {"type": "function_call", "id": "item_9", "name": "lookup", "call_id": "call_9", "arguments": "{}"}
    done = {"type": "response.done", "response": {"id": "resp_9", "status": "completed", "output": [call]}}
    (turn,) = fed([(False, done)]).turns
    assert [(c.name, c.arguments) for c in turn.calls] == [("lookup", "{}")]


def test_turns_and_characters_are_capped_whatever_the_session_length():
    text = "x" * 700
    events = []
    for n in range(conv.MAX_TURNS * 2):
        events.append((False, {"type": "response.created", "response": {"id": f"r{n}"}}))
        events += [(False, {"type": "response.output_text.delta", "response_id": f"r{n}", "delta": text})] * 4
    conversation = fed(events)
    assert len(conversation.turns) <= conv.MAX_TURNS
    assert conversation.chars == sum(t.chars for t in conversation.turns) <= conv.MAX_CHARS
    assert all(len(t.text) == conv.MAX_TURN_CHARS and t.clipped for t in conversation.turns)
    assert conversation.dropped == conv.MAX_TURNS * 2 - len(conversation.turns)
    assert conversation.turns[-1].response_id == f"r{conv.MAX_TURNS * 2 - 1}"


def test_the_view_renders_the_conversation():
    text = render_conversation(fed(session_events()))
    assert text.startswith("══ conversation: 7 turns ══")
    assert "[00:00.0] user (voice): What's the weather?" in text
    assert "assistant: Let me check.\n    completed · 1,230 tokens (1,200 in, 1,000 cached, 30 out)" in text
    assert '    → calls get_weather({"city": "Oslo"}) call_1' in text
    assert 'tool result call_1: {"temp": 4}' in text
    assert "    ! interrupted: the user spoke" in text


@pytest.fixture
def gateway():
    with configured_gateway(gateway_conversations="on", gateway_websocket_history="all") as addon:
        yield addon


def relayed_session(gateway: Gateway):
    flow = tflow.twebsocketflow()
    flow.request.path = "/v1/realtime?model=gpt-realtime"
    flow.websocket.messages.clear()
    gateway.session_metering.websocket_start(flow)
    created = {"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}}
    for from_client, event in [(False, created), *session_events()]:
        flow.websocket.messages.append(WebSocketMessage(1, from_client, json.dumps(event).encode()))
        gateway.session_metering.websocket_message(flow)
    gateway.session_metering.websocket_end(flow)
    return flow


def test_a_relayed_session_is_shown_as_turns_with_the_meters_cost_on_its_handshake(gateway):
    flow = relayed_session(gateway)
    conversation = gateway.state.conversations.get(flow.id)
    assert conversation is not None and len(conversation.turns) == 7
    answer = conversation.turns[1]
    assert answer.cost is not None and answer.cost > 0 and answer.duration is not None
    shown = contentviews.prettify_message(flow.response, flow)
    assert shown.view_name == "Realtime conversation"
    assert f"${answer.cost:,.4f}" in shown.text and "user (voice): What's the weather?" in shown.text


def test_each_response_done_shows_its_turn(gateway):
    flow = relayed_session(gateway)
    done = next(m for m in flow.websocket.messages if b'"resp_1", "status": "completed"' in m.content)
    text = contentviews.prettify_message(done, flow).text
    assert "══ usage: response.done, completed ══" in text
    assert "══ usage: turn ══\ncompleted · 1,230 tokens (1,200 in, 1,000 cached, 30 out) · $" in text


def test_a_flow_read_from_a_file_is_replayed_from_its_messages():
    flow = tflow.twebsocketflow()
    flow.request.path = "/v1/realtime"
    flow.websocket.messages = [WebSocketMessage(1, c, json.dumps(e).encode()) for c, e in session_events()]
    assert [t.text for t in replay(flow).turns] == [t.text for t in fed(session_events()).turns]
    assert conversation_view.render_priority(b"", contentviews.make_metadata(flow.response, flow)) > 0
    assert conversation_view.render_priority(b"", contentviews.make_metadata(flow.request, flow)) == 0
    text = conversation_view.prettify(b"", contentviews.make_metadata(flow.response, flow))
    assert "(read from the kept messages: cost and timing were not recorded)" in text
    assert realtime_view.name != conversation_view.name


def test_the_latest_sessions_only_are_kept(gateway):
    conversations = gateway.state.conversations
    for n in range(MAX_SESSIONS + 5):
        flow = tflow.twebsocketflow()
        flow.id = f"flow-{n}"
        conversations.open(flow, WireProtocol.OPENAI)
    assert len(conversations.by_flow) == MAX_SESSIONS and conversations.get("flow-4") is None


def test_off_under_mitmdump_by_default():
    with configured_gateway() as addon:
        assert (
            not addon.state.conversations.enabled
            and addon.state.conversations.open(tflow.twebsocketflow(), WireProtocol.OPENAI) is None
        )
        assert addon.state.conversations not in addon.state.observability.observers


def test_a_truncation_finds_its_answer_by_the_announced_item_or_as_the_latest_unnamed_one():
    truncated = {"type": "conversation.item.truncated", "item_id": "item_m", "audio_end_ms": 300}
    announced = [
        (False, {"type": "response.created", "response": {"id": "r1"}}),
        (
            False,
            {"type": "response.output_item.added", "response_id": "r1", "item": {"id": "item_m", "type": "message"}},
        ),
        (False, {"type": "response.created", "response": {"id": "r2"}}),
        (False, truncated),
    ]
    first, second = fed(announced).turns
    assert first.item_id == "item_m" and first.notes == ["truncated at 300 ms of audio (what the user heard)"]
    assert not second.notes
    (unnamed,) = fed([announced[0], (False, truncated)]).turns  # cut before anything named its item
    assert unnamed.notes == ["truncated at 300 ms of audio (what the user heard)"]


def test_a_hostile_session_stays_within_the_caps():
    huge = "r" * 100_000
    events = [(False, {"type": "response.created", "response": {"id": huge}})]
    events += [(True, {"type": "response.cancel"})] * 1000
    events += [(False, {"type": "response.output_text.delta", "response_id": huge, "delta": "y" * 100_000})]
    events += [(False, {"type": "error", "error": {"code": "c" * 1000, "message": "m" * 100_000}})] * 3
    conversation = fed(events)
    answer, *errors = conversation.turns
    assert len(answer.response_id or "") == conv.MAX_ID_CHARS and answer.notes == ["cancelled by the client"]
    assert len(answer.text) == conv.MAX_TURN_CHARS and answer.clipped
    assert all(len(e.text) == conv.MAX_TURN_CHARS for e in errors)
    assert conversation.chars == sum(t.chars for t in conversation.turns)
