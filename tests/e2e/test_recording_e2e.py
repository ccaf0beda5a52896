"""What the gateway keeps of a voice session, through real gateway processes: `gateway_record`
bundles on both launchers and both relay paths (the WAVs hold exactly the audio the client and the
simulator sent, whole and per turn), and `redact:` applied to recordings and saved flows (`-w`)
while the upstream and the client receive every byte unredacted; no credential in either."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import wave
from pathlib import Path
from typing import Any

import pytest
import websockets
from mitmproxy import io

from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import wait_until, websocket_base
from ..conftest import LAUNCHERS

EMAIL, CARD = "jo.doe@example.com", "4111 1111 1111 1111"
SECRET = "sk-upstream-SECRET-5e4d3c2b1a"
CLIENT_KEY = "sk-client-RECORDED-77aa"
SPOKEN = [os.urandom(4800) for _ in range(3)]
POLICY = """
auth:
  env: GATEWAY_RECORD_KEY
redact:
  builtin: [email, card]
routes:
  /realtime: Realtime
"""
TRANSCRIPTION = {"type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}


async def voice_session(gateway_url: str) -> dict[str, Any]:
    """A typed turn with an e-mail and a card number, a spoken turn (transcribed by the simulator
    as one), an answer in audio; returns what the client heard."""
    heard: list[bytes] = []
    seen: list[str] = []
    url = f"{websocket_base(gateway_url)}/v1/realtime?model=gpt-realtime"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with websockets.connect(url, additional_headers=headers, compression=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": TRANSCRIPTION}))
        text = {"type": "input_text", "text": f"write to {EMAIL}, card {CARD}"}
        item = {"type": "message", "role": "user", "content": [text]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        for chunk in SPOKEN:
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create"}))
        while (event := json.loads(raw := await ws.recv()))["type"] != "response.done":
            seen.append(raw)
            if event["type"] == "response.output_audio.delta":
                heard.append(base64.b64decode(event["delta"]))
    return {"heard": b"".join(heard), "seen": "".join(seen)}


def logged(gateway: GatewayProcess, line: str) -> str | None:
    """The gateway's log once it holds the line (it is written just after the bundle's rename)."""
    log = gateway.log()
    return log if line in log else None


def frames(path: Path) -> bytes:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (24_000, 2, 1)
        return wav.readframes(wav.getnframes())


def gateway_for(simulator: SimulatorThread, tmp_path: Path, launcher: str, options: dict[str, str]) -> GatewayProcess:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    gateway = GatewayProcess(simulator.url, launcher=launcher, options={"gateway_policy": str(policy), **options})
    gateway.env["GATEWAY_RECORD_KEY"] = SECRET
    return gateway


@pytest.mark.parametrize("relay", ["messages", "frames"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_recorded_session_holds_the_audio_as_sent_and_no_personal_data(tmp_path: Path, launcher: str, relay: str):
    record = tmp_path / "recordings"
    with SimulatorThread(seed=26, audio_deltas=4, audio_bytes=9600, user_transcript=f"my card is {CARD}") as sim:
        options = {"gateway_record": str(record), "gateway_relay": relay}
        with gateway_for(sim, tmp_path, launcher, options) as gateway:
            session = asyncio.run(voice_session(gateway.url))
            (bundle,) = wait_until(lambda: [d for d in record.iterdir() if not d.name.endswith(".partial")] or None)
            log = wait_until(lambda: logged(gateway, f"recorded {bundle}"))
        received = json.dumps(sim.received)
    assert len(session["heard"]) == 9600 * 4
    assert frames(bundle / "user.wav") == b"".join(SPOKEN)
    assert frames(bundle / "model.wav") == session["heard"]
    turns = json.loads((bundle / "turns.json").read_text())["turns"]
    assert [(t["role"], t["voice"]) for t in turns] == [("user", False), ("user", True), ("assistant", False)]
    assert [t["wav"] for t in turns] == [None, "turns/002-user.wav", "turns/003-model.wav"]
    assert frames(bundle / turns[1]["wav"]) == b"".join(SPOKEN)
    assert frames(bundle / turns[2]["wav"]) == session["heard"]
    assert turns[2]["cost_usd"] > 0 and turns[1]["text"] == "my card is [redacted:card]"
    # The upstream got the typed turn whole, the client the transcript whole; the recording neither.
    assert EMAIL in received and CARD in received and CARD in session["seen"]
    files = {path.name: path.read_bytes() for path in bundle.rglob("*") if path.is_file()}
    for name, content in files.items():
        for secret in (EMAIL, CARD, SECRET, CLIENT_KEY, CLIENT_KEY[-8:]):
            assert secret.encode() not in content, f"{secret!r} in {name}"
    assert b"[redacted:email]" in files["events.jsonl"] and b"[redacted:card]" in files["turns.md"]
    assert SECRET not in log


def test_a_saved_flow_keeps_personal_data_redacted(tmp_path: Path):
    saved = tmp_path / "flows.mitm"
    with SimulatorThread(seed=27, audio_deltas=2, user_transcript=f"mail me at {EMAIL}") as sim:
        options = {"save_stream_file": str(saved), "gateway_websocket_history": "all"}
        with gateway_for(sim, tmp_path, "mitmdump", options) as gateway:
            session = asyncio.run(voice_session(gateway.url))
        received = json.dumps(sim.received)
    assert EMAIL in received and EMAIL in session["seen"]
    with saved.open("rb") as f:
        (flow,) = [f for f in io.FlowReader(f).stream() if f.websocket is not None]
    kept = b"\n".join(message.content for message in flow.websocket.messages)
    # The whole history is kept (`all`): the audio too, within gateway_audio_session_mb.
    assert len(flow.websocket.messages) > 10 and base64.b64encode(SPOKEN[0]) in kept
    assert EMAIL.encode() not in kept and CARD.encode() not in kept
    assert b"[redacted:email]" in kept and b"[redacted:card]" in kept
    file = saved.read_bytes()
    assert EMAIL.encode() not in file and SECRET.encode() not in file and CLIENT_KEY.encode() not in file
