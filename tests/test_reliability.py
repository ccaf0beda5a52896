"""Exact accounting under load, policy hot reload, bounded label cardinality, the durable ledger."""

from __future__ import annotations

import asyncio
import json
import signal

import websockets

from ai_gateway.accounting.metrics import OTHER, GatewayMetrics, ModelLabels
from ai_gateway.accounting.usage import TokenUsage
from ai_gateway.tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway.tools.simulators.realtime import SimulatorThread

from .clients import sdk_session, wait_until, websocket_base


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
