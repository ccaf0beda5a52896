"""A simulated Gemini Live upstream (`BidiGenerateContent`), for tests and the demo.

A real WebSocket server on localhost speaking enough of the Live protocol for Google's
`google-genai` SDK (`client.aio.live.connect`) to hold sessions through the gateway, on AI
Studio's paths and Vertex AI's. It answers `setup` with `setupComplete`, and each client turn
(`clientContent` with `turnComplete`, or `realtimeInput` ending with `audioStreamEnd`) with a model
turn: `serverContent.modelTurn` parts (base64 PCM audio as `inlineData`, or text), then
`turnComplete` with the turn's `usageMetadata`, spelled as each service spells it (Vertex:
`candidatesTokenCount`), zeros left out as proto3 JSON does. Messages go out in binary or text
frames (`frames=`), as Google's servers send either.

The ledger holds each turn's billable usage, the last report of the turn, once. How the reports
are sent can be asked for per turn with words in the client's text (`sim_usage=repeated`:
cumulative reports on every audio message of the turn; `sim_usage=late`: the report after
`turnComplete`; `sim_interrupt=1`: the turn is cut off by `interrupted`; `sim_close=1`: the
upstream closes after a report without completing the turn; `sim_function_call=NAME`: the model
calls that function, `toolCall`, and answers the client's `toolResponse` with the rest of the
turn, whose one report covers both). A setup asking for `inputAudioTranscription` gets each audio
turn transcribed (`inputTranscription`, USER_TRANSCRIPT) before the answer; one asking for
`outputAudioTranscription` gets the answer's words (`outputTranscription`, one per audio message).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ai_gateway_tools.simulators.realtime import Handshake, SentUsage
from ai_gateway_tools.simulators.served import Served, command_line

AI_STUDIO_PATH = "/ws/google.ai.generativelanguage.{version}.GenerativeService.{method}"
VERTEX_PATH = "/ws/google.cloud.aiplatform.{version}.LlmBidiService/BidiGenerateContent"
KIND = "gemini_turn"
FRAMES = ("binary", "text", "alternate")
OUTPUT_AUDIO_MIME = "audio/pcm;rate=24000"
MAX_CLIENT_FRAME = 16 * 2**20

_DIRECTIVE = re.compile(r"\bsim_(usage|interrupt|close|function_call)=(\w+)")
_WORDS = ["Hello", "from", "the", "simulated", "Gemini"]
USER_TRANSCRIPT = "What is the weather like?"  # what every audio turn is transcribed as
CALL_ARGUMENTS = {"city": "Paris", "unit": "celsius"}


@dataclass
class _Session:
    id: str
    ws: ServerConnection
    vertex: bool
    model: str = "unknown"
    response_modalities: tuple[str, ...] = ("AUDIO",)
    transcribe_input: bool = False
    transcribe_output: bool = False
    calls: int = 0  # function calls made
    sent: int = 0  # messages sent, for alternating frame types


@dataclass(frozen=True)
class _Turn:
    usage: str = "with_complete"  # with_complete, repeated, late
    interrupt: bool = False
    close: bool = False
    function_call: str | None = None


def model_label(model: str) -> str:
    """The model as the gateway labels it: without its `models/` (or Vertex resource) prefix."""
    return model.rpartition("models/")[2] or model


def _field(obj: dict[str, Any], name: str) -> Any:
    """A field by its JSON name or its proto name (`clientContent`, `client_content`): Google accepts both."""
    snake = re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)
    return obj.get(name, obj.get(snake))


def _turn_plan(text: str) -> _Turn:
    directives = dict(_DIRECTIVE.findall(text))
    return _Turn(
        usage=directives.get("usage", "with_complete"),
        interrupt=directives.get("interrupt") == "1",
        close=directives.get("close") == "1",
        function_call=directives.get("function_call"),
    )


def _details(counts: dict[str, int]) -> list[dict[str, Any]]:
    """A modality list as Google sends it: zero counts leave `tokenCount` out."""
    return [{"modality": m} | ({"tokenCount": n} if n else {}) for m, n in counts.items()]


def turn_usage(rng: random.Random, audio: bool, vertex: bool) -> dict[str, Any]:
    """One turn's usageMetadata, internally consistent (cache within prompt, details adding up)."""
    prompt = {"TEXT": rng.randint(1, 3000), "AUDIO": rng.randint(0, 3000) if audio else 0}
    if rng.random() < 0.3:
        prompt[rng.choice(("IMAGE", "VIDEO"))] = rng.randint(1, 1500)
    response = {"TEXT": rng.randint(1, 300)} | ({"AUDIO": rng.randint(1, 3000)} if audio else {})
    usage: dict[str, Any] = {"promptTokenCount": sum(prompt.values())}
    if rng.random() < 0.5:
        cached = {m: rng.randint(0, n) for m, n in prompt.items()}
        usage["cachedContentTokenCount"] = sum(cached.values())
        usage["cacheTokensDetails"] = _details(cached)
    spelling = "candidates" if vertex else "response"
    usage[f"{spelling}TokenCount"] = sum(response.values())
    if rng.random() < 0.3:
        tool = {"TEXT": rng.randint(1, 500)}
        usage["toolUsePromptTokenCount"] = sum(tool.values())
        usage["toolUsePromptTokensDetails"] = _details(tool)
    if rng.random() < 0.3:
        usage["thoughtsTokenCount"] = rng.randint(1, 800)
    usage["totalTokenCount"] = sum(
        usage.get(k, 0)
        for k in ("promptTokenCount", f"{spelling}TokenCount", "toolUsePromptTokenCount", "thoughtsTokenCount")
    )
    usage["promptTokensDetails"] = _details(prompt)
    usage[f"{spelling}TokensDetails"] = _details(response)
    return usage


