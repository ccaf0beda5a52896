"""Portkey's open-source gateway as a capacity peer (issue #17): its Realtime relay in front of the simulator.

Portkey is not a dependency of the project. The first time the bench's `portkey` configuration
runs, one pinned version is installed with npm into a folder of its own (`.bench/portkey`).

Its `/v1/realtime` route always dials `wss://api.openai.com/v1/realtime` (the OpenAI provider's
base URL is a constant; `x-portkey-custom-host` does not reach that route). The bench gives it a
custom upstream the way a test harness can without changing its code: Node runs it with
`NODE_OPTIONS=--require <preload>`, and the preload wraps `tls.connect` so that a connection to
api.openai.com opens a plain TCP connection to the simulator on 127.0.0.1 instead. The `ws`
client Portkey dials with creates its socket through `tls.connect`, and speaks HTTP and
WebSocket over whatever socket it gets; every other connection is left alone. So no traffic
leaves 127.0.0.1, and the upstream leg has no TLS, like the other configurations'.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from ai_gateway_tools.harness import GatewayProcess

ROOT = Path(__file__).resolve().parents[3]
PORTKEY_VERSION = "1.15.2"
PACKAGE = f"@portkey-ai/gateway@{PORTKEY_VERSION}"
FOLDER = ROOT / ".bench" / "portkey"
SERVER = Path("node_modules", "@portkey-ai", "gateway", "build", "start-server.js")
UPSTREAM_ENV = "BENCH_PORTKEY_UPSTREAM"  # host:port the preload sends api.openai.com to
START_TIMEOUT = 60.0

PRELOAD_SOURCE = f"""// Written by ai_gateway_tools.bench.portkey: Portkey's Realtime route dials api.openai.com;
// this sends that one host to the simulator (plain TCP on 127.0.0.1) and leaves every other connection alone.
"use strict";
const net = require("net");
const tls = require("tls");
const [host, port] = process.env.{UPSTREAM_ENV}.split(":");
const connect = tls.connect;
tls.connect = function (...args) {{
  const options = args.find((arg) => arg !== null && typeof arg === "object") || {{}};
  if ((options.servername || options.host) === "api.openai.com") {{
    return net.connect({{ host, port: Number(port) }});
  }}
  return connect.apply(this, args);
}};
"""


def install(folder: Path = FOLDER) -> Path:
    """Portkey's server script of the pinned version, installed with npm on first use."""
    marker = folder / "bench-installed.txt"
    server = folder / SERVER
    if marker.is_file() and marker.read_text(encoding="utf-8") == f"{PACKAGE}\n" and server.is_file():
        return server
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"installing {PACKAGE} needs npm (Node.js), which is not on PATH")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"scripts/bench: installing {PACKAGE} into {folder} (first use)", file=sys.stderr)
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), PACKAGE]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not server.is_file():
        output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"could not install {PACKAGE}: `{' '.join(command)}` exited {result.returncode}:\n{output}")
    marker.write_text(f"{PACKAGE}\n", encoding="utf-8")
    return server


class PortkeyProcess(GatewayProcess):
    """`node start-server.js --port=N --headless` with the preload, in front of `upstream`, with the
    interface of the bench's other proxies (`url`, `process`, a context manager) and the headers
    Portkey wants (a provider and a key, which it sends upstream as `Authorization`)."""

    def __init__(self, upstream: str, parent: Path) -> None:
        preload = parent / "portkey_upstream.cjs"
        preload.write_text(PRELOAD_SOURCE, encoding="utf-8")
        address = upstream.split("://", 1)[1]
        super().__init__(upstream, env={"NODE_OPTIONS": f"--require {preload}", UPSTREAM_ENV: address})
        self.server = install()
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("Portkey needs node, which is not on PATH")
        self.tool = node

    def command(self) -> list[str]:
        return [self.tool, str(self.server), f"--port={self.port}", "--headless"]

    def start(self, timeout: float = START_TIMEOUT) -> PortkeyProcess:
        super().start(timeout)
        return self

    def ready(self) -> bool:
        """Its root route answers once the server listens (and opens no upstream connection)."""
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    @property
    def headers(self) -> dict[str, str]:
        return {"x-portkey-provider": "openai", "Authorization": "Bearer sk-simulated-upstream"}
