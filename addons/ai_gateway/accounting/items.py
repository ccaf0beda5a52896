"""Usage items: what a protocol adapter reads from a frame or body, and a meter bills.

Every wire protocol (Realtime, the Responses WebSocket mode, HTTP JSON and SSE) turns what it
reads into these few facts, so the meters and everything below them never parse a protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

from ai_gateway.accounting.usage import DurationUsage, SessionSeconds, TokenUsage


@dataclass(frozen=True, slots=True)
class SessionModels:
    """Models a session announced (`session.created`/`session.updated`); None where it named none."""

    model: str | None
    transcription_model: str | None
    session_id: str | None = None  # the conversation id of traces


@dataclass(frozen=True, slots=True)
class ResponseRequested:
    """The client asked for a response (`response.create`); model when the request names one,
    event_id so that the upstream's refusal of it can be told. `unread` (`too_large`): the request
    was too large to decode, so it is admitted as one without its fields and counted as unread."""

    model: str | None = None
    event_id: str | None = None
    unread: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The upstream started a response (`response.created`)."""

    response_id: str | None


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """A user's turn ended: server VAD heard the speech stop (`input_audio_buffer.speech_stopped`),
    or the client committed its audio (`input_audio_buffer.commit`). The voice-turn latency runs
    from here to the first delta of the response this turn starts."""

    kind: str  # "speech_stopped" or "commit"


@dataclass(frozen=True, slots=True)
class FirstDelta:
    """The first generated content of a response (of the HTTP exchange, where response_id is None)."""

    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """A finished response and what it billed; response_model None where the session's model applies.

    usage None: the response happened but its usage could not be read; `unread` says why
    (`missing_usage`, `invalid_usage`). It counts as a response and bills nothing.
    """

    usage: TokenUsage | DurationUsage | None  # seconds: HTTP transcriptions billed by duration
    status: str = "completed"
    response_id: str | None = None
    response_model: str | None = None
    unread: str | None = None


@dataclass(frozen=True, slots=True)
class TranscriptionDone:
    usage: TokenUsage | DurationUsage


@dataclass(frozen=True, slots=True)
class SpeechInput:
    """A speech request's `input`: its characters are billed when the audio comes back."""

    characters: int


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The upstream's own limits: (name, limit, remaining) for `requests` and `tokens`."""

    limits: tuple[tuple[str, float, float], ...]


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """The upstream reported an error inside a session; event_id names the client event it refused."""

    event_id: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class SessionTime:
    """Billable session time so far (GPT-Live `session.usage.updated`, `session.closed`): cumulative,
    so the meter bills what it adds to the report before. `closed` is the reason of the final one."""

    usage: SessionSeconds
    closed: str | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame or body that looked metered but could not be read; reason is a short label value."""

    reason: str
    detail: str


UsageItem = (
    SessionModels
    | ResponseRequested
    | ResponseStarted
    | TurnEnded
    | FirstDelta
    | ResponseDone
    | TranscriptionDone
    | SpeechInput
    | RateLimits
    | UpstreamError
    | SessionTime
    | Malformed
)
