"""SharedLimits' outage bookkeeping, in process: the store's scripts stood in for by coroutines
(what the store itself does is tested against a real redis-server in tests/e2e/test_shared_limits.py)."""

from __future__ import annotations

import asyncio
import logging

from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.shared_limits import SharedLimits
from ai_gateway.config.policy import LimitPolicy

REPLY = [b"1", b"0", b"0", b"0", b"0", b"0", b"0", b"0"]


def test_a_reply_to_a_call_sent_before_the_outage_does_not_end_it(caplog):
    """A call already answered when the store went, its reply read after another call failed, is no
    sign the store is back: one line for the outage, one when a call made since answers (an xdist
    run caught the extra pair of lines, in tests/e2e/test_shared_limits.py's outage test)."""
    limits = SharedLimits("redis://127.0.0.1:9/0", GatewayMetrics("t"))

    async def run() -> None:
        answer = asyncio.Event()

        async def slow(keys: list[str], args: list[str]) -> list[bytes]:
            await answer.wait()
            return REPLY

        async def down(keys: list[str], args: list[str]) -> list[bytes]:
            raise ConnectionError("refused")

        async def up(keys: list[str], args: list[str]) -> list[bytes]:
            return REPLY

        before = asyncio.create_task(limits._call("admit", slow, "k", [], LimitPolicy()))
        await asyncio.sleep(0)  # the slow call has started
        assert await limits._call("admit", down, "k", [], LimitPolicy()) is None
        answer.set()
        assert await before == REPLY
        assert limits.failing is not None
        assert await limits._call("admit", up, "k", [], LimitPolicy()) == REPLY
        assert limits.failing is None

    with caplog.at_level(logging.WARNING):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "limits store" in r.getMessage()]
    assert len(lines) == 2 and "failed" in lines[0] and "answers again" in lines[1]
