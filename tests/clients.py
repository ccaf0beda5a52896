"""Real Realtime clients driving sessions through the gateway: the openai SDK and plain websockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import websockets
from openai import AsyncOpenAI

RESPONSE_DONE = "response.done"


@contextlib.contextmanager
def served_module(module: str, timeout: float = 10) -> Iterator[str]:
    """`python -m <module> --port 0` as a user runs a simulator: yields the URL it prints, then
    checks that Ctrl-C (SIGINT) stops it cleanly."""
    command = [sys.executable, "-m", module, "--port", "0", "--seed", "1"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[-1]
            assert url.startswith("http://127.0.0.1:")
            yield url
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=timeout) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def wait_until[T](probe: Callable[[], T], timeout: float = 15) -> T:
    """Polls `probe` until it returns something true, within a deadline: a poll, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{probe} still false after {timeout}s")
        time.sleep(0.02)
    return result


async def until[T](probe: Callable[[], Awaitable[T]], timeout: float = 15) -> T:
    """`wait_until` inside an event loop: the probe awaited, the loop free between tries."""
    deadline = time.monotonic() + timeout
    while not (result := await probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{probe} still false after {timeout}s")
        await asyncio.sleep(0.02)
    return result


def write_padded(path: Path, text: str, size: int) -> Path:
    """`text` followed by comment lines up to `size` bytes: as valid as `text`, as large as asked."""
    line = b"# " + b"padding " * 9 + b"\n"
    block = line * 10_000
    with open(path, "wb") as file:
        left = size - file.write(text.encode())
        for _ in range(left // len(block)):
            file.write(block)
        left %= len(block)
        file.write(line * (left // len(line)))
        if left % len(line):
            file.write(b"#" * (left % len(line) - 1) + b"\n")
    assert path.stat().st_size == size
    return path


def write_ledger(path: Path, spends: Iterable[tuple[str, int]], *, end: datetime | None = None) -> Path:
    """A usage ledger of one line per (client key label, tokens), a millisecond apart, the last at `end` (now)."""
    lines = [(label, tokens) for label, tokens in spends]
    last = end or datetime.now(UTC)
    with open(path, "w") as file:
        for i, (label, tokens) in enumerate(lines):
            at = (last - timedelta(milliseconds=len(lines) - 1 - i)).isoformat(timespec="milliseconds")
            record = {"time": at, "flow_id": f"f{i}", "route": "Completions", "client_key": label}
            record |= {"status": "completed", "input_tokens": tokens, "output_tokens": 0, "cost_usd": None}
            file.write(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def websocket_base(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1)


async def respond(ws: Any, count: int = 1, timeout: float | None = None) -> dict[str, Any]:
    """`response.create`, then the session read to its `response.done`, `count` times, as a client
    that waits for each answer does; the last response.done (each read within `timeout` seconds)."""
    event: dict[str, Any] = {}
    for _ in range(count):
        await ws.send(json.dumps({"type": "response.create"}))
        while (event := json.loads(await asyncio.wait_for(ws.recv(), timeout)))["type"] != "response.done":
            pass
    return event


async def sdk_session(
    gateway_url: str,
    model: str,
    *,
    beta: bool = False,
    metadata: Iterable[Mapping[str, str]] = ({}, {}, {}),
    concurrent: bool = False,
    api_key: str = "sk-client-own-key",
) -> list[Any]:
    """One session with the official SDK (GA `client.realtime` or `client.beta.realtime`).

    Creates one response per metadata entry, one after another, or all at once when
    `concurrent`; returns the `response.done` events the client received.
    """
    client = AsyncOpenAI(api_key=api_key, websocket_base_url=websocket_base(gateway_url) + "/v1")
    connect = client.beta.realtime.connect if beta else client.realtime.connect
    metadata = list(metadata)
    done: list[Any] = []
    async with connect(model=model) as connection:
        for i, meta in enumerate(metadata):
            await connection.response.create(response={"metadata": dict(meta)} if meta else None)  # type: ignore[arg-type]
            if not concurrent or i == len(metadata) - 1:
                async for event in connection:
                    if event.type == RESPONSE_DONE:
                        done.append(event)
                        if len(done) == (len(metadata) if concurrent else i + 1):
                            break
    return done


async def raw_session(
    url: str,
    client_events: Iterable[Mapping[str, Any]],
    *,
    until: str = RESPONSE_DONE,
    count: int = 1,
    compression: str | None = "deflate",
    headers: Mapping[str, str] | None = None,
    subprotocols: list[str] | None = None,
) -> tuple[list[str | bytes], list[str]]:
    """A plain `websockets` client (offering permessage-deflate by default).

    Sends the client events, then reads until `count` events of type `until` arrived. Returns the
    frames received and the extensions negotiated on the client's leg.
    """
    received: list[str | bytes] = []
    async with websockets.connect(
        url,
        compression=compression,
        additional_headers=dict(headers or {}),
        subprotocols=subprotocols,  # type: ignore[arg-type]
        max_size=None,
    ) as ws:
        extensions = [e.name for e in ws.protocol.extensions]
        for event in client_events:
            await ws.send(json.dumps(event))
        seen = 0
        while seen < count:
            frame = await asyncio.wait_for(ws.recv(), timeout=20)
            received.append(frame)
            if isinstance(frame, str) and frame.startswith("{") and _type_of(frame) == until:
                seen += 1
    return received, extensions


def _type_of(frame: str) -> str | None:
    try:
        return json.loads(frame).get("type")
    except (ValueError, AttributeError, RecursionError):
        return None