def _partial(usage: dict[str, Any], fraction: float) -> dict[str, Any]:
    """An earlier cumulative report of the same turn: every count scaled down."""

    def scale(value: Any) -> Any:
        if isinstance(value, int):
            return int(value * fraction)
        if isinstance(value, list):
            return [scale(v) for v in value]
        if isinstance(value, dict):
            return {k: scale(v) for k, v in value.items()}
        return value

    return scale(usage)


@dataclass
class GeminiLiveSimulator(Served):
    """The simulated upstream; `async with GeminiLiveSimulator() as sim` starts and stops it."""

    host: str = "127.0.0.1"
    port: int = 0
    seed: int = 0
    frames: str = "alternate"
    audio_messages: int = 4
    audio_bytes: int = 9600
    ledger: list[SentUsage] = field(default_factory=list)
    handshakes: list[Handshake] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.frames not in FRAMES:
            raise ValueError(f"frames must be one of {', '.join(FRAMES)}")
        self._rng = random.Random(self.seed)
        self._audio = base64.b64encode(random.Random(self.seed).randbytes(self.audio_bytes)).decode()
        self._ids = itertools.count(1)
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def usage_for(self, model: str) -> list[SentUsage]:
        return [u for u in self.ledger if u.request_model == model_label(model)]

    async def start(self) -> None:
        self.listening(
            await serve(
                self._serve, self.host, self.port, process_request=self._check_handshake, max_size=MAX_CLIENT_FRAME
            )
        )

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        accepted = url.path.endswith(("BidiGenerateContent", "BidiGenerateContentConstrained"))
        self.handshakes.append(
            Handshake(
                path=url.path,
                query=dict(parse_qsl(url.query, keep_blank_values=True)),
                headers=[(name.lower(), value) for name, value in request.headers.raw_items()],
                session_id=f"live_{connection.id.hex[:16]}" if accepted else None,
            )
        )
        return None if accepted else connection.respond(HTTPStatus.NOT_FOUND, "not a Live API path\n")

    async def _serve(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        session = _Session(f"live_{ws.id.hex[:16]}", ws, vertex="aiplatform" in ws.request.path)
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                try:
                    message = json.loads(frame)
                except ValueError:
                    await ws.close(1007, "Request contains an invalid argument.")
                    return
                await self._receive(session, message if isinstance(message, dict) else {})

    async def _receive(self, session: _Session, message: dict[str, Any]) -> None:
        if isinstance(setup := _field(message, "setup"), dict):
            session.model = str(setup.get("model") or "unknown")
            modalities = _field(_field(setup, "generationConfig") or {}, "responseModalities") or ["AUDIO"]
            session.response_modalities = tuple(modalities)
            session.transcribe_input = _field(setup, "inputAudioTranscription") is not None
            session.transcribe_output = _field(setup, "outputAudioTranscription") is not None
            await self._send(session, {"setupComplete": {}})
        elif isinstance(content := _field(message, "clientContent"), dict):
            if _field(content, "turnComplete"):
                text = " ".join(
                    part.get("text", "")
                    for turn in content.get("turns") or []
                    for part in (turn.get("parts") or [])
                    if isinstance(part, dict)
                )
                await self._respond(session, _turn_plan(text))
        elif isinstance(realtime := _field(message, "realtimeInput"), dict) and (
            _field(realtime, "audioStreamEnd") or _field(realtime, "activityEnd") is not None
        ):
            if session.transcribe_input:
                await self._send(session, {"serverContent": {"inputTranscription": {"text": USER_TRANSCRIPT}}})
            await self._respond(session, _Turn())
        elif isinstance(_field(message, "toolResponse"), dict):
            await self._respond(session, _Turn())  # the rest of the turn that called

    async def _respond(self, session: _Session, plan: _Turn) -> None:
        if plan.function_call is not None:
            session.calls += 1
            call = {"id": f"fc_{session.calls}", "name": plan.function_call, "args": CALL_ARGUMENTS}
            await self._send(session, {"toolCall": {"functionCalls": [call]}})
            return
        audio = "AUDIO" in session.response_modalities
        usage = turn_usage(self._rng, audio, session.vertex)
        status = "cancelled" if plan.interrupt else ("incomplete" if plan.close else "completed")
        entry = SentUsage(session.id, KIND, model_label(session.model), model_label(session.model), status, usage)
        self.ledger.append(entry)  # before sending, so that no reader sees usage the ledger lacks
        parts = self.audio_messages if audio else len(_WORDS)
        for n in range(parts):
            part = (
                {"inlineData": {"mimeType": OUTPUT_AUDIO_MIME, "data": self._audio}}
                if audio
                else {"text": _WORDS[n % len(_WORDS)] + " "}
            )
            message: dict[str, Any] = {"serverContent": {"modelTurn": {"parts": [part]}}}
            if plan.usage == "repeated":
                message["usageMetadata"] = _partial(usage, (n + 1) / (parts + 1))
            await self._send(session, message)
            if audio and session.transcribe_output:
                word = _WORDS[n % len(_WORDS)] + (" " if n + 1 < parts else "")
                await self._send(session, {"serverContent": {"outputTranscription": {"text": word}}})
            if plan.interrupt and n == 0:
                await self._send(session, {"serverContent": {"interrupted": True}})
                break
        if plan.close:
            await self._send(session, {"usageMetadata": usage})
            await session.ws.close(1011, "simulated upstream failure")
            return
        await self._send(session, {"serverContent": {"generationComplete": True}})
        if plan.usage == "late":
            await self._send(session, {"serverContent": {"turnComplete": True}})
            await self._send(session, {"usageMetadata": usage})
        else:
            await self._send(session, {"serverContent": {"turnComplete": True}, "usageMetadata": usage})

    async def _send(self, session: _Session, message: dict[str, Any]) -> None:
        data = json.dumps(message)
        binary = self.frames == "binary" or (self.frames == "alternate" and session.sent % 2 == 0)
        session.sent += 1
        await session.ws.send(data.encode() if binary else data)
        await asyncio.sleep(0)


def main(argv: Sequence[str] | None = None) -> None:
    def frames(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--frames", choices=FRAMES, default="alternate", help="frame type of server messages")

    def make(args: argparse.Namespace) -> GeminiLiveSimulator:
        return GeminiLiveSimulator(host=args.host, port=args.port, seed=args.seed, frames=args.frames)

    command_line("Gemini Live", make, argv, frames)


if __name__ == "__main__":
    main()
