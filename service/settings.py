"""Settings, read once from the environment (12-factor).

Every field maps to the upper-case environment variable of the same name,
so `model_delay_min_s` is `MODEL_DELAY_MIN_S`. The README's settings table
lists them all; keep the two in step.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec
from yarl import URL

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
# Also an AMQP prefetch count, which is a 16-bit number.
PrefetchCount = Annotated[int, msgspec.Meta(ge=1, le=65535)]
# A broker's host name: letters, digits, dots and dashes (an address is checked apart).
_BROKER_HOST = re.compile(r"[A-Za-z0-9_.-]+")


class ConfigError(Exception):
    """A setting is wrong; the message is one line meant for an operator."""


class Settings(msgspec.Struct, frozen=True, rename="upper", forbid_unknown_fields=False):
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    host: str = "0.0.0.0"  # a container must listen on all interfaces
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    model_delay_min_s: NonNegative = 10
    model_delay_max_s: NonNegative = 17
    model_concurrency: PrefetchCount = 100
    max_body_bytes: PositiveInt = 1_048_576
    # A request head past these is refused with 431, before it is parsed whole.
    max_header_bytes: PositiveInt = 65_536
    max_headers: PositiveInt = 100
    # Slow clients: a head not complete, or a body silent, this long is closed (408).
    header_timeout_s: Positive = 10
    body_idle_timeout_s: Positive = 30
    predictor: str = ""
    # Prefix of every exchange and queue name, so deployments can share a vhost.
    # The prefix of the exchange's and every queue's name: what AMQP allows in
    # one, and short enough for the longest (".webhooks.delay.17").
    broker_namespace: Annotated[
        str, msgspec.Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    ] = "predictions"
    broker_connect_timeout_s: NonNegative = 60
    broker_reconnect_interval_s: Positive = 2
    publish_timeout_s: Positive = 5
    max_attempts: PositiveInt = 3
    # The wait before a failed task's second attempt; it doubles after each
    # failure (up to 128x), +-25 % jitter. 0 retries at once.
    retry_backoff_s: NonNegative = 1
    result_ttl_s: Positive = 86_400
    shutdown_grace_s: NonNegative = 30
    max_wait_s: NonNegative = 60
    # Bytes of inputs and results kept in memory; the rest is on disk (STATE_DIR).
    results_memory_max_bytes: PositiveInt = 268_435_456
    # Where the on-disk state lives; empty: a temporary directory, removed at exit.
    state_dir: str = ""
    stream_prefetch: PrefetchCount = 128
    # Most events one broker message carries; 1 publishes each alone, as
    # versions before batching did and as they need to read (rolling upgrade).
    publish_batch_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 64
    # Webhooks (the Standard Webhooks spec): off without a secret, whsec_<base64>.
    webhook_secret: str = ""
    webhook_timeout_s: Positive = 10
    # How long a delivery is retried before it is given up (dead).
    webhook_retry_for_s: Positive = 86_400
    # Deliveries at once, in all and to one endpoint (scheme, host and port).
    webhook_concurrency: PrefetchCount = 64
    webhook_endpoint_concurrency: PrefetchCount = 4
    # Let webhooks reach loopback, private and link-local addresses (tests, a
    # private network you trust); off, such a URL is refused (SSRF).
    webhook_allow_private_networks: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            # `inf` passes every bound above, then hangs a sleep or breaks
            # a conversion to int long after the start.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name.upper()} must be a finite number")
        _check_broker_urls(self.rabbitmq_urls)
        if self.webhook_secret and webhook_key(self.webhook_secret) is None:
            raise ValueError(
                "WEBHOOK_SECRET must be whsec_ followed by base64 (the Standard Webhooks format)"
            )
        if self.model_delay_min_s > self.model_delay_max_s:
            raise ValueError(
                f"MODEL_DELAY_MIN_S={self.model_delay_min_s:g} must not exceed "
                f"MODEL_DELAY_MAX_S={self.model_delay_max_s:g}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        known = {name.upper() for name in cls.__struct_fields__}
        given = {key: value for key, value in env.items() if key in known}
        raw = {key: _normalise(key, value) for key, value in given.items()}
        try:
            return msgspec.convert(raw, cls, strict=False)
        except (msgspec.ValidationError, ValueError) as exc:
            raise ConfigError(_explain(str(exc), given)) from None

    @property
    def rabbitmq_urls(self) -> tuple[str, ...]:
        """The broker nodes to try, in order: RABBITMQ_URL's URLs, separated by commas."""
        return tuple(url.strip() for url in self.rabbitmq_url.split(","))

    def with_changes(self, **changes: object) -> Settings:
        """A copy with some fields replaced (tests and benchmarks use this)."""
        return msgspec.structs.replace(self, **changes)


