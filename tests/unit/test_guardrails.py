"""Guardrails' pure parts: the policy's guards and their one-line errors, normalisation, the windows
streamed output is checked in, verdicts from guard services, and redaction's detectors."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import taddons
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.guard_service import ServiceError, moderation_verdicts, webhook_verdict
from ai_gateway.accounting.observer import GuardrailBlock
from ai_gateway.accounting.redaction import Redactor, iban_valid, luhn
from ai_gateway.config.guardrails import (
    ALLOW,
    Action,
    GuardKind,
    Phase,
    RedactPolicy,
    check_regex,
    failed,
    normalise,
)
from ai_gateway.config.policy import PolicyError, parse_policy
from ai_gateway.protocols import guard_text
from ai_gateway.protocols.guard_text import (
    CARRY,
    MAX_WINDOW,
    LiveOutput,
    OutputAudio,
    OutputText,
    Transcript,
    UserText,
    Window,
    client_event,
    live_client_text,
    live_server_event,
    server_event,
)
from ai_gateway.protocols.openai_realtime import RealtimeProtocol
from ai_gateway.proxy.addon import Gateway
from ai_gateway.proxy.guardrails import GuardedResponse

from .conftest import Records, sample_total
from .test_addon import realtime_flow

ROUTES = "routes:\n  /realtime: Realtime\n"
ISSUE_EXAMPLE = """
guardrails:
  - name: no-project-names
    kind: regex
    deny: ["(?i)project\\\\s+falcon"]
    phases: [input, output]
    action: block
  - name: moderation
    kind: moderation               # or webhook
    url: http://moderation.internal:8080/v1/moderations
    phases: [input, output]
    action: block
    timeout_ms: 500
    on_error: open
