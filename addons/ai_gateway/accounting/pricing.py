"""Model prices, and what one metered usage costs at them.

Rates come from three sources, asked in this order for each model:

1. the policy's `prices:` file, if it names one: an OVERRIDE for negotiated, Azure or missing
   prices. A model listed there is priced by that entry alone (it replaces the database's rates
   for that model, it does not merge with them);
2. the price database: pydantic's genai-prices package, pinned in constraints.txt, read from the
   data bundled in the installed wheel only. genai-prices can fetch fresher data (UpdatePrices);
   the gateway never starts that, and reads `genai_prices.data.providers` rather than the
   package's process-wide snapshot, so another library starting an update in the same process
   cannot change the gateway's rates either. The provider is the policy's `provider:` (its
   gen_ai_system), mapped to the database's provider ids by SYSTEM_PROVIDERS;
3. for OpenAI and Azure, the gateway's own supplement (policies/supplement-prices.yaml, the same
   format): list prices of models the database lacks (gpt-live-1.1 and its standby rate), each
   with where it was read. The database wins where it lists a model; the supplement is a stopgap
   until a release of it does.

The override file is validated on the node tree like the policy, so that a typo in a price is
reported as "prices.yaml:12: models.gpt-realtime.audio_input: ...":

    taken: 2025-10-15           # the date the prices were read (YYYY-MM-DD)
    source: <where from>        # a note: page, tier, contract
    models:
      <model>:                  # each rate optional; at least one; token rates need `input`
        input / cached_input / output                       # text, USD per 1M tokens
        audio_input / cached_audio_input / audio_output     # audio, USD per 1M tokens
        image_input / cached_image_input / image_output     # image, USD per 1M tokens
        audio_minute                                        # USD per minute of audio (duration-billed transcription)
        session_minute / paused_session_minute              # USD per minute of session time (GPT-Live), per second

Duration is priced per minute because that is how OpenAI lists it (whisper-1: $0.006/min,
gpt-live-1: $0.05/min billed per second); a per-second figure ($0.000833...) would be a
conversion someone gets wrong when updating the file. Session time is billed per second at those
rates, not rounded: SessionSeconds costs active / 60 * session_minute + paused / 60 *
paused_session_minute; a model without a paused rate bills paused time at its session rate, and
one without a session rate at audio_minute (genai-prices lists gpt-live-1's per-second price as
audio_hours).

Model resolution. In the file: a model is priced under its own name if listed, else under its
name without a trailing `-YYYY-MM-DD` snapshot date (`gpt-realtime-2025-08-28` -> `gpt-realtime`).
There is deliberately no longest-prefix match there: `gpt-5-nano` would be priced as `gpt-5`,
quietly and wrongly. In the database: its own curated match rules (which list snapshots such as
`gpt-realtime-2025-08-28`, and match a family by prefix only where its prices are one), then the
name without its snapshot date. An unpriced model is visible in the lookup counter.

The database's rates map onto ours one to one (USD per 1M tokens): input_mtok -> input,
cache_read_mtok -> cached_input, output_mtok -> output, input_audio_mtok -> audio_input,
cache_audio_read_mtok -> cached_audio_input, output_audio_mtok -> audio_output, and the same for
image; input_audio_hours (else audio_hours) / 60 -> audio_minute. Its tiered prices (every token
of a request at a higher rate once its input exceeds a threshold) become ModelPrices.tiers; dated
prices are resolved for the day of the request and resolved again when the next one starts.
Rates for what the gateway does not meter (cache writes, web or file searches, characters of
speech input, per-request fees) are not charged: the cost covers tokens and transcribed seconds.
Standard tier only: Batch, Flex and Priority variants are not applied.

Cost of a TokenUsage, per modality m in text, audio, image:

    input_m   = the input split for m; text is what audio and image leave: input - audio - image
    cached_m  = likewise from the cached split of cache_read; with no cached split, all cached are text
                (TokenUsage completes the splits so, for the metrics and the ledger as well)
    fresh_m   = input_m - cached_m          (a cached token is billed once, at the cached rate)
    output_m  = likewise from the output split of output
    cost      = sum_m (fresh_m * rate(m, input) + cached_m * rate(m, cached_input)
                       + output_m * rate(m, output)) / 1e6

This is genai-prices' own decomposition (input_tokens includes the cached and the audio and image
tokens; each price applies to what its more specific prices leave), tested against its calc_price.
They differ only for a model with a text cache rate and an audio (image) rate but no cached audio
(image) rate, where genai-prices would subtract those cached tokens from text twice. Reasoning
tokens are part of output and are not added again. Derived counts never go below zero. A rate a
model lacks falls back to the same modality's uncached rate, then to the text rates (cached audio:
cached_audio_input, audio_input, cached_input, input): a model without audio rates bills audio as
text, and a modality without a cache discount is billed in full rather than at text's cheaper
cached rate. A DurationUsage costs seconds / 60 * audio_minute. A non-zero count whose rate is
still missing makes the usage unpriced (UnpricedUsage): guessing would misstate a bill.

Costs stay floats: they feed a Prometheus counter, which is a float anyway. Rates are resolved
once per model name and kept (MAX_RESOLVED names): pricing runs on every response.done.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from yaml.constructor import SafeConstructor
from yaml.nodes import Node, ScalarNode

from ai_gateway.accounting.usage import MODALITIES, CharacterUsage, DurationUsage, SessionSeconds, TokenUsage
from ai_gateway.config.policy import (
    DEFAULT_MAX_CONFIG_BYTES,
    DEFAULT_POLICY,
    STR_TAG,
    Validator,
    compose_yaml,
    describe,
    read_config_file,
)

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, Provider

DEFAULT_PRICES = DEFAULT_POLICY.with_name("prices.yaml")
SUPPLEMENT_PRICES = DEFAULT_POLICY.with_name("supplement-prices.yaml")
# The systems whose models the supplement prices: OpenAI's, also served by Azure.
SUPPLEMENTED_SYSTEMS = frozenset({"openai", "azure.ai.openai"})

PRICED = "priced"
UNPRICED = "unpriced"

DURATION_RATE = "audio_minute"
SESSION_RATE, PAUSED_RATE = "session_minute", "paused_session_minute"
# Rates per minute, of audio or of session time: the rates a model may have without token rates.
MINUTE_RATES = frozenset({DURATION_RATE, SESSION_RATE, PAUSED_RATE})
TOKEN_KINDS = ("input", "cached_input", "output")
COUNT_KEYS = tuple((m, k) for m in MODALITIES for k in TOKEN_KINDS)
MAX_RESOLVED = 4096
PER_MILLION = 1_000_000

DATABASE = "genai-prices"
# The day each genai-prices release was published on PyPI: its bundled data is as of then (the
# package records no date of its own). Add the new release's date when raising the pin.
DATABASE_RELEASES = {"0.2.3": "2026-11-10"}
# gen_ai_system values (OpenTelemetry's gen_ai.provider.name) -> the database's provider ids.
SYSTEM_PROVIDERS = {
    "openai": "openai",
    "azure.ai.openai": "azure",  # Azure's own prices where listed, else OpenAI's
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "xai": "x-ai",
    "x_ai": "x-ai",
    "anthropic": "anthropic",
    "aws.bedrock": "aws",
    "mistral_ai": "mistral",
    "groq": "groq",
    "deepseek": "deepseek",
    "perplexity": "perplexity",
    "cohere": "cohere",
}
# Our token rate -> the database's price key; both USD per 1M tokens.
DATABASE_RATES = {
    "input": "input_mtok",
    "cached_input": "cache_read_mtok",
    "output": "output_mtok",
    "audio_input": "input_audio_mtok",
    "cached_audio_input": "cache_audio_read_mtok",
    "audio_output": "output_audio_mtok",
    "image_input": "input_image_mtok",
    "cached_image_input": "cache_image_read_mtok",
    "image_output": "output_image_mtok",
}
# USD per hour of audio, the input's own rate first; audio_minute is a sixtieth of it.
DATABASE_DURATION_RATES = ("input_audio_hours", "audio_hours")

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
    """One model's rates: USD per 1M tokens, audio_minute in USD per minute; None where not listed.

    `tiers` are (threshold, prices) by rising threshold: a request with more input tokens than a
    threshold pays that tier's rates for all its tokens (the providers' "cliff" pricing).
    """

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
    session_minute: float | None = None
    paused_session_minute: float | None = None
    tiers: tuple[tuple[int, ModelPrices], ...] = ()
    # The rate each (modality, kind) of COUNT_KEYS is billed at, fallbacks applied once: pricing
    # runs on every response.
    rates: tuple[float | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rates", tuple(self._fallback(m, k) for m, k in COUNT_KEYS))

    def tier(self, input_tokens: int) -> ModelPrices:
        """The prices a request with this many input tokens pays."""
        for threshold, prices in reversed(self.tiers):
            if input_tokens > threshold:
                return prices
        return self

    def _fallback(self, modality: str, kind: str) -> float | None:
        for m in dict.fromkeys((modality, "text")):
            for k in dict.fromkeys((kind, kind.removeprefix("cached_"))):
                value = getattr(self, rate_name(m, k))
                if value is not None:
                    return value
        return None


RATE_KEYS = tuple(f.name for f in fields(ModelPrices) if f.init and f.name != "tiers")


@dataclass(frozen=True, slots=True)
class PricedAs:
    """Where a model's rates come from: the source, the name it lists them under, the rates."""

    source: str
    name: str
    prices: ModelPrices