def _check_broker_urls(urls: tuple[str, ...]) -> None:
    # Said at once: aio-pika would retry a malformed URL until
    # BROKER_CONNECT_TIMEOUT_S, then fail with an empty reason, or raise a
    # traceback. (No URL is echoed: it may hold a password.)
    vhosts = set()
    for number, url in enumerate(urls, 1):
        where = f"RABBITMQ_URL's entry {number} of {len(urls)}" if len(urls) > 1 else "RABBITMQ_URL"
        vhosts.add(_broker_vhost(url, where))
    if len(vhosts) > 1:
        # The nodes of one cluster serve the same vhosts: a reconnection to
        # another entry must not move the service to other queues.
        raise ValueError("RABBITMQ_URL's entries name different vhosts; give each node the same")


def _broker_vhost(url: str, where: str) -> str:
    """The vhost one RABBITMQ_URL entry names; ValueError saying what is wrong with it."""
    if not url:
        raise ValueError(f"{where} is empty (two commas in a row, or one at an end)")
    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() not in ("amqp", "amqps"):
        raise ValueError(f"{where} must start with amqp:// or amqps://")
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018 (parsing the port is what may raise)
    except ValueError as exc:
        raise ValueError(f"{where} is not a valid URL ({exc})") from None
    host = parsed.raw_host or ""
    if not host:
        raise ValueError(f"{where} names no host (amqp://user:password@host:5672/vhost)")
    if not _BROKER_HOST.fullmatch(host) and not is_ip_address(host):
        raise ValueError(f"{where} has a host that is not a host name or an address")
    return parsed.path[1:] or "/"


def is_ip_address(host: str) -> bool:
    """Whether a URL's host is an IPv4 or IPv6 address rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def webhook_key(secret: str) -> bytes | None:
    """The HMAC key of a whsec_<base64> secret; None if malformed."""
    encoded = secret.removeprefix("whsec_")
    if encoded == secret or not encoded:
        return None
    try:
        return base64.b64decode(encoded, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def _normalise(key: str, value: str) -> str:
    # LOG_LEVEL=info is as clear as LOG_LEVEL=INFO, LOG_FORMAT=JSON as json.
    value = value.strip()
    if key == "LOG_LEVEL":
        return value.upper()
    return value.lower() if key == "LOG_FORMAT" else value


_NOT_FINITE = re.compile(r"^(?P<name>[A-Z_]+) must be a finite number$")
_AT_SETTING = re.compile(r"^(?P<what>.*) - at `\$\.(?P<name>[A-Z_]+)`$")


def _explain(message: str, given: Mapping[str, str]) -> str:
    """One line: the setting, its value as the operator gave it, what is allowed.

    msgspec says "Invalid enum value 'VERBOSE'" or "Expected `int` >= 1":
    the value normalised, one bound of two, types in Python's words. The
    allowed values are read from the field's type instead.
    """
    not_finite = _NOT_FINITE.match(message)
    if not_finite is not None:
        name = not_finite["name"]
        return f"invalid setting {name}={given.get(name, '')!r}: expected {_ALLOWED[name]}"
    match = _AT_SETTING.match(message)
    if match is None:
        return f"invalid setting: {message}"
    name = match["name"]
    allowed = _ALLOWED.get(name) or match["what"].replace(", got `str`", "")
    return f"invalid setting {name}={given.get(name, '')!r}: expected {allowed}"


def _allowed(kind: msgspec.inspect.Type, name: str) -> str:
    """What a setting of this type accepts, in an operator's words."""
    if isinstance(kind, msgspec.inspect.LiteralType):
        # As declared (msgspec sorts them): DEBUG, INFO, WARNING, ERROR.
        values = typing.get_args(typing.get_type_hints(Settings)[name])
        return "one of " + ", ".join(map(str, values)) + " (in any case)"
    if isinstance(kind, msgspec.inspect.IntType):
        return "a whole number" + _bounds(kind.ge, kind.le, kind.gt, kind.lt)
    if isinstance(kind, msgspec.inspect.FloatType):
        return "a finite number" + _bounds(kind.ge, kind.le, kind.gt, kind.lt)
    if isinstance(kind, msgspec.inspect.BoolType):
        return "true or false"
    if isinstance(kind, msgspec.inspect.StrType):
        return _allowed_text(kind)
    return ""


def _allowed_text(kind: msgspec.inspect.StrType) -> str:
    if kind.pattern:  # only BROKER_NAMESPACE has one
        return f"1 to {kind.max_length} letters, digits, dots, dashes, underscores or colons"
    return "a non-empty text" if kind.min_length else ""


def _bounds(ge: float | None, le: float | None, gt: float | None, lt: float | None) -> str:
    if ge is not None and le is not None:
        return f" from {ge:g} to {le:g}"
    limits = ((">=", ge), ("<=", le), (">", gt), ("<", lt))
    return "".join(f" {op} {value:g}" for op, value in limits if value is not None)


def _allowed_by_setting() -> dict[str, str]:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    return {field.encode_name: _allowed(field.type, field.name) for field in info.fields}


_ALLOWED = _allowed_by_setting()
