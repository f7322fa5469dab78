"""Settings, read once from the environment (12-factor).

Every field maps to the upper-case environment variable of the same name,
so `model_delay_min_s` is `MODEL_DELAY_MIN_S`. The README's settings table
lists them all; keep the two in step.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """A setting is wrong; the message is one line meant for an operator."""


class Settings(msgspec.Struct, frozen=True, rename="upper", forbid_unknown_fields=False):
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    host: str = "0.0.0.0"  # a container must listen on all interfaces
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    model_delay_min_s: NonNegative = 10
    model_delay_max_s: NonNegative = 17
    model_concurrency: PositiveInt = 100
    max_body_bytes: PositiveInt = 1_048_576
    predictor: str = ""
    # Prefix of every exchange and queue name, so deployments can share a vhost.
    broker_namespace: Annotated[str, msgspec.Meta(min_length=1)] = "predictions"
    broker_connect_timeout_s: NonNegative = 60
    broker_reconnect_interval_s: Positive = 2
    publish_timeout_s: Positive = 5
    max_attempts: PositiveInt = 3
    result_ttl_s: Positive = 86_400
    shutdown_grace_s: NonNegative = 30
    max_wait_s: NonNegative = 60
    # Bytes of inputs and results kept in memory; the rest is on disk (STATE_DIR).
    results_memory_max_bytes: PositiveInt = 268_435_456
    # Where the on-disk state lives; empty: a temporary directory, removed at exit.
    state_dir: str = ""
    stream_prefetch: PositiveInt = 128
    # Most events one broker message carries; 1 publishes each alone, as
    # versions before batching did and as they need to read (rolling upgrade).
    publish_batch_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 64
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            # `inf` passes every bound above, then hangs a sleep or breaks
            # a conversion to int long after the start.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name.upper()} must be a finite number, not {value}")
        if not self.rabbitmq_url.startswith(("amqp://", "amqps://")):
            # Said at once: aio-pika would retry a malformed URL until
            # BROKER_CONNECT_TIMEOUT_S, then fail with an empty reason.
            raise ValueError("RABBITMQ_URL must start with amqp:// or amqps://")
        if self.model_delay_min_s > self.model_delay_max_s:
            raise ValueError("MODEL_DELAY_MIN_S must not exceed MODEL_DELAY_MAX_S")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        known = {name.upper() for name in cls.__struct_fields__}
        raw = {key: _normalise(key, value) for key, value in env.items() if key in known}
        try:
            return msgspec.convert(raw, cls, strict=False)
        except (msgspec.ValidationError, ValueError) as exc:
            raise ConfigError(_explain(str(exc), raw)) from None

    def with_changes(self, **changes: object) -> Settings:
        """A copy with some fields replaced (tests and benchmarks use this)."""
        return msgspec.structs.replace(self, **changes)


def _normalise(key: str, value: str) -> str:
    # LOG_LEVEL=info is as clear as LOG_LEVEL=INFO, LOG_FORMAT=JSON as json.
    value = value.strip()
    if key == "LOG_LEVEL":
        return value.upper()
    return value.lower() if key == "LOG_FORMAT" else value


_AT_SETTING = re.compile(r"^(?P<what>.*) - at `\$\.(?P<name>[A-Z_]+)`$")


def _explain(message: str, raw: Mapping[str, str]) -> str:
    """msgspec's message with the value the operator gave, which it omits.

    "Expected `int`, got `str` - at `$.MAX_BODY_BYTES`" becomes
    "invalid setting MAX_BODY_BYTES='1.5': Expected `int`": every value
    arrives as a string, so "got `str`" would only mislead.
    """
    match = _AT_SETTING.match(message)
    if match is None:
        return f"invalid setting: {message}"
    name = match["name"]
    what = match["what"].replace(", got `str`", "")
    return f"invalid setting {name}={raw.get(name, '')!r}: {what}"
