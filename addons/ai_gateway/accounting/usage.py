"""Token usage as the gateway meters it, and strict validation of usage objects from the wire.

Usage comes from an upstream we do not control and is what a team is billed by, so a usage
object is taken whole or not at all: one malformed field (a string, a float, a bool, a negative
or absurd number, cached tokens exceeding input) rejects the object and nothing is counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MODALITIES = ("text", "audio", "image")
MODALITY_KEYS = tuple((m, f"{m}_tokens") for m in MODALITIES)

# No single response bills more than this; anything larger is a corrupt or hostile frame.
MAX_TOKENS = 1_000_000_000
MAX_SECONDS = 86_400.0


class InvalidUsage(ValueError):
    """The usage object is not something we can bill; str() says which field and why."""


Split = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """One response's tokens; None where the upstream did not report a count (embeddings have no output).

    The splits by modality are complete whatever the upstream reported: text is what the reported
    audio and image parts leave of the total (a reported text count is not trusted over the total:
    OpenAI's Chat, Responses and Embeddings report no text part at all), and cached tokens without
    a split are text (as pricing takes them). So every split sums to its total. Parts that exceed
    their total are not something to bill: InvalidUsage, as for cached tokens exceeding input.
    """

    input: int
    output: int | None
    cache_read: int | None = None
    input_by_modality: Split = ()
    cache_read_by_modality: Split = ()
    output_by_modality: Split = ()
    reasoning: int | None = None

    def __post_init__(self) -> None:
        if self.cache_read is not None and self.cache_read > self.input:
            raise InvalidUsage(f"cached tokens {self.cache_read} exceed input tokens {self.input}")
        complete = (
            ("input_by_modality", complete_split("input", self.input, self.input_by_modality)),
            ("cache_read_by_modality", complete_split("cached", self.cache_read, self.cache_read_by_modality)),
            ("output_by_modality", complete_split("output", self.output, self.output_by_modality)),
        )
        for name, split in complete:
            object.__setattr__(self, name, split)


def complete_split(name: str, total: int | None, reported: Split, rest: str = "text") -> Split:
    """The reported parts other than `rest`, and `rest` as what they leave of the total, in
    MODALITIES order (zeros kept: a reported zero is a series); nothing for an unreported total.
    A modality reported twice counts once, its last count. Plain loops: this runs three times
    for every response billed."""
    if total is None:
        return ()
    parts = dict(reported)
    parts.pop(rest, None)
    left = total
    for count in parts.values():
        left -= count
    if left < 0:
        others = " and ".join(m for m in MODALITIES if m != rest)
        raise InvalidUsage(f"{name} {others} tokens {total - left} exceed {name} tokens {total}")
    parts[rest] = left
    return tuple([(m, parts[m]) for m in MODALITIES if m in parts])


@dataclass(frozen=True, slots=True)
class UsageShape:
    """Where an API puts its counts: the same ideas under different names per API. Output is
    `output_modality` where its details do not say otherwise (images make image tokens, speech audio)."""

    input: str
    output: str | None
    input_details: str
    output_details: str | None
    output_modality: str = "text"


REALTIME_USAGE = UsageShape("input_tokens", "output_tokens", "input_token_details", "output_token_details")
RESPONSES_USAGE = UsageShape("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
COMPLETIONS_USAGE = UsageShape(
    "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"
)
EMBEDDINGS_USAGE = UsageShape("prompt_tokens", None, "prompt_tokens_details", None)
IMAGES_USAGE = UsageShape("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details", "image")
SPEECH_USAGE = UsageShape("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details", "audio")


@dataclass(frozen=True, slots=True)
class DurationUsage:
    """Transcription billed by audio duration instead of tokens."""

    seconds: float


@dataclass(frozen=True, slots=True)
class SessionSeconds:
    """Seconds of session time billed by the second (GPT-Live): active, and paused (standby), which
    a model may price lower. One report's figures or one increase of them, never summed by the
    upstream: its reports are cumulative."""

    active: float
    paused: float = 0.0

    @property
    def seconds(self) -> float:
        return self.active + self.paused


@dataclass(frozen=True, slots=True)
class CharacterUsage:
    """Speech billed by characters of input (tts-1): what a speech request's `input` had, counted
    by the gateway, because the audio response reports no usage."""

    characters: int


def tokens(obj: Mapping[str, Any], key: str, *, required: bool = True) -> int | None:
    """A token count: a plain non-negative int within MAX_TOKENS, or None when absent and optional."""
    if key not in obj:
        if required:
            raise InvalidUsage(f"missing {key}")
        return None
    value = obj[key]
    if type(value) is not int or not 0 <= value <= MAX_TOKENS:
        raise InvalidUsage(f"{key} is {value!r}, expected a token count")
    return value


def details(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """An optional nested details object; absent or null means empty."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidUsage(f"{key} is {type(value).__name__}, expected an object")
    return value


def by_modality(detail: Mapping[str, Any]) -> Split:
    """The per-modality counts a details object reports, in MODALITIES order."""
    if not detail:
        return ()
    split = []
    for modality, key in MODALITY_KEYS:
        if key in detail:
            split.append((modality, tokens(detail, key)))
    return tuple(split)


def require_object(usage: Any) -> Mapping[str, Any]:
    if not isinstance(usage, dict):
        raise InvalidUsage(f"usage is {type(usage).__name__}, expected an object")
    return usage


def parse_usage(usage: Any, shape: UsageShape) -> TokenUsage:
    """A usage object of the given API: counts, cache, modality and reasoning details."""
    usage = require_object(usage)
    input_tokens = tokens(usage, shape.input)
    assert input_tokens is not None
    output_tokens = tokens(usage, shape.output) if shape.output else None
    input_details = details(usage, shape.input_details)
    output_details = details(usage, shape.output_details) if shape.output_details else {}
    return TokenUsage(
        input=input_tokens,
        output=output_tokens,
        cache_read=tokens(input_details, "cached_tokens", required=False),
        input_by_modality=by_modality(input_details),
        cache_read_by_modality=by_modality(details(input_details, "cached_tokens_details")),
        output_by_modality=complete_split("output", output_tokens, by_modality(output_details), shape.output_modality),
        reasoning=tokens(output_details, "reasoning_tokens", required=False),
    )


def parse_realtime_usage(usage: Any) -> TokenUsage:
    """Usage of a Realtime `response.done` (input/output tokens with modality and cache details).

    Alibaba's Qwen/DashScope realtime spells the details as the Responses API does
    (`input_tokens_details`); that spelling is read when OpenAI's is absent."""
    if isinstance(usage, dict) and not _has_any(usage, REALTIME_USAGE) and _has_any(usage, RESPONSES_USAGE):
        return parse_usage(usage, RESPONSES_USAGE)
    return parse_usage(usage, REALTIME_USAGE)


def _has_any(usage: Mapping[str, Any], shape: UsageShape) -> bool:
    return shape.input_details in usage or (shape.output_details or "") in usage


def parse_transcription_usage(usage: Any) -> TokenUsage | DurationUsage:
    """Usage of `conversation.item.input_audio_transcription.completed`: tokens or duration."""
    usage = require_object(usage)
    kind = usage.get("type")
    if kind == "duration":
        seconds = usage.get("seconds")
        if type(seconds) not in (int, float) or not 0 <= seconds <= MAX_SECONDS:
            raise InvalidUsage(f"seconds is {seconds!r}, expected a duration")
        return DurationUsage(float(seconds))
    if kind == "tokens":
        return parse_realtime_usage(usage)
    raise InvalidUsage(f"usage type is {kind!r}, expected tokens or duration")


def parse_session_usage(usage: Any) -> SessionSeconds:
    """A GPT-Live `usage` object (`seconds`, optional `active_seconds` and `paused_seconds`): the
    cumulative billable time. Without a breakdown every second is active; with one, the parts
    must add up to `seconds`. Numbers may be floats (`5.0` occurs); bools and negatives are not."""
    usage = require_object(usage)
    seconds = _seconds(usage, "seconds")
    assert seconds is not None
    active, paused = _seconds(usage, "active_seconds", False), _seconds(usage, "paused_seconds", False)
    if active is None and paused is None:
        return SessionSeconds(seconds)
    active = seconds - (paused or 0.0) if active is None else active
    paused = seconds - active if paused is None else paused
    if active < 0 or paused < 0 or abs(active + paused - seconds) > 1e-6:
        raise InvalidUsage(f"active {active:g} and paused {paused:g} seconds do not add up to {seconds:g}")
    return SessionSeconds(active, paused)


def _seconds(usage: Mapping[str, Any], key: str, required: bool = True) -> float | None:
    value = usage.get(key)
    if value is None and not required:
        return None
    if type(value) not in (int, float) or not 0 <= value <= MAX_SECONDS:
        raise InvalidUsage(f"{key} is {value!r}, expected seconds")
    return float(value)
