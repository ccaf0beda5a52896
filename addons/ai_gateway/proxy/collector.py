"""The garbage collector and the relay's latency.

A full collection scans every tracked object; right after startup that is mitmproxy, the price
database and the OpenTelemetry SDK, about 145,000 objects and 80 ms on this project's machines:
a pause every session on the process feels, far over a 20 ms per-frame latency target. None of
those objects become garbage while the gateway runs, so once it runs they are moved out of the
collector's reach (`gc.freeze`): later collections scan only what sessions allocated since.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from ai_gateway.proxy.state import GatewayState

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> None:
    """Collect what startup left behind, then freeze the rest into the permanent generation."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.debug(
        "ai-gateway: %d startup objects frozen out of the garbage collector's scans (%.0f ms)",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )


class StartupObjects:
    """After the other addons' `running`: startup is over, its objects are frozen, and from now on
    an invalid option is refused (the previous value stays) rather than fatal."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_gc_freeze",
            bool,
            True,
            "Once running, move startup's objects (mitmproxy, the price database) out of the garbage "
            "collector's scans: a full collection no longer pauses every session for about 80 ms.",
        )

    def running(self) -> None:
        if ctx.options.gateway_gc_freeze:
            freeze_startup_objects()
        self.state.is_running = True

    def done(self) -> None:
        self.state.is_running = False


@contextlib.contextmanager
def collector_paused(freeze: bool) -> Iterator[None]:
    """For work that builds many long-lived objects and no cyclic garbage (spend restored at
    startup): collections would scan the growing heap again and again, about half the time of
    restoring 100,000 client keys. With `freeze`, what it built joins startup's objects in the
    permanent generation, without the full collection freeze_startup_objects makes (1.4 s over
    the million objects of those keys)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if freeze:
            gc.freeze()
    finally:
        if enabled:
            gc.enable()
