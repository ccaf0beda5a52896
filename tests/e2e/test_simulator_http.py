"""The simulated OpenAI HTTP upstream, over real sockets: the official SDK, plain HTTP and websockets.

The gateway's HTTP tests trust the simulator's ledger as ground truth, so these tests pin down
that what went out on the wire is exactly what the ledger says, and that each x-sim-* override
does what those tests rely on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPResponse
from typing import Any

import openai
import pytest
from openai import AzureOpenAI, OpenAI
from websockets.sync.client import ClientConnection, connect

from ai_gateway_tools.simulators.http import DEFAULT_MODEL, EMBEDDING_DIMENSIONS, SHUTDOWN_GRACE, TEXT, HttpSimulator
from ai_gateway_tools.simulators.realtime import SentUsage, SimulatorThread, resolve_model

from ..clients import served_module

TIMEOUT = 5  # seconds: a missing chunk or event fails the test instead of hanging it
MODEL = "gpt-4o-mini"
SNAPSHOT = resolve_model(MODEL)
MESSAGES = [{"role": "user", "content": "Hi"}]
INCLUDE_USAGE = {"include_usage": True}
ENCODINGS = ["gzip", "br", "zstd", "deflate"]
CHAT = ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
CHAT_STREAM = ("/v1/chat/completions", {**CHAT[1], "stream": True, "stream_options": INCLUDE_USAGE})
RESPONSES = ("/v1/responses", {"model": MODEL, "input": "Hi"})
RESPONSES_STREAM = ("/v1/responses", {**RESPONSES[1], "stream": True})
EMBEDDINGS = ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "Hi"})
COMPLETED = "response.completed"


@pytest.fixture
def sim() -> Iterator[HttpSimulator]:
    with SimulatorThread(server=HttpSimulator(seed=1)) as sim:
        yield sim


def client(sim: HttpSimulator, **headers: str) -> OpenAI:
    return OpenAI(api_key="sk-test", base_url=sim.url + "/v1", max_retries=0, timeout=TIMEOUT, default_headers=headers)


def post(sim: HttpSimulator, path: str, body: Any, **headers: str) -> HTTPResponse:
    """A plain HTTP request: the body exactly as sent, which the SDK would refuse to parse when malformed."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(sim.url + path, data, {"content-type": "application/json", **headers})
    return urllib.request.urlopen(request, timeout=TIMEOUT)


def sse_data(body: bytes) -> list[str]:
    return [line.removeprefix("data: ") for line in body.decode().split("\n") if line.startswith("data: ")]


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def ws_connect(sim: HttpSimulator, path: str = "/v1/responses", **headers: str) -> ClientConnection:
    url = sim.url.replace("http://", "ws://", 1) + path
    return connect(url, additional_headers=headers, open_timeout=TIMEOUT)


def until_completed(ws: ClientConnection) -> list[dict[str, Any]]:
    events = [json.loads(ws.recv(timeout=TIMEOUT))]
    while events[-1]["type"] != COMPLETED:
        events.append(json.loads(ws.recv(timeout=TIMEOUT)))
    return events


def entry(session_id: str, kind: str, usage: dict[str, Any], model: str = MODEL) -> SentUsage:
    return SentUsage(session_id, kind, model, resolve_model(model), "completed", usage)


def test_chat_completion_ledgers_exactly_the_usage_sent(sim: HttpSimulator):
    raw = client(sim).chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    completion, usage = raw.parse(), raw.http_response.json()["usage"]
    assert completion.model == SNAPSHOT
    assert completion.choices[0].message.content == TEXT
    assert sim.ledger == [entry(raw.headers["x-request-id"], "chat", usage)]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] <= usage["completion_tokens"]


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream_sends_usage_only_when_asked(sim: HttpSimulator, include_usage: bool):
    options: dict[str, Any] = {"stream_options": INCLUDE_USAGE} if include_usage else {}
    stream = client(sim).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **options)
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == TEXT
    usages = [chunk.usage.to_dict() for chunk in chunks if chunk.usage is not None]
    assert usages == [sent.usage for sent in sim.ledger]
    assert len(usages) == include_usage
    if include_usage:
        assert chunks[-1].choices == []
        assert sim.ledger[0].kind == "chat" and sim.ledger[0].response_model == SNAPSHOT


