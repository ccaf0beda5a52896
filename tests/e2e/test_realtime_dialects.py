"""OpenAI-compatible realtime servers end to end: a scripted upstream sends frames shaped as xAI's
voice API, Alibaba's Qwen/DashScope realtime and vLLM's /v1/realtime send them; a plain websockets
client drives the session through the real gateway; /metrics must equal what was sent, with no
parse errors."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve

from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.harness import assert_metered_exactly as metered_exactly
from ai_gateway_tools.harness import parse_errors as count_parse_errors
from ai_gateway_tools.simulators.realtime import SentUsage, SimulatorThread

POLICIES = Path(__file__).resolve().parents[2] / "policies"
PARSE_ERRORS = "agentgateway_gateway_parse_errors_total"
AUDIO = base64.b64encode(bytes(9600)).decode()


class ScriptedUpstream:
    """Sends `greeting` on connect, then the next script step after each client frame."""

    def __init__(self, greeting: Sequence[dict[str, Any]], steps: Sequence[Sequence[dict[str, Any]]]) -> None:
        self.greeting, self.steps = greeting, list(steps)
        self.headers: list[tuple[str, str]] = []
        self.port = 0
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await serve(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.headers = [(name.lower(), value) for name, value in ws.request.headers.raw_items()]
        for event in self.greeting:
            await ws.send(json.dumps(event))
        steps = iter(self.steps)
        async for _ in ws:
            for event in next(steps, ()):
                await ws.send(json.dumps(event))


def run_session(
    url: str, client_events: Sequence[dict[str, Any]], until: str, headers: dict[str, str] | None = None
) -> None:
    async def session() -> None:
        async with websockets.connect(url, additional_headers=headers or {}) as ws:
            for event in client_events:
                await ws.send(json.dumps(event))
            while json.loads(await asyncio.wait_for(ws.recv(), 20)).get("type") != until:
                pass

    asyncio.run(session())


def assert_metered_exactly(gateway: GatewayProcess, sent: list[SentUsage], system: str) -> None:
    metered_exactly(gateway.metrics_url, sent[0].request_model, sent, system=system)
    assert count_parse_errors(gateway.metrics_url) == 0


def test_qwen_dashscope_event_id_first_frames_and_tokens_details_spelling(tmp_path):
    model, snapshot = "qwen3-omni-flash-realtime", "qwen3-omni-flash-realtime-2025-09-15"
    usage = {
        "total_tokens": 1517,
        "input_tokens": 1102,
        "output_tokens": 415,
        "input_tokens_details": {"text_tokens": 302, "audio_tokens": 800, "cached_tokens": 256},
        "output_tokens_details": {"text_tokens": 37, "audio_tokens": 378},
    }
    response = {"id": "resp_q1", "object": "realtime.response", "status": "in_progress", "output": []}
    where = {"response_id": "resp_q1", "item_id": "item_q1", "output_index": 0, "content_index": 0}
    upstream = ScriptedUpstream(
        [{"event_id": "event_1", "type": "session.created", "session": {"id": "sess_q", "object": "realtime.session",
                                                                         "model": snapshot, "modalities": ["text", "audio"]}}],
        [[
            {"event_id": "event_2", "type": "response.created", "response": response},
            *({"event_id": f"event_a{i}", "type": "response.audio.delta", **where, "delta": AUDIO} for i in range(3)),
            {"event_id": "event_3", "type": "response.audio_transcript.delta", **where, "delta": "Hi"},
            {"event_id": "event_4", "type": "response.done", "response": {**response, "status": "completed", "usage": usage}},
        ]],
    )  # fmt: skip
    policy = tmp_path / "qwen.yaml"
    policy.write_text("provider: alibaba.dashscope\nroutes:\n  /realtime: Realtime\n")
    with SimulatorThread(server=upstream), GatewayProcess(upstream.url, options={"gateway_policy": str(policy)}) as gw:
        url = f"{gw.url.replace('http', 'ws', 1)}/api-ws/v1/realtime?model={model}"
        run_session(url, [{"event_id": "event_c1", "type": "response.create"}], "response.done")
        # Requires leading-type detection that does not depend on key order only for speed: a frame
        # not starting with its type is decoded in full, so its usage is read either way.
        assert_metered_exactly(
            gw, [SentUsage("sess_q", "qwen_response", model, snapshot, "completed", usage)], "alibaba.dashscope"
        )
        modal = select(scrape(gw.metrics_url), gen_ai_request_model=model, gen_ai_token_modality="audio")
        assert sum(modal.values()) == 800 + 378  # the modality split survives the other spelling


def test_xai_voice_session_with_the_xai_policy():
    model = "grok-voice-t1"
    usage = {
        "total_tokens": 420,
        "input_tokens": 300,
        "output_tokens": 120,
        "input_token_details": {"text_tokens": 100, "audio_tokens": 200, "cached_tokens": 0},
        "output_token_details": {"text_tokens": 20, "audio_tokens": 100},
    }
    response = {"id": "resp_x1", "object": "realtime.response", "status": "in_progress"}
    upstream = ScriptedUpstream(
        [
            {"type": "conversation.created", "event_id": "e0", "conversation": {"id": "conv_1", "object": "realtime.conversation"}},
            {"type": "session.created", "event_id": "e1", "session": {"id": "s_x", "model": model, "voice": "Ara"}},
        ],
        [[
            {"type": "response.created", "event_id": "e2", "response": response},
            {"type": "response.output_audio.delta", "event_id": "e3", "response_id": "resp_x1", "delta": AUDIO},
            {"type": "response.done", "event_id": "e4", "response": {**response, "status": "completed", "usage": usage}},
        ]],
    )  # fmt: skip
    env = {"XAI_API_KEY": "xai-upstream-SECRET"}
    options = {"gateway_policy": str(POLICIES / "xai.yaml")}
    with SimulatorThread(server=upstream), GatewayProcess(upstream.url, options=options, env=env) as gw:
        url = f"{gw.url.replace('http', 'ws', 1)}/v1/realtime?model={model}"
        run_session(url, [{"type": "response.create"}], "response.done", {"Authorization": "Bearer xai-client-key"})
        assert_metered_exactly(gw, [SentUsage("s_x", "response", model, model, "completed", usage)], "x_ai")
    assert [v for n, v in upstream.headers if n == "authorization"] == ["Bearer xai-upstream-SECRET"]
    assert "xai-upstream-SECRET" not in gw.log()


def test_vllm_session_created_without_session_and_transcription_done_usage(tmp_path):
    model = "mistralai/Voxtral-Mini-4B-Realtime-t1"
    usage = {"prompt_tokens": 188, "total_tokens": 203, "completion_tokens": 15, "prompt_tokens_details": None}
    upstream = ScriptedUpstream(
        [{"type": "session.created", "id": "sess-5f1c", "created": 1767225600}],
        [
            [],  # session.update
            [],  # input_audio_buffer.append
            [
                {"type": "transcription.delta", "delta": "Hello"},
                {"type": "transcription.delta", "delta": " world"},
                {"type": "transcription.done", "text": "Hello world", "usage": usage},
            ],
        ],
    )
    policy = tmp_path / "vllm.yaml"
    policy.write_text("provider: vllm\nroutes:\n  /v1/realtime: Realtime\n")
    with SimulatorThread(server=upstream), GatewayProcess(upstream.url, options={"gateway_policy": str(policy)}) as gw:
        url = f"{gw.url.replace('http', 'ws', 1)}/v1/realtime?model={model}"
        events = [
            {"type": "session.update", "model": model},
            {"type": "input_audio_buffer.append", "audio": AUDIO},
            {"type": "input_audio_buffer.commit", "final": True},
        ]
        run_session(url, events, "transcription.done")
        assert_metered_exactly(
            gw, [SentUsage("sess-5f1c", "vllm_transcription", model, "unknown", "completed", usage)], "vllm"
        )
