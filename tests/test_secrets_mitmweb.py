"""The injected upstream key never reaches mitmweb: its flow list, flow details or flow dumps."""

from __future__ import annotations

import asyncio
import urllib.request

from ai_gateway.tools.debug import mitmweb, web_url
from ai_gateway.tools.harness import free_port
from ai_gateway.tools.simulators.realtime import SimulatorThread

from .clients import sdk_session

SECRET = "sk-upstream-MITMWEB-0c1d2e"


def fetch(base: str, path: str, token: str) -> bytes:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_mitmweb_never_sees_the_upstream_key(tmp_path):
    policy = tmp_path / "auth.yaml"
    policy.write_text("auth:\n  env: GATEWAY_WEB_KEY\nroutes:\n  /realtime: Realtime\n")
    with SimulatorThread() as simulator:
        gateway = mitmweb(simulator.url, web_port=free_port())
        gateway.options["gateway_policy"] = str(policy)
        gateway.env["GATEWAY_WEB_KEY"] = SECRET
        with gateway:
            token = web_url(gateway).split("token=", 1)[1]
            base = f"http://127.0.0.1:{gateway.args[gateway.args.index('--web-port') + 1]}"
            asyncio.run(sdk_session(gateway.url, "gpt-realtime-web", metadata=[{}]))
            flows = fetch(base, "/flows", token)
            dump = fetch(base, "/flows/dump", token)
            assert b"gpt-realtime-web" in flows and b"redacted by ai-gateway" in flows
            for channel in (flows, dump, gateway.log().encode()):
                assert SECRET.encode() not in channel
    assert ("authorization", f"Bearer {SECRET}") in simulator.handshakes[-1].headers
