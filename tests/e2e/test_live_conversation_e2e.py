"""A GPT-Live session from the openai SDK, kept by mitmweb's gateway as a conversation: its spoken
turns as transcribed, its delegated responses priced as /metrics counted them."""

from __future__ import annotations

import asyncio
import json

import pytest

from ai_gateway_tools.debug import mitmweb, web_url
from ai_gateway_tools.harness import free_port, scrape_until, select
from ai_gateway_tools.simulators.live import DEFAULT_DELEGATE, HEARD, SAID, LiveSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from .test_openai_live_e2e import live_session
from .test_secrets_mitmweb import fetch, web_base


def test_mitmweb_keeps_a_gpt_live_session_as_its_turns(tmp_path):
    with (
        SimulatorThread(server=LiveSimulator(seed=31)) as simulator,
        mitmweb(simulator.url, web_port=free_port()) as gateway,
    ):
        token = web_url(gateway).split("token=", 1)[1]
        asyncio.run(live_session(gateway.url, "gpt-live-1", ["tick", "delegate", "tick", "tick", "delegate", "close"]))
        fetch(web_base(gateway), "/commands/realtime.export", token, ["@all", str(tmp_path)])
        (bundle,) = tmp_path.iterdir()
        turns = json.loads((bundle / "turns.json").read_text())["turns"]
        assert [(t["role"], t["text"]) for t in turns] == [
            ("user", HEARD),
            ("assistant", SAID),
            ("assistant", "Done."),
            ("user", HEARD),
            ("assistant", SAID),
            ("user", HEARD),
            ("assistant", SAID),
            ("assistant", "Done."),
        ]
        delegated = [t for t in turns if t["response_id"] is not None]
        assert [(t["status"], t["notes"]) for t in delegated] == [("completed", ["delegated to responses"])] * 2
        assert all(t["usage"] is None and t["cost_usd"] is None for t in turns if t["voice"])
        cost = sum(t["cost_usd"] for t in delegated)
        tokens = {kind: sum(t["usage"][kind] for t in delegated) for kind in ("input", "output")}

        def metered(samples: dict) -> dict[str, float]:
            mine = select(samples, gen_ai_request_model=DEFAULT_DELEGATE)
            counts = {
                kind: sum(
                    v
                    for (name, labels), v in mine.items()
                    if name.endswith("_token_usage_sum") and ("gen_ai_token_type", kind) in labels
                )
                for kind in ("input", "output")
            }
            return counts | {"cost": sum(v for (name, _), v in mine.items() if name.endswith("_cost_usd_total"))}

        samples = metered(scrape_until(gateway.metrics_url, lambda s: metered(s)["input"] == tokens["input"]))
        assert {kind: samples[kind] for kind in tokens} == tokens
        assert cost > 0 and samples["cost"] == pytest.approx(cost, rel=1e-9)