class CatalogSource(NamedTuple):
    """One source of rates, as the price catalog info metric labels it."""

    source: str
    version: str
    data_date: str


@dataclass(frozen=True)
class PriceFile:
    """A validated override file: `path` is the file it came from, `taken` and `source` its provenance."""

    path: str
    taken: date
    source: str
    models: Mapping[str, ModelPrices]

    def find(self, model: str) -> PricedAs | None:
        """The entry a model is priced by: its own, else its name's without the snapshot date."""
        name = next((n for n in (model, _SNAPSHOT_DATE.sub("", model)) if n in self.models), None)
        return None if name is None else PricedAs(self.path, name, self.models[name])

    def describe(self) -> CatalogSource:
        return CatalogSource(Path(self.path).name, "", self.taken.isoformat())


class PriceDatabase:
    """genai-prices' bundled rates for one provider."""

    def __init__(self, provider: Provider, providers: list[Provider], version: str) -> None:
        self.provider = provider
        self.providers = providers  # for the provider's fallbacks (Azure -> OpenAI)
        self.version = version

    def find(self, model: str, now: datetime) -> tuple[PricedAs, float] | None:
        """The model's rates on `now`'s day, and when (epoch seconds) they next change."""
        for name in dict.fromkeys((model, _SNAPSHOT_DATE.sub("", model))):
            # Provider.find_model, not DataSnapshot.find_provider_model: the latter keeps every
            # name it matched, unbounded, and model names come from clients.
            info = self.provider.find_model(name, all_providers=self.providers)
            if info is not None:
                return PricedAs(DATABASE, info.id, database_prices(info, now)), next_change(info, now)
        return None

    def describe(self) -> CatalogSource:
        return CatalogSource(DATABASE, self.version, DATABASE_RELEASES.get(self.version, "unknown"))