def test_responses_ledgers_exactly_the_usage_sent(sim: HttpSimulator):
    raw = client(sim).responses.with_raw_response.create(model=MODEL, input="Hi")
    response = raw.parse()
    assert (response.object, response.status, response.model) == ("response", "completed", SNAPSHOT)
    assert response.output_text == TEXT
    usage = raw.http_response.json()["usage"]
    assert sim.ledger == [entry(raw.headers["x-request-id"], "responses", usage)]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens_details"]["cached_tokens"] <= usage["input_tokens"]


def test_responses_stream_sends_usage_in_response_completed(sim: HttpSimulator):
    events = list(client(sim).responses.create(model=MODEL, input="Hi", stream=True))
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-2:] == ["response.output_text.done", COMPLETED]
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == TEXT
    completed = events[-1]
    assert completed.type == COMPLETED and completed.response.usage is not None
    assert [sent.usage for sent in sim.ledger] == [completed.response.usage.to_dict()]
    assert sim.ledger[0].kind == "responses"


@pytest.mark.parametrize(
    ("inputs", "count"), [("one text", 1), (["a", "longer text"], 2), ([1, 2, 3], 1), ([[1, 2], [3]], 2)]
)
@pytest.mark.parametrize("encoding_format", ["float", None])  # None: the SDK asks for base64 and decodes it
def test_embeddings_one_vector_per_input(sim: HttpSimulator, inputs: Any, count: int, encoding_format: str | None):
    options = {"encoding_format": encoding_format} if encoding_format else {}
    result = client(sim).embeddings.create(model="text-embedding-3-small", input=inputs, **options)
    assert [item.index for item in result.data] == list(range(count))
    assert all(len(item.embedding) == EMBEDDING_DIMENSIONS for item in result.data)
    assert sim.ledger == [
        SentUsage("req_1", "embeddings", "text-embedding-3-small", result.model, "completed", result.usage.to_dict())
    ]
    assert json.loads(sim.requests[0].body).get("encoding_format") == (encoding_format or "base64")


def test_embeddings_are_the_same_in_both_formats(sim: HttpSimulator):
    embeddings = client(sim).embeddings
    floats = embeddings.create(model=MODEL, input="same", encoding_format="float").data[0].embedding
    decoded = embeddings.create(model=MODEL, input="same").data[0].embedding
    assert decoded == pytest.approx(floats, rel=1e-6)


def test_responses_websocket_mode(sim: HttpSimulator):
    with ws_connect(sim, "/v1/responses?model=gpt-4.1") as ws:
        ws.send(json.dumps({"type": "response.create", "input": "Hi"}))
        first = until_completed(ws)
        ws.send(json.dumps({"type": "response.create", "model": "o3", "input": "Hi"}))
        second = until_completed(ws)
        ws.send("not JSON")
        error = json.loads(ws.recv(timeout=TIMEOUT))
    assert first[0]["type"] == "response.created"
    assert "".join(e["delta"] for e in first if e["type"] == "response.output_text.delta") == TEXT
    assert sim.ledger == [
        entry("req_1", "responses", first[-1]["response"]["usage"], "gpt-4.1"),
        entry("req_1", "responses", second[-1]["response"]["usage"], "o3"),
    ]
    assert second[-1]["response"]["model"] == resolve_model("o3")
    assert sim.usage_for("o3") == sim.ledger[1:]
    assert (error["type"], error["error"]["code"]) == ("error", "invalid_json")


def test_responses_websocket_mode_with_the_sdk(sim: HttpSimulator):
    with client(sim).responses.connect() as connection:
        connection.response.create(model=MODEL, input="Hi")
        completed = next(event for event in connection if event.type == COMPLETED)
    assert completed.response.usage is not None
    assert sim.ledger == [entry("req_1", "responses", completed.response.usage.to_dict())]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encoded_bodies_are_decoded_by_the_client(sim: HttpSimulator, encoding: str):
    raw = client(sim, **{"x-sim-encoding": encoding}).responses.with_raw_response.create(model=MODEL, input="Hi")
    assert raw.headers["content-encoding"] == encoding
    assert raw.parse().usage.to_dict() == sim.ledger[0].usage