"""


def guards(text: str):
    return parse_policy(text + ROUTES, "p.yaml", {"MOD_KEY": "sk-mod"}).guardrails.guards


def test_the_issue_spelling_is_a_valid_policy():
    regex, moderation = guards(ISSUE_EXAMPLE)
    assert (regex.kind, moderation.kind) == (GuardKind.REGEX, GuardKind.MODERATION)
    assert regex.phases == {Phase.INPUT, Phase.OUTPUT} and regex.action is Action.BLOCK
    assert (moderation.timeout_ms, moderation.on_error, moderation.url.endswith("/v1/moderations")) == (
        500,
        "open",
        True,
    )


def test_a_route_adds_its_own_guards_after_the_policy_s():
    text = (
        ISSUE_EXAMPLE
        + "routes:\n  /realtime:\n    type: Realtime\n    guardrails:\n      - {name: r, kind: regex, deny: [x]}\n"
    )
    policy = parse_policy(text, "p.yaml", {})
    assert [g.name for g in policy.guardrails_for(policy.routes[0]).guards] == ["no-project-names", "moderation", "r"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('guardrails:\n  - name: x\n    kind: regex\n    deny: ["(open"]\n', "p.yaml:4: guardrails[0].deny[0]: invalid regular expression: missing ), unterminated subpattern at position 0"),
        ("guardrails:\n  - {name: x, kind: regex}\n", "p.yaml:2: guardrails[0].deny: missing; a regex guard needs it"),
        ("guardrails:\n  - {name: x, kind: webhook, url: ftp://h}\n", "p.yaml:2: guardrails[0].url: expected an http:// or https:// URL, got 'ftp://h'"),
        ("guardrails:\n  - {name: x, kind: regex, deny: [a], url: http://h}\n", "p.yaml:2: guardrails[0].url: not a key of a regex guard"),
        ("guardrails:\n  - {name: x, kind: regex, deny: [a], action: deny}\n", "p.yaml:2: guardrails[0].action: expected one of block, warn, log, got 'deny'"),
        ("guardrails:\n  - {name: x, kind: regex, deny: [a], phases: []}\n", "p.yaml:2: guardrails[0].phases: expected at least one of input, output"),
        ("guardrails:\n  - {name: x, kind: webhook, url: http://h, on_error: maybe}\n", "p.yaml:2: guardrails[0].on_error: expected open or closed, got 'maybe'"),
        ("guardrails:\n  - {name: x, kind: moderation, url: http://h, thresholds: {hate: 1.5}}\n", "p.yaml:2: guardrails[0].thresholds.hate: expected a score up to 1, got 1.5"),
        ("guardrails:\n  - {name: x, kind: moderation, url: http://h, key_env: UNSET}\n", "p.yaml:2: guardrails[0].key_env: environment variable UNSET is not set or empty"),
        ("guardrails:\n  - {name: x, kind: regex, deny: [a]}\n  - {name: x, kind: regex, deny: [b]}\n", "p.yaml:3: guardrails[1].name: duplicate guard name 'x'"),
        ("guardrails: {name: x}\n", "p.yaml:1: guardrails: expected a list of guards, got a mapping"),
        ("guardrails:\n  - {name: x, kind: regex, deny: [a], max_blocks: -1}\n", "p.yaml:2: guardrails[0].max_blocks: expected a whole number, 0 or more, got int -1"),
        ("guardrails:\n  - {name: x, kind: regex, deny: [a], max_blocks: 1.5}\n", "p.yaml:2: guardrails[0].max_blocks: expected a whole number, 0 or more, got float 1.5"),
        ("guardrails:\n  - {name: x, kind: webhook, url: http://h, batch_ms: 10}\n", "p.yaml:2: guardrails[0].batch_ms: not a key of a webhook guard"),
        ("guardrails:\n  - {name: x, kind: regex, deny: [a], batch_max: 4}\n", "p.yaml:2: guardrails[0].batch_max: not a key of a regex guard"),
        ("guardrails:\n  - {name: x, kind: moderation, url: http://h, batch_ms: -5}\n", "p.yaml:2: guardrails[0].batch_ms: expected a whole number, 0 or more, got int -5"),
        ("guardrails:\n  - {name: x, kind: moderation, url: http://h, batch_ms: fast}\n", "p.yaml:2: guardrails[0].batch_ms: expected a whole number, 0 or more, got 'fast'"),
        ("guardrails:\n  - name: x\n    kind: moderation\n    url: http://h\n    timeout_ms: 100\n    batch_ms: 100\n", "p.yaml:6: guardrails[0].batch_ms: expected less than timeout_ms (100), got 100: checks would time out in their batch"),
        ("guardrails:\n  - {name: x, kind: moderation, url: http://h, batch_max: 0}\n", "p.yaml:2: guardrails[0].batch_max: expected a whole number, 1 or more, got int 0"),
        ("guardrails:\n  - {name: x, kind: moderation, url: http://h, batch_max: [8]}\n", "p.yaml:2: guardrails[0].batch_max: expected a whole number, 1 or more, got a list"),
        ("redact: {builtin: [ssn]}\n", "p.yaml:1: redact.builtin[0]: expected one of email, phone, card, iban, got 'ssn'"),
    ],
)  # fmt: skip
def test_invalid_guards_are_one_line_naming_key_and_line(text, error):
    with pytest.raises(PolicyError) as caught:
        guards(text)
    assert str(caught.value) == error


@pytest.mark.parametrize(
    "text", ["Project Falcon", "PROJECT\tFALCON", "ｐｒｏｊｅｃｔ ｆａｌｃｏｎ", "pro\u200bject fal\u00adcon"]
)
def test_look_alike_spellings_normalise_to_one_phrase(text):
    (guard, _) = guards(ISSUE_EXAMPLE)
    assert check_regex(guard, normalise(text)).blocks


def test_an_allow_pattern_excuses_only_the_match_it_covers():
    (guard,) = guards('guardrails:\n  - {name: x, kind: regex, deny: ["falcon"], allow: ["falcon heavy"]}\n')
    assert not check_regex(guard, normalise("The Falcon Heavy flew")).blocks
    assert check_regex(guard, normalise("Falcon Heavy and then falcon")).blocks


def test_a_service_failure_blocks_only_when_closed():
    text = "guardrails:\n  - {name: o, kind: webhook, url: http://h}\n  - {name: c, kind: webhook, url: http://h, on_error: closed}\n"
    opened, closed = guards(text)
    assert (failed(opened, "timeout").blocks, failed(closed, "timeout").blocks) == (False, True)
    assert failed(opened, "timeout").outcome == "error"


def feed_all(deltas: list[str]) -> list[tuple[str, int]]:
    window = Window()
    return [w for delta in deltas for w in window.feed(delta)] + window.flush()


def test_output_is_checked_at_sentence_ends_never_per_delta():
    windows = feed_all(["Sure", ".", " The", " project", " falcon", " is", " late", ".", " More"])
    assert [w[start:] for w, start in windows] == ["sure.", " the project falcon is late.", " more"]
    assert windows[1] == ("sure. the project falcon is late.", 5)  # checked with what came before


def test_text_without_a_sentence_end_is_checked_every_160_characters():
    windows = feed_all(["word "] * 100)
    assert [len(w) - start for w, start in windows] == [160, 160, 160, 20]  # the rest at the end


@given(st.text(alphabet="ab .!?\n", max_size=600), st.lists(st.integers(1, 40), max_size=60))
def test_windows_cover_the_text_however_it_streams(text, sizes):
    """However the text is cut into deltas, the new parts of its windows are the whole normalised
    text, in order, each at most MAX_WINDOW characters, with at most CARRY carried before it."""
    deltas, rest = [], text
    for size in sizes:
        deltas.append(rest[:size])
        rest = rest[size:]
    deltas.append(rest)
    windows = feed_all(deltas)
    assert all(start <= CARRY and len(w) - start <= MAX_WINDOW for w, start in windows)
    covered, whole = "".join(w[start:] for w, start in windows), normalise(text)
    assert whole.startswith(covered) and not whole[len(covered) :].strip()  # a blank tail is never checked


@given(st.text(alphabet="xyz .", max_size=300), st.integers(0, 300), st.integers(1, 30))
def test_a_phrase_anywhere_in_the_stream_is_found(prefix, at, size):
    """A denied phrase is found whatever deltas it arrives in, and wherever the windows fall."""
    (guard, _) = guards(ISSUE_EXAMPLE)
    text = prefix[:at] + " project falcon " + prefix[at:]
    deltas = [text[i : i + size] for i in range(0, len(text), size)]
    assert any(guard.denies(w, start) for w, start in feed_all(deltas))


def test_realtime_events_read_for_guards():
    item = {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    }
    assert client_event(json.dumps(item).encode()) == UserText("hi")
    item["item"]["role"] = "system"
    assert client_event(json.dumps(item).encode()) is None
    assert client_event(b'{"type": "input_audio_buffer.append", "audio": "AAAA"}') is None
    delta = {"type": "response.output_audio_transcript.delta", "response_id": "r1", "item_id": "i1", "delta": " hi"}
    assert server_event(json.dumps(delta).encode()) == OutputText("r1", "i1", " hi")
    audio = {"type": "response.output_audio.delta", "response_id": "r1", "delta": "A" * 6400}  # 4800 bytes
    assert server_event(json.dumps(audio).encode()) == OutputAudio("r1", 100.0)
    done = {"type": "conversation.item.input_audio_transcription.completed", "item_id": "i2", "transcript": "yo"}
    assert server_event(json.dumps(done).encode()) == Transcript("i2", "yo")  # fmt: skip


def test_a_response_s_audio_is_its_deltas_sizes_less_the_envelope_its_first_had():
    """The first delta's base64 is found; the others' audio is their size less that envelope, the
    same exact figure for deltas whose ids and members are the same (as one response's are)."""
    response = GuardedResponse()
    for size in (6400, 3200, 12800, 4):  # base64 characters: 100 ms, 50 ms, 200 ms, 0.0625 ms
        delta = {
            "type": "response.output_audio.delta",
            "event_id": "event_AbC",
            "response_id": "r1",
            "delta": "A" * size,
        }
        response.audio(json.dumps(delta).encode())
    assert response.audio_ms == pytest.approx(350.0625)


@pytest.mark.parametrize(
    ("content", "plain"),
    [
        (b'{"type": "input_audio_buffer.append", "audio": "AAAA"}', True),
        (b'{"audio": "AAAA", "event_id": "e1", "type": "input_audio_buffer.append"}', True),
        (b'{"type": "conversation.item.create", "item": {"role": "user", "content": "hi"}}', False),
        # a second type, which the upstream's parser may take: not plain, so the guard reads it
        (b'{"type": "input_audio_buffer.append", "audio": "AAAA", "type": "conversation.item.create"}', False),
        (b'{"type": "conversation.item.\\u0063reate", "item": {"content": "hi"}}', False),
        (b'{"type": "response.create"}', False),
        (b'{"type": "input_audio_buffer.commit"}', False),
    ],
)
def test_metering_tells_guardrails_which_client_frames_name_nothing_they_read(content, plain):
    """One scan of a client frame for metering and guardrails: a frame it finds plain (an audio
    append) names no event either reads, in any spelling; guardrails then leave it unread."""
    protocol = RealtimeProtocol()
    protocol.client_frame(content, True)
    assert protocol.plain is plain
    if plain:
        assert client_event(content) is None


@pytest.mark.parametrize(
    "event",
    [
        {"event_id": "e1", "type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
        {"type": "response.done", "response": {"id": "resp_2", "status": "completed", "usage": None}},
        {"type": "response.done", "response": {"status": "cancelled", "output": [{"id": "item_1"}]}},
    ],
)
def test_a_response_s_start_and_end_are_read_from_what_metering_decoded(event, monkeypatch):
    """The guard takes a response's id from the item metering read, never decoding the frame a
    second time, and gets what decoding it would give."""
    content = json.dumps(event, sort_keys=True).encode()
    decoded = server_event(content)
    protocol = RealtimeProtocol()
    protocol.server_frame(content, True)
    monkeypatch.setattr(guard_text, "decode_json", lambda *_, **__: pytest.fail("decoded again"))
    assert server_event(content, protocol.kind, protocol.item) == decoded


def test_max_blocks_is_per_guard_and_never_by_default():
    policy = parse_policy(
        "guardrails:\n  - {name: a, kind: regex, deny: [x], max_blocks: 0}\n  - {name: b, kind: regex, deny: [y]}\n"
        + ROUTES,
        "p.yaml",
        {},
    )
    assert (policy.guardrails.max_blocks("a"), policy.guardrails.max_blocks("b")) == (0, None)


def test_gemini_live_messages_read_for_guards():
    turn = {"clientContent": {"turns": [{"role": "user", "parts": [{"text": "hi"}, {"text": "there"}]}]}}
    assert live_client_text(json.dumps(turn).encode()) == "hi\nthere"
    turn["clientContent"]["turns"][0]["role"] = "model"  # history the client replays is not the user's
    assert live_client_text(json.dumps(turn).encode()) == ""
    assert live_client_text(b'{"realtime_input": {"text": "typed"}}') == "typed"
    assert live_client_text(b'{"setup": {"systemInstruction": {"parts": [{"text": "be brief"}]}}}') == ""
    audio = {"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm", "data": "A" * 6400}}]}}}
    assert live_server_event(json.dumps(audio).encode()) == LiveOutput(audio_ms=100.0)  # 4800 bytes at 24 kHz
    parts = [{"text": "thinking", "thought": True}, {"text": "Hello"}]
    text = {"serverContent": {"modelTurn": {"parts": parts}, "outputTranscription": {"text": " hi"}}}
    assert live_server_event(json.dumps(text).encode()) == LiveOutput(text="Hello", spoken=" hi")
    heard = {"serverContent": {"inputTranscription": {"text": " yo"}, "turnComplete": True}}
    assert live_server_event(json.dumps(heard).encode()) == LiveOutput(heard=" yo", turn_over=True)
    assert live_server_event(b'{"setupComplete": {}}') is None


