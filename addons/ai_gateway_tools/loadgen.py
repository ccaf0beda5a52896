"""Realistic Realtime voice traffic for the benchmark: concurrent sessions of audio in both directions.

Each session takes turns as a voice agent does: the client streams microphone audio
(`input_audio_buffer.append`, base64 PCM16 at 24 kHz), asks for a response, and the upstream
answers with audio deltas, transcript deltas and a `response.done` carrying usage. Clients are
plain `websockets` clients, which offer permessage-deflate as browsers and Node's `ws` do.

The upstream is the project's simulator, run in a child process: in this process it would
share the GIL with the clients, and a thread waiting for the GIL (up to 5 ms) would show up as
relay latency. Its ledger comes back over a pipe for the accounting checks.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from ai_gateway_tools.simulators.realtime import PCM16_BYTES_PER_SECOND, SentUsage, Simulator

RECEIVE_TIMEOUT = 30.0  # a relay that stalls this long has failed; the bench must not hang on it
_TYPE = re.compile(r'\s*\{\s*"type"\s*:\s*"([a-z0-9_.]+)"')


def pcm16_bytes(milliseconds: float) -> int:
    """Bytes of 24 kHz mono PCM16 audio in `milliseconds` (100 ms: 4800 bytes, 6400 base64 chars)."""
    return int(PCM16_BYTES_PER_SECOND * milliseconds / 1000) // 2 * 2


def audio_base64(rng: random.Random, milliseconds: float) -> str:
    """Noise rather than silence, so that compression sees audio-like entropy."""
    return base64.b64encode(rng.randbytes(pcm16_bytes(milliseconds))).decode()


@dataclass(frozen=True)
class Traffic:
    """The shape of one turn of a voice session."""

    appends: int = 10  # client audio appends per turn
    append_ms: float = 100  # audio per append
    append_interval: float = 0.0  # seconds between appends: 0 sends as fast as the relay takes them
    audio_deltas: int = 24  # server audio deltas per response
    delta_interval: float = 0.0  # seconds the upstream waits between deltas: 0 sends them back to back

    def response_create(self) -> str:
        """The simulator sends `sim_deltas` audio deltas for this response, `sim_delta_ms` apart (its
        per-response overrides)."""
        metadata = {"sim_deltas": str(self.audio_deltas)}
        if self.delta_interval:
            metadata["sim_delta_ms"] = f"{self.delta_interval * 1000:g}"
        return json.dumps({"type": "response.create", "response": {"metadata": metadata}})

    def append(self, rng: random.Random) -> str:
        return json.dumps({"type": "input_audio_buffer.append", "audio": audio_base64(rng, self.append_ms)})


@dataclass
class LoadStats:
    """What the clients sent and received; frames and bytes count both directions."""

    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # response.create to each frame of its response
    usages: list[str] = field(default_factory=list)  # usage of every response.done received, as canonical JSON
    server_frames: int = 0  # frames received, session.created included
    sessions: int = 0  # sessions whose handshake succeeded
    lateness: list[float] = field(default_factory=list)  # how late each paced append went out: the client's own error
    failures: list[str] = field(default_factory=list)  # with keep_going: why a session ended early

    def count(self, frame: str | bytes) -> None:
        self.frames += 1
        self.bytes += len(frame)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


def canonical_usage(usage: Any) -> str:
    return json.dumps(usage, sort_keys=True)


def event_type(frame: str | bytes) -> str | None:
    """The leading `type` of a server event, read from its first bytes: deltas are never decoded."""
    head = frame[:96] if isinstance(frame, str) else frame[:96].decode(errors="replace")
    match = _TYPE.match(head)
    return match.group(1) if match else None


class Stop:
    """When sessions stop starting turns: a deadline, a byte budget, or a number of turns each.

    A session always finishes the turn it is in, so every response.done the upstream ledgered
    has reached the client (and so passed the gateway) before the connection closes.
    """

    def __init__(self, seconds: float | None = None, megabytes: float | None = None, turns: int | None = None) -> None:
        if seconds is None and megabytes is None and turns is None:
            raise ValueError("a load needs a bound: seconds, megabytes or turns")
        self.deadline = None if seconds is None else time.perf_counter() + seconds
        self.max_bytes = None if megabytes is None else megabytes * 1e6
        self.turns = turns

    def reached(self, stats: LoadStats, turns: int) -> bool:
        return (
            (self.deadline is not None and time.perf_counter() >= self.deadline)
            or (self.max_bytes is not None and stats.bytes >= self.max_bytes)
            or (self.turns is not None and turns >= self.turns)
        )


async def drive(
    http_url: str,
    model: str,
    traffic: Traffic,
    stop: Stop,
    *,
    sessions: int = 1,
    seed: int = 0,
    spread: float = 0.0,
    after_session: Callable[[int], Awaitable[None]] | None = None,
    headers: Mapping[str, str] | None = None,
    compression: str | None = "deflate",
    keep_going: bool = False,
) -> LoadStats:
    """Run `sessions` voice sessions against `http_url` until `stop`.

    Concurrent, their starts spread evenly over `spread` seconds (paced sessions that start
    together stay in step, and their responses would all burst at once); or one after another
    when `after_session` is given: it is awaited after the n-th session closed, with nothing else
    in flight (memory is sampled there). `headers` go with every handshake (a proxy's key);
    `compression=None` offers no permessage-deflate. With `keep_going`, a session that fails (refused,
    closed, stalled) is recorded in `failures` and the others go on: a capacity ramp measures overload.
    """
    stats = LoadStats()
    url = http_url.replace("http://", "ws://", 1) + f"/v1/realtime?model={model}"
    append = traffic.append(random.Random(seed))
    started = time.perf_counter()

    async def session(delay: float = 0.0) -> None:
        try:
            await _session(url, traffic, append, stop, stats, delay, headers, compression)
        except (OSError, TimeoutError, WebSocketException) as e:
            if not keep_going:
                raise
            stats.failures.append(f"{type(e).__name__}: {e}")

    if after_session is not None:
        for n in range(1, sessions + 1):
            await session()
            await after_session(n)
    else:
        async with asyncio.TaskGroup() as group:
            for n in range(sessions):
                group.create_task(session(delay=n * spread / sessions))
    stats.seconds = time.perf_counter() - started
    return stats


async def _session(
    url: str,
    traffic: Traffic,
    append: str,
    stop: Stop,
    stats: LoadStats,
    delay: float = 0,
    headers: Mapping[str, str] | None = None,
    compression: str | None = "deflate",
) -> None:
    await asyncio.sleep(delay)
    async with connect(url, max_size=None, additional_headers=headers, compression=compression) as ws:
        await _receive_until(ws, "session.created", stats)
        stats.sessions += 1
        turns = 0
        while not stop.reached(stats, turns):
            await _turn(ws, traffic, append, stats)
            turns += 1


async def _turn(ws: ClientConnection, traffic: Traffic, append: str, stats: LoadStats) -> None:
    """Paced appends go out on the clock (a late one does not delay the next), each one's lateness recorded."""
    start = time.perf_counter()
    for n in range(traffic.appends):
        if traffic.append_interval:
            late = time.perf_counter() - (start + n * traffic.append_interval)
            if late < 0:
                await asyncio.sleep(-late)
                late = time.perf_counter() - (start + n * traffic.append_interval)
            stats.lateness.append(late)
        await ws.send(append)
        stats.count(append)
    if traffic.append_interval:  # the last append's audio plays out before the user stops speaking
        await asyncio.sleep(max(0.0, start + traffic.appends * traffic.append_interval - time.perf_counter()))
    create = traffic.response_create()
    sent = time.perf_counter()
    await ws.send(create)
    stats.count(create)
    done = await _receive_until(ws, "response.done", stats, since=sent, interval=traffic.delta_interval)
    stats.usages.append(canonical_usage(json.loads(done)["response"]["usage"]))


async def _receive_until(
    ws: ClientConnection, wanted: str, stats: LoadStats, since: float | None = None, interval: float = 0.0
) -> str | bytes:
    """Reads server frames up to the first of type `wanted`; each frame's delay since `since` is a latency
    sample. With deltas paced `interval` apart, the n-th delta is due n - 1 intervals after the first, and
    response.done with the last: its delay is counted from when it was due."""
    deltas = 0
    while True:
        frame = await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT)
        received = time.perf_counter()
        kind = event_type(frame)
        if since is not None:
            deltas += kind is not None and kind.endswith(".delta")
            stats.latencies.append(received - since - interval * max(0, deltas - 1))
        stats.count(frame)
        stats.server_frames += 1
        if kind == wanted:
            return frame