@pytest.mark.parametrize("encoding", ["identity", *ENCODINGS])
def test_gate_holds_the_stream_after_its_first_chunk(sim: HttpSimulator, encoding: str):
    """Each event is flushed through the encoder, so the client decodes the first chunk while the
    rest waits: what lets the gateway's tests prove it does not buffer."""
    sdk = client(sim, **{"x-sim-gate": "g", "x-sim-encoding": encoding})
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    assert raw.headers.get("content-encoding", "identity") == encoding
    chunks = iter(raw.parse())
    assert next(chunks).choices[0].delta.content == "Hello"  # the client's timeout bounds this wait
    assert sim.ledger == []
    sim.open_gate("g")
    rest = list(chunks)
    assert rest[-1].usage is not None
    assert [sent.usage for sent in sim.ledger] == [rest[-1].usage.to_dict()]


def test_gate_holds_websocket_responses(sim: HttpSimulator):
    with ws_connect(sim, **{"x-sim-gate": "ws"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": MODEL}))
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "response.created"
        assert sim.ledger == []
        sim.open_gate("ws")
        events = until_completed(ws)
    assert sim.ledger == [entry("req_1", "responses", events[-1]["response"]["usage"])]


def test_stop_does_not_wait_for_a_closed_gate():
    with SimulatorThread(server=HttpSimulator()) as sim:
        stream = client(sim, **{"x-sim-gate": "never"}).chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True
        )
        next(iter(stream))
        started = time.monotonic()
    assert time.monotonic() - started < 2 * SHUTDOWN_GRACE + 0.5
    stream.close()
    assert sim.ledger == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_status_override_answers_with_an_openai_error(
    sim: HttpSimulator, status: int, error: type[openai.APIStatusError], stream: bool
):
    sdk = client(sim, **{"x-sim-status": str(status), "x-sim-encoding": "gzip"})
    with pytest.raises(error) as raised:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=stream)
    assert raised.value.status_code == status
    assert isinstance(raised.value.body, dict) and set(raised.value.body) == {"message", "type", "param", "code"}
    assert sim.ledger == [] and sim.malformed_sent == 0


@pytest.mark.parametrize(("path", "body"), [CHAT, RESPONSES, EMBEDDINGS, ("/v1/models", {})])
def test_malformed_json_body(sim: HttpSimulator, path: str, body: dict[str, Any]):
    with post(sim, path, body, **{"x-sim-malformed": "json"}) as response:
        assert not parses(response.read().decode())
    assert sim.ledger == [] and sim.malformed_sent == 1


@pytest.mark.parametrize(("path", "body"), [CHAT, RESPONSES, EMBEDDINGS, ("/v1/models", {})])
def test_malformed_usage_body(sim: HttpSimulator, path: str, body: dict[str, Any]):
    with post(sim, path, body, **{"x-sim-malformed": "usage"}) as response:
        usage = json.loads(response.read())["usage"]
    assert usage["total_tokens"] == str(int(usage["total_tokens"]))
    assert sim.ledger == [] and sim.malformed_sent == 1


@pytest.mark.parametrize(("path", "body"), [CHAT_STREAM, RESPONSES_STREAM])
@pytest.mark.parametrize(("kind", "ledgered"), [("sse", True), ("json", False), ("usage", False)])
def test_malformed_streams(sim: HttpSimulator, path: str, body: dict[str, Any], kind: str, ledgered: bool):
    """sse slips an invalid event in before the valid usage; json and usage spoil the usage itself."""
    with post(sim, path, body, **{"x-sim-malformed": kind}) as response:
        data = sse_data(response.read())
    invalid = [i for i, text in enumerate(data) if not parses(text) and text != "[DONE]"]
    assert len(invalid) == (0 if kind == "usage" else 1) and sim.malformed_sent == 1
    usages = [sent.usage for sent in sim.ledger]
    if ledgered:
        final = json.loads(data[invalid[0] + 1])
        assert usages == [final["usage"] if "usage" in final else final["response"]["usage"]]
    else:
        assert usages == []


@pytest.mark.parametrize("encoding", ["identity", "br", "zstd"])
def test_truncated_chat_stream_ends_cleanly_without_usage(sim: HttpSimulator, encoding: str):
    sdk = client(sim, **{"x-sim-truncate": "1", "x-sim-encoding": encoding})
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    chunks = list(raw.parse())  # a truncated or undecodable body would raise
    assert raw.headers["connection"] == "close"
    assert 0 < len(chunks) < len(TEXT.split())
    assert all(chunk.usage is None for chunk in chunks) and sim.ledger == []


