"""The README's references stay true: its policy example is a valid policy, and its metric table
names exactly the metrics the gateway exports."""

from __future__ import annotations

import re
from pathlib import Path

from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.config.policy import parse_policy

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"## {title}")
    return README[start : README.index("\n## ", start + 1)]


def test_policy_reference_example_is_a_valid_policy():
    example = re.search(r"```yaml\n(.*?)```", section("Policy reference"), re.DOTALL)
    assert example is not None
    policy = parse_policy(example[1], "README.md", {"OPENAI_API_KEY": "sk-doc"})
    assert policy.budgets is not None and policy.prices is not None and policy.auth is not None
    assert [route.suffix for route in policy.routes][-1] == "*"


def exported_names() -> set[str]:
    """Metric names as Prometheus shows them: counters with _total, histograms and gauges as named."""
    names = set()
    for family in GatewayMetrics("agentgateway").registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def documented_names() -> set[str]:
    table = section("Metric reference")
    names = set()
    for row in re.findall(r"^\| `(agentgateway_[a-z_]+)`(?:, `\.\.\.(_[a-z_]+)`)?", table, re.MULTILINE):
        first, sibling = row
        names.add(first)
        if sibling:
            names.add(first.rsplit("_", 1)[0] + sibling)
    return names


def test_metric_reference_matches_what_the_gateway_exports():
    assert documented_names() == exported_names()
