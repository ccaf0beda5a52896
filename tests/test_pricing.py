"""Price catalog loading and validation, model resolution, and hand-computed costs of real usage shapes."""

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ai_gateway.accounting.pricing import (
    DEFAULT_PRICES,
    PRICED,
    RATE_KEYS,
    UNPRICED,
    ModelPrices,
    UnpricedUsage,
    cost_usd,
    load_catalog,
    parse_catalog,
)
from ai_gateway.accounting.usage import (
    COMPLETIONS_USAGE,
    EMBEDDINGS_USAGE,
    MODALITIES,
    DurationUsage,
    TokenUsage,
    parse_realtime_usage,
    parse_transcription_usage,
    parse_usage,
)
from ai_gateway.config.policy import PolicyError
from ai_gateway.tools.simulators.realtime import EXAMPLE_USAGE

# The shipped list prices, fixed here so the hand computations do not change when prices.yaml does.
CATALOG = parse_catalog(
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


def cost(model: str, usage: TokenUsage | DurationUsage) -> float:
    prices = CATALOG.price(model)
    assert prices is not None
    return cost_usd(usage, prices)


def test_shipped_catalog_loads_and_prices_every_required_model():
    catalog = load_catalog(DEFAULT_PRICES)
    assert isinstance(catalog.taken, date)
    assert catalog.source
    for model in REQUIRED_MODELS:
        assert catalog.lookup(model)[1] == PRICED, model
    whisper = catalog.price("whisper-1")
    assert whisper is not None and whisper.audio_minute is not None


def test_text_only_response_with_cache_and_reasoning():
    usage = parse_usage(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 200},
            "completion_tokens_details": {"reasoning_tokens": 100},
        },
        COMPLETIONS_USAGE,
    )
    # 800 fresh * 2.50 + 200 cached * 1.25 + 500 output * 10.00 (reasoning is inside the 500)
    assert cost("gpt-4o", usage) == pytest.approx((800 * 2.5 + 200 * 1.25 + 500 * 10) / 1e6)


def test_reasoning_tokens_are_not_counted_twice():
    with_reasoning = TokenUsage(input=10, output=50, reasoning=40)
    assert cost("gpt-4o", with_reasoning) == cost("gpt-4o", TokenUsage(input=10, output=50))


def test_reference_realtime_response_with_audio_and_cached_text():
    usage = parse_realtime_usage(
        EXAMPLE_USAGE  # the reference documentation's response.done usage
    )
    # text: (119 - 64) fresh * 4 + 64 cached * 0.40; audio: 13 * 32; output: 30 * 16 + 91 * 64
    expected = (55 * 4 + 64 * 0.4 + 13 * 32 + 30 * 16 + 91 * 64) / 1e6
    assert expected == pytest.approx(0.0069656)
    assert cost("gpt-realtime-2025-08-28", usage) == pytest.approx(expected)


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
    usage = parse_transcription_usage(
        {
            "type": "tokens",
            "input_tokens": 13,
            "output_tokens": 9,
            "total_tokens": 22,
            "input_token_details": {"text_tokens": 0, "audio_tokens": 13},
        }
    )
    assert cost("gpt-4o-transcribe", usage) == pytest.approx((13 * 6 + 9 * 10) / 1e6)


def test_transcription_billed_by_duration():
    usage = parse_transcription_usage({"type": "duration", "seconds": 3.2})
    assert cost("whisper-1", usage) == pytest.approx(3.2 / 60 * 0.006)


def test_embeddings_bill_input_only():
    usage = parse_usage({"prompt_tokens": 1000, "total_tokens": 1000}, EMBEDDINGS_USAGE)
    assert usage.output is None
    assert cost("text-embedding-3-small", usage) == pytest.approx(1000 * 0.02 / 1e6)


@pytest.mark.parametrize(
    ("model", "resolved"),
    [
        ("gpt-realtime", "gpt-realtime"),
        ("gpt-realtime-2025-08-28", "gpt-realtime"),
        ("gpt-realtime-mini-2025-10-06", "gpt-realtime-mini"),
        ("gpt-4o-realtime-preview-2024-10-01", "gpt-4o-realtime-preview-2024-10-01"),
        ("gpt-4o-realtime-preview-2024-12-17", "gpt-4o-realtime-preview"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-5-nano", None),
        ("gpt-4o-audio-preview", None),
        ("gpt-realtime-2025-08", None),
        ("gpt-realtime-2025-08-28-extra", None),
        ("unknown", None),
    ],
)
def test_snapshot_resolution(model, resolved):
    catalog = load_catalog(DEFAULT_PRICES)
    assert catalog.resolve(model) == resolved
    prices, status = catalog.lookup(model)
    assert status == (UNPRICED if resolved is None else PRICED)
    assert prices is (None if resolved is None else catalog.models[resolved])


def test_a_listed_snapshot_has_its_own_prices():
    catalog = load_catalog(DEFAULT_PRICES)
    old, alias = catalog.price("gpt-4o-realtime-preview-2024-10-01"), catalog.price("gpt-4o-realtime-preview")
    assert old is not None and alias is not None
    assert old.audio_input != alias.audio_input


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
    assert CATALOG.cost(model, usage) == (None, UNPRICED)


def test_missing_rate_names_the_rate_and_zero_counts_need_none():
    prices = CATALOG.price("gpt-4o-transcribe")
    assert prices is not None
    with pytest.raises(UnpricedUsage, match="audio_minute"):
        cost_usd(DurationUsage(3.2), prices)
    assert CATALOG.cost("gpt-4o-transcribe", DurationUsage(0.0)) == (0.0, PRICED)
    assert CATALOG.cost("whisper-1", DurationUsage(60.0)) == (pytest.approx(0.006), PRICED)


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


def test_yaml_number_spellings_are_rates():
    catalog = parse_catalog(HEAD + "  gpt-x: {input: 1_000, output: 2.5e-1, cached_input: 0}\n", "p.yaml")
    assert catalog.models["gpt-x"] == ModelPrices(input=1000.0, output=0.25, cached_input=0.0)


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
