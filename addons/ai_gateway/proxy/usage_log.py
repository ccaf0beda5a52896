"""The usage ledger: one JSON line per billed response, and the spend a restart must not forgive."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from ai_gateway.accounting.ledger import CONTINUE, REFUSE, UsageLedger, recent_records
from ai_gateway.proxy.collector import collector_paused
from ai_gateway.proxy.state import GatewayState

logger = logging.getLogger(__name__)


class UsageLog:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_usage_log", str, "", "Append one JSON line per metered response to this file (the usage ledger)."
        )
        loader.add_option(
            "gateway_usage_log_on_error",
            str,
            CONTINUE,
            "While the usage ledger cannot be written (full disk): 'continue' relaying, its usage unrecorded "
            "and counted, or 'refuse' new metered requests and responses (503, error event) until it can.",
            choices=(CONTINUE, REFUSE),
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_usage_log" in updated:
            self.open(ctx.options.gateway_usage_log)
        if self.state.ledger is not None:
            self.state.ledger.on_error = ctx.options.gateway_usage_log_on_error

    def open(self, path: str) -> None:
        """The new ledger is opened before the old one closes: if it cannot be, the old one stays."""
        try:
            ledger = UsageLedger(path, ctx.options.gateway_usage_log_on_error) if path else None
        except OSError as e:
            self.state.refuse(f"gateway_usage_log: cannot append to {path}: {e.strerror or e}")
            return
        if self.state.ledger is not None:
            self.state.ledger.close()
        self.state.ledger = ledger
        self.state.rewire()

    def running(self) -> None:
        """Before /metrics answers (what readiness probes watch) and before the gateway counts as
        running; connections wait in the listen backlog meanwhile: none is admitted without its
        key's spend."""
        self.restore_spend()

    def done(self) -> None:
        """Right after the drain's: every connection was closed then, so no usage relayed to a
        client can miss the ledger."""
        if self.state.ledger is not None:
            self.state.ledger.close()

    def restore_spend(self) -> None:
        """A restart does not forgive spend: the ledger's lines of the current budget window are
        charged to their client keys again (budgets live in this process's memory). A shared
        store keeps the spend itself, across restarts."""
        state = self.state
        if state.control is None or state.ledger is None or state.policy is None or state.policy.budgets is None:
            return
        if state.shared is not None:
            return
        window = state.policy.budgets.window_seconds
        wall = datetime.now(UTC)
        started = time.monotonic()
        records = recent_records(state.ledger.path, wall - timedelta(seconds=window))
        with collector_paused(freeze=ctx.options.gateway_gc_freeze):
            restored = state.control.restore(records, lambda at: (wall - at).total_seconds(), started)
        logger.info(
            "ai-gateway: spend of %d responses in the last %gs restored from the usage ledger (%.1f s)",
            restored,
            window,
            time.monotonic() - started,
        )
