"""realtime.export from mitmweb's command API, with mitmweb's defaults (relayed audio kept within
its caps): the WAVs hold exactly the audio the simulator sent and the client appended, whole and
per turn, the events their frames without audio, the turns the conversation."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import wave
from pathlib import Path

import websockets

from ai_gateway_tools.debug import mitmweb, web_url
from ai_gateway_tools.harness import free_port
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import websocket_base
from .test_secrets_mitmweb import fetch, web_base

SPOKEN = [os.urandom(4800) for _ in range(3)]


async def session(gateway_url: str) -> bytes:
    """The user speaks three chunks, commits them and asks for two answers; returns the answers' audio."""
    heard = []
    async with websockets.connect(f"{websocket_base(gateway_url)}/v1/realtime?model=gpt-realtime") as ws:
        await ws.recv()
        for chunk in SPOKEN:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        for _ in range(2):
            await ws.send(json.dumps({"type": "response.create"}))
            while (event := json.loads(await ws.recv()))["type"] != "response.done":
                if event["type"] == "response.output_audio.delta":
                    heard.append(base64.b64decode(event["delta"]))
    return b"".join(heard)


def test_realtime_export_writes_the_session_s_audio_as_sent(tmp_path: Path) -> None:
    with SimulatorThread(seed=25, audio_deltas=4, audio_bytes=9600) as simulator:
        gateway = mitmweb(simulator.url, web_port=free_port())
        with gateway:
            token = web_url(gateway).split("token=", 1)[1]
            heard = asyncio.run(session(gateway.url))
            fetch(web_base(gateway), "/commands/realtime.export", token, ["@all", str(tmp_path)])
            log = gateway.log()
    (bundle,) = tmp_path.iterdir()
    with wave.open(str(bundle / "model.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (24_000, 2, 1)
        assert len(heard) == 9600 * 4 * 2 and wav.readframes(wav.getnframes()) == heard
    with wave.open(str(bundle / "user.wav"), "rb") as wav:
        assert wav.readframes(wav.getnframes()) == b"".join(SPOKEN)
    events = (bundle / "events.jsonl").read_text()
    assert (
        base64.b64encode(heard[:9600]).decode() not in events and "<audio pcm16 24 kHz: 9,600 bytes, 200 ms>" in events
    )
    turns = json.loads((bundle / "turns.json").read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "assistant"]
    assert [t["wav"] for t in turns] == ["turns/001-user.wav", "turns/002-model.wav", "turns/003-model.wav"]
    for turn, expected in zip(
        turns, [b"".join(SPOKEN), heard[: len(heard) // 2], heard[len(heard) // 2 :]], strict=True
    ):
        with wave.open(str(bundle / turn["wav"]), "rb") as wav:
            assert wav.readframes(wav.getnframes()) == expected
    assert all(t["cost_usd"] > 0 and t["ttft_ms"] is not None for t in turns[1:])
    assert f"written to {bundle}" in log
