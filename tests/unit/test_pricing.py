"""Price catalog: the genai-prices database as the default source, the override file over it,
model resolution, hand-computed costs of real usage shapes, and the override file's validation."""

import importlib.metadata
import socket
import threading
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ai_gateway.accounting.pricing import (
    DATABASE,
    DATABASE_RELEASES,
    DEFAULT_PRICES,
    PRICED,
    RATE_KEYS,
    UNPRICED,
    ModelPrices,
    PriceCatalog,
    UnpricedUsage,
    catalog_for,
    cost_usd,
    database_for,
    load_catalog,
    next_change,
    parse_catalog,
)
from ai_gateway.accounting.usage import MODALITIES, DurationUsage, SessionSeconds, TokenUsage
from ai_gateway.config.policy import PolicyError, load_policy
from ai_gateway.protocols.usage_fields import (
    COMPLETIONS_USAGE,
    EMBEDDINGS_USAGE,
    parse_realtime_usage,
    parse_transcription_usage,
    parse_usage,
)
from ai_gateway_tools.simulators.realtime import EXAMPLE_USAGE

from .conftest import examples

ROOT = Path(__file__).resolve().parents[2]

# What the default policy prices with: genai-prices' bundled rates for provider openai.
OPENAI = catalog_for("openai", None)

# Fixed test rates, so the formula's tests do not change when the database does.
FILE = PriceCatalog(
    parse_catalog(
        """\
taken: 2025-10-15
source: test rates
models:
  gpt-realtime: {input: 4, cached_input: 0.4, output: 16, audio_input: 32, cached_audio_input: 0.4, audio_output: 64}
  gpt-4o-transcribe: {input: 2.5, output: 10, audio_input: 6}
  whisper-1: {audio_minute: 0.006}
  gpt-4o: {input: 2.5, cached_input: 1.25, output: 10}
  text-embedding-3-small: {input: 0.02}
  audio-without-cache-rate: {input: 1, cached_input: 0.1, output: 2, audio_input: 10}
""",
        "test-prices.yaml",
    )
)

