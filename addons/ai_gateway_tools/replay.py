"""scripts/replay: a recorded Realtime session's client side, driven against any upstream, and what
the same conversation cost and how fast it was there, beside the recording's figures.

    scripts/replay RECORDING --upstream URL [--model M] [--pacing recorded|fast]

RECORDING is a `realtime.export` bundle or a flow file saved with `-w` (as `gateway_replay` reads
them). The recorded client events are sent again, the user's audio included (cut from the bundle's
user.wav), each once the upstream has answered as far as it had when the recording's client sent
it (as many `response.done`), at the recorded gaps or at once. The upstream is the real API
(`https://api.openai.com`, with OPENAI_API_KEY), another model (`--model gpt-realtime-mini`: what
would this have cost on the mini model?), the simulator, or a gateway. Both columns are worked
out the same way from the events and their times: tokens from each `response.done`, cost at the
gateway's prices for OpenAI (genai-prices), time to first token from the `response.create` (or the
end of the user's speech, for a response server VAD started) to the response's first delta. The
recording's times are the gateway's, the replay's this client's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import websockets

from ai_gateway.accounting.pricing import PriceCatalog, catalog_for
from ai_gateway.accounting.usage import DurationUsage, TokenUsage
from ai_gateway.protocols.openai_realtime import (
    AUDIO_COMMIT,
    RESPONSE_CREATE,
    RESPONSE_CREATED,
    RESPONSE_DONE,
    SESSION_CREATED,
    SESSION_EVENTS,
    SPEECH_STOPPED,
    TRANSCRIPTION_COMPLETED,
    read_response_done,
    read_session,
)
from ai_gateway.protocols.usage_fields import parse_transcription_usage
from ai_gateway.proxy.recording import Recording, RecordingError, load

PROG = "scripts/replay"
SYNC_EVENTS = (SESSION_CREATED, RESPONSE_DONE)  # how far the upstream has answered
DEFAULT_WAIT = 60.0

Timed = tuple[float, bool, dict[str, Any]]  # (wall-clock time, from the client, event)


@dataclass
class Turn:
    """One response: what started it, what it billed and cost, its time to first token."""

    cause: str
    status: str = "?"
    usage: TokenUsage | None = None
    cost: float | None = None
    ttft: float | None = None


@dataclass
class Figures:
    model: str | None
    turns: list[Turn]
    transcription_cost: float = 0.0

    @property
    def cost(self) -> float:
        return sum(t.cost or 0.0 for t in self.turns) + self.transcription_cost


def figures(events: Iterable[Timed], catalog: PriceCatalog) -> Figures:
    """Per response: tokens, cost and TTFT, from a session's events and their times."""
    out = Figures(None, [])
    transcription_model = None
    creates: deque[float] = deque()
    turn_end: tuple[float, str] | None = None
    started: dict[str, tuple[float, Turn]] = {}
    for at, from_client, event in events:
        kind, response_id = event.get("type"), _response_id(event)
        if from_client:
            if kind == RESPONSE_CREATE:
                creates.append(at)
            elif kind == AUDIO_COMMIT:
                turn_end = (at, "commit")
        elif kind in SESSION_EVENTS:
            session = read_session(event)
            out.model = session.model or out.model
            transcription_model = session.transcription_model or transcription_model
        elif kind == SPEECH_STOPPED:
            turn_end = (at, "server VAD")
        elif kind == RESPONSE_CREATED and response_id:
            cause = (creates.popleft(), RESPONSE_CREATE) if creates else turn_end or (at, "upstream")
            turn = Turn(cause[1])
            started[response_id] = (cause[0], turn)
            out.turns.append(turn)
        elif kind == TRANSCRIPTION_COMPLETED and transcription_model:
            with contextlib.suppress(ValueError, KeyError):
                usage = parse_transcription_usage(event["usage"])
                out.transcription_cost += _cost(catalog, transcription_model, usage) or 0.0
        elif response_id in started:
            begun, turn = started[response_id]
            if str(kind).endswith(".delta") and turn.ttft is None:
                turn.ttft = at - begun
            elif kind == RESPONSE_DONE:
                done = read_response_done(event)
                turn.status, turn.usage = done.status, done.usage if isinstance(done.usage, TokenUsage) else None
                turn.cost = _cost(catalog, out.model, turn.usage) if turn.usage is not None else None
    return out


def _cost(catalog: PriceCatalog, model: str | None, usage: TokenUsage | DurationUsage) -> float | None:
    """None for a model the catalog does not price."""
    return catalog.cost(model or "", usage)[0]


def _response_id(event: dict[str, Any]) -> str | None:
    response = event.get("response")
    value = response.get("id") if isinstance(response, dict) else event.get("response_id")
    return value if isinstance(value, str) else None


def recorded_events(recording: Recording) -> list[Timed]:
    return [(m.at, m.from_client, m.event) for m in recording.messages if m.event is not None]


