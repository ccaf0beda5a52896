"""Voice turns and response timing of a Realtime session.

A voice user waits from the end of their speech to the first audio of the answer. With server
VAD (the default of most voice agents) the upstream starts that response by itself, with no
`response.create` to measure from: the turn's end is the only start there is. A turn ends with
`input_audio_buffer.speech_stopped` (server VAD) or the client's `input_audio_buffer.commit`;
the next response that starts answers it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Responses tracked at once; more than this in flight is not a real upstream.
MAX_TRACKED = 64


@dataclass(frozen=True, slots=True)
class Turn:
    kind: str  # "speech_stopped" or "commit"
    at: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class ResponseTiming:
    """Seconds: request to the end, request to the first delta, the turn's end to the first delta."""

    duration: float | None = None
    ttft: float | None = None
    turn: str | None = None
    turn_latency: float | None = None


NO_TIMING = ResponseTiming()


class ResponseClock:
    """When each response began (its request, the turn it answers, or its response.created) and
    which turn it answers; bounded, each entry dropped when its response finishes."""

    def __init__(self) -> None:
        self.pending: Turn | None = None
        self.began: dict[str, float] = {}
        self.turns: dict[str, Turn] = {}

    def turn_ended(self, kind: str, now: float) -> None:
        self.pending = Turn(kind, now)  # speech after an unanswered turn: the latest end counts

    def started(self, response_id: str | None, requested: float | None, now: float) -> float | None:
        """A response started; `requested` is its response.create's time, if it had one.

        Returns the turn's end when the upstream started it by itself to answer a turn: its time
        to first token runs from there.
        """
        turn, self.pending = self.pending, None
        if response_id is None or len(self.began) >= MAX_TRACKED:
            return None
        if turn is not None:
            self.turns[response_id] = turn
        start = requested if requested is not None else turn.at if turn is not None else now
        self.began[response_id] = start
        return turn.at if requested is None and turn is not None else None

    def finished(self, response_id: str | None, first_delta: tuple[float, float] | None, now: float) -> ResponseTiming:
        """The response's timing; `first_delta` is (its request, its first delta), when measured."""
        if response_id is None:
            return NO_TIMING
        began = self.began.pop(response_id, None)
        turn = self.turns.pop(response_id, None)
        ttft = turn_latency = None
        if first_delta is not None:
            ttft = first_delta[1] - first_delta[0]
            if turn is not None:
                turn_latency = first_delta[1] - turn.at
        return ResponseTiming(
            None if began is None else now - began, ttft, None if turn is None else turn.kind, turn_latency
        )
