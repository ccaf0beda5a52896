"""scripts/demo: the gateway's main job, end to end, on one machine with no key and no network.

Starts the built-in simulated Realtime upstream (or uses --upstream), puts mitmdump with the
gateway in front of it, drives a session through it with the official openai SDK, and prints the
token metrics scraped from /metrics. Against the simulator it also checks them against exactly
what the upstream sent and exits non-zero on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping

from openai import AsyncOpenAI

from ai_gateway.tools.harness import GatewayProcess, SampleKey, expected_samples, scrape, select, usage_only
from ai_gateway.tools.simulators.realtime import Simulator, SimulatorThread

PREFIX = "agentgateway"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="a real upstream, e.g. https://api.openai.com (needs OPENAI_API_KEY)")
    parser.add_argument("--model", default="gpt-realtime", help="Realtime model to request (default: %(default)s)")
    parser.add_argument(
        "--responses", type=int, default=3, help="responses to create in the session (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.upstream and not os.environ.get("OPENAI_API_KEY"):
        parser.error("--upstream needs OPENAI_API_KEY in the environment")

    with upstream(args.upstream) as (url, simulator), GatewayProcess(url) as gateway:
        print(f"upstream  {url}{' (built-in simulator)' if simulator else ''}")
        print(f"gateway   mitmdump -s addons/gateway.py --mode reverse:{url} -p {gateway.port}")
        print(f"metrics   {gateway.metrics_url}\n")
        asyncio.run(drive_session(gateway.url, args.model, args.responses, real=simulator is None))
        scraped = select(scrape(gateway.metrics_url), gen_ai_request_model=args.model)
        samples = usage_only(scraped)
        print(render(samples))
        cost = sum(v for (name, _), v in scraped.items() if name == f"{PREFIX}_gen_ai_client_cost_usd_total")
        print(f"{'cost':<32}${cost:.4f} at the list prices of the genai-prices database")
        if simulator is None:
            return 0
        expected = expected_samples(simulator.usage_for(args.model))
        if samples != expected:
            print("\nMISMATCH: the metrics differ from what the upstream sent", file=sys.stderr)
            return 1
        print(f"\nexact: the metrics equal the usage the upstream sent in {args.responses} response.done events")
        return 0


@contextlib.contextmanager
def upstream(url: str | None) -> Iterator[tuple[str, Simulator | None]]:
    if url:
        yield url, None
        return
    with SimulatorThread() as simulator:
        yield simulator.url, simulator


async def drive_session(gateway_url: str, model: str, responses: int, real: bool) -> None:
    """One Realtime session through the gateway with the SDK's GA client."""
    client = AsyncOpenAI(
        api_key=os.environ.get("OPENAI_API_KEY", "sk-demo-no-key-needed"),
        websocket_base_url=gateway_url.replace("http://", "ws://", 1) + "/v1",
    )
    async with client.realtime.connect(model=model) as connection:
        if real:  # keep a real session cheap: short text answers
            await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        for n in range(1, responses + 1):
            await connection.response.create(
                response={"instructions": "Answer in five words: what is a gateway?"} if real else None
            )  # type: ignore[arg-type]
            async for event in connection:
                if event.type == "response.done":
                    usage = event.response.usage
                    tokens = f"{usage.input_tokens} in, {usage.output_tokens} out" if usage else "no usage"
                    print(f"response {n}: {event.response.status} ({tokens})")
                    break
    print()


def render(samples: Mapping[SampleKey, float]) -> str:
    """The token metrics as a short table: one row per token type and model pair."""
    rows: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0])
    modalities: dict[str, dict[str, float]] = defaultdict(dict)
    for (name, labels), value in sorted(samples.items(), key=lambda item: sorted(item[0][1])):
        label = dict(labels)
        models = f"{label['gen_ai_request_model']} -> {label['gen_ai_response_model']}"
        if name == f"{PREFIX}_gen_ai_client_token_usage_sum":
            rows[(label["gen_ai_operation_name"], label["gen_ai_token_type"], models)][0] += value
        elif name == f"{PREFIX}_gen_ai_client_token_usage_count":
            rows[(label["gen_ai_operation_name"], label["gen_ai_token_type"], models)][1] += value
        elif name.startswith(f"{PREFIX}_gen_ai_client_inference_usage_") and name.endswith("_total"):
            family = name.removeprefix(f"{PREFIX}_gen_ai_client_inference_usage_").removesuffix("_total")
            modalities[family][label["gen_ai_token_modality"]] = (
                modalities[family].get(label["gen_ai_token_modality"], 0) + value
            )
    lines = [
        f"{'operation':<14}{'token type':<18}{'model (request -> response)':<52}{'tokens':>10}{'observations':>14}"
    ]
    for (operation, token_type, models), (total, count) in sorted(rows.items()):
        lines.append(f"{operation:<14}{token_type:<18}{models:<52}{total:>10.0f}{count:>14.0f}")
    for family, split in sorted(modalities.items()):
        lines.append(f"{family:<32}" + "  ".join(f"{m} {v:.0f}" for m, v in sorted(split.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
