"""scripts/demo: the gateway's main job, end to end, on one machine with no key and no network.

Starts the built-in simulated Realtime upstream (or uses --upstream), puts mitmdump with the
gateway in front of it, drives a session through it with the official openai SDK, and prints the
token metrics scraped from /metrics. Against the simulator it also checks them against exactly
what the upstream sent and exits non-zero on any difference. `--protocol gemini-live` does the
same for Gemini Live with the simulated Live upstream, policies/gemini.yaml and Google's
google-genai SDK (the gateway holds the key; the SDK connects over TLS to the gateway, trusting
the gateway's own CA).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ai_gateway_tools.harness import GatewayProcess, SampleKey, expected_samples, scrape, select, usage_only
from ai_gateway_tools.simulators.gemini_live import AI_STUDIO_PATH, GeminiLiveSimulator
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

PREFIX = "agentgateway"
GEMINI_POLICY = Path(__file__).resolve().parents[2] / "policies" / "gemini.yaml"
GEMINI_MODEL = "gemini-2.5-flash-native-audio-preview-09-2025"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="a real upstream, e.g. https://api.openai.com (needs OPENAI_API_KEY)")
    parser.add_argument(
        "--protocol", choices=("openai", "gemini-live"), default="openai", help="(default: %(default)s)"
    )
    parser.add_argument("--model", help=f"model to request (default: gpt-realtime; gemini-live: {GEMINI_MODEL})")
    parser.add_argument(
        "--responses", type=int, default=3, help="responses to create in the session (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.protocol == "gemini-live":
        if args.upstream and not os.environ.get("GEMINI_API_KEY"):
            parser.error("--upstream needs GEMINI_API_KEY in the environment")
        return gemini_demo(args.upstream, args.model or GEMINI_MODEL, args.responses)
    args.model = args.model or "gpt-realtime"
    if args.upstream and not os.environ.get("OPENAI_API_KEY"):
        parser.error("--upstream needs OPENAI_API_KEY in the environment")

    with upstream(args.upstream) as (url, simulator), GatewayProcess(url) as gateway:
        print(f"upstream  {url}{' (built-in simulator)' if simulator else ''}")
        print(f"gateway   mitmdump -s addons/gateway.py --mode reverse:{url} -p {gateway.port}")
        print(f"metrics   {gateway.metrics_url}\n")
        asyncio.run(drive_session(gateway.url, args.model, args.responses, real=simulator is None))
        expected = None if simulator is None else expected_samples(simulator.usage_for(args.model))
        return report(gateway, args.model, expected, f"{args.responses} response.done events")


def report(gateway: GatewayProcess, model: str, expected: Mapping[SampleKey, float] | None, what: str) -> int:
    """Prints the model's metrics; with the upstream's ledger, 0 only if they equal it exactly."""
    scraped = select(scrape(gateway.metrics_url), gen_ai_request_model=model)
    samples = usage_only(scraped)
    print(render(samples))
    cost = sum(v for (name, _), v in scraped.items() if name == f"{PREFIX}_gen_ai_client_cost_usd_total")
    print(f"{'cost':<32}${cost:.4f} at the list prices of the genai-prices database")
    if expected is None:
        return 0
    if samples != expected:
        print("\nMISMATCH: the metrics differ from what the upstream sent", file=sys.stderr)
        return 1
    print(f"\nexact: the metrics equal the usage the upstream sent in {what}")
    return 0


def gemini_demo(upstream_url: str | None, model: str, turns: int) -> int:
    """A Gemini Live session through the gateway with google-genai, against the simulator unless upstream_url."""
    with contextlib.ExitStack() as stack:
        simulator = None if upstream_url else stack.enter_context(SimulatorThread(server=GeminiLiveSimulator()))
        url = upstream_url or simulator.url
        confdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        env = {"GEMINI_API_KEY": os.environ.get("GEMINI_API_KEY", "demo-no-key-needed")}
        options = {"gateway_policy": str(GEMINI_POLICY), "confdir": str(confdir)}
        gateway = stack.enter_context(GatewayProcess(url, options=options, env=env))
        print(f"upstream  {url}{' (built-in Gemini Live simulator)' if simulator else ''}")
        print(f"gateway   mitmdump -s addons/gateway.py --mode reverse:{url} -p {gateway.port}")
        print(f"metrics   {gateway.metrics_url}\n")
        ca = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
        asyncio.run(drive_gemini_session(gateway.url.replace("http://", "wss://", 1), ca, model, turns))
        expected = None if simulator is None else expected_samples(simulator.usage_for(model), system="gcp.gemini")
        return report(gateway, model, expected, f"{turns} turns' usageMetadata")


async def drive_gemini_session(gateway_url: str, ca: ssl.SSLContext, model: str, turns: int) -> None:
    """google-genai's "API gateway" mode: a custom base_url and no key; the gateway's policy adds the key."""
    # The SDKs are imported where a session needs them (about a second of CPU each): scripts/debug
    # drives the simulator with neither, and each demo needs one.
    from google import genai
    from google.genai import types

    path = AI_STUDIO_PATH.format(version="v1beta", method="BidiGenerateContent")
    options = types.HttpOptions(base_url=gateway_url + path, async_client_args={"ssl": ca})
    client = genai.Client(vertexai=True, http_options=options)
    config = types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO])
    async with client.aio.live.connect(model=f"models/{model}", config=config) as session:
        for n in range(1, turns + 1):
            turn = types.Content(role="user", parts=[types.Part(text="Answer in five words: what is a gateway?")])
            await session.send_client_content(turns=turn, turn_complete=True)
            async for message in session.receive():
                if (usage := message.usage_metadata) is not None:
                    print(f"turn {n}: {usage.prompt_token_count} prompt, {usage.total_token_count} total tokens")
    print()


@contextlib.contextmanager
def upstream(url: str | None, **simulator_options: Any) -> Iterator[tuple[str, Simulator | None]]:
    """`url`, or the simulator (with these options) started for the duration."""
    if url:
        yield url, None
        return
    with SimulatorThread(**simulator_options) as simulator:
        yield simulator.url, simulator


async def drive_session(gateway_url: str, model: str, responses: int, real: bool) -> None:
    """One Realtime session through the gateway with the SDK's GA client."""
    from openai import AsyncOpenAI

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