def test_service_answers_become_verdicts():
    webhook, moderation = guards(
        "guardrails:\n  - {name: w, kind: webhook, url: http://h}\n"
        "  - {name: m, kind: moderation, url: http://h, thresholds: {violence: 0.5}}\n"
    )
    assert webhook_verdict(webhook, {"action": "block", "reason": "no"}).reason == "no"
    assert not webhook_verdict(webhook, {"action": "allow"}).blocks
    with pytest.raises(ServiceError):
        webhook_verdict(webhook, {"verdict": "ok"})
    scores = {"results": [{"flagged": True, "categories": {"hate": True}, "category_scores": {"violence": 0.7}}]}
    assert [v.reason for v in moderation_verdicts(moderation, scores, 1)] == ["violence"]
    scores["results"][0]["category_scores"]["violence"] = 0.2
    assert not moderation_verdicts(moderation, scores, 1)[0].blocks  # thresholds decide, not the flags


def result(violence: float) -> dict:
    return {
        "flagged": violence >= 0.5,
        "categories": {"violence": violence >= 0.5},
        "category_scores": {"violence": violence},
    }


def test_a_batch_answer_is_split_into_a_verdict_per_text_in_order():
    (moderation,) = guards("guardrails:\n  - {name: m, kind: moderation, url: http://h}\n")
    verdicts = moderation_verdicts(moderation, {"results": [result(0.1), result(0.9), result(0.2)]}, 3)
    assert [(v.outcome, v.reason) for v in verdicts] == [(ALLOW, ""), (Action.BLOCK, "violence"), (ALLOW, "")]
    # one text (sent as a string) is judged on every result the service gave for it
    assert moderation_verdicts(moderation, {"results": [result(0.1), result(0.9)]}, 1)[0].blocks


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ({"results": [result(0.1), result(0.9)]}, "expected 3 results, one per input, got 2"),
        ({"results": [result(0.1)] * 4}, "expected 3 results, one per input, got 4"),
        ({"results": []}, "expected results, a list of moderation results"),
        ({"results": [result(0.1), "flagged", result(0.1)]}, "expected results, a list of moderation results"),
        (["results"], "expected results, a list of moderation results"),
    ],
)
def test_a_batch_answer_that_does_not_match_its_texts_is_a_service_error(answer, error):
    (moderation,) = guards("guardrails:\n  - {name: m, kind: moderation, url: http://h}\n")
    with pytest.raises(ServiceError, match=error):
        moderation_verdicts(moderation, answer, 3)