def database_for(system: str) -> PriceDatabase | None:
    """The database's rates for a gen_ai_system, or None when the database has no such provider."""
    provider_id = SYSTEM_PROVIDERS.get(system)
    if provider_id is None:
        return None
    # Imported here, when a policy is applied: the bundled data takes 0.3 s and 30 MB to load,
    # which tools and tests that never price anything need not pay.
    from genai_prices.data import providers
    from genai_prices.data_snapshot import find_provider_by_id

    provider = find_provider_by_id(providers, provider_id)
    if provider is None:
        return None
    return PriceDatabase(provider, providers, importlib.metadata.version("genai-prices"))


def database_prices(info: ModelInfo, now: datetime) -> ModelPrices:
    """A database model's standard-tier rates on `now`'s day, as ModelPrices (mapping in the module docstring)."""
    from genai_prices.types import TieredPrices

    price = info.get_prices(now)
    values = {ours: getattr(price, theirs) for ours, theirs in DATABASE_RATES.items()}
    thresholds = sorted({t.start for v in values.values() if isinstance(v, TieredPrices) for t in v.tiers})
    hourly = next((v for key in DATABASE_DURATION_RATES if (v := getattr(price, key)) is not None), None)
    minute = None if hourly is None else float(Decimal(hourly) / 60)
    return ModelPrices(
        **_at_tier(values, None),
        audio_minute=minute,
        tiers=tuple((t, ModelPrices(**_at_tier(values, t), audio_minute=minute)) for t in thresholds),
    )


