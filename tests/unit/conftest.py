"""What the in-process addon tests share: the gateway inside mitmproxy's test context."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mitmproxy.test import taddons

from ai_gateway.config.policy import DEFAULT_POLICY
from ai_gateway.proxy.addon import Gateway


@contextlib.contextmanager
def configured_gateway(**options: Any) -> Iterator[Gateway]:
    """The gateway's addons in mitmproxy's test context with the default policy, no metrics
    endpoint, and these options; its hooks are called directly by the test."""
    gateway = Gateway()
    with taddons.context(gateway) as context:
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY), **options)
        yield gateway
