"""Routes follow the path the upstream serves: an over-budget key cannot slip past its budget, or
past metering, by spelling a metered path another way (percent-escapes, `%2F`, dot segments,
doubled slashes, a fragment); a path with no single reading is refused (issue #20, item 1)."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st

from ai_gateway.config.paths import AmbiguousPath, normalise_target
from ai_gateway_tools.harness import GatewayProcess, assert_metered_exactly
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import respond, websocket_base
from ..conftest import LAUNCHERS

CHAT_SPELLINGS = (
    "/v1/chat/%63ompletions",
    "/v1/chat%2Fcompletions",
    "/v1/chat%2fcompletions",
    "/v1/chat/completions#x",
    "/v1//chat/./completions/",
    "/v1/models/../chat/completions",
    "/v1/%2e%2e/v1/chat/completions",
    "/v1/chat/completions?x=1",
)
AMBIGUOUS = (
    "/v1/chat/%2563ompletions",  # double encoding: %63 after one decoding
    "/v1/chat\\completions",
    "/v1/chat%5Ccompletions",
    "/v1/chat/completions%00",
    "/v1/chat/%ffcompletions",
)
POLICY = """\
budgets:
  client_key: {tokens: 1}
  reserve: {tokens: 1}
routes:
  /realtime: Realtime
  /chat/completions: Completions
  "*": Passthrough
"""


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/chat/%63ompletions", "/v1/chat/completions"),
        ("/v1/chat%2Fcompletions?stream=true", "/v1/chat/completions?stream=true"),
        ("/v1/chat/completions#frag?x=1", "/v1/chat/completions"),
        ("/v1//chat///completions/", "/v1/chat/completions"),
        ("/v1/./chat/x/../completions", "/v1/chat/completions"),
        ("/../../v1/chat/completions", "/v1/chat/completions"),
        ("/v1/%72ealtime?model=gpt-realtime", "/v1/realtime?model=gpt-realtime"),
        ("/v1/files/a%20b%3Fc%25", "/v1/files/a%20b%3Fc%25"),  # `?` and `%` stay escaped
        ("/v1/models/caf%C3%A9", "/v1/models/caf%C3%A9"),
        ("/", "/"),
        ("*", "*"),
    ],
)
def test_paths_are_normalised_as_a_decoding_upstream_reads_them(target, normal):
    assert normalise_target(target) == normal


@pytest.mark.parametrize("target", AMBIGUOUS)
def test_paths_with_no_single_reading_are_refused(target):
    with pytest.raises(AmbiguousPath):
        normalise_target(target)


_segment = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=6).filter(
    lambda s: "\\" not in s
)


@given(st.lists(_segment, max_size=6), st.booleans())
def test_normalising_is_idempotent_and_keeps_the_decoded_segments(segments, encode):
    raw = "/" + "/".join(segments)
    target = "".join(f"%{b:02X}" for b in raw.encode()) if encode else raw.replace("%", "%25")
    target = target.replace("%2F", "/") if encode else target
    try:
        normal = normalise_target(target)
    except AmbiguousPath:
        return  # only for a segment holding `%XX` or a control character after decoding
    assert normalise_target(normal) == normal
    path = normal.split("?", 1)[0]
    assert "//" not in path and "/./" not in path + "/" and "/../" not in path + "/"
    kept = [s for s in unquote(path).split("/") if s]
    assert all(s not in (".", "..") for s in kept)


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[HttpSimulator]:
    with SimulatorThread(server=HttpSimulator(seed=2020)) as simulator:
        yield simulator


def post(gateway: GatewayProcess, target: str, key: str, model: str) -> int:
    """A POST with the target sent exactly as written (no client normalises it first)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=20)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    try:
        connection.request("POST", target, body, headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_an_over_budget_key_is_refused_however_the_path_is_spelled(tmp_path: Path, http_upstream, launcher):
    (tmp_path / "policy.yaml").write_text(POLICY)
    options = {"gateway_policy": str(tmp_path / "policy.yaml")}
    model = f"gpt-4o-paths-{launcher}"
    with GatewayProcess(http_upstream.url, options=options, launcher=launcher) as gateway:
        assert post(gateway, "/v1/chat/completions", "sk-spent", model) == 200  # spends the key's budget
        assert post(gateway, "/v1/chat/completions", "sk-spent", model) == 429
        served = len(http_upstream.requests)
        refused = {target: post(gateway, target, "sk-spent", model) for target in CHAT_SPELLINGS}
        assert refused == dict.fromkeys(CHAT_SPELLINGS, 429)
        ambiguous = {target: post(gateway, target, "sk-fresh", model) for target in AMBIGUOUS}
        assert ambiguous == dict.fromkeys(AMBIGUOUS, 400)
        assert len(http_upstream.requests) == served  # none of them reached the upstream

        # Under budget, an encoded spelling is metered exactly, and the upstream gets the normal path.
        other = f"gpt-4o-paths-metered-{launcher}"
        assert post(gateway, "/v1/chat/%63ompletions#x", "sk-other", other) == 200
        assert http_upstream.requests[-1].path == "/v1/chat/completions"
        assert_metered_exactly(gateway.metrics_url, other, http_upstream.usage_for(other))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_an_encoded_realtime_path_is_a_metered_session_under_the_same_budget(tmp_path: Path, launcher):
    (tmp_path / "policy.yaml").write_text(POLICY)
    options = {"gateway_policy": str(tmp_path / "policy.yaml")}
    headers = {"authorization": "Bearer sk-spent"}

    async def one_response(path: str) -> None:
        async with websockets.connect(websocket_base(gateway.url) + path, additional_headers=headers) as ws:
            await ws.recv()  # session.created
            await respond(ws)

    async def refused(path: str) -> int:
        with pytest.raises(websockets.InvalidStatus) as caught:
            async with websockets.connect(websocket_base(gateway.url) + path, additional_headers=headers):
                pass
        return caught.value.response.status_code

    with (
        SimulatorThread(seed=2021) as upstream,
        GatewayProcess(upstream.url, options=options, launcher=launcher) as gateway,
    ):
        asyncio.run(one_response("/v1/%72ealtime?model=gpt-realtime"))  # metered: spends the budget
        assert [entry.path for entry in upstream.handshakes] == ["/v1/realtime"]
        assert asyncio.run(refused("/v1/%72ealtime?model=gpt-realtime")) == 429
        assert asyncio.run(refused("/v1//x/../realtime?model=gpt-realtime")) == 429
        assert len(upstream.handshakes) == 1
