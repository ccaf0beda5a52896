"""The gateway policy: which route type a request path has, and what to do with its headers.

A policy is a small YAML file (see README, "Policy reference"). It is validated against the YAML
node tree rather than the loaded data so that every error can name the line it came from: a
platform team editing a ConfigMap needs "policies/x.yaml:7: routes./realtime.type: expected ...",
not a traceback.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ai_gateway.config.guardrails import (
    BUILTIN_DETECTORS,
    DEFAULT_BATCH_MAX,
    DEFAULT_BATCH_MS,
    DEFAULT_TIMEOUT_MS,
    ON_ERROR_CLOSED,
    ON_ERROR_OPEN,
    Action,
    Guard,
    GuardKind,
    GuardrailPolicy,
    Phase,
    RedactPolicy,
)

# Headers the gateway can send the upstream key in (`auth.header`).
AUTH_HEADERS = ("authorization", "api-key", "x-goog-api-key")
DEFAULT_POLICY = Path(__file__).resolve().parents[3] / "policies" / "openai.yaml"
CATCH_ALL = "*"
# Largest configuration file read (gateway_policy_max_bytes): policies are a few KB, and even
# libyaml reads this in about 30 ms; a file of 100 MB would stall startup or a reload for minutes.
DEFAULT_MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_BYTES_OPTION = "gateway_policy_max_bytes"

STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"

T = TypeVar("T")


class RouteType(enum.StrEnum):
    """Route types: they decide how a request is metered. agentgateway's names first; the others
    are OpenAI endpoints agentgateway has no route type for."""

    COMPLETIONS = "Completions"
    RESPONSES = "Responses"
    EMBEDDINGS = "Embeddings"
    REALTIME = "Realtime"
    PASSTHROUGH = "Passthrough"
    TEXT_COMPLETIONS = "TextCompletions"  # the legacy /v1/completions
    TRANSCRIPTIONS = "Transcriptions"
    TRANSLATIONS = "Translations"
    SPEECH = "Speech"
    IMAGES = "Images"  # generations and edits
    REALTIME_CALLS = "RealtimeCalls"  # WebRTC and SIP: /realtime/calls, /realtime/client_secrets


class WireProtocol(enum.StrEnum):
    """The wire protocol a route speaks; it picks the protocol adapter that reads its frames."""

    OPENAI = "openai"  # OpenAI's APIs and the servers speaking their dialects (Azure, xAI, Qwen, vLLM)
    GEMINI_LIVE = "gemini-live"  # Google's BidiGenerateContent (AI Studio and Vertex AI)
    OPENAI_LIVE = "openai-live"  # OpenAI's GPT-Live (/live/sessions and its sideband), billed per second


# Route types each non-default protocol can meter.
PROTOCOL_ROUTE_TYPES = {
    WireProtocol.GEMINI_LIVE: (RouteType.REALTIME,),
    WireProtocol.OPENAI_LIVE: (RouteType.REALTIME,),
}
# Protocols whose client names the model in its first message: a route's `model` cannot apply.
MODEL_IN_FIRST_MESSAGE = {
    WireProtocol.GEMINI_LIVE: "the client's setup message names the model",
    WireProtocol.OPENAI_LIVE: "the client's session.start names the model",
}


@dataclass(frozen=True, slots=True)
class Limit:
    """A budget in tokens and/or USD; None where the policy sets none in that unit."""

    tokens: int | None = None
    usd: float | None = None


# What an admitted response holds against budgets until its usage settles it, unless the policy
# says otherwise: about one long voice answer at gpt-realtime's audio rates.
DEFAULT_RESERVE = Limit(tokens=4096, usd=0.05)


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """The policy's `budgets:` section."""

    session: Limit | None = None
    client_key: Limit | None = None
    window_seconds: float = 3600.0
    reserve: Limit = DEFAULT_RESERVE


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per client key: request and token rates over a rolling minute, sessions open at once, and how
    long a session may last or stay idle. None: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_sessions: int | None = None
    max_session_seconds: float | None = None
    idle_session_seconds: float | None = None

    def over(self, override: RateLimits | None) -> RateLimits:
        """These limits with the ones `override` sets replacing them."""
        if override is None:
            return self
        return RateLimits(
            *(mine if theirs is None else theirs for mine, theirs in zip(astuple(self), astuple(override), strict=True))
        )