def test_truncated_responses_stream_has_no_completed_event(sim: HttpSimulator):
    with post(sim, *RESPONSES_STREAM, **{"x-sim-truncate": "1"}) as response:
        data = sse_data(response.read())
    assert data and all(parses(text) for text in data)
    assert COMPLETED not in {json.loads(text)["type"] for text in data}
    assert sim.ledger == []


def test_truncated_websocket_response_closes_the_connection(sim: HttpSimulator):
    with ws_connect(sim, **{"x-sim-truncate": "1"}) as ws:
        ws.send(json.dumps({"type": "response.create", "model": MODEL}))
        events = [json.loads(message) for message in ws]  # ends without error on a normal close
    assert events and COMPLETED not in {event["type"] for event in events}
    assert ws.close_code == 1000 and sim.ledger == []


def test_delay_comes_before_every_chunk(sim: HttpSimulator):
    delay_ms = 20
    started = time.monotonic()
    stream = client(sim, **{"x-sim-delay-ms": str(delay_ms)}).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    chunks = iter(stream)
    next(chunks)
    first = time.monotonic() - started
    count = 1 + len(list(chunks)) + 1  # with [DONE]
    assert first >= delay_ms / 1000
    assert time.monotonic() - started >= count * delay_ms / 1000


def test_passthrough_usage_is_ledgered_as_passthrough(sim: HttpSimulator):
    raw = client(sim).models.with_raw_response.list()
    with post(sim, "/v1/files", {"model": "whatever"}) as response:
        files_usage = json.loads(response.read())["usage"]
    with post(sim, "/v1/moderations", {"model": MODEL, "input": "Hi"}) as response:  # no metered route
        legacy_usage = json.loads(response.read())["usage"]
    assert sim.ledger == [
        SentUsage(
            "req_1",
            "passthrough",
            "unknown",
            resolve_model(DEFAULT_MODEL),
            "completed",
            raw.http_response.json()["usage"],
        ),
        entry("req_2", "passthrough", files_usage, "whatever"),
        entry("req_3", "passthrough", legacy_usage),
    ]


def test_requests_are_recorded_as_the_upstream_saw_them(sim: HttpSimulator):
    client(sim).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_query={"trace": "1"}, extra_headers={"X-Trace": "a"}
    ).close()
    [seen] = sim.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions?trace=1")
    assert ("authorization", "Bearer sk-test") in seen.headers and ("x-trace", "a") in seen.headers
    assert json.loads(seen.body) == {"messages": MESSAGES, "model": MODEL, "stream": True}


