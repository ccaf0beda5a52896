"""End to end for the HTTP route types: real mitmdump with the gateway, the simulated HTTP upstream,
the official openai SDK; /metrics compared to exactly what the upstream sent."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from openai import OpenAI, RateLimitError

from ai_gateway_tools.harness import GatewayProcess, scrape, scrape_until, select, usage_only
from ai_gateway_tools.harness import assert_metered_exactly as metered_exactly
from ai_gateway_tools.harness import parse_errors as count_parse_errors
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

PARSE_ERRORS = "agentgateway_gateway_parse_errors_total"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http_simulator() -> Iterator[HttpSimulator]:
    with SimulatorThread(server=HttpSimulator(seed=99)) as sim:
        yield sim


@pytest.fixture(scope="module")
def http_gateway(http_simulator) -> Iterator[GatewayProcess]:
    with GatewayProcess(http_simulator.url) as gw:
        yield gw


@pytest.fixture
def client(http_gateway) -> OpenAI:
    return OpenAI(api_key="sk-client", base_url=f"{http_gateway.url}/v1", max_retries=0)


def assert_metered_exactly(gateway: GatewayProcess, simulator: HttpSimulator, model: str, count: int) -> None:
    sent = [e for e in simulator.usage_for(model) if e.kind != "passthrough"]
    assert len(sent) == count
    metered_exactly(gateway.metrics_url, model, sent)


def parse_errors(gateway: GatewayProcess, reason: str) -> float:
    return count_parse_errors(gateway.metrics_url, reason)


def last_request_body(simulator: HttpSimulator) -> dict:
    return json.loads(simulator.requests[-1].body)


def test_chat_completion(client, http_gateway, http_simulator, model):
    completion = client.chat.completions.create(model=model, messages=MESSAGES)
    sent = http_simulator.usage_for(model)
    assert completion.usage is not None and completion.usage.prompt_tokens == sent[0].usage["prompt_tokens"]
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_streaming_chat_gets_include_usage_added_and_stays_valid(client, http_gateway, http_simulator, model):
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True))
    assert last_request_body(http_simulator)["stream_options"] == {"include_usage": True}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_streaming_chat_with_stream_options(client, http_gateway, http_simulator, model):
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert list(stream)[-1].usage is not None
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


@pytest.mark.parametrize("options", [{"include_usage": False}, {"include_usage": None}, {}, None])
def test_streaming_chat_cannot_switch_usage_off(client, http_gateway, http_simulator, model, options):
    """Issue 12 point 7: the upstream is always asked for usage; the client sees the usage chunk
    (`choices: []`) as it does when it sends no stream_options, and the SDK reads it."""
    before = parse_errors(http_gateway, "missing_usage")
    extra = {"extra_body": {"stream_options": options}} if options is None else {"stream_options": options}
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **extra))
    assert last_request_body(http_simulator)["stream_options"]["include_usage"] is True
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == http_simulator.usage_for(model)[0].usage["prompt_tokens"]
    assert parse_errors(http_gateway, "missing_usage") == before
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_responses_json_and_streaming(client, http_gateway, http_simulator, model):
    response = client.responses.create(model=model, input="hi")
    assert response.usage is not None
    events = list(client.responses.create(model=model, input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert_metered_exactly(http_gateway, http_simulator, model, 2)


def test_responses_websocket_mode(http_gateway, http_simulator, model):
    import websockets

    async def session() -> None:
        url = http_gateway.url.replace("http://", "ws://") + f"/v1/responses?model={model}"
        async with websockets.connect(url) as ws:
            for _ in range(3):
                await ws.send(json.dumps({"type": "response.create", "model": model, "input": "hi"}))
                while json.loads(await ws.recv())["type"] != "response.completed":
                    pass

    asyncio.run(session())
    assert_metered_exactly(http_gateway, http_simulator, model, 3)


def test_embeddings_are_input_only(client, http_gateway, http_simulator, model):
    client.embeddings.create(model=model, input=["one", "two three"])
    assert_metered_exactly(http_gateway, http_simulator, model, 1)
    samples = select(scrape(http_gateway.metrics_url), gen_ai_request_model=model)
    assert {dict(labels).get("gen_ai_token_type") for (name, labels) in samples if "token_usage" in name} == {"input"}


def test_passthrough_is_never_metered(client, http_gateway, http_simulator):
    before = usage_only(scrape(http_gateway.metrics_url))
    client.models.list()
    assert http_simulator.ledger[-1].kind == "passthrough" and http_simulator.ledger[-1].usage
    after = usage_only(scrape(http_gateway.metrics_url))
    assert {k: v for k, v in after.items() if "gen_ai_client" in k[0]} == {
        k: v for k, v in before.items() if "gen_ai_client" in k[0]
    }


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
@pytest.mark.parametrize("stream", [False, True])
def test_compressed_bodies_are_metered_and_relayed_untouched(
    client, http_gateway, http_simulator, model, encoding, stream
):
    headers = {"x-sim-encoding": encoding}
    if stream:
        chunks = list(
            client.chat.completions.create(model=model, messages=MESSAGES, stream=True, extra_headers=headers)
        )
        assert chunks[-1].usage is not None
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, extra_headers=headers)
        assert raw.headers["content-encoding"] == encoding
        assert raw.parse().usage is not None
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def post(gateway: GatewayProcess, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        gateway.url + path, data=body, headers={"content-type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"x-sim-malformed": "json"}, "invalid_json"),
        ({"x-sim-malformed": "usage"}, "invalid_usage"),
    ],
)
def test_malformed_bodies_are_forwarded_and_counted(http_gateway, http_simulator, model, headers, reason):
    before = parse_errors(http_gateway, reason)
    status, body = post(
        http_gateway, "/v1/chat/completions", json.dumps({"model": model, "messages": MESSAGES}).encode(), headers
    )
    assert status == 200 and body
    assert parse_errors(http_gateway, reason) == before + 1
    assert_metered_exactly(http_gateway, http_simulator, model, 0)


def test_malformed_sse_line_is_counted_and_the_stream_still_metered(http_gateway, http_simulator, model):
    before = parse_errors(http_gateway, "invalid_json")
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": True}).encode()
    status, _ = post(http_gateway, "/v1/chat/completions", body, {"x-sim-malformed": "sse"})
    assert status == 200
    assert parse_errors(http_gateway, "invalid_json") == before + 1
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_truncated_stream_is_counted(http_gateway, http_simulator, model):
    before = parse_errors(http_gateway, "truncated")
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": True}).encode()
    post(http_gateway, "/v1/chat/completions", body, {"x-sim-truncate": "1"})
    assert parse_errors(http_gateway, "truncated") == before + 1
    assert_metered_exactly(http_gateway, http_simulator, model, 0)


def test_non_json_request_body_passes_through_unchanged(http_gateway, http_simulator):
    body = b"this is not json \xff"
    post(http_gateway, "/v1/chat/completions", body, {"content-type": "text/plain"})
    assert http_simulator.requests[-1].body == body


def test_stream_is_relayed_chunk_by_chunk_without_buffering(client, http_gateway, http_simulator, model):
    gate = f"gate-{model}"
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, extra_headers={"x-sim-gate": gate}
    )
    first: list = []
    reader = threading.Thread(target=lambda: first.append(next(iter(stream))))
    reader.start()
    reader.join(timeout=15)
    # The first chunk arrived while the upstream still held back the rest.
    assert first and first[0].choices
    http_simulator.open_gate(gate)
    rest = list(stream)
    assert rest[-1].usage is not None
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_a_client_that_leaves_at_the_streams_last_event_got_a_complete_answer(
    client, http_gateway, http_simulator, model
):
    """The openai SDK stops reading at `[DONE]` and closes the connection; an upstream that ends
    the response later (here 3 s) then sees the client gone. The answer was whole: metered, and
    its duration counted without an error (it was `client_disconnected` when the timing fell so)."""
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, extra_headers={"x-sim-linger-ms": "3000"}
    )
    assert list(stream)[-1].usage is not None
    duration = "agentgateway_gen_ai_server_request_duration_count"

    def counted(samples: dict) -> dict[str, float]:
        mine = select(samples, gen_ai_request_model=model)
        return {dict(ls).get("error_type", ""): v for (name, ls), v in mine.items() if name == duration}

    scraped = scrape_until(http_gateway.metrics_url, lambda s: sum(counted(s).values()) >= 1, timeout=10)
    assert counted(scraped) == {"": 1}
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_upstream_errors_and_latency_metrics(client, http_gateway, http_simulator, model):
    with pytest.raises(RateLimitError):
        client.chat.completions.create(model=model, messages=MESSAGES, extra_headers={"x-sim-status": "429"})
    list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, stream=True, extra_headers={"x-sim-delay-ms": "30"}
        )
    )

    def value(metric: str, samples: dict | None = None, **labels: str) -> float:
        samples = select(samples or scraped, gen_ai_request_model=model)
        return sum(v for (name, ls), v in samples.items() if name == metric and set(labels.items()) <= ls)

    duration = "agentgateway_gen_ai_server_request_duration_count"
    scraped = scrape_until(http_gateway.metrics_url, lambda s: value(duration, s, error_type="") == 1)
    errors = {
        dict(ls).get("error_type", "") for name, ls in select(scraped, gen_ai_request_model=model) if name == duration
    }
    durations = {error: value(duration, error_type=error) for error in errors}
    assert durations == {"429": 1, "": 1}  # each outcome counted once (a failure shows what was counted instead)
    assert value("agentgateway_gen_ai_server_time_to_first_token_count") == 1
    assert value("agentgateway_gen_ai_server_time_to_first_token_sum") >= 0.03
    assert value("agentgateway_gen_ai_server_time_per_output_token_count") == 1
    errors = scrape(http_gateway.metrics_url)
    assert (
        errors[
            (
                "agentgateway_gateway_upstream_errors_total",
                frozenset({("route_type", "Completions"), ("error_type", "429")}),
            )
        ]
        >= 1
    )


def test_policy_model_override_rewrites_the_body(http_simulator, model, tmp_path):
    policy = tmp_path / "override.yaml"
    policy.write_text(f"model: {model}\nroutes:\n  /chat/completions: Completions\n")
    with GatewayProcess(http_simulator.url, options={"gateway_policy": str(policy)}) as gateway:
        client = OpenAI(api_key="sk", base_url=f"{gateway.url}/v1", max_retries=0)
        client.chat.completions.create(model="gpt-client-choice", messages=MESSAGES)
        assert last_request_body(http_simulator)["model"] == model
        assert_metered_exactly(gateway, http_simulator, model, 1)


def test_issue_13_row_13_rewrite_keeps_the_clients_bytes(http_gateway, http_simulator, model):
    """The stream_options rewrite is a splice: numbers json.dumps would turn into Infinity or 0.0,
    duplicate keys and spacing reach the upstream as sent, and the body grows by the insertion only."""
    body = (
        b'{ "model" : "%s", "stream": true, "messages": [{"role": "user", "content": "hi"}],\n'
        b'  "temperature": 1e400, "top_p": 1e-400, "n": 1, "n": 1, "user": "\\u00e9" }' % model.encode()
    )
    status, _ = post(http_gateway, "/v1/chat/completions", body, {})
    assert status == 200
    sent = http_simulator.requests[-1].body
    assert sent == b'{"stream_options":{"include_usage":true},' + body[1:]
    assert_metered_exactly(http_gateway, http_simulator, model, 1)
