"""Exact accounting under load, policy hot reload, bounded label cardinality, the durable ledger."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections import defaultdict
from collections.abc import Mapping

import pytest
import websockets
from prometheus_client import CollectorRegistry

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.metrics import OTHER, GatewayMetrics, ModelLabels
from ai_gateway.accounting.usage import CharacterUsage, DurationUsage, TokenUsage
from ai_gateway_tools.harness import GatewayProcess, SampleKey, expected_samples, scrape, select, usage_only
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import sdk_session, wait_until, websocket_base
from ..conftest import LAUNCHERS

PAIR = ("gen_ai_request_model", "gen_ai_response_model")
FOLDED = "gateway_metric_series_folded_total"


async def responses_in_turn(url: str, responses: int, seen: list[str] | None = None) -> int:
    """One session creating responses one after another; returns how many finished."""
    done = 0
    async with websockets.connect(url, max_size=None) as ws:
        for _ in range(responses):
            await ws.send(json.dumps({"type": "response.create"}))
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "response.done":
                    done += 1
                    if seen is not None:
                        seen.append(event["response"]["id"])
                    break
    return done


@pytest.mark.slow
def test_200_concurrent_sessions_of_20_responses_are_metered_exactly():
    with (
        SimulatorThread(seed=5, audio_deltas=1, transcript_deltas=1) as simulator,
        GatewayProcess(simulator.url) as gateway,
    ):
        models = [f"gpt-realtime-load{i % 10}" for i in range(200)]

        async def load() -> list[int]:
            base = websocket_base(gateway.url)
            return await asyncio.gather(*(responses_in_turn(f"{base}/v1/realtime?model={m}", 20) for m in models))

        assert asyncio.run(load()) == [20] * 200
        assert len(simulator.ledger) == 4000
        expected = expected_samples(simulator.ledger)
        assert usage_only(select(scrape(gateway.metrics_url), gen_ai_operation_name="realtime")) == expected


@pytest.mark.slow
def test_policy_edits_apply_to_new_connections_and_invalid_edits_are_refused(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("provider: team-a\nroutes:\n  /realtime: Realtime\n")
    with (
        SimulatorThread() as simulator,
        GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway,
    ):
        asyncio.run(sdk_session(gateway.url, "gpt-realtime-before", metadata=[{}]))
        policy.write_text("provider: team-b\nroutes:\n  /realtime: Realtime\n")
        wait_until(lambda: "policy reloaded" in gateway.log())
        assert sum("policy reloaded" in line for line in gateway.log().splitlines()) == 1
        asyncio.run(sdk_session(gateway.url, "gpt-realtime-after", metadata=[{}]))
        policy.write_text("provider: team-c\nroutes:\n  /realtime: Realtim\n")
        wait_until(lambda: "policy change refused" in gateway.log())
        asyncio.run(sdk_session(gateway.url, "gpt-realtime-refused", metadata=[{}]))
        samples = scrape(gateway.metrics_url)
    refusal = next(line for line in gateway.log().splitlines() if "policy change refused" in line)
    assert f"{policy}:3: routes./realtime: expected one of" in refusal
    for model, system in [
        ("gpt-realtime-before", "team-a"),
        ("gpt-realtime-after", "team-b"),
        ("gpt-realtime-refused", "team-b"),
    ]:
        assert usage_only(select(samples, gen_ai_request_model=model)) == expected_samples(
            simulator.usage_for(model), system=system
        )


def test_label_values_are_bounded_and_sums_stay_exact():
    metrics = GatewayMetrics("t", max_model_labels=50)
    for i in range(10_000):
        metrics.series(ModelLabels("chat", "openai", f"model-{i}\n\x00" + "x" * 300, "resp")).record(TokenUsage(i, 1))
    families = {f.name: f for f in metrics.registry.collect()}
    sums = [
        s
        for s in families["t_gen_ai_client_token_usage"].samples
        if s.name.endswith("_sum") and s.labels["gen_ai_token_type"] == "input"
    ]
    assert len(sums) == 51
    assert sum(s.value for s in sums) == sum(range(10_000))
    models = {s.labels["gen_ai_request_model"] for s in sums}
    assert OTHER in models
    assert all(len(m) <= 128 and m.isprintable() for m in models)


def test_label_bound_through_the_gateway():
    with SimulatorThread(audio_deltas=0, transcript_deltas=0) as simulator:
        with GatewayProcess(simulator.url, options={"gateway_max_model_labels": "5"}) as gateway:

            async def sessions() -> list[int]:
                base = websocket_base(gateway.url)
                return await asyncio.gather(
                    *(responses_in_turn(f"{base}/v1/realtime?model=m{i}", 1) for i in range(30))
                )

            asyncio.run(sessions())
            samples = scrape(gateway.metrics_url)
    counts = select(samples, gen_ai_token_type="input")
    request_models = {dict(labels)["gen_ai_request_model"] for (name, labels) in counts if name.endswith("_count")}
    assert len(request_models) <= 5 + 1 and OTHER in request_models
    total = sum(v for (name, _), v in counts.items() if name.endswith("_sum"))
    assert total == sum(e.usage["input_tokens"] for e in simulator.ledger)


def samples_of(registry: CollectorRegistry) -> dict[SampleKey, float]:
    """A registry's samples as `scrape` reads them from /metrics."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def series_by_family(samples: Mapping[SampleKey, float]) -> dict[str, set[frozenset[tuple[str, str]]]]:
    """The label sets of each model-labelled family (a histogram's buckets are one series)."""
    families: dict[str, set[frozenset[tuple[str, str]]]] = defaultdict(set)
    for name, labels in samples:
        if PAIR[0] in dict(labels):
            families[re.sub(r"_(bucket|sum|count|total)$", "", name)].add(frozenset(i for i in labels if i[0] != "le"))
    return families