MEMORY_STORE = "memory"
STORE_OPEN, STORE_CLOSED = "open", "closed"
DEFAULT_STORE_TIMEOUT_MS = 250.0


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The policy's `limits:` section. `store` is `memory` (this process's own) or a Redis URL
    shared by every worker and replica; `on_store_error` says whether a response or session is
    admitted (`open`) or refused (`closed`) while that store does not answer within `store_timeout_ms`."""

    store: str = MEMORY_STORE
    client_key: RateLimits = RateLimits()
    on_store_error: str = STORE_OPEN
    store_timeout_ms: float = DEFAULT_STORE_TIMEOUT_MS

    @property
    def shared(self) -> bool:
        return self.store != MEMORY_STORE


@dataclass(frozen=True, slots=True)
class KnownKey:
    """A client key the policy names: known by its SHA-256 only, shown by its name."""

    sha256: str
    name: str
    budget: Limit | None = None
    limits: RateLimits | None = None


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """The policy's `client_keys:` section."""

    require: bool = False
    keys: tuple[KnownKey, ...] = ()

    def find(self, sha256: str | None) -> KnownKey | None:
        return next((key for key in self.keys if key.sha256 == sha256), None) if sha256 else None


@dataclass(frozen=True)
class HeaderPolicy:
    """Request header edits, applied before anything goes upstream."""

    remove: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Route:
    suffix: str
    type: RouteType
    request: HeaderPolicy = HeaderPolicy()
    model: str | None = None
    protocol: WireProtocol = WireProtocol.OPENAI
    provider: str | None = None  # gen_ai_system for this route; the policy's provider when None
    guardrails: GuardrailPolicy = GuardrailPolicy()  # the route's own guards, after the policy's


@dataclass(frozen=True)
class Auth:
    """Where the upstream credential comes from and how it is sent."""

    env: str
    key: str = field(repr=False)
    header: str = "authorization"  # or api-key (Azure), x-goog-api-key (Gemini)

    @property
    def header_value(self) -> str:
        return f"Bearer {self.key}" if self.header == "authorization" else self.key


@dataclass(frozen=True)
class Policy:
    source: str
    provider: str = "openai"
    auth: Auth | None = None
    model: str | None = None
    prices: Path | None = None
    budgets: BudgetPolicy | None = None
    limits: LimitPolicy = LimitPolicy()
    client_keys: ClientKeys = ClientKeys()
    routes: tuple[Route, ...] = field(default_factory=tuple)
    guardrails: GuardrailPolicy = GuardrailPolicy()  # for every route
    redact: RedactPolicy = RedactPolicy()

    def match(self, path: str) -> Route:
        """agentgateway's matching: longest path suffix first (query excluded), "*" last."""
        path = path.split("?", 1)[0]
        for route in self.routes:
            if route.suffix == CATCH_ALL or path.endswith(route.suffix):
                return route
        return NO_MATCH

    def model_for(self, route: Route) -> str | None:
        """The model to request upstream instead of the client's, if the policy overrides it."""
        return route.model or self.model

    def provider_for(self, route: Route) -> str:
        """The gen_ai_system of a route's usage: its own provider, else the policy's."""
        return route.provider or self.provider

    @property
    def asks_services(self) -> bool:
        """Whether any guard, the policy's or a route's, asks a service (webhook, moderation)."""
        guards = [*self.guardrails.guards, *(g for route in self.routes for g in route.guardrails.guards)]
        return any(guard.remote for guard in guards)

    def guardrails_for(self, route: Route) -> GuardrailPolicy:
        """The guards a route's traffic passes: the policy's, then the route's own."""
        if not route.guardrails:
            return self.guardrails
        return GuardrailPolicy(self.guardrails.guards + route.guardrails.guards)


