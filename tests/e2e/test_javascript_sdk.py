"""The openai JavaScript SDK through the gateway, as the README shows it: the SDK dials only
`wss://`, so the gateway answers TLS on its port (mitmproxy's reverse mode recognises the client's
handshake) with a certificate from mitmproxy's CA, which Node is told to trust."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ai_gateway_tools.harness import GatewayProcess, assert_metered_exactly
from ai_gateway_tools.simulators.realtime import SimulatorThread

ROOT = Path(__file__).resolve().parents[2]
NODE_PROJECT = ROOT / ".venv" / "js"  # scripts/setup installs the SDK here (package.json beside this test)
README_BASE_URL = "https://gateway.example.com:8443/v1"


def readme_snippet() -> str:
    snippet = re.search(r"```js\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    assert snippet is not None and README_BASE_URL in snippet[1]
    return snippet[1]


@pytest.fixture(scope="module")
def node_project() -> Path:
    if shutil.which("node") is None or not (NODE_PROJECT / "node_modules" / "openai").is_dir():
        if os.environ.get("CI"):
            pytest.fail("node and the openai JavaScript SDK are needed (scripts/setup installs the SDK)")
        pytest.skip("node or the openai JavaScript SDK is missing: run scripts/setup")
    return NODE_PROJECT


@pytest.mark.parametrize("launcher", ["mitmdump", "serve"])
def test_the_readme_javascript_example_is_metered_exactly_over_wss(node_project, launcher):
    with SimulatorThread(seed=2026) as simulator, GatewayProcess(simulator.url, launcher=launcher) as gateway:
        base_url = f"https://localhost:{gateway.port}/v1"
        script = node_project / f"readme-{launcher}.mjs"
        script.write_text(readme_snippet().replace(README_BASE_URL, base_url))
        env = {
            **os.environ,
            "OPENAI_API_KEY": "sk-javascript-client",
            "NODE_EXTRA_CA_CERTS": str(Path.home() / ".mitmproxy" / "mitmproxy-ca-cert.pem"),
        }
        done = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        printed = re.search(r"\binput_tokens: (\d+)", done.stdout)  # the usage object, as console.log shows it
        assert printed is not None, done.stdout
        (sent,) = simulator.ledger  # the one response, and the client saw its usage
        assert sent.usage["input_tokens"] == int(printed[1])
        model = sent.request_model
        assert model == "gpt-realtime"
        handshake = simulator.handshakes[-1]
        assert handshake.path == "/v1/realtime" and handshake.query["model"] == "gpt-realtime"

        assert_metered_exactly(gateway.metrics_url, model, simulator.usage_for(model))
