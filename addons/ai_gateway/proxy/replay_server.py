"""The upstream `gateway_replay` points Realtime sessions at: a WebSocket server on loopback, in the
gateway's process, that answers each client from a recording.

The recording's server events are cut into answers, each released by what caused it in the
recording: the connection (session.created), a client event (a `response.create`, a commit, a
session.update, a cancel...: the client's next event of that type releases the next answer of
that type), or, under server VAD, the user's audio (speech started and stopped once the client
has appended as much audio as the recording had then). A response's events stay with the answer
that started it, wherever other events fell between them. Each answer's events go out at their
recorded offsets from its cause (`recorded` pacing) or at once (`fast`). A `response.create`
the recording has no answer left for gets an `error` event, so the client is not left waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ai_gateway.protocols.json_events import decode_json
from ai_gateway.protocols.openai_realtime import RESPONSE_CREATE, error_event
from ai_gateway.proxy.recording import Message, Recording, base64_size

APPEND = "input_audio_buffer.append"
SPEECH_EVENTS = frozenset({"input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"})
OPEN, AUDIO = "open", "audio"  # the causes that are not a client event
MAX_CLIENT_MESSAGE = 16 * 2**20  # OpenAI accepts audio appends up to 15 MiB

# websockets logs every connection at INFO: the gateway's log already has mitmproxy's line for each.
connection_log = logging.getLogger(f"{__name__}.connections")
connection_log.setLevel(logging.WARNING)


@dataclass
class Answer:
    """Server events the recording sent for one cause; `threshold`: for an audio cause, the bytes
    the client had appended when it came."""

    cause: str
    anchor: float  # the recorded time of the cause
    threshold: int = 0
    messages: list[Message] = field(default_factory=list)


def answers(messages: Iterable[Message]) -> list[Answer]:
    """The recording's server events cut into answers, in the order their causes came."""
    current = Answer(OPEN, 0.0)
    cut = [current]
    by_response: dict[str, Answer] = {}
    appended, appended_at = 0, None
    for message in messages:
        if message.from_client:
            if message.kind == APPEND:
                appended += message.audio_size
                appended_at = message.at
            else:
                current = Answer(message.kind or "?", message.at)
                cut.append(current)
            continue
        if message.kind in SPEECH_EVENTS:
            current = Answer(AUDIO, appended_at if appended_at is not None else message.at, appended)
            cut.append(current)
        if not cut[0].messages and current is cut[0]:
            current.anchor = message.at  # the first event goes as soon as the client connects
        response_id = _response_id(message.event)
        owner = by_response.setdefault(response_id, current) if response_id else current
        owner.messages.append(message)
    return cut


def _response_id(event: dict[str, Any] | None) -> str | None:
    if event is None:
        return None
    response = event.get("response")
    value = response.get("id") if isinstance(response, dict) else event.get("response_id")
    return value if isinstance(value, str) else None


class Player:
    """One client's replay: the answers released as its events call for them, each sent by a task of its own."""

    def __init__(self, recording: Recording, cut: list[Answer], ws: ServerConnection, fast: bool) -> None:
        self.recording = recording
        self.ws = ws
        self.fast = fast
        self.by_cause: dict[str, deque[Answer]] = defaultdict(deque)
        for answer in cut[1:]:
            if answer.cause != AUDIO:
                self.by_cause[answer.cause].append(answer)
        self.audio = deque(a for a in cut if a.cause == AUDIO)
        self.appended = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.release(cut[0])

    def client_message(self, content: str | bytes) -> None:
        data = content.encode() if isinstance(content, str) else content
        event = decode_json(data, limit=MAX_CLIENT_MESSAGE)
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == APPEND:
            audio = event.get("audio")  # type: ignore[union-attr]
            self.appended += base64_size(audio) if isinstance(audio, str) else 0
            while self.audio and self.audio[0].threshold <= self.appended:
                self.release(self.audio.popleft())
        elif isinstance(kind, str) and self.by_cause.get(kind):
            self.release(self.by_cause[kind].popleft())
        elif kind == RESPONSE_CREATE:
            message = f"replay: the recording {self.recording.source.name} has no response left to replay"
            self.send_later(error_event("replay_exhausted", message, data))

    def release(self, answer: Answer) -> None:
        task = asyncio.get_running_loop().create_task(self.play(answer, time.monotonic()))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def play(self, answer: Answer, started: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            for message in answer.messages:
                if not self.fast and (wait := started + message.at - answer.anchor - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await self.ws.send(self.recording.frame(message).decode(errors="replace"))

    def send_later(self, frame: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self.send(frame))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def send(self, frame: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(frame.decode())

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()


class ReplayServer:
    """The loopback server; `port` once started. Every connection replays the same recording."""

    def __init__(self, recording: Recording, fast: bool) -> None:
        self.recording = recording
        self.answers = answers(recording.messages)
        self.fast = fast
        self.server: Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.server = await serve(
            self.play,
            "127.0.0.1",
            0,
            compression=None,
            max_size=MAX_CLIENT_MESSAGE,
            select_subprotocol=_realtime,
            logger=connection_log,
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def play(self, ws: ServerConnection) -> None:
        player = Player(self.recording, self.answers, ws, self.fast)
        try:
            async for message in ws:
                player.client_message(message)
        except ConnectionClosed:
            pass
        finally:
            player.stop()


def _realtime(connection: ServerConnection, offered: list[Any]) -> Any:
    """Browsers offer `realtime` (and their key as a subprotocol): only `realtime` is chosen."""
    return "realtime" if "realtime" in offered else None
