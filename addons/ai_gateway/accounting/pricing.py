"""Model prices, and what one metered usage costs at them.

The price catalog is a YAML file (policies/prices.yaml), validated on the node tree like the policy
so that a typo in a price is reported as "prices.yaml:12: models.gpt-realtime.audio_input: ...":

    taken: 2025-10-15           # the date the prices were read (YYYY-MM-DD)
    source: <where from>        # a note: page, tier, contract
    models:
      <model>:                  # each rate optional; at least one; token rates need `input`
        input / cached_input / output                       # text, USD per 1M tokens
        audio_input / cached_audio_input / audio_output     # audio, USD per 1M tokens
        image_input / cached_image_input / image_output     # image, USD per 1M tokens
        audio_minute                                        # USD per minute of audio (duration-billed transcription)

Duration is priced per minute because that is how OpenAI lists it (whisper-1: $0.006/min); a
per-second figure would be a conversion someone gets wrong when updating the file.

Model resolution: a model is priced under its own name if listed, else under its name without a
trailing `-YYYY-MM-DD` snapshot date (`gpt-realtime-2025-08-28` -> `gpt-realtime`), else not at
all. List a snapshot to price it apart from its alias. There is deliberately no longest-prefix
match: `gpt-5-nano` would be priced as `gpt-5` and `gpt-4o-audio-preview` as `gpt-4o`, quietly and
wrongly; an unpriced model is visible in the lookup counter and fixed by adding it.

Cost of a TokenUsage, per modality m in text, audio, image:

    input_m   = the reported input split for m; for text when not reported: input - audio - image
    cached_m  = likewise from the cached split of cache_read; with no cached split, all cached are text
    fresh_m   = input_m - cached_m          (a cached token is billed once, at the cached rate)
    output_m  = likewise from the output split of output
    cost      = sum_m (fresh_m * rate(m, input) + cached_m * rate(m, cached_input)
                       + output_m * rate(m, output)) / 1e6

Reasoning tokens are part of output and are not added again. Derived counts never go below zero.
A rate a model lacks falls back to the same modality's uncached rate, then to the text rates
(cached audio: cached_audio_input, audio_input, cached_input, input): a model without audio rates
bills audio as text, and a modality without a cache discount is billed in full rather than at
text's cheaper cached rate. A DurationUsage costs seconds / 60 * audio_minute. A non-zero count
whose rate is still missing makes the usage unpriced (UnpricedUsage): guessing would misstate a bill.

Costs stay floats: they feed a Prometheus counter, which is a float anyway.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field, fields
from datetime import date

from yaml.constructor import SafeConstructor
from yaml.nodes import Node, ScalarNode

from ai_gateway.accounting.usage import MODALITIES, DurationUsage, TokenUsage
from ai_gateway.config.policy import (
    DEFAULT_POLICY,
    STR_TAG,
    Validator,
    compose_yaml,
    describe,
    read_config_file,
)

DEFAULT_PRICES = DEFAULT_POLICY.with_name("prices.yaml")

PRICED = "priced"
UNPRICED = "unpriced"

DURATION_RATE = "audio_minute"
TOKEN_KINDS = ("input", "cached_input", "output")
MAX_RESOLVED = 4096
PER_MILLION = 1_000_000

_SNAPSHOT_DATE = re.compile(r"-[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_CONSTRUCTOR = SafeConstructor()


class UnpricedUsage(ValueError):
    """The usage has tokens or seconds of a kind the model has no rate for; str() names the rate."""


def rate_name(modality: str, kind: str) -> str:
    """The catalog key of a token rate: `input`, `audio_output`, `cached_image_input`, ..."""
    if modality == "text":
        return kind
    cached = "cached_" if kind.startswith("cached_") else ""
    return f"{cached}{modality}_{kind.removeprefix('cached_')}"


@dataclass(frozen=True, slots=True)
class ModelPrices:
    """One model's rates: USD per 1M tokens, audio_minute in USD per minute; None where not listed."""

    input: float | None = None
    cached_input: float | None = None
    output: float | None = None
    audio_input: float | None = None
    cached_audio_input: float | None = None
    audio_output: float | None = None
    image_input: float | None = None
    cached_image_input: float | None = None
    image_output: float | None = None
    audio_minute: float | None = None
    # The rate each (modality, kind) is billed at, fallbacks applied once: pricing runs per response.
    rates: Mapping[tuple[str, str], float | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rates = {(m, k): self._fallback(m, k) for m in MODALITIES for k in TOKEN_KINDS}
        object.__setattr__(self, "rates", rates)

    def rate(self, modality: str, kind: str) -> float | None:
        """The rate a token is billed at, with the fallbacks of the module docstring."""
        return self.rates[modality, kind]

    def _fallback(self, modality: str, kind: str) -> float | None:
        for m in dict.fromkeys((modality, "text")):
            for k in dict.fromkeys((kind, kind.removeprefix("cached_"))):
                value = getattr(self, rate_name(m, k))
                if value is not None:
                    return value
        return None


RATE_KEYS = tuple(f.name for f in fields(ModelPrices) if f.init)


@dataclass(frozen=True)
class PriceCatalog:
    """A validated catalog: `path` is the file it came from, `taken` and `source` its provenance."""

    path: str
    taken: date
    source: str
    models: Mapping[str, ModelPrices]
    _resolved: dict[str, str | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def resolve(self, model: str) -> str | None:
        """The listed name a model is priced as: itself, else itself without its snapshot date."""
        if model in self._resolved:
            return self._resolved[model]
        if len(self._resolved) >= MAX_RESOLVED:  # model names come from clients: bound the cache
            self._resolved.clear()
        name = next((n for n in (model, _SNAPSHOT_DATE.sub("", model)) if n in self.models), None)
        self._resolved[model] = name
        return name

    def price(self, model: str) -> ModelPrices | None:
        name = self.resolve(model)
        return None if name is None else self.models[name]

    def lookup(self, model: str) -> tuple[ModelPrices | None, str]:
        """The model's prices and `priced`, or None and `unpriced`: the status is a metric label."""
        prices = self.price(model)
        return prices, PRICED if prices is not None else UNPRICED

    def cost(self, model: str, usage: TokenUsage | DurationUsage) -> tuple[float | None, str]:
        """What a usage costs and the lookup status; None and `unpriced` when it cannot be priced.

        The one call metering needs: it never raises, so a gap in the catalog cannot break metering.
        """
        prices, status = self.lookup(model)
        if prices is None:
            return None, status
        try:
            return cost_usd(usage, prices), PRICED
        except UnpricedUsage:
            return None, UNPRICED


def cost_usd(usage: TokenUsage | DurationUsage, prices: ModelPrices) -> float:
    """USD for one usage at a model's prices (formula in the module docstring).

    Raises UnpricedUsage when a non-zero count has no rate, even after fallbacks.
    """
    if isinstance(usage, DurationUsage):
        return _charge(usage.seconds / 60, prices.audio_minute, DURATION_RATE)
    counts = _token_counts(usage)
    rates = prices.rates
    return sum(_charge(n, rates[key], rate_name(*key)) for key, n in counts.items() if n) / PER_MILLION


def _charge(quantity: float, rate: float | None, name: str) -> float:
    """quantity * rate; nothing to charge needs no rate."""
    if not quantity:
        return 0.0
    if rate is None:
        raise UnpricedUsage(f"no {name} rate for {quantity:g}")
    return quantity * rate


def _token_counts(usage: TokenUsage) -> dict[tuple[str, str], int]:
    """Tokens by (modality, kind); every input token is either fresh or cached, never both."""
    inputs = _split(usage.input, usage.input_by_modality)
    cached = _split(usage.cache_read or 0, usage.cache_read_by_modality)
    outputs = _split(usage.output or 0, usage.output_by_modality)
    counts: dict[tuple[str, str], int] = {}
    for m in MODALITIES:
        counts[m, "input"] = max(inputs[m] - cached[m], 0)
        counts[m, "cached_input"] = cached[m]
        counts[m, "output"] = outputs[m]
    return counts


def _split(total: int, by_modality: tuple[tuple[str, int], ...]) -> dict[str, int]:
    """Counts per modality; text, unless reported, is what audio and image leave of the total."""
    reported = dict(by_modality)
    counts = dict.fromkeys(MODALITIES, 0) | reported
    if "text" not in reported:
        counts["text"] = max(total - counts["audio"] - counts["image"], 0)
    return counts


def load_catalog(path: str | os.PathLike[str]) -> PriceCatalog:
    """Read and validate a price catalog. Raises PolicyError with a one-line file:line: key: message."""
    return parse_catalog(read_config_file(path, "price catalog"), str(path))


def parse_catalog(text: str, source: str) -> PriceCatalog:
    return _CatalogValidator(source).catalog(compose_yaml(text, source, "a mapping with taken, source and models"))


class _CatalogValidator(Validator):
    """The policy's node-tree validator, extended with the catalog's schema."""

    def __init__(self, source: str) -> None:
        super().__init__(source, {})

    def require(self, items: Mapping[str, object], key: str, node: Node, expected: Mapping[str, str]) -> None:
        """Fail on the first missing name, saying what it should have been."""
        for name, what in expected.items():
            if name not in items:
                raise self.fail(f"{key}.{name}" if key else name, node, f"missing; expected {what}")

    def catalog(self, root: Node) -> PriceCatalog:
        items = self.mapping("", root, ("taken", "source", "models"))
        self.require(
            items,
            "",
            root,
            {
                "taken": "the date the prices were read (YYYY-MM-DD)",
                "source": "where the prices come from",
                "models": "a mapping of model name to rates",
            },
        )
        return PriceCatalog(
            path=self.source,
            taken=self.date("taken", items["taken"][1]),
            source=self.string("source", items["source"][1]),
            models=self.models("models", items["models"][1]),
        )

    def date(self, key: str, node: Node) -> date:
        if isinstance(node, ScalarNode) and node.tag in (_TIMESTAMP_TAG, STR_TAG):
            with suppress(ValueError):
                return date.fromisoformat(node.value)
        raise self.fail(key, node, f"expected a date (YYYY-MM-DD), got {describe(node)}")

    def models(self, key: str, node: Node) -> dict[str, ModelPrices]:
        items = self.mapping(key, node, None)
        if not items:
            raise self.fail(key, node, "expected at least one model")
        return {name: self.model(f"{key}.{name}", value) for name, (_, value) in items.items()}

    def model(self, key: str, node: Node) -> ModelPrices:
        items = self.mapping(key, node, RATE_KEYS)
        if not items:
            raise self.fail(key, node, f"expected at least one rate of {', '.join(RATE_KEYS)}")
        if items.keys() - {DURATION_RATE}:
            self.require(
                items, key, node, {"input": "USD per 1M text input tokens, which other token rates fall back to"}
            )
        return ModelPrices(**{name: self.rate(f"{key}.{name}", name, value) for name, (_, value) in items.items()})

    def rate(self, key: str, name: str, node: Node) -> float:
        value = _number(node)
        if value is None or not (math.isfinite(value) and value >= 0):
            unit = "USD per minute of audio" if name == DURATION_RATE else "USD per 1M tokens"
            raise self.fail(key, node, f"expected a non-negative number of {unit}, got {describe(node)}")
        return value


def _number(node: Node) -> float | None:
    """A YAML int or float scalar as a float (YAML's own spellings: 1_000, 1e-3, .inf); else None."""
    if not isinstance(node, ScalarNode):
        return None
    with suppress(OverflowError):  # an int too large for a float
        if node.tag == _INT_TAG:
            return float(_CONSTRUCTOR.construct_yaml_int(node))
        if node.tag == _FLOAT_TAG:
            return _CONSTRUCTOR.construct_yaml_float(node)
    return None
