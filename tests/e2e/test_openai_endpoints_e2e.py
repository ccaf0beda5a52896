"""Issue 14 point 4 on the real gateway: every metered OpenAI endpoint beyond Chat, Responses and
Embeddings, driven by the official openai SDK, /metrics and the ledger compared to exactly what
the simulated upstream sent (its ledger, through the independent oracle)."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.harness import assert_metered_exactly as metered_exactly
from ai_gateway_tools.harness import parse_errors as count_parse_errors
from ai_gateway_tools.simulators.http import SPEECH_AUDIO, TEXT, HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

PARSE_ERRORS = "agentgateway_gateway_parse_errors_total"
CALLS = "agentgateway_gateway_realtime_calls_total"
AUDIO = ("speech.wav", b"RIFF" + bytes(2048), "audio/wav")
IMAGE = ("cat.png", b"\x89PNG\r\n\x1a\n" + bytes(512), "image/png")


@pytest.fixture(scope="module")
def http_simulator() -> Iterator[HttpSimulator]:
    with SimulatorThread(server=HttpSimulator(seed=14)) as sim:
        yield sim


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ledger") / "usage.jsonl"


@pytest.fixture(scope="module")
def http_gateway(http_simulator, ledger_path) -> Iterator[GatewayProcess]:
    with GatewayProcess(http_simulator.url, options={"gateway_usage_log": str(ledger_path)}) as gw:
        yield gw


@pytest.fixture
def client(http_gateway) -> OpenAI:
    return OpenAI(api_key="sk-client", base_url=f"{http_gateway.url}/v1", max_retries=0)


def assert_metered_exactly(gateway: GatewayProcess, simulator: HttpSimulator, model: str, count: int) -> None:
    sent = simulator.usage_for(model)
    assert len(sent) == count
    metered_exactly(gateway.metrics_url, model, sent)


def parse_errors(gateway: GatewayProcess) -> float:
    return count_parse_errors(gateway.metrics_url)


def ledger_lines(path: Path, model: str) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["request_model"] == model]


def test_legacy_completions(client, http_gateway, http_simulator, model):
    completion = client.completions.create(model=model, prompt="Say hi")
    assert completion.choices[0].text == TEXT
    assert completion.usage.prompt_tokens == http_simulator.usage_for(model)[0].usage["prompt_tokens"]
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_legacy_completions_stream_gets_usage(client, http_gateway, http_simulator, model):
    chunks = list(client.completions.create(model=model, prompt="Say hi", stream=True))
    assert json.loads(http_simulator.requests[-1].body)["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    assert chunks[-1].usage is not None
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


@pytest.mark.parametrize("response_format", ["json", "verbose_json"])
def test_transcription_tokens(client, http_gateway, http_simulator, model, response_format, ledger_path):
    transcript = client.audio.transcriptions.create(model=model, file=AUDIO, response_format=response_format)
    assert transcript.text == TEXT
    (sent,) = http_simulator.usage_for(model)
    assert sent.usage["type"] == "tokens"
    assert_metered_exactly(http_gateway, http_simulator, model, 1)
    (line,) = ledger_lines(ledger_path, model)
    details = sent.usage["input_token_details"]
    assert line["input_by_modality"] == {"text": details["text_tokens"], "audio": details["audio_tokens"]}
    assert line["output_by_modality"] == {"text": sent.usage["output_tokens"]}


def test_transcription_stream(client, http_gateway, http_simulator, model):
    events = list(client.audio.transcriptions.create(model=model, file=AUDIO, stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == TEXT
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_transcription_by_duration_is_priced(client, http_gateway, http_simulator):
    before = parse_errors(http_gateway)
    client.audio.transcriptions.create(model="whisper-1", file=AUDIO)
    (sent,) = http_simulator.usage_for("whisper-1")[-1:]
    assert sent.usage["type"] == "duration"
    samples = select(scrape(http_gateway.metrics_url), gen_ai_request_model="whisper-1")
    seconds = [v for (name, _), v in samples.items() if name.endswith("transcription_audio_seconds_total")]
    assert seconds == [sum(e.usage["seconds"] for e in http_simulator.usage_for("whisper-1"))]
    cost = [v for (name, _), v in samples.items() if name == "agentgateway_gen_ai_client_cost_usd_total"]
    assert cost and cost[0] == pytest.approx(seconds[0] / 60 * 0.006)  # whisper-1: $0.006 a minute
    assert parse_errors(http_gateway) == before


def test_translation(client, http_gateway, http_simulator, model):
    translation = client.audio.translations.create(model=model, file=AUDIO)
    assert translation.text == TEXT
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_transcript_as_text_has_no_usage_to_meter(client, http_gateway, http_simulator, model):
    before = parse_errors(http_gateway)
    assert client.audio.transcriptions.create(model=model, file=AUDIO, response_format="text") == TEXT
    assert http_simulator.usage_for(model) == []
    assert parse_errors(http_gateway) == before + 1  # missing_usage: honest, nothing to bill


def test_speech_audio_counts_characters(client, http_gateway, http_simulator, model, ledger_path):
    text = "Hello, wörld! ✓"
    audio = client.audio.speech.create(model=model, voice="alloy", input=text)
    assert audio.content == SPEECH_AUDIO
    (sent,) = http_simulator.usage_for(model)
    assert sent.usage == {"characters": len(text)}
    assert_metered_exactly(http_gateway, http_simulator, model, 1)
    (line,) = ledger_lines(ledger_path, model)
    assert line["input_characters"] == len(text) and line["operation"] == "speech"


def test_speech_stream_bills_tokens_and_characters(client, http_gateway, http_simulator, model):
    with client.audio.speech.with_streaming_response.create(
        model=model, voice="alloy", input="Hi there", stream_format="sse"
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    assert sorted(e.kind for e in http_simulator.usage_for(model)) == ["speech", "speech_characters"]
    assert_metered_exactly(http_gateway, http_simulator, model, 2)


def test_image_generation(client, http_gateway, http_simulator, model, ledger_path):
    image = client.images.generate(model=model, prompt="a cat")
    assert image.data[0].b64_json
    assert_metered_exactly(http_gateway, http_simulator, model, 1)
    (line,) = ledger_lines(ledger_path, model)
    assert line["output_by_modality"] == {"text": 0, "image": image.usage.output_tokens}


def test_image_generation_stream(client, http_gateway, http_simulator, model):
    events = list(client.images.generate(model=model, prompt="a cat", stream=True, partial_images=1))
    assert events[-1].type == "image_generation.completed"
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_image_edit_reads_the_model_from_the_upload(client, http_gateway, http_simulator, model):
    edited = client.images.edit(model=model, image=IMAGE, prompt="a hat")
    assert edited.usage.input_tokens_details.image_tokens > 0
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_responses_compact(client, http_gateway, http_simulator, model):
    compacted = client.responses.compact(model=model, input="a long conversation")
    assert compacted.usage.input_tokens == http_simulator.usage_for(model)[0].usage["input_tokens"]
    assert_metered_exactly(http_gateway, http_simulator, model, 1)


def test_get_on_a_metered_path_is_not_metered(client, http_gateway, http_simulator):
    before = parse_errors(http_gateway)
    listed = client.chat.completions.list()
    assert listed.data == []
    assert parse_errors(http_gateway) == before


def post(gateway: GatewayProcess, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{gateway.url}/v1{path}", body, {"authorization": "Bearer sk-client", "content-type": content_type}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def test_realtime_calls_and_client_secrets_are_counted(http_gateway, http_simulator):
    session = json.dumps({"session": {"type": "realtime", "model": "gpt-realtime"}}).encode()
    status, secret = post(http_gateway, "/realtime/client_secrets", session, "application/json")
    assert status == 200 and json.loads(secret)["value"].startswith("ek_")
    status, answer = post(http_gateway, "/realtime/calls", b"v=0\r\n", "application/sdp")
    assert status == 200 and answer.startswith(b"v=0")
    status, _ = post(http_gateway, "/realtime/calls/rtc_1/accept", session, "application/json")  # SIP
    assert status == 200
    samples = scrape(http_gateway.metrics_url)
    for kind in ("client_secrets", "calls", "accept"):
        assert samples[(CALLS, frozenset({("kind", kind)}))] == 1


def test_realtime_calls_pass_client_key_checks_and_rate_limits(tmp_path, http_simulator):
    """Minting a browser's session is refused like any metered request: an unknown key gets 401, a
    key over its requests per minute 429, and neither reaches the upstream; admitted ones are counted."""
    known = "sk-known"
    policy = tmp_path / "calls.yaml"
    policy.write_text(
        "client_keys:\n  require: true\n  keys:\n"
        f"    - {{sha256: {hashlib.sha256(known.encode()).hexdigest()}, name: web}}\n"
        "limits:\n  client_key: {requests_per_minute: 1}\n"
        "routes:\n  /realtime/client_secrets: RealtimeCalls\n  '*': Passthrough\n"
    )
    body = json.dumps({"session": {"type": "realtime", "model": "gpt-realtime"}}).encode()
    with GatewayProcess(http_simulator.url, options={"gateway_policy": str(policy)}) as gateway:
        seen = len(http_simulator.requests)
        statuses = []
        for key in ("sk-stranger", known, known):
            request = urllib.request.Request(
                f"{gateway.url}/v1/realtime/client_secrets",
                body,
                {"authorization": f"Bearer {key}", "content-type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
        samples = scrape(gateway.metrics_url)
    assert statuses == [401, 200, 429]
    assert len(http_simulator.requests) == seen + 1
    assert samples[(CALLS, frozenset({("kind", "client_secrets")}))] == 1
    enforced = select(samples, action="rejected_request")
    assert sorted(dict(labels)["reason"] for (_, labels), v in enforced.items() if v) == [
        "invalid_api_key",
        "rate_limit_exceeded",
    ]
