"""The production launcher: mitmproxy with the gateway and only the addons a reverse gateway needs.

    scripts/serve --mode reverse:https://api.openai.com -p 8080 [--set name=value ...] [-q] [--workers N]

Stock `mitmdump -s addons/gateway.py` runs some forty default addons, and mitmproxy's
AddonManager tries all of them for every hook, twice per WebSocket message (the message's hook,
then `update`): about 90 us per message, a quarter of mitmdump's time on Realtime traffic; its
flow dumper also prints a line per message. Here the gateway runs on a Master with the addons
that shape reverse-proxied traffic under mitmdump's defaults, in mitmdump's order, and each hook
goes only to the addons that implement it (about 2.5 us per message). The event loop is
uvloop's when it is installed (`--loop`): it relays frames with less CPU. mitmproxy's modules
are used as they are, never patched.

Everything the gateway does is as under mitmdump (the end-to-end tests run against both), and
logs go to stdout as mitmdump's do. Not loaded: the flow dumper, option-driven addons that are
off by default (map/modify/replay/save/...), scripts, and mitmdump's interactive and
file-reading helpers; a `--set` of an option only they define is refused in one line rather
than ignored.

`--workers N` runs N such processes on the same port (see `workers.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from mitmproxy import exceptions, hooks, optmanager
from mitmproxy.addonmanager import AddonManager, safecall, traverse
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyserver,
    termlog,
    tlsconfig,
    update_alt_svc,
)
from mitmproxy.log import MitmFormatter
from mitmproxy.master import Master
from mitmproxy.options import Options
from mitmproxy.proxy import mode_specs
from mitmproxy.utils import debug

from ai_gateway.launcher import workers
from ai_gateway.proxy.addon import Gateway

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # optional: the launcher runs on asyncio's own loop without it
    uvloop = None

PROG = "serve"
logger = logging.getLogger(__name__)


class HookDispatch(AddonManager):
    """mitmproxy's AddonManager, but a hook goes only to the addons that define it.

    The stock manager tries every addon in the chain, and every sub-addon of each, for every hook
    (a generator, a getattr and a `safecall` context per addon). Here the hook functions are
    found once (the gateway's sub-addons included) and kept until the chain changes; each is
    called in chain order in its own `safecall`, and `AddonHalt` stops the event as mitmproxy's
    does. One difference: an addon added while a hook is being dispatched gets that hook from the
    next event on (the gateway adds its credential addon in `running`, which has no `running` hook).
    """

    def __init__(self, master: Master) -> None:
        super().__init__(master)
        self._implementers: dict[str, list[Callable[..., Any]]] = {}

    def implementers(self, name: str) -> list[Callable[..., Any]]:
        found = self._implementers.get(name)
        if found is None:
            found = self._implementers[name] = [
                hook for top in self.chain for addon in traverse([top]) if callable(hook := getattr(addon, name, None))
            ]
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        for hook in self.implementers(event.name):
            try:
                with safecall():
                    result = hook(*event.args())
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return

    def add(self, *addons: Any) -> None:
        super().add(*addons)
        self._implementers.clear()

    def insert_after(self, name: str, addon: Any) -> None:
        """Put an addon registered earlier (`register`) into the chain, right after the addon `name`."""
        self.chain.insert(self.chain.index(self.lookup[name]) + 1, addon)
        self._implementers.clear()

    def remove(self, addon: Any) -> None:
        super().remove(addon)
        self._implementers.clear()

    def clear(self) -> None:
        super().clear()
        self._implementers.clear()


LEAN_ADDONS: tuple[Callable[[], Any], ...] = (
    core.Core,
    block.Block,
    disable_h2c.DisableH2C,
    proxyserver.Proxyserver,
    next_layer.NextLayer,
    tlsconfig.TlsConfig,
    update_alt_svc.UpdateAltSvc,
)
"""mitmdump's default addons that act on reverse-proxied traffic with default options, in mitmdump's
order: the proxy itself (core, proxyserver, next_layer, tlsconfig), plus block (refuses clients
on public addresses, `block_global`), disable_h2c (strips h2c upgrade headers) and
update_alt_svc (points the upstream's Alt-Svc at the gateway), which change traffic by default."""


class TaggedFormatter(MitmFormatter):
    """mitmproxy's log format with a worker's name in front: N workers write to one stdout."""

    def __init__(self, colorize: bool, tag: str) -> None:
        super().__init__(colorize)
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.tag} {super().format(record)}"


class GatewayMaster(Master):
    """A Master with the lean addons and hook dispatch; the gateway joins once the options are parsed."""

    addons: HookDispatch

    def __init__(self, opts: Options, log_tag: str | None = None, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(opts, with_termlog=False)
        # Master made a plain AddonManager subscribed to option changes; swap it before any addon is added.
        self.options.changed.disconnect(self.addons._configure_all)
        self.addons = HookDispatch(self)
        self._termlog_addon = termlog.TermLog()
        if log_tag is not None:
            handler = self._termlog_addon.logger
            handler.setFormatter(TaggedFormatter(handler.has_vt_codes, log_tag))
        self.errorcheck = errorcheck.ErrorCheck()
        self.addons.add(self._termlog_addon, *(make() for make in LEAN_ADDONS), self.errorcheck)
        self.on_ready = on_ready

    def start_gateway(self, gateway: Gateway) -> None:
        """Chain the registered gateway where mitmdump's script loader puts scripts (after
        proxyserver) and configure it with every option, as the script loader does."""
        self.addons.insert_after("proxyserver", gateway)
        with safecall():
            self.addons.invoke_addon_sync(gateway, hooks.ConfigureHook(self.options.keys()))

    async def running(self) -> None:
        await super().running()
        if self.on_ready is not None:
            # A worker about to exit on a startup error must not be reported ready.
            await self.errorcheck.shutdown_if_errored()
            self.on_ready()


class ReusePort:
    """Event loop mixin: every server the loop creates binds with SO_REUSEPORT.

    mitmproxy listens with `asyncio.start_server(handler, host, port)`, which has no reuse_port
    argument but calls the running loop's `create_server`. Workers running this loop all bind the
    gateway's port, and the kernel spreads new connections across them.
    """

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        return await super().create_server(*args, **{**kwargs, "reuse_port": True})  # type: ignore[misc]


class AsyncioReusePortLoop(ReusePort, asyncio.SelectorEventLoop):
    pass


LOOPS: dict[tuple[str, bool], Callable[[], asyncio.AbstractEventLoop]] = {
    ("asyncio", False): asyncio.SelectorEventLoop,
    ("asyncio", True): AsyncioReusePortLoop,
}
if uvloop is not None:

    class UvloopReusePortLoop(ReusePort, uvloop.Loop):
        pass

    LOOPS |= {("uvloop", False): uvloop.Loop, ("uvloop", True): UvloopReusePortLoop}


def loop_factory(name: str, reuse_port: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop class: uvloop when installed (`auto`), which relays WebSocket frames faster."""
    if name == "auto":
        name = "asyncio" if uvloop is None else "uvloop"
    if (name, reuse_port) not in LOOPS:
        raise ValueError(f"--loop {name}: uvloop is not installed")
    return LOOPS[name, reuse_port]


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The AI gateway on mitmproxy with only the addons a reverse gateway needs. "
        "Arguments are mitmdump's; options are set with --set name=value.",
    )
    p.add_argument("-m", "--mode", action="append", metavar="reverse:URL[@PORT]", help="the upstream (repeatable)")
    p.add_argument("--listen-host", metavar="HOST", help="address to listen on (default: all)")
    p.add_argument("-p", "--listen-port", type=int, metavar="PORT", help="port to listen on (default: 8080)")
    p.add_argument("--set", action="append", default=[], dest="setoptions", metavar="NAME=VALUE", help="set an option")
    p.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    p.add_argument("--workers", type=positive, default=1, help="processes sharing the port (default: 1)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="event loop (default: auto)")
    # Set by the supervisor of --workers for the processes it starts.
    p.add_argument("--worker", type=positive, help=argparse.SUPPRESS)
    p.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    return p


def apply_arguments(opts: Options, args: argparse.Namespace) -> None:
    """Options as mitmdump sets them: --set, then the confdir's config.yaml, then the named arguments.

    Raises OptionsError (one line) for an unknown --set option, a bad value or a mode other
    than reverse.
    """
    opts.set(*args.setoptions)
    optmanager.load_paths(opts, *(os.path.join(opts.confdir, name) for name in ("config.yaml", "config.yml")))
    named = {
        "mode": args.mode,
        "listen_host": args.listen_host,
        "listen_port": args.listen_port,
        "termlog_verbosity": "error" if args.quiet else None,
    }
    opts.update(**{name: value for name, value in named.items() if value is not None})
    for spec in opts.mode:
        if not isinstance(mode_specs.ProxyMode.parse(spec), mode_specs.ReverseMode):
            raise exceptions.OptionsError(f"--mode {spec}: {PROG} runs reverse gateways only (reverse:URL[@PORT])")


def configure_logging() -> None:
    """As mitmproxy's launchers do: the handlers filter by level; chatty libraries are held back."""
    logging.getLogger().setLevel(logging.DEBUG)
    for name in ("asyncio", "hpack", "quic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    debug.register_info_dumpers()


async def launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Parse the options on a lean master, then serve, or supervise `--workers` processes."""
    configure_logging()
    link = None if args.supervisor_fd is None else workers.SupervisorLink(args.supervisor_fd)
    master = GatewayMaster(
        Options(),
        log_tag=None if args.worker is None else f"[worker {args.worker} pid {os.getpid()}]",
        on_ready=None if link is None else link.ready,
    )
    gateway = Gateway()
    master.addons.register(gateway)  # its options exist from here; its hooks run once it is chained
    supervising = args.workers > 1 and args.worker is None
    try:
        apply_arguments(master.options, args)
        if supervising:
            workers.require_fixed_port(master.options)
    except exceptions.OptionsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if supervising:
        return await workers.supervise(argv, args.workers, master.options)
    await serve(master, gateway, link)
    return 0


async def serve(master: GatewayMaster, gateway: Gateway, link: workers.SupervisorLink | None) -> None:
    """Until SIGINT or SIGTERM, or a worker's supervisor exits; `done` runs in every case.

    These handlers stop a gateway still starting; once it runs, its `running` hook takes both
    signals over to drain open connections first (proxy/drain.py)."""
    if link is not None:
        master.options.update(gateway_metrics_port=0)  # the supervisor serves /metrics for all workers
        link.on_supervisor_exit(master.shutdown)
    master.start_gateway(gateway)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, master.shutdown)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as mitmdump: a client gone mid-write is not fatal
    await master.run()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        factory = loop_factory(args.loop, reuse_port=args.worker is not None)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(launch(args, argv))


if __name__ == "__main__":
    sys.exit(main())