def test_batching_keys_default_and_are_moderation_only():
    text = (
        "guardrails:\n  - {name: a, kind: moderation, url: http://h}\n"
        "  - {name: b, kind: moderation, url: http://h, timeout_ms: 40}\n"
        "  - {name: c, kind: moderation, url: http://h, batch_ms: 0, batch_max: 1}\n"
    )
    assert [(g.batch_ms, g.batch_max) for g in guards(text)] == [(50, 32), (20, 32), (0, 1)]


def test_checksums_tell_cards_and_ibans_from_lookalikes():
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE88 3704 0044 0532 0130 00")


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("write to jo.doe+x@example.co.uk now", "write to [redacted:email] now"),
        ("card 4111 1111 1111 1111, exp 12/27", "card [redacted:card], exp 12/27"),
        ("order 4111 1111 1111 1112", "order 4111 1111 1111 1112"),
        ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN [redacted:iban] please"),
        ("call +44 20 7946 0958 or (555) 123-4567", "call [redacted:phone] or [redacted:phone]"),
        ("on 2024-01-15 at 12:30", "on 2024-01-15 at 12:30"),
        ("employee EMP-123456", "employee [redacted:pattern]"),
    ],
)
def test_redaction_replaces_what_it_detects(text, kept):
    policy = parse_policy(
        'redact:\n  builtin: [email, phone, card, iban]\n  patterns: ["EMP-\\\\d{6}"]\n' + ROUTES, "p.yaml", {}
    )
    assert Redactor(policy.redact).redact(text) == kept
    assert not Redactor(RedactPolicy())


