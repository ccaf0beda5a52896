"""Every benchmark phase also checks the accounting: the response.done usage each client received
equals what the simulated upstream ledgered, and for the gateway configurations /metrics equals
harness.expected_samples of that ledger. A difference makes the run fail. The peer, LiteLLM's
proxy, has its own usage log compared with the ledger too, and reported without failing the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ai_gateway_tools.bench.configs import Config, model
from ai_gateway_tools.bench.litellm import LitellmProcess, Metered
from ai_gateway_tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway_tools.loadgen import UpstreamProcess, canonical_usage
from ai_gateway_tools.simulators.realtime import SentUsage


def accounting_problems(
    config: Config, ledger: Sequence[SentUsage], model: str, received: Sequence[str], proxy: GatewayProcess | None
) -> tuple[list[str], int]:
    """Relayed exactly (clients got every usage the upstream sent) and, through a gateway, metered exactly."""
    sent = sorted(canonical_usage(entry.usage) for entry in ledger if entry.kind == "response")
    problems = []
    if sorted(received) != sent:
        problems.append(f"{model}: clients received {len(received)} response.done, the upstream sent {len(sent)}")
    if config.metered and proxy is not None:
        metrics = usage_only(select(scrape(proxy.metrics_url), gen_ai_request_model=model))
        if metrics != expected_samples(ledger):
            problems.append(f"{model}: /metrics differs from the upstream's ledger")
    return problems, len(sent)


@dataclass
class Checks:
    """The accounting of every phase so far, per configuration."""

    problems: dict[str, list[str]] = field(default_factory=dict)  # config -> problems (empty: exact)
    responses: dict[str, int] = field(default_factory=dict)  # config -> response.done checked
    peer: dict[str, Metered] = field(default_factory=dict)  # config -> the peer's own usage log against the ledger

    def check(
        self, config: Config, upstream: UpstreamProcess, phase: str, received: list[str], proxy: GatewayProcess | None
    ) -> None:
        ledger = upstream.ledger(model(config, phase))
        problems, responses = accounting_problems(config, ledger, model(config, phase), received, proxy)
        self.problems.setdefault(config.name, []).extend(problems)
        self.responses[config.name] = self.responses.get(config.name, 0) + responses
        if isinstance(proxy, LitellmProcess):  # the peer's own metering: reported, never a failure
            metered = proxy.metered(model(config, phase), ledger)
            self.peer[config.name] = self.peer.get(config.name, Metered()) + metered