REQUIRED_MODELS = (
    "gpt-realtime",
    "gpt-realtime-mini",
    "gpt-4o-realtime-preview",
    "gpt-4o-mini-realtime-preview",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "whisper-1",
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-5",
    "gpt-5-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)


# Real usage shapes: a chat completion with cached and reasoning tokens (1,000 prompt of which 200
# cached, 500 completion of which 100 reasoning), a token-billed transcription, an embedding.
CHAT = parse_usage(
    {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "prompt_tokens_details": {"cached_tokens": 200},
        "completion_tokens_details": {"reasoning_tokens": 100},
    },
    COMPLETIONS_USAGE,
)
TRANSCRIPTION = parse_transcription_usage(
    {
        "type": "tokens",
        "input_tokens": 13,
        "output_tokens": 9,
        "total_tokens": 22,
        "input_token_details": {"text_tokens": 0, "audio_tokens": 13},
    }
)
EMBEDDING = parse_usage({"prompt_tokens": 1000, "total_tokens": 1000}, EMBEDDINGS_USAGE)


def cost(model: str, usage: TokenUsage | DurationUsage, catalog: PriceCatalog = FILE) -> float:
    prices = catalog.price(model)
    assert prices is not None, model
    return cost_usd(usage, prices)


# --- the database: the default policy's source of rates ------------------------------------------


def test_default_policy_prices_every_required_model_from_the_database():
    policy = load_policy(ROOT / "policies" / "openai.yaml")
    assert policy.prices is None, "the default policy needs no prices file"
    catalog = catalog_for(policy.provider, policy.prices)
    for model in REQUIRED_MODELS:
        priced = catalog.resolve(model)
        assert priced is not None and priced.source == DATABASE, model


def test_the_database_version_is_the_pinned_one_and_dated():
    version = importlib.metadata.version("genai-prices")
    assert f"genai-prices=={version}\n" in (ROOT / "constraints.txt").read_text()
    assert f'"genai-prices=={version}"' in (ROOT / "pyproject.toml").read_text()
    source, supplement = OPENAI.sources
    assert supplement == ("supplement-prices.yaml", "", "2026-12-07")
    assert source == (DATABASE, version, DATABASE_RELEASES[version])
    assert date.fromisoformat(source.data_date)
    assert f"genai-prices {version}" in PRICES_DOC and source.data_date in PRICES_DOC


PRICES_DOC = (ROOT / "docs" / "limits.md").read_text(encoding="utf-8")


# Hand-computed costs at the database's published rates. The rates are those of genai-prices
# 0.2.3's bundled data (genai_prices/data.py, provider openai), USD per 1M tokens:
#   gpt-realtime: input 4, cache_read 0.4, output 16, input_audio 32, cache_audio_read 0.4,
#                 output_audio 64, input_image 5, cache_image_read 0.5
#   gpt-realtime-mini: input 0.6, cache_read 0.06, output 2.4, input_audio 10,
#                      cache_audio_read 0.3, output_audio 20, input_image 0.8, cache_image_read 0.08
#   gpt-4o-mini-transcribe: input 1.25, output 5, input_audio 3
#   gpt-4o-mini: input 0.15, cache_read 0.075, output 0.6
#   text-embedding-3-small: input 0.02
#   whisper-1: audio 0.36 per hour (0.006 per minute)
#   gpt-5.4: input 2.5, cache_read 0.25, output 15; above 272,000 input tokens 5, 0.5, 22.5


def test_database_gpt_realtime_reference_response_and_snapshot():
    usage = parse_realtime_usage(EXAMPLE_USAGE)  # the reference documentation's response.done usage
    # text: (119 - 64) fresh * 4 + 64 cached * 0.40; audio: 13 * 32; output: 30 text * 16 + 91 audio * 64
    expected = (55 * 4 + 64 * 0.4 + 13 * 32 + 30 * 16 + 91 * 64) / 1e6
    assert OPENAI.cost("gpt-realtime-2025-08-28", usage) == (pytest.approx(expected, rel=1e-12), PRICED)
    assert OPENAI.resolve("gpt-realtime-2025-08-28").name == "gpt-realtime"


def test_database_gpt_realtime_image_and_cached_audio():
    usage = TokenUsage(
        input=1000,
        output=100,
        cache_read=500,
        input_by_modality=(("text", 200), ("audio", 600), ("image", 200)),
        cache_read_by_modality=(("text", 100), ("audio", 300), ("image", 100)),
        output_by_modality=(("text", 40), ("audio", 60)),
    )
    expected = (100 * 4 + 100 * 0.4 + 300 * 32 + 300 * 0.4 + 100 * 5 + 100 * 0.5 + 40 * 16 + 60 * 64) / 1e6
    assert cost("gpt-realtime", usage, OPENAI) == pytest.approx(expected, rel=1e-12)


def test_database_gpt_realtime_mini():
    usage = TokenUsage(
        input=1000,
        output=300,
        cache_read=400,
        input_by_modality=(("text", 300), ("audio", 700)),
        cache_read_by_modality=(("text", 100), ("audio", 300)),
        output_by_modality=(("text", 100), ("audio", 200)),
    )
    expected = (200 * 0.6 + 100 * 0.06 + 400 * 10 + 300 * 0.3 + 100 * 2.4 + 200 * 20) / 1e6
    assert cost("gpt-realtime-mini-2025-10-06", usage, OPENAI) == pytest.approx(expected, rel=1e-12)


def test_database_transcription_by_tokens():
    usage = TRANSCRIPTION
    assert cost("gpt-4o-mini-transcribe", usage, OPENAI) == pytest.approx((13 * 3 + 9 * 5) / 1e6, rel=1e-12)


def test_database_transcription_by_duration():
    assert OPENAI.cost("whisper-1", DurationUsage(90.0)) == (pytest.approx(1.5 * 0.006, rel=1e-12), PRICED)


def test_database_chat_model_with_cache_and_reasoning():
    usage = CHAT
    expected = (800 * 0.15 + 200 * 0.075 + 500 * 0.6) / 1e6
    assert cost("gpt-4o-mini-2024-07-18", usage, OPENAI) == pytest.approx(expected, rel=1e-12)


def test_database_embedding_model():
    usage = EMBEDDING
    assert cost("text-embedding-3-small", usage, OPENAI) == pytest.approx(1000 * 0.02 / 1e6, rel=1e-12)


def test_database_tiered_prices_apply_to_every_token_past_the_threshold():
    at, above = TokenUsage(input=272_000, output=10), TokenUsage(input=272_001, output=10, cache_read=1)
    assert cost("gpt-5.4", at, OPENAI) == pytest.approx((272_000 * 2.5 + 10 * 15) / 1e6, rel=1e-12)
    assert cost("gpt-5.4", above, OPENAI) == pytest.approx((272_000 * 5 + 1 * 0.5 + 10 * 22.5) / 1e6, rel=1e-12)


GENAI_KEYS = {  # TokenUsage counts -> genai-prices Usage keys
    ("text", "input"): None,
    ("audio", "input"): "input_audio_tokens",
    ("image", "input"): "input_image_tokens",
    ("audio", "cached"): "cache_audio_read_tokens",
    ("image", "cached"): "cache_image_read_tokens",
    ("audio", "output"): "output_audio_tokens",
    ("image", "output"): "output_image_tokens",
}


@settings(max_examples=examples(200), deadline=None)
@given(
    model=st.sampled_from(
        [
            "gpt-realtime",
            "gpt-realtime-mini",
            "gpt-4o-realtime-preview",
            "gpt-4o-mini-transcribe",
            "gpt-4o-mini",
            "gpt-image-1.5",
            "gpt-5.4",
        ]
    ),
    counts=st.fixed_dictionaries(
        {(m, k): st.integers(0, 200_000) for m in MODALITIES for k in ("fresh", "cached", "output")}
    ),
)
def test_costs_equal_genai_prices_own_calculation(model, counts):
    """Our mapping of TokenUsage onto the database's rates prices like genai-prices' calc_price."""
    from genai_prices import Usage, calc_price

    def total(kind: str, *kinds: str) -> dict[str, int]:
        return {m: sum(counts[m, k] for k in (kind, *kinds)) for m in MODALITIES}

    inputs, cached, outputs = total("fresh", "cached"), total("cached"), total("output")
    usage = TokenUsage(
        input=sum(inputs.values()),
        output=sum(outputs.values()),
        cache_read=sum(cached.values()),
        input_by_modality=tuple(inputs.items()),
        cache_read_by_modality=tuple(cached.items()),
        output_by_modality=tuple(outputs.items()),
    )
    theirs = Usage(
        input_tokens=usage.input,
        cache_read_tokens=usage.cache_read,
        output_tokens=usage.output,
        input_audio_tokens=inputs["audio"],
        input_image_tokens=inputs["image"],
        cache_audio_read_tokens=cached["audio"],
        cache_image_read_tokens=cached["image"],
        output_audio_tokens=outputs["audio"],
        output_image_tokens=outputs["image"],
    )
    expected = calc_price(theirs, model, provider_id="openai").total_price
    assert cost(model, usage, OPENAI) == pytest.approx(float(expected), rel=1e-9, abs=1e-15)


def test_rates_are_resolved_once_per_model():
    catalog = catalog_for("openai", None)
    first = catalog.resolve("gpt-realtime-2025-08-28")
    assert catalog.resolve("gpt-realtime-2025-08-28") is first
    assert catalog.price("gpt-realtime-2025-08-28") is first.prices


def test_only_the_bundled_data_is_used_and_nothing_is_fetched(monkeypatch):
    """genai-prices' process-wide snapshot (what its UpdatePrices replaces) is not what we read,
    and building and using a catalog opens no connection and starts no update thread."""
    from genai_prices.data_snapshot import DataSnapshot, set_custom_snapshot

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    set_custom_snapshot(DataSnapshot(providers=[], from_auto_update=True))
    try:
        catalog = catalog_for("openai", None)
        assert catalog.cost("gpt-realtime", TokenUsage(input=1_000_000, output=0)) == (4.0, PRICED)
    finally:
        set_custom_snapshot(None)
    assert not [t for t in threading.enumerate() if t.name.startswith("genai_prices")]


@pytest.mark.parametrize(
    ("system", "model", "name"),
    [
        ("openai", "gpt-realtime", "gpt-realtime"),
        ("azure.ai.openai", "gpt-realtime", "gpt-realtime"),  # Azure falls back to OpenAI's list
        ("gcp.gemini", "gemini-2.5-flash", "gemini-2.5-flash"),
        ("xai", "grok-4", "grok-4-0709"),
        ("x_ai", "grok-4", "grok-4-0709"),
    ],
)
def test_gen_ai_systems_map_to_database_providers(system, model, name):
    priced = catalog_for(system, None).resolve(model)
    assert priced is not None and (priced.source, priced.name) == (DATABASE, name)


def test_a_system_the_database_lacks_has_only_the_override_file():
    assert database_for("example.unknown") is None
    catalog = catalog_for("example.unknown", None)
    assert catalog.sources == ()
    assert catalog.cost("gpt-realtime", TokenUsage(input=1, output=1)) == (None, UNPRICED)
    with_file = catalog_for("example.unknown", DEFAULT_PRICES)
    assert with_file.lookup("realtime-prod")[1] == PRICED


def test_dated_prices_are_resolved_again_when_the_next_one_starts():
    """gemini-3.6-flash has new prices from 2027-01-01 (genai-prices 0.2.3's data)."""
    now = [datetime(2026, 12, 31, 23, 0, tzinfo=UTC).timestamp()]
    catalog = PriceCatalog(database=database_for("gcp.gemini"), clock=lambda: now[0])
    usage = TokenUsage(input=1_000_000, output=0)
    before, status = catalog.cost("gemini-3.6-flash", usage)
    assert status == PRICED
    info = catalog.database.provider.find_model("gemini-3.6-flash", all_providers=catalog.database.providers)
    assert next_change(info, datetime.fromtimestamp(now[0], UTC)) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    now[0] += 2 * 3600
    after, _ = catalog.cost("gemini-3.6-flash", usage)
    assert after != before
    expected = info.get_prices(datetime(2027, 1, 1, 1, tzinfo=UTC)).input_mtok
    assert after == pytest.approx(float(expected))


def test_time_of_day_prices_change_at_the_next_boundary():
    info = database_for("deepseek").provider.find_model("deepseek-chat")
    # its off-peak window is 16:30 to 00:30 UTC (peak prices 00:30 to 16:30)
    assert (
        next_change(info, datetime(2026, 12, 1, 12, tzinfo=UTC))
        == datetime(2026, 12, 1, 16, 30, tzinfo=UTC).timestamp()
    )
    assert (
        next_change(info, datetime(2026, 12, 1, 20, tzinfo=UTC)) == datetime(2026, 12, 2, 0, 30, tzinfo=UTC).timestamp()
    )


# --- the override file over the database ---------------------------------------------------------


def test_override_file_wins_for_the_models_it_lists_and_their_snapshots(tmp_path):
    override = tmp_path / "negotiated.yaml"
    override.write_text("taken: 2026-12-01\nsource: contract\nmodels:\n  gpt-realtime: {input: 1, output: 2}\n")
    catalog = catalog_for("openai", override)
    usage = TokenUsage(input=1_000_000, output=1_000_000)
    for model in ("gpt-realtime", "gpt-realtime-2025-08-28"):
        priced = catalog.resolve(model)
        assert (priced.source, priced.name) == (str(override), "gpt-realtime")
        assert catalog.cost(model, usage) == (pytest.approx(3.0), PRICED)
    # replaced, not merged: the file's entry has no audio rate, so audio is billed as text
    audio = TokenUsage(input=1_000_000, output=0, input_by_modality=(("audio", 1_000_000),))
    assert catalog.cost("gpt-realtime", audio) == (pytest.approx(1.0), PRICED)
    # a model the file does not list comes from the database
    assert catalog.resolve("gpt-realtime-mini").source == DATABASE
    assert [s.source for s in catalog.sources] == ["negotiated.yaml", DATABASE, "supplement-prices.yaml"]
    assert catalog.sources[0].data_date == "2026-12-01"


def test_shipped_override_example():
    catalog = catalog_for("openai", DEFAULT_PRICES)
    old, later = (
        catalog.resolve("gpt-4o-realtime-preview-2024-10-01"),
        catalog.resolve("gpt-4o-realtime-preview-2024-12-17"),
    )
    assert old.source == str(DEFAULT_PRICES) and later.source == DATABASE
    assert (old.prices.audio_input, later.prices.audio_input) == (100.0, 40.0)
    prod = catalog.price("realtime-prod")
    database = catalog.price("gpt-realtime")
    assert prod is not None and database is not None
    assert {k: getattr(prod, k) for k in RATE_KEYS} == {k: getattr(database, k) for k in RATE_KEYS}


@pytest.mark.parametrize(
    ("model", "usage"),
    [
        ("gpt-realtime-t1", TokenUsage(input=1, output=1)),
        ("unknown", TokenUsage(input=1, output=1)),
        ("gpt-realtime-2025-08", TokenUsage(input=1, output=1)),
        ("whisper-1", TokenUsage(input=13, output=9)),  # priced by duration only
        ("gpt-4o-transcribe", DurationUsage(3.2)),  # priced by tokens only
        ("tts-1", TokenUsage(input=10, output=0)),  # priced per character, which is not metered
    ],
)
def test_unpriced_in_the_database(model, usage):
    assert OPENAI.cost(model, usage) == (None, UNPRICED)


# --- the cost formula, at fixed test rates ---------------------------------------------------------


def test_text_only_response_with_cache_and_reasoning():
    usage = CHAT
    # 800 fresh * 2.50 + 200 cached * 1.25 + 500 output * 10.00 (reasoning is inside the 500)
    assert cost("gpt-4o", usage) == pytest.approx((800 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6)


def test_reasoning_tokens_are_not_counted_twice():
    with_reasoning = TokenUsage(input=10, output=50, reasoning=40)
    assert cost("gpt-4o", with_reasoning) == cost("gpt-4o", TokenUsage(input=10, output=50))


def test_cached_audio_is_billed_at_the_cached_audio_rate_only():
    usage = TokenUsage(
        input=100,
        output=0,
        cache_read=80,
        input_by_modality=(("text", 0), ("audio", 100)),
        cache_read_by_modality=(("text", 0), ("audio", 80)),
    )
    # 20 fresh audio * 32 + 80 cached audio * 0.40; not 100 * 32, nor 80 at both rates
    assert cost("gpt-realtime", usage) == pytest.approx((20 * 32 + 80 * 0.4) / 1e6)


def test_cached_tokens_without_a_split_count_as_text():
    usage = parse_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 40, "audio_tokens": 10},
        },
        COMPLETIONS_USAGE,
    )
    # text input 100 - 10 audio = 90, of which 40 cached; audio 10 fresh; output all text
    assert cost("gpt-realtime", usage) == pytest.approx((50 * 4 + 40 * 0.4 + 10 * 32 + 20 * 16) / 1e6)