def test_a_response_that_waited_for_the_shared_store_reaches_the_guards(tmp_path, monkeypatch):
    """A response the upstream started by itself waits for the shared store's admission (its
    response.created held); once admitted the guards see it too: in flight, to be cancelled on a block."""
    policy = tmp_path / "guarded.yaml"
    policy.write_text("guardrails:\n  - {name: names, kind: regex, deny: [falcon]}\n" + ROUTES)
    gateway = Gateway()
    with taddons.context(gateway) as context:
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(policy), gateway_relay="messages")
        flow = realtime_flow()
        gateway.session_metering.websocket_start(flow)
        accounting, asked = gateway.state.accounting, []

        async def admitted(source: object) -> None:
            asked.append(source)

        monkeypatch.setattr(accounting, "shared", object())
        monkeypatch.setattr(accounting, "admit_shared", admitted)
        created = {"type": "response.created", "response": {"id": "resp_vad", "status": "in_progress"}}
        flow.websocket.messages.append(WebSocketMessage(1, False, json.dumps(created).encode()))
        pending = gateway.session_metering.websocket_message(flow)
        assert pending is not None and "resp_vad" not in gateway.guardrails.sessions[flow.id].in_flight
        asyncio.run(pending)
        assert len(asked) == 1 and gateway.guardrails.sessions[flow.id].in_flight == {"resp_vad"}


def test_a_turn_blocked_before_its_answer_started_names_the_guard_in_that_answer_s_record(tmp_path, monkeypatch):
    """Transcribed speech blocked before the response it starts (server VAD) was created: that
    response is cancelled as it starts, and its record, as a cancelled response's in flight would,
    names the guard, the input phase and the block (the access log's line, the span)."""
    policy = tmp_path / "guarded.yaml"
    policy.write_text("guardrails:\n  - {name: names, kind: regex, deny: [falcon]}\n" + ROUTES)
    gateway = Gateway()
    with taddons.context(gateway) as context:
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(policy), gateway_relay="messages")
        records, sent = Records(), []
        monkeypatch.setattr(gateway.state.accounting, "observer", records)
        monkeypatch.setattr(gateway.guardrails.links, "send", lambda _, to_client, payload: sent.append(payload))
        flow = realtime_flow()
        gateway.session_metering.websocket_start(flow)
        heard = {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "item_1",
            "transcript": "about project falcon",
        }
        created = {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}
        done = {"type": "response.done", "response": {"id": "resp_1", "status": "cancelled", "output": []}}
        for event in (heard, created, done):
            flow.websocket.messages.append(WebSocketMessage(1, False, json.dumps(event).encode()))
            assert gateway.session_metering.websocket_message(flow) is None
        assert [json.loads(payload)["type"] for payload in sent] == [
            "conversation.item.delete",
            "error",
            "response.cancel",
        ]
        (record,) = records.responses
        assert record.guardrail == GuardrailBlock("names", "input", "block")


