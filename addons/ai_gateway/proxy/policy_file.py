"""The policy file: read at startup, watched and applied again when it changes, and what follows
from it (prices, budgets and limits, the shared limits store, the upstream key)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from ai_gateway.accounting import guard_service
from ai_gateway.accounting.limits import MINUTE, SpendControl
from ai_gateway.accounting.pricing import PriceCatalog, catalog_for
from ai_gateway.accounting.redaction import Redactor
from ai_gateway.accounting.shared_limits import SharedLimits
from ai_gateway.config.policy import (
    DEFAULT_MAX_CONFIG_BYTES,
    DEFAULT_POLICY,
    MAX_BYTES_OPTION,
    MEMORY_STORE,
    FileStamp,
    LimitPolicy,
    Policy,
    PolicyError,
    RateLimits,
    file_stamp,
    load_policy,
)
from ai_gateway.proxy.credential import UpstreamCredential
from ai_gateway.proxy.state import GatewayState

POLICY_POLL_SECONDS = 0.5
POLICY_SETTLE_SECONDS = 2.0  # a policy file must be unchanged this long before it is read

logger = logging.getLogger(__name__)


class PolicyFile:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.stamp: FileStamp | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.retiring: set[asyncio.Task[None]] = set()  # stores of earlier policies, closing
        self.credential = UpstreamCredential()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_policy",
            str,
            str(DEFAULT_POLICY),
            "Policy file (YAML): route types, header policies, upstream key.",
        )
        loader.add_option(
            "gateway_policy_reload", bool, True, "Apply edits of the policy file to new connections without restart."
        )
        loader.add_option(
            MAX_BYTES_OPTION,
            int,
            DEFAULT_MAX_CONFIG_BYTES,
            "Largest policy file (and price catalog it names) read, in bytes; a larger one is refused unread.",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {"gateway_policy", MAX_BYTES_OPTION}:
            return
        if (max_bytes := ctx.options.gateway_policy_max_bytes) < 1:
            self.state.refuse(f"{MAX_BYTES_OPTION}: expected a positive number, got {max_bytes}")
        else:
            path = ctx.options.gateway_policy
            stamp = file_stamp(path)  # before reading: a change made while it is read is seen by the watcher
            try:
                self.apply(*read_policy(path, max_bytes))
            except PolicyError as e:
                self.state.refuse(f"invalid policy: {e}")
                return
            self.stamp = stamp
            logger.info("ai-gateway: policy %s (%d routes)", path, len(self.state.policy.routes))  # type: ignore[union-attr]

    def running(self) -> None:
        # Last in the chain, after mitmproxy's next_layer addon: it wraps the HTTP layer that one chose.
        ctx.master.addons.add(self.credential)
        if self.state.shared is not None:
            self.state.shared.start(self.control_window, self.control_limits)
        if ctx.options.gateway_policy_reload:
            self.watcher = asyncio.get_running_loop().create_task(self.watch())

    async def done(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        if self.credential in ctx.master.addons.chain:
            ctx.master.addons.remove(self.credential)
        if self.state.shared is not None:
            await self.state.shared.close()  # usage settled during the drain reaches the store

    def apply(self, policy: Policy, catalog: PriceCatalog | None) -> None:
        """Everything that follows from a policy; spend already counted against budgets is kept."""
        state = self.state
        state.policy, state.catalog = policy, catalog
        state.redactor = Redactor(policy.redact) or None
        state.control = controls_for(state.control, policy)
        state.shared = self.shared_store(policy.limits.store if state.control is not None else MEMORY_STORE)
        state.rewire()
        self.credential.auth = policy.auth
        if policy.asks_services:
            guard_service.prepare()

    def shared_store(self, store: str) -> SharedLimits | None:
        """The policy's shared limits store: the same URL keeps its client (and its leases); a new
        one starts from what that store holds; the old one is closed once its writes are sent."""
        current = self.state.shared
        if current is not None and current.url == store:
            return current
        if current is not None:
            self.retire(current)
        if store == MEMORY_STORE:
            return None
        shared = SharedLimits(store, self.state.metrics)
        if self.state.is_running:
            shared.start(self.control_window, self.control_limits)
        return shared

    def retire(self, shared: SharedLimits) -> None:
        with contextlib.suppress(RuntimeError):  # no loop yet: nothing was sent
            task = asyncio.get_running_loop().create_task(shared.close())
            self.retiring.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self.retiring.discard)

    def control_window(self) -> float:
        return self.state.control.window if self.state.control is not None else MINUTE

    def control_limits(self) -> LimitPolicy:
        return self.state.control.limits if self.state.control is not None else LimitPolicy()

    async def watch(self) -> None:
        """Polls the file's stat, as mitmproxy's script watcher does for scripts, off the event loop
        (a stat or read on a hung file system must not stop the relay).

        A change is read once the file has not changed for POLICY_SETTLE_SECONDS: a file written
        in place is read whole, not half-written. It follows `gateway_policy`: a policy set
        through the option is watched from then on."""
        path = ctx.options.gateway_policy
        applied = seen = self.stamp  # of the file as configure() read it, however long ago
        since = time.monotonic()
        while True:
            await asyncio.sleep(POLICY_POLL_SECONDS)
            if ctx.options.gateway_policy != path:  # configure() already loaded the new file
                path = ctx.options.gateway_policy
                applied = seen = await asyncio.to_thread(file_stamp, path)
                continue
            stamp = await asyncio.to_thread(file_stamp, path)
            if stamp != seen:
                seen, since = stamp, time.monotonic()
            elif stamp not in (applied, None) and time.monotonic() - since >= POLICY_SETTLE_SECONDS:
                applied = stamp
                await self.reload(path, stamp)

    async def reload(self, path: str, stamp: FileStamp) -> None:
        try:
            policy, catalog = await asyncio.to_thread(read_policy, path, ctx.options.gateway_policy_max_bytes)
        except PolicyError as e:
            logger.error("ai-gateway: policy change refused, the previous policy stays in force: %s", e)
            return
        if await asyncio.to_thread(file_stamp, path) != stamp:
            return  # changed again while read: the watcher reads it once it settles
        if ctx.options.gateway_policy != path:
            return  # the option moved to another file meanwhile, and configure() loaded it
        self.apply(policy, catalog)
        logger.info("ai-gateway: policy reloaded: %s (%d routes), applies to new connections", path, len(policy.routes))


def controls_for(control: SpendControl | None, policy: Policy) -> SpendControl | None:
    """The budgets and limits of a new policy, keeping the spend already counted; None when the
    policy sets none (nothing is then held or checked per response)."""
    limits, keys = policy.limits, policy.client_keys
    if policy.budgets is None and limits.client_key == RateLimits() and not keys.keys:
        return None
    if control is None:
        return SpendControl(policy.budgets, limits, keys)
    control.update(policy.budgets, limits, keys)
    return control


def read_policy(path: str, max_bytes: int) -> tuple[Policy, PriceCatalog]:
    """The policy and its price catalog (its `prices` file over the database); either may raise
    PolicyError, also when it is over `max_bytes`."""
    policy = load_policy(path, max_bytes=max_bytes)
    return policy, catalog_for(policy.provider, policy.prices, max_bytes)