def test_missing_audio_rates_fall_back_to_text_and_missing_cached_audio_to_fresh_audio():
    audio = TokenUsage(input=10, output=5, input_by_modality=(("audio", 10),), output_by_modality=(("audio", 5),))
    assert cost("gpt-4o", audio) == pytest.approx((10 * 2.5 + 5 * 10) / 1e6)
    cached_audio = TokenUsage(
        input=100, output=0, cache_read=80, input_by_modality=(("audio", 100),), cache_read_by_modality=(("audio", 80),)
    )
    # No cached_audio_input: all 100 at audio_input, not 80 at the text cached rate.
    assert cost("audio-without-cache-rate", cached_audio) == pytest.approx(100 * 10 / 1e6)


def test_transcription_billed_by_tokens():
    usage = TRANSCRIPTION
    assert cost("gpt-4o-transcribe", usage) == pytest.approx((13 * 6 + 9 * 10) / 1e6)


def test_transcription_billed_by_duration():
    usage = parse_transcription_usage({"type": "duration", "seconds": 3.2})
    assert cost("whisper-1", usage) == pytest.approx(3.2 / 60 * 0.006)


def test_embeddings_bill_input_only():
    usage = EMBEDDING
    assert usage.output is None
    assert cost("text-embedding-3-small", usage) == pytest.approx(1000 * 0.02 / 1e6)


