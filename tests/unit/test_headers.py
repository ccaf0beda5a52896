"""Client credentials: found and removed in every place OpenAI and Azure OpenAI accept one."""

from __future__ import annotations

import pytest
from mitmproxy.http import Request

from ai_gateway.proxy.headers import (
    client_credential,
    mask_client_credentials,
    remove_client_credentials,
    split_query_keys,
)


def request(path: str = "/v1/realtime", *headers: tuple[str, str]) -> Request:
    made = Request.make("GET", f"http://upstream{path}", b"", [(n.encode(), v.encode()) for n, v in headers])
    del made.headers["content-length"]  # added by make()
    return made


@pytest.mark.parametrize(
    ("path", "kept", "keys"),
    [
        ("/v1/models", "/v1/models", []),
        ("/v1/models?", "/v1/models?", []),
        ("/r?api-key=k", "/r", ["k"]),
        ("/r?deployment=d&API-Key=k&x=%7E", "/r?deployment=d&x=%7E", ["k"]),
        ("/r?api_key=a&key=b", "/r", ["a", "b"]),
        ("/r?api%2Dkey=k%2B1&keys=1", "/r?keys=1", ["k+1"]),
        ("/r?key", "/r", [""]),
        ("/r?monkey=1&a=b+c", "/r?monkey=1&a=b+c", []),
    ],
)
def test_query_keys_are_split_off_and_the_rest_kept_byte_for_byte(path, kept, keys):
    assert split_query_keys(path) == (kept, keys)


@pytest.mark.parametrize(
    ("headers", "path", "expected"),
    [
        ([("Authorization", "Bearer sk-a")], "/r", "sk-a"),
        ([("authorization", "bearer sk-a"), ("AUTHORIZATION", "Bearer sk-b")], "/r", "sk-a"),
        ([("Authorization", "Basic dTpw"), ("api-key", "sk-b")], "/r", "sk-b"),
        ([("X-Api-Key", "sk-x")], "/r", "sk-x"),
        ([("OpenAI-Api-Key", "sk-o")], "/r", "sk-o"),
        ([("Proxy-Authorization", "Bearer sk-p")], "/r", "sk-p"),
        ([("Sec-WebSocket-Protocol", "realtime, OPENAI-INSECURE-API-KEY.sk-w")], "/r", "sk-w"),
        ([], "/r?model=m&api-key=sk-q", "sk-q"),
        ([("Authorization", "Bearer ")], "/r?key=", None),
        ([], "/r", None),
    ],
)
def test_the_client_key_is_read_from_every_place(headers, path, expected):
    assert client_credential(request(path, *headers)) == expected


def test_every_client_credential_is_removed():
    flow_request = request(
        "/openai/realtime?api-version=2025&api-key=sk-1&deployment=d&KEY=sk-2",
        ("Authorization", "Bearer sk-3"),
        ("authorization", "Bearer sk-4"),
        ("Api-Key", "sk-5"),
        ("x-api-key", "sk-6"),
        ("openai-api-key", "sk-7"),
        ("Proxy-Authorization", "Basic sk-8"),
        ("Sec-WebSocket-Protocol", "realtime, Openai-Insecure-Api-Key.sk-9"),
        ("Sec-WebSocket-Protocol", "openai-beta.realtime-v1"),
        ("User-Agent", "test"),
    )
    remove_client_credentials(flow_request)
    assert flow_request.path == "/openai/realtime?api-version=2025&deployment=d"
    assert flow_request.headers.fields == (
        (b"User-Agent", b"test"),
        (b"sec-websocket-protocol", b"realtime, openai-beta.realtime-v1"),
    )


def test_a_request_without_credentials_is_left_alone():
    flow_request = request("/r?a=%20b", ("Sec-WebSocket-Protocol", "realtime"))
    remove_client_credentials(flow_request)
    assert flow_request.path == "/r?a=%20b"
    assert flow_request.headers.fields == ((b"Sec-WebSocket-Protocol", b"realtime"),)


def key(n: int) -> str:
    return f"sk-proj-SECRETSECRET{n:04d}"


def test_every_client_credential_is_masked_to_its_last_four_characters():
    flow_request = request(
        f"/openai/realtime?api-version=2025&api-key={key(1)}&deployment=d&KEY=short&access_token={key(2)}",
        ("Authorization", f"Bearer {key(3)}"),
        ("Api-Key", key(4)),
        ("x-api-key", key(5)),
        ("openai-api-key", key(6)),
        ("x-goog-api-key", key(7)),
        ("Sec-WebSocket-Protocol", f"realtime, openai-insecure-api-key.{key(8)}"),
        ("Proxy-Authorization", f"Token {key(9)}"),
        ("User-Agent", "test"),
    )
    mask_client_credentials(flow_request)
    shown = flow_request.path + str(flow_request.headers.fields)
    assert "SECRET" not in shown and "short" not in shown
    assert flow_request.path == (
        "/openai/realtime?api-version=2025&api-key=%E2%80%A60001&deployment=d&KEY=%E2%80%A6&access_token=%E2%80%A60002"
    )
    assert flow_request.headers.get_all("authorization") == ["Bearer …0003"]
    assert [flow_request.headers[h] for h in ("api-key", "x-api-key", "openai-api-key", "x-goog-api-key")] == [
        "…0004",
        "…0005",
        "…0006",
        "…0007",
    ]
    assert flow_request.headers["sec-websocket-protocol"] == "realtime, openai-insecure-api-key.…0008"
    assert flow_request.headers["proxy-authorization"] == "Token …0009"
    assert flow_request.headers["user-agent"] == "test"
    fields, path = flow_request.headers.fields, flow_request.path
    mask_client_credentials(flow_request)
    assert (flow_request.headers.fields, flow_request.path) == (fields, path), "masked twice shows the same"


def test_a_request_without_credentials_is_not_touched_by_masking():
    flow_request = request("/r?a=%20b&monkey=1", ("Sec-WebSocket-Protocol", "realtime"), ("X", "y"))
    before = (flow_request.path, flow_request.headers.fields)
    mask_client_credentials(flow_request)
    assert (flow_request.path, flow_request.headers.fields) == before