def test_any_path_prefix_such_as_azure_deployments(sim: HttpSimulator):
    azure = AzureOpenAI(
        api_key="k", api_version="2024-10-21", azure_endpoint=sim.url, azure_deployment="prod", max_retries=0
    )
    completion = azure.chat.completions.create(model=MODEL, messages=MESSAGES)
    with post(sim, "/openai/deployments/prod/embeddings?api-version=2024-10-21", {"input": "Hi"}) as response:
        embedding_model = json.loads(response.read())["model"]
    assert sim.requests[0].path == "/openai/deployments/prod/chat/completions?api-version=2024-10-21"
    assert [(sent.kind, sent.request_model, sent.response_model) for sent in sim.ledger] == [
        ("chat", MODEL, completion.model),
        ("embeddings", "unknown", embedding_model),
    ]
    assert embedding_model == resolve_model(DEFAULT_MODEL)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-sim-encoding", "lzma"),
        ("x-sim-status", "200"),
        ("x-sim-status", "many"),
        ("x-sim-malformed", "yes"),
        ("x-sim-truncate", "true"),
        ("x-sim-delay-ms", "-5"),
    ],
)
def test_unknown_override_values_are_refused(sim: HttpSimulator, header: str, value: str):
    with pytest.raises(openai.BadRequestError) as raised:
        client(sim, **{header: value}).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert isinstance(raised.value.body, dict) and raised.value.body["param"] == header
    assert sim.ledger == []


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", [], None),
        ("/v1/embeddings", {"model": MODEL, "input": []}, "input"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_invalid_requests_get_400(sim: HttpSimulator, path: str, body: Any, param: str | None):
    with pytest.raises(urllib.error.HTTPError) as raised:
        post(sim, path, body)
    assert raised.value.code == 400
    assert json.loads(raised.value.read())["error"]["param"] == param
    assert sim.ledger == []


def test_usage_is_reproducible_per_seed():
    def usages(seed: int) -> list[dict[str, Any]]:
        with SimulatorThread(server=HttpSimulator(seed=seed)) as sim:
            sdk = client(sim)
            for _ in range(10):
                sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
                sdk.responses.create(model=MODEL, input="Hi")
            return [sent.usage for sent in sim.ledger]

    first, again, other = usages(7), usages(7), usages(8)
    assert first == again and first != other
    chat = first[::2]
    assert any(u["prompt_tokens_details"]["audio_tokens"] for u in chat + other[::2])
    assert any(u["completion_tokens_details"]["reasoning_tokens"] for u in chat)
    for usage in chat:
        details = usage["completion_tokens_details"]
        assert details["reasoning_tokens"] + details["audio_tokens"] <= usage["completion_tokens"]
        assert details["accepted_prediction_tokens"] <= usage["completion_tokens"]


def test_simulator_thread_runs_any_upstream(sim: HttpSimulator):
    with pytest.raises(OSError), SimulatorThread(server=HttpSimulator(port=sim.port)):
        pass  # the port is taken: the error reaches the caller's thread
    with pytest.raises(TypeError):
        SimulatorThread(server=HttpSimulator(), seed=1)  # type: ignore[call-overload]


def test_main_serves_until_interrupted():
    with served_module("ai_gateway_tools.simulators.http", timeout=TIMEOUT) as url:
        completion = OpenAI(api_key="sk-test", base_url=url + "/v1", max_retries=0, timeout=TIMEOUT).chat.completions
        assert completion.create(model=MODEL, messages=MESSAGES).model == SNAPSHOT


AUDIO_FILE = ("a.wav", b"RIFF" + bytes(64), "audio/wav")


def test_new_endpoints_ledger_exactly_what_the_sdk_received(sim: HttpSimulator):
    """Legacy completions, transcription (tokens and duration), images and compaction: each ledger
    entry is the usage the SDK parsed, under the request's model (multipart fields included)."""
    api = client(sim)
    completion = api.completions.create(model="gpt-3.5-turbo-instruct", prompt="Hi")
    transcript = api.audio.transcriptions.create(model="gpt-4o-transcribe", file=AUDIO_FILE)
    whisper = api.audio.translations.create(model="whisper-1", file=AUDIO_FILE, response_format="verbose_json")
    image = api.images.edit(model="gpt-image-1", image=("i.png", b"\x89PNG", "image/png"), prompt="hat")
    compacted = api.responses.compact(model=MODEL, input="long")
    got = [(e.kind, e.request_model, e.response_model, e.usage) for e in sim.ledger]
    assert got == [
        (
            "text_completion",
            "gpt-3.5-turbo-instruct",
            resolve_model("gpt-3.5-turbo-instruct"),
            completion.usage.model_dump(exclude_none=True),
        ),
        ("http_transcription", "gpt-4o-transcribe", "unknown", transcript.usage.model_dump(exclude_none=True)),
        ("translation", "whisper-1", "unknown", whisper.model_extra["usage"]),
        ("image_edit", "gpt-image-1", "unknown", image.usage.model_dump(exclude_none=True)),
        ("responses", MODEL, "unknown", compacted.usage.model_dump(exclude_none=True)),
    ]
    assert sim.ledger[2].usage["type"] == "duration"


def test_speech_ledgers_characters_with_the_audio_and_tokens_with_the_stream(sim: HttpSimulator):
    api = client(sim)
    audio = api.audio.speech.create(model="tts-1", voice="alloy", input="Grüße")
    with api.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Hi", stream_format="sse"
    ) as response:
        done = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")][-1]
    assert audio.content.startswith(b"ID3")
    assert [(e.kind, e.request_model, e.usage) for e in sim.ledger] == [
        ("speech_audio", "tts-1", {"characters": 5}),
        ("speech", "gpt-4o-mini-tts", done["usage"]),
        ("speech_characters", "gpt-4o-mini-tts", {"characters": 2}),
    ]