def _at_tier(values: Mapping[str, Any], threshold: int | None) -> dict[str, float | None]:
    """Each rate for input above `threshold` tokens (None: the base rates)."""
    from genai_prices.types import TieredPrices

    rates: dict[str, float | None] = {}
    for name, value in values.items():
        if isinstance(value, TieredPrices):  # the last tier starting at or below the threshold
            tiers = [t.price for t in value.tiers if threshold is not None and t.start <= threshold]
            value = tiers[-1] if tiers else value.base
        rates[name] = None if value is None else float(value)
    return rates


def next_change(info: ModelInfo, now: datetime) -> float:
    """When (epoch seconds) a model's dated or time-of-day prices next change; inf if they never do."""
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint

    changes: list[datetime] = []
    for conditional in info.prices if isinstance(info.prices, list) else ():
        constraint = conditional.constraint
        if isinstance(constraint, StartDateConstraint):
            changes.append(datetime.combine(constraint.start_date, time_of_day(), UTC))
        elif isinstance(constraint, TimeOfDateConstraint):
            changes.extend(_next_time(t, now) for t in (constraint.start_time, constraint.end_time))
    return min((c.timestamp() for c in changes if c > now), default=math.inf)


def _next_time(at: time_of_day, now: datetime) -> datetime:
    """The next moment after `now` that is `at` o'clock (naive times are UTC, as genai-prices reads them)."""
    moment = datetime.combine(now.date(), at if at.tzinfo else at.replace(tzinfo=UTC))
    while moment <= now:
        moment += timedelta(days=1)
    return moment


class PriceCatalog:
    """Rates per model: the override file's first, then the database's; resolved once per name."""

    def __init__(
        self,
        file: PriceFile | None = None,
        database: PriceDatabase | None = None,
        clock: Callable[[], float] = time.time,
        supplement: PriceFile | None = None,
    ) -> None:
        self.file = file
        self.database = database
        self.supplement = supplement
        self.clock = clock  # the day a usage is priced for: dated prices change on it
        self._resolved: dict[str, PricedAs | None] = {}
        self._expires = math.inf  # when a resolved database rate changes: resolve again from then

    @property
    def sources(self) -> tuple[CatalogSource, ...]:
        """Where the rates come from, override first (the info metric's series)."""
        return tuple(s.describe() for s in (self.file, self.database, self.supplement) if s is not None)

    def resolve(self, model: str) -> PricedAs | None:
        """The source and entry a model is priced by, or None when no source lists it."""
        if model in self._resolved:
            return self._resolved[model]
        if len(self._resolved) >= MAX_RESOLVED:  # model names come from clients: bound the cache
            self._resolved.clear()
        priced = self.file.find(model) if self.file is not None else None
        if priced is None and self.database is not None:
            found = self.database.find(model, datetime.fromtimestamp(self.clock(), UTC))
            if found is not None:
                priced, expires = found
                self._expires = min(self._expires, expires)
        if priced is None and self.supplement is not None:
            priced = self.supplement.find(model)
        self._resolved[model] = priced
        return priced

    def price(self, model: str) -> ModelPrices | None:
        priced = self.resolve(model)
        return None if priced is None else priced.prices

    def lookup(self, model: str) -> tuple[ModelPrices | None, str]:
        """The model's prices and `priced`, or None and `unpriced`: the status is a metric label."""
        prices = self.price(model)
        return prices, PRICED if prices is not None else UNPRICED

    def cost(
        self, model: str, usage: TokenUsage | DurationUsage | CharacterUsage | SessionSeconds
    ) -> tuple[float | None, str]:
        """What a usage costs and the lookup status; None and `unpriced` when it cannot be priced.

        The one call metering needs: it never raises, so a gap in the catalog cannot break metering.
        """
        if self.clock() >= self._expires:
            self._resolved.clear()
            self._expires = math.inf
        prices, status = self.lookup(model)
        if prices is None:
            return None, status
        try:
            return cost_usd(usage, prices), PRICED
        except UnpricedUsage:
            return None, UNPRICED