def test_the_response_streaming_has_its_audio_counted_by_metering_and_its_blocks_hold(tmp_path, monkeypatch):
    """While one response streams, its audio deltas are not handed to the guards (metering counts
    them); the audio before a block is still every delta's, what follows the block is dropped, and
    a client frame between two deltas still reaches the guards."""
    policy = tmp_path / "guarded.yaml"
    policy.write_text("guardrails:\n  - {name: names, kind: regex, deny: [falcon]}\n" + ROUTES)
    gateway = Gateway()
    with taddons.context(gateway) as context:
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(policy), gateway_relay="messages")
        sent: list[bytes] = []
        monkeypatch.setattr(gateway.guardrails.links, "send", lambda _, to_client, payload: sent.append(payload))
        flow = realtime_flow()
        gateway.session_metering.websocket_start(flow)
        where = {"response_id": "resp_1", "item_id": "item_1", "output_index": 0, "content_index": 0}

        def relay(event: dict[str, object], from_client: bool = False) -> WebSocketMessage:
            message = WebSocketMessage(1, from_client, json.dumps(event).encode())
            flow.websocket.messages.append(message)
            assert gateway.session_metering.websocket_message(flow) is None
            return message

        relay({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}})
        for size in (6400, 3200, 12800):  # 100, 50 and 200 ms
            relay({"type": "response.output_audio.delta", "event_id": "event_1", **where, "delta": "A" * size})
            assert flow.id in gateway.guardrails.unwatched  # from the first delta on
        user = {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": "falcon"}}
        assert relay(user, from_client=True).dropped  # a client frame after an audio delta: guarded
        relay({"type": "response.output_audio.delta", "event_id": "event_2", **where, "delta": "A" * 6400})
        said = relay({"type": "response.output_audio_transcript.delta", **where, "delta": "It is project falcon."})
        assert said.dropped and flow.id not in gateway.guardrails.unwatched
        after = relay({"type": "response.output_audio.delta", "event_id": "event_3", **where, "delta": "A" * 6400})
        assert after.dropped  # the blocked response's audio: handed to the guards again, and dropped
        assert [json.loads(p)["type"] for p in sent] == [
            "error",
            "response.cancel",
            "conversation.item.delete",
            "error",
        ]
        assert gateway.guardrails.sessions[flow.id].responses == {}
        audio = sample_total(gateway.state.accounting.metrics, "agentgateway_guardrail_audio_before_block_seconds_sum")
        assert audio == pytest.approx(0.45)  # 100 + 50 + 200 + 100 ms, the dropped delta not among them


def test_a_guarded_route_whose_sessions_no_guard_reads_says_so_once(tmp_path, caplog):
    """GPT-Live and Responses WebSocket sessions are relayed unchecked: a guarded route of theirs
    is a warning, once per route and kind of session, never silence (and never one per session)."""
    policy = tmp_path / "guarded.yaml"
    policy.write_text(
        "guardrails:\n  - {name: names, kind: regex, deny: [falcon]}\n"
        "routes:\n  /realtime: Realtime\n  /responses: Responses\n"
        "  /live/sessions:\n    type: Realtime\n    protocol: openai-live\n"
    )
    gateway = Gateway()
    with taddons.context(gateway) as context, caplog.at_level(logging.WARNING):
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(policy), gateway_relay="messages")
        for path in ("/v1/live/sessions", "/v1/live/sessions", "/v1/responses", "/v1/realtime?model=gpt-realtime"):
            flow = realtime_flow()
            flow.request.path = path
            gateway.session_metering.websocket_start(flow)
    said = [r.getMessage() for r in caplog.records if "relayed unchecked" in r.getMessage()]
    assert len(said) == 2 and "route /live/sessions" in said[0] and "openai-live" in said[0]
    assert "route /responses has guardrails, but its Responses sessions" in said[1]