NO_MATCH = Route(suffix="", type=RouteType.COMPLETIONS)


class PolicyError(ValueError):
    """An invalid policy; str() is the one line shown to the user."""

    def __init__(self, source: str, key: str, line: int | None, expected: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {key}: {expected}" if key else f"{where}: {expected}")


def load_policy(
    path: str | os.PathLike[str], environ: Mapping[str, str] = os.environ, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES
) -> Policy:
    """Read and validate a policy file. Raises PolicyError with a one-line message."""
    return parse_policy(read_config_file(path, "policy file", max_bytes), str(path), environ)


FileStamp = tuple[int, int, int, int]


def file_stamp(path: str | os.PathLike[str]) -> FileStamp | None:
    """What changes when a file is written or replaced: inode, mtime, ctime, size; None if absent."""
    try:
        return stamp_of(os.stat(path))
    except OSError:
        return None


def stamp_of(st: os.stat_result) -> FileStamp:
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def read_config_file(path: str | os.PathLike[str], what: str, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES) -> str:
    """A configuration file's text; PolicyError (one line) for anything but a regular file.

    Opened non-blocking and checked on the open descriptor: reading a named pipe (or a device)
    would wait for a writer forever. A file over `max_bytes` is refused by its size, unread, and
    never more than that is read. A file written while it is read is refused too.
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                kind = next((name for test, name in _FILE_KINDS if test(before.st_mode)), "not a regular file")
                raise PolicyError(source, "", None, f"expected a regular {what}, got {kind}")
            if before.st_size > max_bytes:
                raise PolicyError(
                    source,
                    "",
                    None,
                    f"the {what} is {before.st_size:,} bytes, over the limit of {max_bytes:,}; "
                    f"raise {MAX_BYTES_OPTION} to read it",
                )
            with open(fd, "rb", closefd=False) as file:
                data = file.read(max_bytes + 1)  # grown since fstat: the stamp below tells
            if stamp_of(os.fstat(fd)) != stamp_of(before):
                raise PolicyError(source, "", None, f"the {what} changed while it was read; expected a stable file")
        finally:
            os.close(fd)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(source, "", None, f"cannot read {what} ({e.__class__.__name__}: {e})") from None


def parse_policy(text: str, source: str, environ: Mapping[str, str] = os.environ) -> Policy:
    root = compose_yaml(text, source, "a mapping with at least 'routes'")
    return Validator(source, environ).policy(root)


# libyaml's loader where pyyaml was built with it: about 100 times faster than pyyaml's own (130 KB/s).
_FAST_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_EXPLAINED_CHARS = 64 * 1024  # at most about half a second of pyyaml's parser


def compose_yaml(text: str, source: str, expected: str) -> Node:
    """The YAML node tree (it keeps line numbers), or a PolicyError naming the line YAML gave up on.
    Aliases stay shared nodes, never expanded: nested aliases cost the file's size, no more."""
    try:
        root = _compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise PolicyError(source, "", line, f"invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise PolicyError(source, "", None, f"invalid YAML: {e}") from None
    if root is None:
        raise PolicyError(source, "", None, f"expected {expected}, got an empty file")
    return root


def _compose(text: str) -> Node | None:
    """Invalid YAML of a policy's usual size is read again by pyyaml's own loader, whose message
    names what it found ("but got '}'", a tab) where libyaml's does not. A large file keeps
    libyaml's message: pyyaml's parser would take seconds, holding the GIL the relay needs."""
    try:
        return yaml.compose(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        if _FAST_LOADER is yaml.SafeLoader or len(text) > _EXPLAINED_CHARS:
            raise
        return yaml.compose(text, Loader=yaml.SafeLoader)


class Validator:
    """Walks the YAML node tree; each method validates one part of the schema."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ

    def fail(self, key: str, node: Node, expected: str) -> PolicyError:
        return PolicyError(self.source, key, node.start_mark.line + 1, expected)

    def mapping(self, key: str, node: Node, allowed: tuple[str, ...] | None) -> dict[str, tuple[Node, Node]]:
        """Key name -> (key node, value node); rejects non-mappings, duplicates and unknown keys."""
        if not isinstance(node, MappingNode):
            raise self.fail(key, node, f"expected a mapping, got {describe(node)}")
        items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            name = self.string(key or "(top level)", key_node)
            child = f"{key}.{name}" if key else name
            if name in items:
                raise self.fail(child, key_node, "duplicate key")
            if allowed is not None and name not in allowed:
                raise self.fail(child, key_node, f"unknown key; expected one of {', '.join(allowed)}")
            items[name] = (key_node, value_node)
        return items

    def string(self, key: str, node: Node) -> str:
        if not (isinstance(node, ScalarNode) and node.tag == STR_TAG) or not node.value:
            raise self.fail(key, node, f"expected a non-empty string, got {describe(node)}")
        return node.value

    def header_name(self, key: str, node: Node) -> str:
        name = self.string(key, node)
        if not name.isascii() or any(c in name for c in " \t\r\n:"):
            raise self.fail(key, node, f"expected an HTTP header name, got {name!r}")
        return name.lower()

    def header_value(self, key: str, node: Node) -> str:
        value = self.string(key, node)
        if any(c in value for c in "\r\n\0"):
            raise self.fail(key, node, "expected a header value without line breaks")
        return value

    def optional(
        self, items: dict[str, tuple[Node, Node]], name: str, parse: Callable[[str, Node], T], key: str, default: T
    ) -> T:
        if name not in items:
            return default
        child = f"{key}.{name}" if key else name
        return parse(child, items[name][1])

    def policy(self, root: Node) -> Policy:
        items = self.mapping(
            "",
            root,
            (
                "provider",
                "auth",
                "model",
                "prices",
                "budgets",
                "limits",
                "client_keys",
                "routes",
                "guardrails",
                "redact",
            ),
        )
        if "routes" not in items:
            raise self.fail("routes", root, "missing; expected a mapping of path suffix to route type")
        return Policy(
            source=self.source,
            provider=self.optional(items, "provider", self.string, "", "openai"),
            auth=self.optional(items, "auth", self.auth, "", None),
            model=self.optional(items, "model", self.string, "", None),
            prices=self.optional(items, "prices", self.relative_path, "", None),
            budgets=self.optional(items, "budgets", self.budgets, "", None),
            limits=self.optional(items, "limits", self.limits, "", LimitPolicy()),
            client_keys=self.optional(items, "client_keys", self.client_keys, "", ClientKeys()),
            routes=self.routes("routes", items["routes"][1]),
            guardrails=self.optional(items, "guardrails", self.guardrails, "", GuardrailPolicy()),
            redact=self.optional(items, "redact", self.redact, "", RedactPolicy()),
        )

    def relative_path(self, key: str, node: Node) -> Path:
        """A file named relative to the policy file, as a ConfigMap mounts them side by side."""
        return Path(self.source).parent / self.string(key, node)

    def budgets(self, key: str, node: Node) -> BudgetPolicy:
        items = self.mapping(key, node, ("session", "client_key", "window", "reserve"))
        return BudgetPolicy(
            session=self.optional(items, "session", self.limit, key, None),
            client_key=self.optional(items, "client_key", self.limit, key, None),
            window_seconds=self.optional(items, "window", self.positive_number, key, 3600.0),
            reserve=self.optional(items, "reserve", self.limit, key, DEFAULT_RESERVE),
        )

    def limits(self, key: str, node: Node) -> LimitPolicy:
        items = self.mapping(key, node, ("store", "client_key", "on_store_error", "store_timeout_ms"))
        store = self.optional(items, "store", self.string, key, MEMORY_STORE)
        if store != MEMORY_STORE and urlsplit(store).scheme not in ("redis", "rediss", "unix"):
            expected = "memory (this process's own) or a Redis URL (redis://host:port/db, rediss://, unix://)"
            raise self.fail(f"{key}.store", items["store"][1], f"expected {expected}, got {store!r}")
        on_error = self.optional(items, "on_store_error", self.string, key, STORE_OPEN)
        if on_error not in (STORE_OPEN, STORE_CLOSED):
            raise self.fail(
                f"{key}.on_store_error", items["on_store_error"][1], f"expected open or closed, got {on_error!r}"
            )
        return LimitPolicy(
            store,
            self.optional(items, "client_key", self.rate_limits, key, RateLimits()),
            on_error,
            self.optional(items, "store_timeout_ms", self.positive_number, key, DEFAULT_STORE_TIMEOUT_MS),
        )

    def rate_limits(self, key: str, node: Node) -> RateLimits:
        names = ("requests_per_minute", "tokens_per_minute", "concurrent_sessions")
        seconds = ("max_session_seconds", "idle_session_seconds")
        items = self.mapping(key, node, names + seconds)
        return RateLimits(
            *(self.optional(items, name, self.whole_number, key, None) for name in names),
            *(self.optional(items, name, self.positive_number, key, None) for name in seconds),
        )

    def client_keys(self, key: str, node: Node) -> ClientKeys:
        items = self.mapping(key, node, ("require", "keys"))
        require = self.optional(items, "require", self.boolean, key, False)
        keys_node = items["keys"][1] if "keys" in items else None
        if keys_node is not None and not isinstance(keys_node, SequenceNode):
            raise self.fail(f"{key}.keys", keys_node, f"expected a list of keys, got {describe(keys_node)}")
        keys = tuple(
            self.known_key(f"{key}.keys[{i}]", item)
            for i, item in enumerate(keys_node.value if keys_node is not None else ())
        )
        for field_name in ("sha256", "name"):
            seen: set[str] = set()
            for i, known in enumerate(keys):
                value = getattr(known, field_name)
                if value in seen:
                    raise self.fail(
                        f"{key}.keys[{i}].{field_name}", keys_node.value[i], f"duplicate {field_name} {value!r}"
                    )
                seen.add(value)
        return ClientKeys(require, keys)

    def known_key(self, key: str, node: Node) -> KnownKey:
        items = self.mapping(key, node, ("sha256", "name", "budgets", "limits"))
        for required in ("sha256", "name"):
            if required not in items:
                raise self.fail(f"{key}.{required}", node, "missing")
        digest = self.string(f"{key}.sha256", items["sha256"][1]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise self.fail(
                f"{key}.sha256", items["sha256"][1], "expected the 64 hex digits of the key's SHA-256, never the key"
            )
        return KnownKey(
            sha256=digest,
            name=self.string(f"{key}.name", items["name"][1]),
            budget=self.optional(items, "budgets", self.limit, key, None),
            limits=self.optional(items, "limits", self.rate_limits, key, None),
        )

    def whole_number(self, key: str, node: Node) -> int:
        value = self.positive_number(key, node)
        if value != int(value):
            raise self.fail(key, node, f"expected a whole number, got {value:g}")
        return int(value)

    def count(self, key: str, node: Node, least: int = 0) -> int:
        """A whole number, `least` or more (zero included by default)."""
        if isinstance(node, ScalarNode) and node.tag == _INT_TAG:
            with contextlib.suppress(ValueError):
                if (value := int(yaml.safe_load(node.value))) >= least:
                    return value
        raise self.fail(key, node, f"expected a whole number, {least} or more, got {describe(node)}")

    def boolean(self, key: str, node: Node) -> bool:
        if isinstance(node, ScalarNode) and node.tag == _BOOL_TAG:
            return bool(yaml.safe_load(node.value))
        raise self.fail(key, node, f"expected true or false, got {describe(node)}")

    def limit(self, key: str, node: Node) -> Limit:
        items = self.mapping(key, node, ("tokens", "usd"))
        if not items:
            raise self.fail(key, node, "expected tokens and/or usd")
        return Limit(
            tokens=self.optional(items, "tokens", self.whole_number, key, None),
            usd=self.optional(items, "usd", self.positive_number, key, None),
        )

    def positive_number(self, key: str, node: Node) -> float:
        if isinstance(node, ScalarNode) and node.tag in (_INT_TAG, _FLOAT_TAG):
            with contextlib.suppress(ValueError):
                value = float(yaml.safe_load(node.value))
                if 0 < value < float("inf"):
                    return value
        raise self.fail(key, node, f"expected a positive number, got {describe(node)}")

    def auth(self, key: str, node: Node) -> Auth:
        items = self.mapping(key, node, ("env", "header"))
        if "env" not in items:
            raise self.fail(f"{key}.env", node, "missing; expected the name of an environment variable holding the key")
        env_node = items["env"][1]
        env = self.string(f"{key}.env", env_node)
        if not self.environ.get(env):
            raise self.fail(
                f"{key}.env", env_node, f"environment variable {env} is not set or empty; expected the upstream API key"
            )
        header = self.optional(items, "header", self.header_name, key, "authorization")
        if header not in AUTH_HEADERS:
            expected = ", ".join(AUTH_HEADERS)
            raise self.fail(f"{key}.header", items["header"][1], f"expected one of {expected}, got {header!r}")
        return Auth(env=env, key=self.environ[env], header=header)

    def routes(self, key: str, node: Node) -> tuple[Route, ...]:
        items = self.mapping(key, node, None)
        if not items:
            raise self.fail(key, node, "expected at least one route")
        routes = [self.route(f"{key}.{suffix}", suffix, value) for suffix, (_, value) in items.items()]
        return tuple(sorted(routes, key=lambda r: (r.suffix == CATCH_ALL, -len(r.suffix))))

    def route(self, key: str, suffix: str, node: Node) -> Route:
        if isinstance(node, ScalarNode):
            return Route(suffix, self.route_type(key, node))
        items = self.mapping(key, node, ("type", "request", "model", "protocol", "provider", "guardrails"))
        if "type" not in items:
            raise self.fail(f"{key}.type", node, f"missing; expected one of {_ROUTE_TYPES}")
        route_type = self.route_type(f"{key}.type", items["type"][1])
        protocol = self.optional(items, "protocol", self.protocol, key, WireProtocol.OPENAI)
        allowed = PROTOCOL_ROUTE_TYPES.get(protocol)
        if allowed is not None and route_type not in allowed:
            expected = " or ".join(t.value for t in allowed)
            raise self.fail(f"{key}.type", items["type"][1], f"expected {expected} for protocol {protocol}")
        if protocol in MODEL_IN_FIRST_MESSAGE and "model" in items:
            raise self.fail(
                f"{key}.model",
                items["model"][1],
                f"not supported for protocol {protocol} ({MODEL_IN_FIRST_MESSAGE[protocol]})",
            )
        return Route(
            suffix,
            route_type,
            self.optional(items, "request", self.header_policy, key, HeaderPolicy()),
            self.optional(items, "model", self.string, key, None),
            protocol,
            self.optional(items, "provider", self.string, key, None),
            self.optional(items, "guardrails", self.guardrails, key, GuardrailPolicy()),
        )

    def guardrails(self, key: str, node: Node) -> GuardrailPolicy:
        guards = tuple(self.guard(f"{key}[{i}]", item) for i, item in enumerate(self.sequence(key, node, "guards")))
        seen: set[str] = set()
        for i, guard in enumerate(guards):
            if guard.name in seen:
                raise self.fail(f"{key}[{i}].name", node.value[i], f"duplicate guard name {guard.name!r}")
            seen.add(guard.name)
        return GuardrailPolicy(guards)

    def guard(self, key: str, node: Node) -> Guard:
        names = ("name", "kind", "deny", "allow", "phases", "action", "url", "timeout_ms", "on_error", "thresholds")
        items = self.mapping(key, node, (*names, "model", "key_env", "max_blocks", "batch_ms", "batch_max"))
        for required in ("name", "kind"):
            if required not in items:
                raise self.fail(f"{key}.{required}", node, "missing")
        kind = self.choice(f"{key}.kind", items["kind"][1], GuardKind)
        own = {GuardKind.REGEX: ("deny", "allow"), GuardKind.WEBHOOK: ("url", "timeout_ms", "on_error", "key_env")}
        own[GuardKind.MODERATION] = (*own[GuardKind.WEBHOOK], "thresholds", "model", "batch_ms", "batch_max")
        for name in items.keys() - {"name", "kind", "phases", "action", "max_blocks"} - set(own[kind]):
            raise self.fail(f"{key}.{name}", items[name][0], f"not a key of a {kind} guard")
        required = "deny" if kind is GuardKind.REGEX else "url"
        if required not in items:
            raise self.fail(f"{key}.{required}", node, f"missing; a {kind} guard needs it")
        on_error = self.optional(items, "on_error", self.string, key, ON_ERROR_OPEN)
        if on_error not in (ON_ERROR_OPEN, ON_ERROR_CLOSED):
            raise self.fail(f"{key}.on_error", items["on_error"][1], f"expected open or closed, got {on_error!r}")
        timeout_ms = self.optional(items, "timeout_ms", self.positive_number, key, DEFAULT_TIMEOUT_MS)
        return Guard(
            name=self.string(f"{key}.name", items["name"][1]),
            kind=kind,
            phases=self.optional(items, "phases", self.phases, key, frozenset(Phase)),
            action=self.optional(items, "action", lambda k, n: self.choice(k, n, Action), key, Action.BLOCK),
            deny=self.optional(items, "deny", self.patterns, key, ()),
            allow=self.optional(items, "allow", self.patterns, key, ()),
            url=self.optional(items, "url", self.http_url, key, None),
            timeout_ms=timeout_ms,
            on_error=on_error,
            thresholds=self.optional(items, "thresholds", self.thresholds, key, ()),
            model=self.optional(items, "model", self.string, key, None),
            api_key=self.optional(items, "key_env", self.secret, key, None),
            max_blocks=self.optional(items, "max_blocks", self.count, key, None),
            batch_ms=self.batch_ms(key, items, timeout_ms),
            batch_max=self.optional(items, "batch_max", lambda k, n: self.count(k, n, 1), key, DEFAULT_BATCH_MAX),
        )

    def batch_ms(self, key: str, items: dict[str, tuple[Node, Node]], timeout_ms: float) -> float:
        """How long a moderation check lingers for a batch: less than the timeout, which it counts
        against (by default 50 ms, or half the timeout if that is shorter)."""
        if "batch_ms" not in items:
            return min(DEFAULT_BATCH_MS, timeout_ms / 2)
        node = items["batch_ms"][1]
        batch_ms = self.count(f"{key}.batch_ms", node)
        if batch_ms >= timeout_ms:
            raise self.fail(
                f"{key}.batch_ms",
                node,
                f"expected less than timeout_ms ({timeout_ms:g}), got {batch_ms}: checks would time out in their batch",
            )
        return batch_ms

    def secret(self, key: str, node: Node) -> str:
        """The value of the environment variable a key names (a guard service's token)."""
        env = self.string(key, node)
        if not self.environ.get(env):
            raise self.fail(key, node, f"environment variable {env} is not set or empty")
        return self.environ[env]

    def phases(self, key: str, node: Node) -> frozenset[Phase]:
        phases = frozenset(self.choice(f"{key}[{i}]", item, Phase) for i, item in enumerate(self.sequence(key, node)))
        if not phases:
            raise self.fail(key, node, "expected at least one of input, output")
        return phases

    def patterns(self, key: str, node: Node) -> tuple[re.Pattern[str], ...]:
        """Regular expressions (Python's syntax), matched case-insensitively against normalised text."""
        compiled = []
        for i, item in enumerate(self.sequence(key, node, "patterns")):
            try:
                compiled.append(re.compile(self.string(f"{key}[{i}]", item), re.IGNORECASE))
            except re.error as e:
                raise self.fail(f"{key}[{i}]", item, f"invalid regular expression: {e}") from None
        return tuple(compiled)

    def thresholds(self, key: str, node: Node) -> tuple[tuple[str, float], ...]:
        items = self.mapping(key, node, None)
        scores = []
        for name, (_, value) in items.items():
            score = self.positive_number(f"{key}.{name}", value)
            if score > 1:
                raise self.fail(f"{key}.{name}", value, f"expected a score up to 1, got {score:g}")
            scores.append((name, score))
        return tuple(scores)

    def http_url(self, key: str, node: Node) -> str:
        url = self.string(key, node)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(key, node, f"expected an http:// or https:// URL, got {url!r}")
        return url

    def redact(self, key: str, node: Node) -> RedactPolicy:
        items = self.mapping(key, node, ("builtin", "patterns"))
        builtin = ()
        if "builtin" in items:
            items_node = items["builtin"][1]
            builtin = tuple(
                self.choice(f"{key}.builtin[{i}]", item, BUILTIN_DETECTORS)
                for i, item in enumerate(self.sequence(f"{key}.builtin", items_node))
            )
        return RedactPolicy(builtin, self.optional(items, "patterns", self.patterns, key, ()))

    def sequence(self, key: str, node: Node, what: str = "values") -> list[Node]:
        if not isinstance(node, SequenceNode):
            raise self.fail(key, node, f"expected a list of {what}, got {describe(node)}")
        return node.value

    def choice[C: str](self, key: str, node: Node, choices: Iterable[C]) -> C:
        """One of `choices` (an enum's members, or strings), spelled as its value."""
        options = {str(c): c for c in choices}
        if not (isinstance(node, ScalarNode) and node.tag == STR_TAG and node.value in options):
            raise self.fail(key, node, f"expected one of {', '.join(options)}, got {describe(node)}")
        return options[node.value]

    def protocol(self, key: str, node: Node) -> WireProtocol:
        if not (isinstance(node, ScalarNode) and node.value in WireProtocol._value2member_map_):
            raise self.fail(key, node, f"expected one of {_PROTOCOLS}, got {describe(node)}")
        return WireProtocol(node.value)

    def route_type(self, key: str, node: Node) -> RouteType:
        if not (isinstance(node, ScalarNode) and node.value in RouteType._value2member_map_):
            raise self.fail(key, node, f"expected one of {_ROUTE_TYPES}, got {describe(node)}")
        return RouteType(node.value)

    def header_policy(self, key: str, node: Node) -> HeaderPolicy:
        items = self.mapping(key, node, ("remove", "set", "add"))
        return HeaderPolicy(
            remove=self.optional(items, "remove", self.header_list, key, ()),
            set=self.optional(items, "set", self.header_map, key, ()),
            add=self.optional(items, "add", self.header_map, key, ()),
        )

    def header_list(self, key: str, node: Node) -> tuple[str, ...]:
        if not isinstance(node, SequenceNode):
            raise self.fail(key, node, f"expected a list of header names, got {describe(node)}")
        return tuple(self.header_name(f"{key}[{i}]", item) for i, item in enumerate(node.value))

    def header_map(self, key: str, node: Node) -> tuple[tuple[str, str], ...]:
        items = self.mapping(key, node, None)
        return tuple(
            (self.header_name(f"{key}.{name}", name_node), self.header_value(f"{key}.{name}", value_node))
            for name, (name_node, value_node) in items.items()
        )


_ROUTE_TYPES = ", ".join(t.value for t in RouteType)
_PROTOCOLS = ", ".join(p.value for p in WireProtocol)


def describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL_TAG:
        return "nothing"
    if node.tag == STR_TAG:
        return repr(node.value)
    return f"{node.tag.rsplit(':', 1)[-1]} {node.value}"