def own_series(label_sets: set[frozenset[tuple[str, str]]]) -> int:
    """Label sets beyond the `other` bucket (request and response model both `other`)."""
    return sum(1 for labels in label_sets if {dict(labels)[k] for k in PAIR} != {OTHER})


def folded(samples: Mapping[SampleKey, float], family: str) -> float:
    return sum(select({k: v for k, v in samples.items() if k[0].endswith(FOLDED)}, family=family).values())


def without_pairs(samples: Mapping[SampleKey, float]) -> dict[SampleKey, float]:
    """Every sample summed over request and response models: what folding must leave unchanged."""
    sums: dict[SampleKey, float] = defaultdict(float)
    for (name, labels), value in samples.items():
        if not name.endswith(FOLDED):
            sums[name, frozenset(i for i in labels if i[0] not in PAIR)] += value
    return sums


def renaming_upstream(bound: int) -> dict[SampleKey, float]:
    """100 responses, each under a new response model, billed with every kind of usage and latency."""
    metrics = GatewayMetrics("t", max_series_per_family=bound)
    accounting = Accounting(metrics)
    source = Source("flow", "Realtime", session=True)
    for n in range(100):
        labels = ModelLabels("realtime", "openai", f"m{n % 7}", f"renamed-{n}")
        usage = TokenUsage(100 + n, 20, 10, input_by_modality=(("audio", 30),), reasoning=5)
        accounting.bill(source, labels, usage, "completed" if n % 3 else "cancelled")
        accounting.bill(source, labels, DurationUsage(1.5))
        accounting.bill(source, labels, CharacterUsage(7))
        metrics.series(labels).priced("priced", 0.25)
        accounting.latency(labels, 0.125, 0.5, 20)
        accounting.turn_latency(labels, "commit", 0.25)
        accounting.duration(labels, 0.5, "503" if n % 2 else "")
    return samples_of(metrics.registry)


def test_every_model_labelled_family_holds_its_series_bound_and_its_totals():
    unbounded, bounded = renaming_upstream(100_000), renaming_upstream(20)
    attempted, kept = series_by_family(unbounded), series_by_family(bounded)
    assert len(attempted) == 14  # every family with model labels, histograms included
    for family, label_sets in kept.items():
        assert own_series(label_sets) == 20, family
        assert folded(bounded, family) == len(attempted[family]) - 20, family
    assert without_pairs(bounded) == pytest.approx(without_pairs(unbounded))


