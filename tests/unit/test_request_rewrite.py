"""Request rewrites splice the client's bytes: the model override and `stream_options` change only
those values; every other byte (numbers like 1e400, duplicate keys, spacing) reaches the upstream
as the client sent it."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ai_gateway.config.policy import RouteType
from ai_gateway.protocols.openai_http import rewrite_request

from .conftest import examples

_MISSING = object()


def reference(route_type: RouteType, document: dict[str, Any], model: str | None) -> dict[str, Any]:
    """What the rewrite means, on the parsed document (the old json.dumps rewrite, plus usage that
    cannot be switched off: include_usage false, null or absent becomes true)."""
    document = copy.deepcopy(document)
    if model is not None and document.get("model") != model:
        document["model"] = model
    if route_type is RouteType.COMPLETIONS and document.get("stream") is True:
        options = document.get("stream_options", _MISSING)
        if options is _MISSING or options is None:
            document["stream_options"] = {"include_usage": True}
        elif isinstance(options, dict) and options.get("include_usage") is not True:
            options["include_usage"] = True
    return document


def no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_loads(body: bytes) -> Any:
    return json.loads(body, parse_constant=no_constants)


whitespace = st.sampled_from(["", " ", "\n  ", "\t", "\r\n"])
numbers = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e400", "-1e400", "1e-400", "1.0E+2", "-0", "12345678901234567890123"]),
)
strings = st.text(max_size=8).flatmap(
    lambda text: st.sampled_from([json.dumps(text), json.dumps(text, ensure_ascii=False)])
)
scalars = st.one_of(st.sampled_from(["null", "true", "false"]), numbers, strings)
keys = st.sampled_from(["model", "stream", "stream_options", "include_usage", "messages", "n", "mod\\u0065l"])


def _array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str, str]]) -> str:
    return "{" + ",".join(f'"{key}"{space}:{space}{value}' for key, value, space in pairs) + "}"


values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(_array),
        st.lists(st.tuples(keys, children, whitespace), max_size=3).map(_object),
    ),
    max_leaves=8,
)
stream_values = st.one_of(st.just("true"), st.just("false"), values)
options_values = st.one_of(
    st.sampled_from(["null", "{}", '{"include_usage":false}', '{"include_usage": true}', '{ "x": 1e400 }']),
    st.sampled_from(['{"include_usage":null,"include_usage":false}', '{"include_obfuscation":true}']),
    values,
)
member_values = {"stream": stream_values, "stream_options": options_values}
top_keys = st.sampled_from(["model", "stream", "stream_options", "messages", "n", "model", "stream", "mod\\u0065l"])
EDITABLE = ("model", "stream_options", "mod\\u0065l")


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """A JSON object as text, and the spans of its top-level values the rewrite may change."""
    text = draw(whitespace) + "{" + draw(whitespace)
    spans: list[tuple[int, int]] = []
    for index, key in enumerate(draw(st.lists(top_keys, max_size=6))):
        if index:
            text += "," + draw(whitespace)
        text += f'"{key}"{draw(whitespace)}:{draw(whitespace)}'
        value = draw(member_values.get(key, values))
        if key in EDITABLE:
            spans.append((len(text.encode()), len((text + value).encode())))
        text += value + draw(whitespace)
    return (text + "}" + draw(whitespace)).encode(), spans


def fixed_parts_pattern(body: bytes, spans: list[tuple[int, int]]) -> re.Pattern[bytes]:
    """The body's bytes outside `spans`, in order, with anything allowed in the spans and right
    after the opening brace (where inserted members go)."""
    brace = body.index(b"{") + 1
    pattern, position = re.escape(body[:brace]) + b"(?:.*?)", brace
    for start, end in spans:
        pattern += re.escape(body[position:start]) + b"(?:.*?)"
        position = end
    return re.compile(pattern + re.escape(body[position:]), re.DOTALL)


@settings(max_examples=examples(500), deadline=None)
@given(
    request_bodies(),
    st.sampled_from([RouteType.COMPLETIONS, RouteType.RESPONSES, RouteType.EMBEDDINGS]),
    st.one_of(st.none(), st.sampled_from(["gpt-4o", "m\u00e9", 'a"b'])),
)
def test_splice_means_the_same_as_the_old_rewrite_and_keeps_every_other_byte(generated, route_type, model):
    body, spans = generated
    original = strict_loads(body)
    expected = reference(route_type, original, model)
    requested, rewritten = rewrite_request(route_type, body, model)
    sent = body if rewritten is None else rewritten
    assert strict_loads(sent) == expected  # still strict JSON: no Infinity, nothing collapsed
    assert (rewritten is None) == (expected == original)
    assert requested == (expected.get("model") if isinstance(expected.get("model"), str) else None)
    assert fixed_parts_pattern(body, spans).fullmatch(sent)
    assert len(sent) - len(body) <= 64 + 24 * len(spans)


def test_streaming_request_gets_include_usage_and_model_override():
    model, body = rewrite_request(RouteType.COMPLETIONS, b'{"model": "a", "stream": true, "messages": []}', "b")
    assert model == "b"
    assert body == b'{"stream_options":{"include_usage":true},"model": "b", "stream": true, "messages": []}'
    assert rewrite_request(RouteType.RESPONSES, b'{"model": "a", "stream": true}', None) == ("a", None)
    assert rewrite_request(RouteType.COMPLETIONS, b'{"model": "a", "stream": false}', None) == ("a", None)


def test_usage_cannot_be_switched_off():
    for options in (b'{"include_usage": false}', b"null", b"{}"):
        _, body = rewrite_request(RouteType.COMPLETIONS, b'{"stream":true,"stream_options":' + options + b"}", None)
        assert json.loads(body)["stream_options"]["include_usage"] is True
    kept = b'{"stream":true,"stream_options":{"include_usage":true}}'
    assert rewrite_request(RouteType.COMPLETIONS, kept, None) == (None, None)


def test_issue_13_row_13_numbers_duplicates_and_size_survive():
    body = b'{"model":"x","stream":true,"temperature":1e400,"top_p":1e-400,"n":1,"n":2,"pad":"' + b"y" * 10**6 + b'"}'
    _, rewritten = rewrite_request(RouteType.COMPLETIONS, body, "gpt-4o")
    assert rewritten == b'{"stream_options":{"include_usage":true},"model":"gpt-4o"' + body[len(b'{"model":"x"') :]
    assert len(rewritten) - len(body) == len(b'"stream_options":{"include_usage":true},') + len("gpt-4o") - 1


def test_bodies_that_are_not_one_json_object_pass_unchanged():
    for body in (
        b"not json",
        b"[1]",
        b'"model"',
        b'{"model": "a"} {}',
        b'{"model": "a",}',
        b"\xff{}",
        b"",
        b"{" * 10**5,
    ):
        assert rewrite_request(RouteType.COMPLETIONS, body, "b") == (None, None)