@pytest.mark.parametrize(
    ("model", "resolved"),
    [
        ("gpt-realtime", "gpt-realtime"),
        ("gpt-realtime-2025-08-28", "gpt-realtime"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-5-nano", None),
        ("gpt-4o-audio-preview", None),
        ("gpt-realtime-2025-08", None),
        ("gpt-realtime-2025-08-28-extra", None),
        ("unknown", None),
    ],
)
def test_file_snapshot_resolution(model, resolved):
    priced = FILE.resolve(model)
    assert (priced.name if priced else None) == resolved
    prices, status = FILE.lookup(model)
    assert status == (UNPRICED if resolved is None else PRICED)
    assert prices is (None if resolved is None else FILE.file.models[resolved])


@pytest.mark.parametrize(
    ("model", "usage"),
    [
        ("gpt-5-nano", TokenUsage(input=1, output=1)),
        ("whisper-1", TokenUsage(input=13, output=9)),
        ("gpt-4o-transcribe", DurationUsage(3.2)),
        ("text-embedding-3-small", TokenUsage(input=10, output=1)),
    ],
)
def test_unpriced_models_and_usage_without_a_rate(model, usage):
    assert FILE.cost(model, usage) == (None, UNPRICED)


def test_missing_rate_names_the_rate_and_zero_counts_need_none():
    prices = FILE.price("gpt-4o-transcribe")
    assert prices is not None
    with pytest.raises(UnpricedUsage, match="audio_minute"):
        cost_usd(DurationUsage(3.2), prices)
    with pytest.raises(UnpricedUsage, match="image_output"):
        cost_usd(TokenUsage(input=0, output=3, output_by_modality=(("image", 3),)), ModelPrices(input=1))
    assert FILE.cost("gpt-4o-transcribe", DurationUsage(0.0)) == (0.0, PRICED)
    assert FILE.cost("whisper-1", DurationUsage(60.0)) == (pytest.approx(0.006), PRICED)


def test_shipped_override_file_loads():
    file = load_catalog(DEFAULT_PRICES)
    assert isinstance(file.taken, date) and file.source
    assert set(file.models) == {"realtime-prod", "gpt-4o-realtime-preview-2024-10-01"}


HEAD = "taken: 2025-10-15\nsource: s\nmodels:\n"
RATES = ", ".join(RATE_KEYS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HEAD + "  gpt-x:\n    input: -1\n",
            "p.yaml:5: models.gpt-x.input: expected a non-negative number of USD per 1M tokens, got int -1",
        ),
        (
            HEAD + "  gpt-x:\n    input: '1.0'\n",
            "p.yaml:5: models.gpt-x.input: expected a non-negative number of USD per 1M tokens, got '1.0'",
        ),
        (
            HEAD + "  gpt-x:\n    input: 1\n    output: .nan\n",
            "p.yaml:6: models.gpt-x.output: expected a non-negative number of USD per 1M tokens, got float .nan",
        ),
        (
            HEAD + "  gpt-x:\n    input: true\n",
            "p.yaml:5: models.gpt-x.input: expected a non-negative number of USD per 1M tokens, got bool true",
        ),
        (
            HEAD + "  whisper-1:\n    audio_minute: -0.006\n",
            "p.yaml:5: models.whisper-1.audio_minute: expected a non-negative number of USD per minute of audio, got float -0.006",
        ),
        (
            HEAD + "  gpt-x:\n    input: 1\n    audio_in: 3\n",
            f"p.yaml:6: models.gpt-x.audio_in: unknown key; expected one of {RATES}",
        ),
        (
            HEAD + "  gpt-x:\n    output: 1\n",
            "p.yaml:5: models.gpt-x.input: missing; expected USD per 1M text input tokens, which other token rates fall back to",
        ),
        (HEAD + "  gpt-x: {}\n", f"p.yaml:4: models.gpt-x: expected at least one rate of {RATES}"),
        (HEAD + "  gpt-x:\n", "p.yaml:4: models.gpt-x: expected a mapping, got nothing"),
        (HEAD + "  gpt-x: {input: 1}\n  gpt-x: {input: 2}\n", "p.yaml:5: models.gpt-x: duplicate key"),
        ("taken: 2025-10-15\nsource: s\nmodels: {}\n", "p.yaml:3: models: expected at least one model"),
        (
            HEAD + "  gpt-x: {input: 1}\ncurrency: USD\n",
            "p.yaml:5: currency: unknown key; expected one of taken, source, models",
        ),
        (
            "source: s\nmodels:\n  gpt-x: {input: 1}\n",
            "p.yaml:1: taken: missing; expected the date the prices were read (YYYY-MM-DD)",
        ),
        (
            "taken: last week\nsource: s\nmodels:\n  gpt-x: {input: 1}\n",
            "p.yaml:1: taken: expected a date (YYYY-MM-DD), got 'last week'",
        ),
        (
            "taken: 2025-10-15\nsource: 3\nmodels:\n  gpt-x: {input: 1}\n",
            "p.yaml:2: source: expected a non-empty string, got int 3",
        ),
        (HEAD + "  gpt-x: {input: [1}\n", "p.yaml:4: invalid YAML: expected ',' or ']', but got '}'"),
        ("", "p.yaml: expected a mapping with taken, source and models, got an empty file"),
    ],
)
def test_invalid_catalogs_name_file_line_key_and_expectation(text, expected):
    with pytest.raises(PolicyError) as e:
        parse_catalog(text, "p.yaml")
    assert "\n" not in str(e.value)
    assert str(e.value) == expected


