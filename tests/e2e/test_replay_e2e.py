"""Replay with real processes: two sessions recorded through the gateway (mitmweb) in front of the
simulator and exported with realtime.export, then served back by `gateway_replay` through both
launchers, with no upstream at all, to the openai SDK and to a pipecat-like websockets client,
which see what the recording's clients saw; /metrics counts the replayed usage exactly, under
gen_ai_system="replay"; scripts/replay drives a recording against the simulator."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets
from mitmproxy import io
from openai import AsyncOpenAI

from ai_gateway.accounting.pricing import catalog_for
from ai_gateway.protocols.usage_fields import parse_realtime_usage
from ai_gateway_tools.debug import mitmweb, web_url
from ai_gateway_tools.harness import GatewayProcess, assert_metered_exactly, free_port
from ai_gateway_tools.simulators.realtime import SentUsage, SimulatorThread

from ..clients import raw_session, websocket_base
from ..conftest import LAUNCHERS
from .test_secrets_mitmweb import fetch, web_base

# Two request models (the recording's simulator is the fixture's own), both priced.
SDK_MODEL, VAD_MODEL = "gpt-realtime", "gpt-realtime-2025-08-28"
CHUNK = 4800
SPOKEN = [[os.urandom(CHUNK) for _ in range(3)] for _ in range(2)]  # two voice turns of three appends
SIMULATOR = {
    "seed": 2512,
    "audio_deltas": 3,
    "audio_bytes": 4800,
    "vad_speech_bytes": 3 * CHUNK,
    "delta_interval": 0.01,
}
VAD_SESSION = {
    "type": "realtime",
    "audio": {"input": {"turn_detection": {"type": "server_vad"}, "transcription": {"model": "gpt-4o-transcribe"}}},
}


@dataclass
class Seen:
    """What a client received: every event's type, the transcripts, the audio."""

    types: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    times: list[float] = field(default_factory=list)

    def add(self, event: dict[str, Any]) -> bool:
        """Returns whether the event ends a response."""
        self.types.append(event["type"])
        self.times.append(time.monotonic())
        if event["type"] == "response.output_audio.delta":
            self.audio += base64.b64decode(event["delta"])
        elif event["type"] == "response.output_audio_transcript.delta":
            self.texts.append(event["delta"])
        return event["type"] == "response.done"


async def sdk_client(gateway_url: str) -> Seen:
    """The openai SDK asks for two answers, the second saying given words."""
    seen = Seen()
    client = AsyncOpenAI(api_key="sk-client-own-key", websocket_base_url=websocket_base(gateway_url) + "/v1")
    async with client.realtime.connect(model=SDK_MODEL) as connection:
        for metadata in ({}, {"sim_transcript": "replayed word for word", "sim_delta_ms": "80"}):
            await connection.response.create(response={"metadata": metadata} if metadata else None)  # type: ignore[arg-type]
            async for event in connection:
                if seen.add(event.model_dump(mode="json")):
                    break
    return seen


async def pipecat_client(gateway_url: str) -> Seen:
    """As pipecat talks: event_id before type, server VAD; it streams the user's audio and the
    upstream answers by itself each time the user stops speaking."""
    seen = Seen()
    url = f"{websocket_base(gateway_url)}/v1/realtime?model={VAD_MODEL}"
    async with websockets.connect(url, compression=None, max_size=None) as ws:
        seen.add(json.loads(await ws.recv()))
        await ws.send(json.dumps({"event_id": "evt_session", "type": "session.update", "session": VAD_SESSION}))
        for turn, chunks in enumerate(SPOKEN):
            for n, chunk in enumerate(chunks):
                append = {"event_id": f"evt_{turn}_{n}", "type": "input_audio_buffer.append"}
                await ws.send(json.dumps({**append, "audio": base64.b64encode(chunk).decode()}))
            while not seen.add(json.loads(await asyncio.wait_for(ws.recv(), 20))):
                pass
    return seen


@dataclass
class Recording:
    bundles: dict[str, Path]  # by request model
    flows: Path
    seen: dict[str, Seen]
    sent: dict[str, list[SentUsage]]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """Both sessions through mitmweb in front of the simulator, audio kept, saved with -w and exported."""
    where = tmp_path_factory.mktemp("recorded")
    flows = where / "sessions.flows"
    with SimulatorThread(**SIMULATOR) as simulator:
        gateway = mitmweb(simulator.url, web_port=free_port())
        gateway.options |= {"gateway_strip_audio": "false", "save_stream_file": str(flows)}
        with gateway:
            token = web_url(gateway).split("token=", 1)[1]
            seen = {
                SDK_MODEL: asyncio.run(sdk_client(gateway.url)),
                VAD_MODEL: asyncio.run(pipecat_client(gateway.url)),
            }
            fetch(web_base(gateway), "/commands/realtime.export", token, ["@all", str(where / "bundles")])
    with flows.open("rb") as file:
        models = {f.id: f.request.query["model"] for f in io.FlowReader(file).stream()}
    bundles = {models[bundle.name]: bundle for bundle in (where / "bundles").iterdir()}
    sent = {model: simulator.usage_for(model) for model in models.values()}
    yield Recording(bundles, flows, seen, sent)


def replaying(path: Path, launcher: str, pacing: str, **options: str) -> GatewayProcess:
    """The gateway with nothing behind it: its reverse target is a port no one listens on."""
    options = {"gateway_replay": str(path), "gateway_replay_pacing": pacing, **options}
    return GatewayProcess(f"http://127.0.0.1:{free_port()}", launcher=launcher, options=options)


def assert_same(replayed: Seen, recorded: Seen) -> None:
    assert replayed.types == recorded.types
    assert replayed.texts == recorded.texts
    assert replayed.audio == recorded.audio and len(recorded.audio) > 0