class UpstreamProcess:
    """The simulator in a child process; `with UpstreamProcess(...) as upstream` starts and stops it.

    The child speaks JSON lines: it prints its URL, then answers each model name read from stdin
    with that model's ledger; end of input stops it, so it also stops when this process dies.
    `uvloop=True` runs it on uvloop, a cheaper upstream for a load that must not be the bottleneck.
    """

    def __init__(self, uvloop: bool = False, **simulator_kwargs: Any) -> None:
        self.command = [sys.executable, "-m", __name__, json.dumps(simulator_kwargs), *(["uvloop"] if uvloop else [])]
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def ledger(self, model: str) -> list[SentUsage]:
        """Every usage object the upstream sent to sessions that requested `model`."""
        assert self.process is not None and self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(model + "\n")
        self.process.stdin.flush()
        return [SentUsage(**entry) for entry in json.loads(self.process.stdout.readline())]

    def __enter__(self) -> UpstreamProcess:
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            self.process.wait(10)
            raise RuntimeError(f"the simulated upstream did not start (exit code {self.process.returncode})")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _serve_upstream(simulator_kwargs: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    async with Simulator(**simulator_kwargs) as simulator:
        print(simulator.url, flush=True)
        while model := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            print(json.dumps([dataclasses.asdict(entry) for entry in simulator.usage_for(model)]), flush=True)


def event_loop_factory(uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """For asyncio.run(loop_factory=…): uvloop's, or None for asyncio's own."""
    if not uvloop:
        return None
    import uvloop as module

    return module.new_event_loop


if __name__ == "__main__":
    asyncio.run(_serve_upstream(json.loads(sys.argv[1])), loop_factory=event_loop_factory("uvloop" in sys.argv[2:]))
