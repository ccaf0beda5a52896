"""docs/architecture.md matches the code: every module it names imports, every gateway module is
named, and no module imports from a layer above its own."""

import ast
import importlib
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "addons" / "ai_gateway"
DOC = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
# Third-party imports the gateway process may make: its own dependencies and what mitmproxy installs.
RUNTIME_IMPORTS = {
    "aiohttp",  # guard services, imported when first asked
    "redis",
    "mitmproxy",
    "prometheus_client",
    "yaml",
    "uvloop",
    "genai_prices",
    "brotli",
    "backports",
    "compression",
    "wsproto",  # mitmproxy's WebSocket protocol: proxy/closer.py hands its layer a close event
    "opentelemetry",
    "OpenSSL",  # pyOpenSSL, mitmproxy's TLS: proxy/socket_relay.py carries a TLS leg's SSL.Connection on
    "websockets",  # its C apply_mask unmasks client frames on gateway_relay=frames (protocols/ws_frames.py)
}
TOOL_ONLY = {"openai", "psutil", "tqdm", "matplotlib", "playwright", "pytest"}


def layer_ranks() -> dict[str, int]:
    """module -> rank, from the layer table's rows: | rank | layer | modules | holds |"""
    ranks = {}
    for rank, modules in re.findall(r"^\| (\d+) \| \w+ \| (.*?) \|", DOC, re.MULTILINE):
        for module in re.findall(r"`(ai_gateway\.[\w.]+)`", modules):
            ranks[module] = int(rank)
    return ranks


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gateway_modules() -> dict[str, Path]:
    """Every module of the package that runs in the gateway process (all but tools and package inits)."""
    return {
        module_name(path): path
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and "tools" not in path.relative_to(PACKAGE).parts
    }


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_every_module_named_in_the_doc_imports():
    named = sorted(set(re.findall(r"`(ai_gateway\.[\w.]+)`", DOC)))
    assert len(named) > 20
    for module in named:
        importlib.import_module(module)


def test_the_layer_table_names_every_gateway_module():
    assert sorted(layer_ranks()) == sorted(gateway_modules())


def test_no_module_imports_from_a_layer_above_it():
    ranks = layer_ranks()
    violations = []
    for module, path in gateway_modules().items():
        for imported in imports(path):
            if imported.startswith("ai_gateway_tools"):
                violations.append(f"{module} imports the tool {imported}")
            elif imported in ranks and ranks[imported] < ranks[module]:
                violations.append(f"{module} (layer {ranks[module]}) imports {imported} (layer {ranks[imported]})")
    assert violations == []


def test_the_gateway_imports_only_its_own_dependencies():
    """A `pip install` of the gateway alone is enough to run it: no tool's dependency is imported."""
    stdlib = sys.stdlib_module_names
    third_party = {
        name.split(".")[0]
        for path in gateway_modules().values()
        for name in imports(path)
        if name.split(".")[0] not in stdlib and not name.startswith("ai_gateway")
    }
    assert third_party <= RUNTIME_IMPORTS
    assert not third_party & TOOL_ONLY


def test_tool_dependencies_are_an_extra():
    """The simulators' and benchmarks' libraries come with `ai-gateway[tools]`, not with the gateway."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(deps: list[str]) -> set[str]:
        return {re.split(r"[\[<>=;! ]", dep, maxsplit=1)[0].lower() for dep in deps}

    tools = {"openai", "psutil", "tqdm", "matplotlib"}
    assert names(project["dependencies"]).isdisjoint(tools)
    assert tools <= names(project["optional-dependencies"]["tools"])
