"""The README and the reference in docs/ stay true to the code: the policy examples are valid
policies, every option, metric and policy key the code declares is documented and every documented
one exists, and every link between the pages resolves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.config import policy as policy_module
from ai_gateway.config.policy import parse_policy
from ai_gateway.proxy.addon import Gateway

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def yaml_example(page: str) -> str:
    example = re.search(r"```yaml\n(.*?)```", text(page), re.DOTALL)
    assert example is not None, f"{page} has no YAML example"
    return example[1]


@pytest.mark.parametrize("page", ["README.md", "docs/policy.md"])
def test_policy_examples_are_valid_policies(page):
    policy = parse_policy(yaml_example(page), page, {"OPENAI_API_KEY": "sk-doc"})
    assert policy.budgets is not None and policy.auth is not None
    assert [route.suffix for route in policy.routes][-1] == "*"


def test_readme_stays_short():
    """The README says what it is, how to start and where the reference is; the rest is in docs/."""
    assert len(text("README.md").splitlines()) <= 250


def table_names(page: str, pattern: str) -> set[str]:
    """The names in the first column of a page's tables: `| \\`name\\` | ...`."""
    return set(re.findall(rf"^\| `({pattern})`", text(page), re.MULTILINE))


def exported_metrics() -> set[str]:
    """Metric names as Prometheus shows them: counters with _total, histograms and gauges as named."""
    names = set()
    for family in GatewayMetrics("agentgateway").registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def documented_metrics() -> set[str]:
    names = set()
    rows = re.findall(r"^\| `(agentgateway_[a-z_]+)`(?:, `\.\.\.(_[a-z_]+)`)?", text("docs/metrics.md"), re.MULTILINE)
    for first, sibling in rows:
        names.add(first)
        if sibling:
            names.add(first.rsplit("_", 1)[0] + sibling)
    return names


def test_the_metric_reference_names_exactly_what_the_gateway_exports():
    assert documented_metrics() == exported_metrics()


def declared_options() -> set[str]:
    """Every option the gateway's addons declare in their `load`."""
    gateway = Gateway()
    with taddons.context(gateway) as context:
        names = context.options.keys()
        return {name for name in names if name.startswith("gateway_")}


def test_the_options_page_names_exactly_the_options_the_addons_declare():
    assert table_names("docs/options.md", r"gateway_[a-z_]+") == declared_options()


def policy_keys() -> set[str]:
    """Every key the policy validator accepts: the string literals of the tuples in each of its
    methods that checks a mapping's keys."""
    tree = ast.parse(Path(policy_module.__file__).read_text(encoding="utf-8"))
    validator = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Validator")
    keys: set[str] = set()
    for method in validator.body:
        source = ast.unparse(method)
        if "self.mapping(" not in source or "self.mapping(key, node, None)" in source:
            continue
        for node in ast.walk(method):
            if isinstance(node, ast.Tuple):
                keys.update(e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
    return keys


def test_every_policy_key_is_documented():
    reference = text("docs/policy.md") + text("docs/limits.md") + text("docs/guardrails.md")
    keys = policy_keys()
    assert {"routes", "budgets", "client_keys", "on_store_error", "idle_session_seconds"} <= keys
    undocumented = {key for key in keys if not re.search(rf"(^|[\s{{,`]){key}(:|`)", reference, re.MULTILINE)}
    assert undocumented == set()


LINK = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    broken = []
    for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}#{anchor}")
    assert broken == []
