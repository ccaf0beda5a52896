"""A mitmdump script (`-s`) that writes each WebSocket session's bundle with `realtime.export` as it
closes, into the directory `export_dir` names: how a script reaches the gateway's commands."""

from __future__ import annotations

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader


class ExportOnClose:
    def load(self, loader: Loader) -> None:
        loader.add_option("export_dir", str, "", "Where each closed session's bundle is written.")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        if ctx.options.export_dir:
            ctx.master.commands.call("realtime.export", [flow], ctx.options.export_dir)


addons = [ExportOnClose()]
