"""Usage objects from the wire, read strictly: each API's field names (OpenAI's Realtime, Responses,
Chat Completions, Embeddings, Images and Speech spellings, DashScope's `*_tokens_details`) into the
gateway's usage.

Usage comes from an upstream we do not control and is what a team is billed by, so a usage
object is taken whole or not at all: one malformed field (a string, a float, a bool, a negative
or absurd number, cached tokens exceeding input) rejects the object and nothing is counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ai_gateway.accounting.usage import (
    MAX_SECONDS,
    MAX_TOKENS,
    MODALITY_KEYS,
    DurationUsage,
    InvalidUsage,
    SessionSeconds,
    Split,
    TokenUsage,
    complete_split,
)


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