async def drive(recording: Recording, upstream: str, model: str, fast: bool, wait: float) -> list[Timed]:
    """The recording's client events sent to the upstream as it answers; every event both ways, timed."""
    url = upstream.replace("http", "ws", 1).rstrip("/") + "/v1/realtime?" + urlencode({"model": model})
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timed: list[Timed] = []
    seen: Counter[str] = Counter()
    recorded: Counter[str] = Counter()
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        reader = asyncio.get_running_loop().create_task(_read(ws, timed, seen))
        previous: tuple[float, float] | None = None  # (recorded, sent) times of the last client event
        for message in recording.messages:
            if not message.from_client:
                if message.kind in SYNC_EVENTS:
                    recorded[message.kind] += 1
                continue
            await _until(lambda: all(seen[k] >= n for k, n in recorded.items()) or reader.done(), wait)
            if not fast and previous is not None:
                await asyncio.sleep(max(0.0, message.at - previous[0] - (time.monotonic() - previous[1])))
            await ws.send(recording.frame(message).decode(errors="replace"))
            previous = (message.at, time.monotonic())
            if message.event is not None:
                timed.append((time.time(), True, message.event))
        await _until(lambda: seen[RESPONSE_DONE] >= recorded[RESPONSE_DONE] or reader.done(), wait)
        reader.cancel()
    return timed


async def _read(ws: websockets.ClientConnection, timed: list[Timed], seen: Counter[str]) -> None:
    async for frame in ws:
        with contextlib.suppress(ValueError):
            event = json.loads(frame)
            if isinstance(event, dict):
                timed.append((time.time(), False, event))
                seen[str(event.get("type"))] += 1


async def _until(done: Callable[[], bool], wait: float) -> None:
    deadline = time.monotonic() + wait
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def table(recorded: Figures, replayed: Figures, source: str, upstream: str) -> str:
    """Both sessions' responses side by side, a row each, totals last."""
    head = f"{'turn':<5}{'cause':<17}"
    columns = f"{'in':>7}{'cached':>8}{'out':>7}{'cost $':>11}{'TTFT ms':>9}"
    width = len(columns) + 2
    lines = [
        f"{'':<22}{('recording: ' + source)[: width - 1]:<{width}}{'replay: ' + upstream}",
        f"{'':<22}{('model ' + str(recorded.model))[: width - 1]:<{width}}{'model ' + str(replayed.model)}",
        f"{head}{columns} |{columns}",
    ]
    for n in range(max(len(recorded.turns), len(replayed.turns))):
        mine = recorded.turns[n] if n < len(recorded.turns) else None
        theirs = replayed.turns[n] if n < len(replayed.turns) else None
        cause = (mine or theirs).cause  # type: ignore[union-attr]
        lines.append(f"{n + 1:<5}{cause:<17}{_row(mine)} |{_row(theirs)}")
    if recorded.transcription_cost or replayed.transcription_cost:
        lines.append(f"{'':<5}{'transcription':<17}{_cost_row(recorded.transcription_cost)} |")
        lines[-1] += _cost_row(replayed.transcription_cost)
    lines.append(f"{'total':<22}{_totals(recorded)} |{_totals(replayed)}")
    return "\n".join(lines)


def _row(turn: Turn | None) -> str:
    if turn is None:
        return f"{'-':>7}{'-':>8}{'-':>7}{'-':>11}{'-':>9}"
    usage = turn.usage
    counts = ("?", "?", "?") if usage is None else (usage.input, usage.cache_read or 0, usage.output or 0)
    cost = "?" if turn.cost is None else f"{turn.cost:.6f}"
    ttft = "-" if turn.ttft is None else f"{turn.ttft * 1000:.1f}"
    return f"{counts[0]:>7}{counts[1]:>8}{counts[2]:>7}{cost:>11}{ttft:>9}"


def _cost_row(cost: float) -> str:
    return f"{'':>22}{cost:>11.6f}{'':>9}"


def _totals(figures_: Figures) -> str:
    usages = [t.usage for t in figures_.turns if t.usage is not None]
    ttfts = sorted(t.ttft for t in figures_.turns if t.ttft is not None)
    median = f"{ttfts[len(ttfts) // 2] * 1000:.1f}" if ttfts else "-"
    counts = (sum(u.input for u in usages), sum(u.cache_read or 0 for u in usages), sum(u.output or 0 for u in usages))
    return f"{counts[0]:>7}{counts[1]:>8}{counts[2]:>7}{figures_.cost:>11.6f}{median:>9}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recording = load(args.recording)
    except RecordingError as e:
        sys.exit(f"{PROG}: {e}")
    for note in recording.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    model = args.model or recording.request_model or recording.model or "gpt-realtime"
    try:
        live = asyncio.run(drive(recording, args.upstream, model, args.pacing == "fast", args.wait))
    except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosedError) as e:
        sys.exit(f"{PROG}: {args.upstream}: {e}")
    catalog = catalog_for("openai", None)
    print(table(figures(recorded_events(recording), catalog), figures(live, catalog), args.recording, args.upstream))
    print("TTFT total: the median. Times: the recording's as the gateway saw them, the replay's as this client did.")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("recording", help="a realtime.export bundle directory, or a flow file saved with -w")
    parser.add_argument("--upstream", required=True, help="e.g. https://api.openai.com, or a gateway or simulator URL")
    parser.add_argument("--model", help="the model asked for (default: the recording's)")
    parser.add_argument("--pacing", choices=("recorded", "fast"), default="recorded", help="client events' pace")
    parser.add_argument(
        "--wait", type=float, default=DEFAULT_WAIT, help="seconds to wait for an answer (default: %(default)s)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