def test_unreadable_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read price catalog"):
        load_catalog(tmp_path / "missing.yaml")


def test_session_time_is_priced_per_second_at_per_minute_rates():
    file = parse_catalog(HEAD + "  live-x: {session_minute: 0.06, paused_session_minute: 0.012}\n", "p.yaml")
    prices = file.models["live-x"]
    assert cost_usd(SessionSeconds(61.0, 30.0), prices) == pytest.approx(61 * 0.001 + 30 * 0.0002)
    # No paused rate: paused time at the session rate; no session rate: at audio_minute (the database's form).
    assert cost_usd(SessionSeconds(1.0, 1.0), ModelPrices(session_minute=0.06)) == pytest.approx(0.002)
    assert cost_usd(SessionSeconds(60.0), ModelPrices(audio_minute=0.05)) == pytest.approx(0.05)
    with pytest.raises(UnpricedUsage, match="no session_minute rate for 3 s"):
        cost_usd(SessionSeconds(3.0), ModelPrices(input=1.0))
    with pytest.raises(PolicyError, match="expected a non-negative number of USD per minute of session time"):
        parse_catalog(HEAD + "  live-x: {session_minute: -1}\n", "p.yaml")


def test_the_supplement_prices_what_the_database_lacks_and_only_that():
    assert OPENAI.resolve("gpt-live-1.1").prices == ModelPrices(session_minute=0.05, paused_session_minute=0.02)
    assert OPENAI.resolve("gpt-live-1").source == DATABASE  # listed there ($3 per hour as audio_hours)
    assert OPENAI.cost("gpt-live-1", SessionSeconds(30.0, 30.0)) == (pytest.approx(0.05), PRICED)
    assert catalog_for("gcp.gemini", None).resolve("gpt-live-1.1") is None