def catalog_for(
    system: str, prices: str | os.PathLike[str] | None, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES
) -> PriceCatalog:
    """A policy's catalog: its override file, if any, over the database's rates for its provider,
    over the gateway's supplement for OpenAI's models.

    Raises PolicyError (one line) for an invalid override file, or one over `max_bytes`.
    """
    supplement = load_catalog(SUPPLEMENT_PRICES) if system in SUPPLEMENTED_SYSTEMS else None
    return PriceCatalog(
        load_catalog(prices, max_bytes) if prices is not None else None, database_for(system), supplement=supplement
    )


def cost_usd(usage: TokenUsage | DurationUsage | CharacterUsage | SessionSeconds, prices: ModelPrices) -> float:
    """USD for one usage at a model's prices (formula in the module docstring).

    Raises UnpricedUsage when a non-zero count has no rate, even after fallbacks; characters of
    speech input have no rate in the catalog.
    """
    if isinstance(usage, CharacterUsage):
        if usage.characters:
            raise UnpricedUsage(f"no rate for {usage.characters} characters of speech input")
        return 0.0
    if isinstance(usage, DurationUsage):
        if usage.seconds and prices.audio_minute is None:
            raise UnpricedUsage(f"no {DURATION_RATE} rate for {usage.seconds:g} s")
        return usage.seconds / 60 * (prices.audio_minute or 0.0)
    if isinstance(usage, SessionSeconds):
        return session_cost(usage, prices)
    if prices.tiers:
        prices = prices.tier(usage.input)
    total = 0.0
    for n, rate, key in zip(_token_counts(usage), prices.rates, COUNT_KEYS, strict=True):
        if n:
            if rate is None:
                raise UnpricedUsage(f"no {rate_name(*key)} rate for {n}")
            total += n * rate
    return total / PER_MILLION


def session_cost(usage: SessionSeconds, prices: ModelPrices) -> float:
    """Seconds of session time at the model's per-minute rates (fallbacks in the module docstring)."""
    active = prices.session_minute if prices.session_minute is not None else prices.audio_minute
    paused = prices.paused_session_minute if prices.paused_session_minute is not None else active
    for seconds, rate, name in ((usage.active, active, SESSION_RATE), (usage.paused, paused, PAUSED_RATE)):
        if seconds and rate is None:
            raise UnpricedUsage(f"no {name} rate for {seconds:g} s")
    return (usage.active * (active or 0.0) + usage.paused * (paused or 0.0)) / 60


def _token_counts(usage: TokenUsage) -> tuple[int, ...]:
    """Tokens in COUNT_KEYS order; every input token is either fresh or cached, never both."""
    text, audio, image = _split(usage.input_by_modality)
    cached_text, cached_audio, cached_image = _split(usage.cache_read_by_modality)
    text_out, audio_out, image_out = _split(usage.output_by_modality)
    return (
        *(max(text - cached_text, 0), cached_text, text_out),
        *(max(audio - cached_audio, 0), cached_audio, audio_out),
        *(max(image - cached_image, 0), cached_image, image_out),
    )


def _split(by_modality: tuple[tuple[str, int], ...]) -> tuple[int, int, int]:
    """Text, audio and image counts of a complete split (TokenUsage completes them)."""
    counts = dict(by_modality)
    return counts.get("text", 0), counts.get("audio", 0), counts.get("image", 0)


def load_catalog(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> PriceFile:
    """Read and validate a price override file. Raises PolicyError with a one-line file:line: key: message."""
    return parse_catalog(read_config_file(path, "price catalog", max_bytes), str(path))


def parse_catalog(text: str, source: str) -> PriceFile:
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

    def catalog(self, root: Node) -> PriceFile:
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
        return PriceFile(
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
        if items.keys() - MINUTE_RATES:
            self.require(
                items, key, node, {"input": "USD per 1M text input tokens, which other token rates fall back to"}
            )
        return ModelPrices(**{name: self.rate(f"{key}.{name}", name, value) for name, (_, value) in items.items()})

    def rate(self, key: str, name: str, node: Node) -> float:
        value = _number(node)
        if value is None or not (math.isfinite(value) and value >= 0):
            units = {DURATION_RATE: "USD per minute of audio", SESSION_RATE: "USD per minute of session time"}
            unit = units.get(name, "USD per minute paused" if name == PAUSED_RATE else "USD per 1M tokens")
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
