"""A Gemini Live session from Google's google-genai SDK, kept by the gateway as a conversation: what
the turns say is what was said, and the tokens and dollars they were priced at are what /metrics
counted. Read through `realtime.export`: from mitmweb's command API, and from a mitmdump script
(tests/e2e/export_on_close.py; scripts/serve loads no scripts, so it has no way to hand a
conversation out before sessions are recorded).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import wave
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import types

from ai_gateway_tools.debug import web_url
from ai_gateway_tools.harness import free_port, scrape_until, select
from ai_gateway_tools.simulators.gemini_live import (
    _WORDS,
    AI_STUDIO_PATH,
    CALL_ARGUMENTS,
    USER_TRANSCRIPT,
    GeminiLiveSimulator,
)
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import wait_until
from .test_gemini_live_e2e import LiveGateway
from .test_secrets_mitmweb import fetch, web_base

MODEL = "gemini-live-2.5-flash-preview"  # priced by the database: the turns get a cost
PATH = AI_STUDIO_PATH.format(version="v1beta", method="BidiGenerateContent")
EXPORT_SCRIPT = Path(__file__).with_name("export_on_close.py")
AUDIO_MESSAGES = 3
SPOKEN = " ".join(_WORDS[:AUDIO_MESSAGES])  # the simulated model's words for an answer of that many parts
TYPED = "sim_function_call=get_weather"
RESULT = {"temperature": 18}
SPOKEN_AUDIO = os.urandom(3200)  # 100 ms of 16 kHz PCM16


async def session(gateway: LiveGateway) -> bytes:
    """A spoken turn, a typed turn the model answers with a function call and, after its result, words;
    then a typed turn cut off by a barge-in (the simulator's `interrupted`). Returns the audio heard."""
    client = genai.Client(
        vertexai=True,
        http_options=types.HttpOptions(base_url=gateway.wss(PATH), async_client_args={"ssl": gateway.ssl_context()}),
    )
    config = types.LiveConnectConfig(
        response_modalities=[types.Modality.AUDIO],
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
    )
    async with client.aio.live.connect(model=f"models/{MODEL}", config=config) as live:
        await live.send_realtime_input(audio=types.Blob(data=SPOKEN_AUDIO, mime_type="audio/pcm;rate=16000"))
        await live.send_realtime_input(audio_stream_end=True)
        received = [message async for message in live.receive()]
        await live.send_client_content(turns=types.Content(role="user", parts=[types.Part(text=TYPED)]))
        call = None
        async for message in live.receive():
            received.append(message)
            if message.tool_call is not None:
                (call,) = message.tool_call.function_calls
                break
        assert call is not None and call.args == CALL_ARGUMENTS
        response = types.FunctionResponse(id=call.id, name=call.name, response=RESULT)
        await live.send_tool_response(function_responses=[response])
        received += [message async for message in live.receive()]
        await live.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="sim_interrupt=1")]))
        received += [message async for message in live.receive()]
        assert any(m.server_content and m.server_content.interrupted for m in received)
    return b"".join(m.data for m in received if m.data)


def check(bundle: Path, gateway: LiveGateway) -> None:
    """The exported turns are what was said, priced as /metrics counted them."""
    turns = json.loads((bundle / "turns.json").read_text())["turns"]
    said = [(t["role"], t["text"], t["status"]) for t in turns]
    assert said == [
        ("user", USER_TRANSCRIPT, None),
        ("assistant", SPOKEN, "completed"),
        ("user", TYPED, None),
        ("assistant", "", "tool call"),
        ("tool", json.dumps(RESULT), None),
        ("assistant", SPOKEN, "completed"),
        ("user", "sim_interrupt=1", None),
        ("assistant", _WORDS[0] + " ", "cancelled"),
        ("user", "", None),  # the barge-in: the user spoke (nothing transcribed it)
    ]
    assert [(c["name"], json.loads(c["arguments"])) for c in turns[3]["calls"]] == [("get_weather", CALL_ARGUMENTS)]
    assert turns[4]["call_id"] == turns[3]["calls"][0]["call_id"]
    assert "interrupted: the user spoke" in turns[7]["notes"]
    priced = [t for t in turns if t["usage"] is not None]
    assert len(priced) == 3 and all(t["cost_usd"] > 0 and t["ttft_ms"] is not None for t in priced)
    totals = {kind: sum(t["usage"][kind] for t in priced) for kind in ("input", "output")}
    cost = sum(t["cost_usd"] for t in priced)

    def metered(samples: dict) -> dict[str, float]:
        mine = select(samples, gen_ai_request_model=MODEL)
        tokens = {
            kind: sum(
                v
                for (n, labels), v in mine.items()
                if n.endswith("_token_usage_sum") and ("gen_ai_token_type", kind) in labels
            )
            for kind in ("input", "output")
        }
        return tokens | {"cost": sum(v for (n, _), v in mine.items() if n.endswith("_cost_usd_total"))}

    samples = metered(scrape_until(gateway.metrics_url, lambda s: metered(s)["input"] == totals["input"]))
    assert {k: samples[k] for k in totals} == totals
    assert samples["cost"] == pytest.approx(cost, rel=1e-9)


@pytest.fixture
def simulator() -> Any:
    with SimulatorThread(server=GeminiLiveSimulator(seed=2512, audio_messages=AUDIO_MESSAGES)) as simulator:
        yield simulator


def test_mitmweb_keeps_a_gemini_live_session_as_its_turns(simulator, tmp_path):
    args = ["--web-port", str(free_port()), "--no-web-open-browser"]
    with LiveGateway(simulator.url, tmp_path / "confdir", tool="mitmweb", args=args) as gateway:
        token = web_url(gateway).split("token=", 1)[1]
        heard = asyncio.run(session(gateway))
        fetch(web_base(gateway), "/commands/realtime.export", token, ["@all", str(tmp_path / "export")])
        (bundle,) = (tmp_path / "export").iterdir()
        check(bundle, gateway)
    # mitmweb keeps every message: the audio both ways, as WAV at the rates the mime types name.
    for name, rate, audio in (("user", 16_000, SPOKEN_AUDIO), ("model", 24_000, heard)):
        with wave.open(str(bundle / f"{name}.wav"), "rb") as wav:
            assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (rate, 2, 1)
            assert wav.readframes(wav.getnframes()) == audio
    assert len(heard) == (2 * AUDIO_MESSAGES + 1) * simulator.audio_bytes
    events = (bundle / "events.jsonl").read_text()
    assert (
        base64.b64encode(heard[:600]).decode() not in events and base64.b64encode(SPOKEN_AUDIO).decode() not in events
    )
    assert "<audio audio/pcm;rate=24000: 9,600 bytes, 200 ms>" in events and '"turnComplete": true' in events


def test_a_mitmdump_script_exports_a_gemini_live_session_as_its_turns(simulator, tmp_path):
    exported = tmp_path / "export"
    options = {"gateway_conversations": "on", "export_dir": str(exported)}
    with LiveGateway(simulator.url, tmp_path / "confdir", options=options, args=["-s", str(EXPORT_SCRIPT)]) as gateway:
        asyncio.run(session(gateway))
        # The script exports as the session closes; events.jsonl is written after turns.json.
        bundle = wait_until(lambda: next((d for d in exported.glob("*") if (d / "events.jsonl").exists()), None))
        check(bundle, gateway)