def test_yaml_number_spellings_are_rates():
    file = parse_catalog(HEAD + "  gpt-x: {input: 1_000, output: 2.5e-1, cached_input: 0}\n", "p.yaml")
    assert file.models["gpt-x"] == ModelPrices(input=1000.0, output=0.25, cached_input=0.0)


# Property: a valid usage is built from independent counts of each (modality, kind), so adding
# tokens of any one kind must never lower the cost, whichever optional splits the upstream reports.
KINDS = tuple((m, k) for m in MODALITIES for k in ("fresh", "cached", "output"))
rate = st.floats(min_value=0, max_value=1000, allow_nan=False)
optional_rate = st.none() | rate
prices_strategy = st.builds(
    ModelPrices,
    input=rate,
    output=rate,
    **{name: optional_rate for name in RATE_KEYS if name not in ("input", "output", "audio_minute")},
)


def build_usage(counts: dict[tuple[str, str], int], report_text: bool, report_cache: bool) -> TokenUsage:
    """The TokenUsage an upstream would report for these counts."""

    def split(kinds: tuple[str, ...]) -> dict[str, int]:
        return {m: sum(counts[m, k] for k in kinds) for m in MODALITIES}

    def reported(by_modality: dict[str, int]) -> tuple[tuple[str, int], ...]:
        return tuple((m, n) for m, n in by_modality.items() if report_text or m != "text")

    inputs, cached, outputs = split(("fresh", "cached")), split(("cached",)), split(("output",))
    return TokenUsage(
        input=sum(inputs.values()),
        output=sum(outputs.values()),
        cache_read=sum(cached.values()),
        input_by_modality=reported(inputs),
        cache_read_by_modality=reported(cached) if report_cache else (),
        output_by_modality=reported(outputs),
    )


@given(
    prices=prices_strategy,
    counts=st.fixed_dictionaries({kind: st.integers(0, 10**6) for kind in KINDS}),
    report_text=st.booleans(),
    report_cache=st.booleans(),
    kind=st.sampled_from(KINDS),
    more=st.integers(1, 10**6),
)
def test_cost_is_non_negative_and_monotonic_in_each_count(prices, counts, report_text, report_cache, kind, more):
    if not report_cache:
        # Without a cached split every cached token is text; a valid usage then caches only text.
        counts |= {(m, "cached"): 0 for m in MODALITIES if m != "text"}
        kind = ("text", "cached") if kind[1] == "cached" else kind
    before = cost_usd(build_usage(counts, report_text, report_cache), prices)
    after = cost_usd(build_usage(counts | {kind: counts[kind] + more}, report_text, report_cache), prices)
    assert 0 <= before <= after
