"""Guardrails on Gemini Live sessions, end to end on both launchers: Google's google-genai SDK, the
gateway with policies/gemini.yaml and a regex guard, the simulated Live upstream (which keeps every
client message it received).

Denied user text never reaches the model and the SDK raises the gateway's error (the session goes
on, until max_blocks); a denied phrase in the model's spoken answer or in the user's transcribed
speech stops the turn within its sentence and closes the session with 1008.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest
from google import genai
from google.genai import errors, types

from ai_gateway_tools.harness import scrape, select
from ai_gateway_tools.simulators.gemini_live import GeminiLiveSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..conftest import LAUNCHERS
from .test_frame_relay import SOCKETS_CHOSEN
from .test_gemini_live_e2e import AI_STUDIO, POLICY, LiveGateway
from .test_guardrails_e2e import DENIED_ANSWER

LOGGED = {"termlog_verbosity": "debug"}  # names the path each session took: sockets, under auto

GUARD = "no-project-names"
CHECKS = "agentgateway_guardrail_checks_total"


def guarded_policy(tmp_path: Path, max_blocks: int | None = None) -> str:
    """policies/gemini.yaml with a regex guard on both phases."""
    text = POLICY.read_text().replace("prices: prices.yaml", f"prices: {POLICY.parent / 'prices.yaml'}")
    limit = f"    max_blocks: {max_blocks}\n" if max_blocks is not None else ""
    guard = f'guardrails:\n  - name: {GUARD}\n    kind: regex\n    deny: ["project\\\\s+falcon"]\n{limit}'
    path = tmp_path / "gemini-guarded.yaml"
    path.write_text(guard + text)
    return str(path)


def checks(gateway: LiveGateway, phase: str, action: str) -> float:
    samples = select(scrape(gateway.metrics_url), guard=GUARD, phase=phase, action=action)
    return sum(v for (name, _), v in samples.items() if name == CHECKS)


def client(gateway: LiveGateway) -> genai.Client:
    options = types.HttpOptions(base_url=gateway.wss(AI_STUDIO), async_client_args={"ssl": gateway.ssl_context()})
    return genai.Client(vertexai=True, http_options=options)


async def turn(session, text: str) -> list[types.LiveServerMessage]:
    await session.send_client_content(turns=types.Content(role="user", parts=[types.Part(text=text)]))
    return [message async for message in session.receive()]


async def until_closed(session) -> tuple[list[types.LiveServerMessage], errors.APIError]:
    """Messages received until the SDK raises the close."""
    received = []
    with pytest.raises(errors.APIError) as closed:
        while True:
            async for message in session.receive():
                received.append(message)
    return received, closed.value


def sent_texts(simulator: GeminiLiveSimulator) -> str:
    return json.dumps(simulator.received)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_denied_user_text_never_reaches_the_model_and_the_sdk_raises_it(tmp_path, launcher):
    with (
        SimulatorThread(server=GeminiLiveSimulator(seed=31)) as upstream,
        LiveGateway(upstream.url, tmp_path, launcher, {"gateway_policy": guarded_policy(tmp_path)}) as gateway,
    ):

        async def session() -> tuple[list[errors.ClientError], list[types.LiveServerMessage]]:
            config = types.LiveConnectConfig(response_modalities=[types.Modality.TEXT])
            refused = []
            async with client(gateway).aio.live.connect(model="models/gemini-live-guarded", config=config) as live:
                for text in ["Tell me about Project  Falcon", "ｐｒｏｊｅｃｔ fal\u200bcon?"]:
                    with pytest.raises(errors.ClientError) as caught:
                        await turn(live, text)
                    refused.append(caught.value)
                return refused, await turn(live, "What's the weather?")

        refused, answered = asyncio.run(session())
        assert [(e.code, e.status) for e in refused] == [(400, "INVALID_ARGUMENT")] * 2
        assert all(GUARD in e.message and e.details["details"][0]["reason"] == "GUARDRAIL_BLOCKED" for e in refused)
        assert "".join(m.text or "" for m in answered).strip() == "Hello from the simulated Gemini"
        assert "weather" in sent_texts(upstream) and "falcon" not in sent_texts(upstream).casefold()
        assert checks(gateway, "input", "block") == 2 and checks(gateway, "input", "allow") == 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_denied_phrase_in_the_spoken_answer_ends_the_session_within_its_sentence(tmp_path, launcher):
    with (
        SimulatorThread(server=GeminiLiveSimulator(seed=32, answer=DENIED_ANSWER)) as upstream,
        LiveGateway(
            upstream.url, tmp_path, launcher, {"gateway_policy": guarded_policy(tmp_path), **LOGGED}
        ) as gateway,
    ):

        async def session() -> tuple[list[types.LiveServerMessage], errors.APIError]:
            config = types.LiveConnectConfig(
                response_modalities=[types.Modality.AUDIO], output_audio_transcription=types.AudioTranscriptionConfig()
            )
            async with client(gateway).aio.live.connect(model="models/gemini-live-spoken", config=config) as live:
                await live.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="Any news?")]))
                return await until_closed(live)

        received, closed = asyncio.run(session())
        said = "".join(
            m.server_content.output_transcription.text
            for m in received
            if m.server_content and m.server_content.output_transcription
        )
        assert said.strip() == "Sure. The project falcon launch is next week and it is"  # not its last word
        assert closed.code == 1008 and GUARD in closed.details
        assert SOCKETS_CHOSEN in gateway.log()
        assert not any(m.server_content and m.server_content.turn_complete for m in received)
        assert checks(gateway, "output", "block") == 1
        # An audio message per word, each before its transcript: the blocked word's audio had passed.
        audio = [m.data for m in received if m.data]
        assert len(audio) == len(said.split()) + 1
        samples = select(scrape(gateway.metrics_url), guard=GUARD)
        passed = sum(v for (name, _), v in samples.items() if name.endswith("audio_before_block_seconds_sum"))
        assert passed == pytest.approx(sum(map(len, audio)) / 48000, rel=0.01)  # 24 kHz PCM16


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_denied_transcribed_speech_ends_the_session_before_the_answer(tmp_path, launcher):
    spoken = "so what is the status of project falcon"
    with (
        SimulatorThread(server=GeminiLiveSimulator(seed=33, user_transcript=spoken)) as upstream,
        LiveGateway(upstream.url, tmp_path, launcher, {"gateway_policy": guarded_policy(tmp_path)}) as gateway,
    ):

        async def session() -> tuple[list[types.LiveServerMessage], errors.APIError]:
            config = types.LiveConnectConfig(
                response_modalities=[types.Modality.AUDIO], input_audio_transcription=types.AudioTranscriptionConfig()
            )
            async with client(gateway).aio.live.connect(model="models/gemini-live-heard", config=config) as live:
                await live.send_realtime_input(audio=types.Blob(data=bytes(3200), mime_type="audio/pcm;rate=16000"))
                await live.send_realtime_input(audio_stream_end=True)
                return await until_closed(live)

        received, closed = asyncio.run(session())
        heard = "".join(
            m.server_content.input_transcription.text
            for m in received
            if m.server_content and m.server_content.input_transcription
        )
        assert heard.strip() == spoken  # the transcript is checked once the model starts answering
        assert not any(m.data for m in received)  # not a word of the answer
        assert closed.code == 1008 and GUARD in closed.details
        assert checks(gateway, "input", "block") == 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_session_blocked_more_than_max_blocks_times_is_closed(tmp_path, launcher):
    with (
        SimulatorThread(server=GeminiLiveSimulator(seed=34)) as upstream,
        LiveGateway(
            upstream.url, tmp_path, launcher, {"gateway_policy": guarded_policy(tmp_path, 1), **LOGGED}
        ) as gateway,
    ):

        async def session() -> tuple[errors.ClientError, errors.APIError]:
            config = types.LiveConnectConfig(response_modalities=[types.Modality.TEXT])
            async with client(gateway).aio.live.connect(model="models/gemini-live-blocks", config=config) as live:
                with pytest.raises(errors.ClientError) as first:
                    await turn(live, "project falcon?")
                await turn(live, "What's the weather?")
                with contextlib.suppress(errors.ClientError):  # the error may come before the close
                    await turn(live, "project falcon!")
                return first.value, (await until_closed(live))[1]

        first, closed = asyncio.run(session())
        assert first.code == 400
        assert closed.code == 1008 and f"'{GUARD}' blocked this session 2 times" in closed.details
        assert SOCKETS_CHOSEN in gateway.log()
        assert checks(gateway, "input", "block") == 2
