"""Usage as the gateway meters it: tokens with complete splits by modality, seconds, characters.

What the wire spells (OpenAI's and DashScope's field names, each API's) is read in
protocols/usage_fields.py; a usage object that would not make a valid one here is refused whole.
"""

from __future__ import annotations

from dataclasses import dataclass

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