def test_the_other_bucket_is_always_admitted():
    metrics = GatewayMetrics("t", max_series_per_family=1)
    for request_model in ("a", "b", OTHER):
        metrics.series(ModelLabels("realtime", "openai", request_model, OTHER)).response("completed")
    samples = samples_of(metrics.registry)
    (responses,) = series_by_family(samples).values()
    assert {dict(labels)[PAIR[0]] for labels in responses} == {"a", OTHER}
    assert folded(samples, "t_gen_ai_client_responses") == 1  # b; the genuine `other` pair was no newcomer
    assert sum(select(samples, gen_ai_request_model=OTHER).values()) == 2


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_series_stay_bounded_when_the_upstream_renames_its_model_before_each_response(launcher):
    bound, sessions, responses = 20, 5, 6  # 30 request x response model pairs
    with SimulatorThread(audio_deltas=1, transcript_deltas=1, renamed_model="renamed-{n}") as simulator:
        options = {"gateway_max_series_per_family": str(bound)}
        with GatewayProcess(simulator.url, launcher=launcher, options=options) as gateway:

            async def renamed() -> list[int]:
                base = websocket_base(gateway.url)
                return await asyncio.gather(
                    *(responses_in_turn(f"{base}/v1/realtime?model=m{i}", responses) for i in range(sessions))
                )

            assert asyncio.run(renamed()) == [responses] * sessions
            samples = scrape(gateway.metrics_url)
    assert len({(e.request_model, e.response_model) for e in simulator.ledger}) == sessions * responses
    families = series_by_family(samples)
    assert all(own_series(label_sets) <= bound for label_sets in families.values())
    assert folded(samples, "agentgateway_gen_ai_client_token_usage") > 0
    for token_type, key in (("input", "input_tokens"), ("output", "output_tokens")):
        sums = select(samples, gen_ai_token_type=token_type)
        total = sum(v for (name, _), v in sums.items() if name.endswith("_sum"))
        assert total == sum(e.usage[key] for e in simulator.ledger)


def test_ledger_has_every_finished_response_exactly_once_after_sigkill(tmp_path):
    ledger = tmp_path / "usage.jsonl"
    with SimulatorThread(audio_deltas=1, transcript_deltas=1) as simulator:
        gateway = GatewayProcess(simulator.url, options={"gateway_usage_log": str(ledger)}).start()
        seen: list[str] = []

        async def load() -> None:
            base = websocket_base(gateway.url)
            tasks = [
                asyncio.ensure_future(responses_in_turn(f"{base}/v1/realtime?model=ledger", 10_000, seen))
                for _ in range(8)
            ]
            while len(seen) < 300:
                await asyncio.sleep(0.01)
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGKILL)
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(load())
        gateway.stop()
    records = [json.loads(line) for line in ledger.read_text().splitlines() if line.endswith("}")]
    ids = [r["response_id"] for r in records]
    assert len(ids) == len(set(ids)), "a response is in the ledger twice"
    assert set(seen) <= set(ids), "a response the client saw finish is missing from the ledger"
    sent = {e.usage["input_tokens"] for e in simulator.ledger}
    assert all(
        r["input_tokens"] in sent and r["route"] == "Realtime" and r["request_model"] == "ledger" for r in records
    )


def test_ledger_lines_carry_every_usage_field(tmp_path):
    ledger = tmp_path / "ledger" / "usage.jsonl"
    with (
        SimulatorThread() as simulator,
        GatewayProcess(simulator.url, options={"gateway_usage_log": str(ledger)}) as gateway,
    ):
        asyncio.run(sdk_session(gateway.url, "gpt-realtime-ledger", metadata=[{}, {"sim_status": "cancelled"}]))
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(records) == 2
    for record, sent in zip(records, simulator.ledger, strict=True):
        usage = sent.usage
        details = usage["input_token_details"]
        assert record["response_model"] == sent.response_model and record["status"] == sent.status
        assert record["input_tokens"] == usage["input_tokens"] and record["output_tokens"] == usage["output_tokens"]
        assert record["cached_tokens"] == details["cached_tokens"]
        assert record["input_by_modality"] == {m: details[f"{m}_tokens"] for m in ("text", "audio", "image")}
        assert record["cached_by_modality"] == {
            m: details["cached_tokens_details"][f"{m}_tokens"] for m in ("text", "audio", "image")
        }
        assert record["output_by_modality"] == {
            m: usage["output_token_details"][f"{m}_tokens"] for m in ("text", "audio")
        }
        assert record["flow_id"] and record["time"].endswith("+00:00")