@pytest.mark.parametrize(
    "launcher, source", [*((launcher, "bundle") for launcher in LAUNCHERS), ("mitmdump", "flow file")]
)
def test_the_sdk_is_answered_from_the_recording_at_its_pace(recorded, tmp_path, launcher, source):
    path = recorded.bundles[SDK_MODEL] if source == "bundle" else recorded.flows
    ledger = tmp_path / "usage.jsonl"
    with replaying(path, launcher, "recorded", gateway_usage_log=str(ledger)) as gateway:
        seen = asyncio.run(sdk_client(gateway.url))
        assert_metered_exactly(gateway.metrics_url, SDK_MODEL, recorded.sent[SDK_MODEL], system="replay")
    assert_same(seen, recorded.seen[SDK_MODEL])
    assert "".join(seen.texts).endswith("replayed word for word")
    # At the recorded pace: the second answer's deltas came 80 ms apart, and do again. Against the
    # simulator's pace, not the recording client's clock: a loaded machine stretches what that
    # client saw beyond the offsets the gateway recorded (a loaded machine only makes a replay slower).
    assert last_response_time(recorded.seen[SDK_MODEL]) >= 0.9 * 7 * 0.08
    assert last_response_time(seen) >= 0.9 * 7 * 0.08
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(line["system"], line["input_tokens"]) for line in lines] == [
        ("replay", sent.usage["input_tokens"]) for sent in recorded.sent[SDK_MODEL]
    ]


def last_response_time(seen: Seen) -> float:
    """Seconds from the last response.created to its response.done, as the client saw them."""
    created = len(seen.types) - 1 - seen.types[::-1].index("response.created")
    return seen.times[-1] - seen.times[created]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_pipecat_like_client_is_answered_when_it_stops_speaking(recorded, launcher):
    with replaying(recorded.bundles[VAD_MODEL], launcher, "fast") as gateway:
        seen = asyncio.run(pipecat_client(gateway.url))
        assert_metered_exactly(gateway.metrics_url, VAD_MODEL, recorded.sent[VAD_MODEL], system="replay")
        # A response.create the recording has no answer for is told so rather than left waiting.
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={VAD_MODEL}"
        frames, _ = asyncio.run(raw_session(url, [{"type": "response.create"}], until="error"))
        assert json.loads(frames[-1])["error"]["code"] == "replay_exhausted"
    assert_same(seen, recorded.seen[VAD_MODEL])
    assert seen.types.count("input_audio_buffer.speech_stopped") == 2 and "response.create" not in seen.types
    assert {s.kind for s in recorded.sent[VAD_MODEL]} == {"response", "transcription"}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_truncated_recording_stops_startup_with_one_line(recorded, tmp_path, launcher):
    truncated = tmp_path / "bundle"
    truncated.mkdir()
    events = (recorded.bundles[SDK_MODEL] / "events.jsonl").read_text()
    (truncated / "events.jsonl").write_text(events[: len(events) // 2])
    lines = events[: len(events) // 2].count("\n") + 1
    with pytest.raises(RuntimeError, match="exited with") as failed:
        replaying(truncated, launcher, "fast").start()
    expected = f"gateway_replay: {truncated}/events.jsonl line {lines}: not a JSON object (truncated?); expected"
    assert str(failed.value).count(expected) == 1


def run_replay(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ai_gateway_tools.replay", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def rows(output: str) -> list[list[str]]:
    """The per-turn rows of scripts/replay's table: turn, cause, then both columns' figures."""
    return [line.replace("|", " ").split() for line in output.splitlines() if line[:1].isdigit()]


def test_scripts_replay_prices_the_conversation_on_another_model(recorded):
    with SimulatorThread(**{**SIMULATOR, "seed": 7}) as simulator:
        done = run_replay(str(recorded.bundles[VAD_MODEL]), "--upstream", simulator.url, "--model", "gpt-realtime-mini")
    assert done.returncode == 0, done.stderr
    replayed = [s.usage for s in simulator.usage_for("gpt-realtime-mini") if s.kind == "response"]
    original = [s.usage for s in recorded.sent[VAD_MODEL] if s.kind == "response"]
    table = rows(done.stdout)
    assert len(table) == len(original) == len(replayed) == 2
    for row, before, after in zip(table, original, replayed, strict=True):
        # Server VAD started both responses in the replay too: the user's audio went out as recorded.
        assert row[1:3] == ["server", "VAD"]
        assert row[3:7] == [*counts(before), cost("gpt-realtime-2025-08-28", before)]
        assert row[8:12] == [*counts(after), cost("gpt-realtime-mini-2025-08-28", after)]
    assert "model gpt-realtime-2025-08-28" in done.stdout and "model gpt-realtime-mini-2025-08-28" in done.stdout


def cost(model: str, usage: dict[str, Any]) -> str:
    """At the gateway's prices, as /metrics would count it."""
    dollars = catalog_for("openai", None).cost(model, parse_realtime_usage(usage))[0]
    assert dollars is not None and dollars > 0
    return f"{dollars:.6f}"


def counts(usage: dict[str, Any]) -> list[str]:
    return [str(usage["input_tokens"]), str(usage["input_token_details"]["cached_tokens"]), str(usage["output_tokens"])]


def test_scripts_replay_names_what_is_not_a_recording(tmp_path):
    done = run_replay(str(tmp_path), "--upstream", "http://127.0.0.1:9")
    assert done.returncode == 1 and done.stdout == ""
    expected = f"scripts/replay: {tmp_path}: not a recording: no events.jsonl in it; expected a realtime.export "
    assert done.stderr == expected + "bundle (a directory with events.jsonl) or a mitmproxy flow file saved with -w\n"
