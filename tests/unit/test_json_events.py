"""The shared client-event reader against json.loads: generated events in any key order, spacing and
escaping, with nested objects that have a `type` of their own, read as json.loads reads them by
every adapter (Realtime, Responses over WebSocket, Gemini Live); and large frames read with
bounded work."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai_gateway.accounting.items import ResponseRequested, SessionModels, TurnEnded
from ai_gateway.protocols.gemini_live import GeminiLiveProtocol, model_name
from ai_gateway.protocols.json_events import event_type, head_strings, read_event
from ai_gateway.protocols.openai_realtime import AUDIO_COMMIT, RESPONSE_CREATE, RealtimeProtocol
from ai_gateway.protocols.openai_responses_socket import ResponsesSocketProtocol

from .conftest import examples

NAMES = (RESPONSE_CREATE, AUDIO_COMMIT, "setup")
TYPES = [RESPONSE_CREATE, AUDIO_COMMIT, "input_audio_buffer.append", "conversation.item.create", "session.update"]
KEYS = ["type", "model", "event_id", "x", "audio", "setup"]
spaces = st.sampled_from(["", " ", "\n", "\t", "  \r\n"])
leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.sampled_from(TYPES + ["QUJD"])
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.lists(st.tuples(st.sampled_from(KEYS), inner), max_size=3),
    max_leaves=10,
)  # a list of pairs stands for an object, so that it keeps its order and any duplicate key


def literal(draw: st.DrawFn, text: str) -> str:
    """A JSON string of `text`, each character spelled plainly or as a \\uXXXX escape at random."""
    escaped = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return (
        '"'
        + "".join(
            escape(c) if e else json.dumps(c, ensure_ascii=False)[1:-1] for c, e in zip(text, escaped, strict=True)
        )
        + '"'
    )


def escape(character: str) -> str:
    """\\uXXXX (a surrogate pair beyond the BMP, as json.dumps spells it) whatever the character."""
    return f"\\u{ord(character):04x}" if ord(character) < 0x10000 else json.dumps(character)[1:-1]


def dump(draw: st.DrawFn, value: Any) -> str:
    """JSON text of a generated value, with random spacing and escaping."""
    if isinstance(value, str):
        return literal(draw, value)
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        members = (f"{draw(spaces)}{literal(draw, k)}{draw(spaces)}:{draw(spaces)}{dump(draw, v)}" for k, v in value)
        return "{" + ",".join(members) + draw(spaces) + "}"
    if isinstance(value, list):
        return "[" + ",".join(draw(spaces) + dump(draw, v) for v in value) + "]"
    return json.dumps(value)


def python(value: Any) -> Any:
    """What json.loads makes of a generated value (pairs as a dict, the last duplicate winning)."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        return {k: python(v) for k, v in value}
    return [python(v) for v in value] if isinstance(value, list) else value


def strings(value: Any) -> set[str]:
    """Every string of a decoded value, keys included."""
    if isinstance(value, dict):
        return set(value).union(*(strings(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(strings(v) for v in value))
    return {value} if isinstance(value, str) else set()


@st.composite
def events(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, Any]]]:
    """An event as clients spell them: a type (sometimes two), an event_id, a model, a nested
    `response` and `input` with types of their own, audio, a setup; shuffled or sorted."""
    pairs = [("type", draw(st.sampled_from(TYPES)))]
    optional = [
        ("event_id", draw(st.text(max_size=8))),
        ("model", draw(st.sampled_from(["gpt-4o", "", "models/gemini-live"]))),
        ("response", [("type", "response"), ("model", "gpt-realtime"), ("x", draw(values))]),
        ("input", [[("type", draw(st.sampled_from(TYPES))), ("x", draw(values))]]),
        ("audio", "QUJD" * draw(st.integers(0, 40))),
        ("setup", [("model", "models/gemini-live-x")]),
        ("type", draw(st.sampled_from(TYPES))),  # named twice
        ("x", draw(values)),
    ]
    pairs += [pair for pair in optional if draw(st.booleans())]
    pairs = sorted(pairs, key=lambda p: p[0]) if draw(st.booleans()) else draw(st.permutations(pairs))
    return (draw(spaces) + dump(draw, pairs) + draw(spaces)).encode(), pairs


@pytest.mark.slow
@settings(max_examples=examples(600), deadline=None)
@given(events())
def test_the_reader_agrees_with_json_loads(generated):
    content, pairs = generated
    decoded = json.loads(content)
    assert decoded == python(pairs)
    types = tuple(v for k, v in pairs if k == "type")
    event = read_event(content, NAMES)
    if strings(decoded) & set(NAMES):
        assert event is not None
    if event is not None:
        assert event.types == types and event.members == decoded and not event.too_large
    assert event_type(content) in (*types, None)
    once = {k for k, _ in pairs if [p[0] for p in pairs].count(k) == 1}
    assert all(decoded[k] == v for k, v in head_strings(content).items() if k in once)

    large = read_event(content, NAMES, limit=len(content) - 1)  # too large: head and tail only
    if len(types) == 1 and types[0] in NAMES:
        assert large is not None and large.too_large and large.may_be(types[0])
    if large is not None:
        assert all(decoded[k] == v for k, v in large.members.items() if k in once)


@pytest.mark.slow
@settings(max_examples=examples(300), deadline=None)
@given(events())
def test_every_adapter_reads_client_events_as_json_loads_does(generated):
    content, pairs = generated
    decoded = json.loads(content)
    types = {v for k, v in pairs if k == "type"}
    response = decoded.get("response")
    realtime = RealtimeProtocol().client_frame(content, True)
    responses = ResponsesSocketProtocol().client_frame(content, True)
    if RESPONSE_CREATE in types:
        event_id = decoded.get("event_id") or None
        assert realtime == ResponseRequested(response.get("model") if isinstance(response, dict) else None, event_id)
        assert responses == ResponseRequested(decoded.get("model") or None)
    else:
        assert realtime == (TurnEnded("commit") if AUDIO_COMMIT in types else None)
        assert responses is None
    setup = decoded.get("setup")
    expected = SessionModels(model_name(setup["model"]), None) if isinstance(setup, dict) else None
    assert GeminiLiveProtocol().client_frame(content, True) == expected


AUDIO = "QUJD" * 12_000  # a 48 KB append's base64


def test_an_escape_is_looked_for_outside_the_audio_and_in_an_audio_value_short_enough_to_be_a_name():
    """The stretch after `"audio"` is skipped by the escape search as by the name search; one that
    may itself be a name spelled with escapes (six bytes a character at most) is not."""
    spelled = escape("r") + "esponse" + escape(".") + "create"
    for content in (
        f'{{"type":"x","audio":"{AUDIO}","event_id":"{spelled}"}}',  # after the audio
        f'{{"event_id":"{spelled}","audio":"{AUDIO}"}}',  # before it
        f'{{"type":"x","audio":"{spelled}"}}',  # the stretch is the name
        f'{{"type":"x","audio":"{"".join(escape(c) for c in AUDIO_COMMIT)}"}}',  # the longest name, all escaped
        f'{{"type":"{spelled}"}}',  # no audio
        f'{{"type":"x","x":{{"audio":{{"{spelled}":1}}}}}}',  # the stretch is an object's key
    ):
        event = read_event(content.encode(), NAMES)
        assert event is not None and event.members == json.loads(content), content[:80]


def test_escapes_inside_a_long_audio_value_are_not_read_as_a_name():
    content = f'{{"type":"input_audio_buffer.append","audio":"{AUDIO}{escape("A")}"}}'.encode()
    assert read_event(content, NAMES) is None  # no string of it can be a name: left undecoded
