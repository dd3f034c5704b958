"""Every setting of a replica, from ``GATEWAY_*`` environment variables and ``wsgateway`` flags.

Flags win over environment variables, which win over defaults. ``wsgateway --help`` lists
each setting with its variable and default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ENV_PREFIX", "Settings", "SlowConsumerPolicy"]

ENV_PREFIX = "GATEWAY_"


#: close: close 1013, the client reconnects and catches up; drop-oldest: keep the newest
#: messages (dashboards, prices); drop-newest: keep what is queued, lose what arrives.
SlowConsumerPolicy = Literal["close", "drop-oldest", "drop-newest"]
Compression = Literal["off", "deflate"]
LogLevel = Literal["debug", "info", "warning", "error"]


class URL(SecretStr):
    """A URL that may carry a password: shown as '**********' in logs and reprs."""


Seconds = Annotated[float, Field(gt=0)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        cli_prog_name="wsgateway",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_exit_on_error=False,
        cli_implicit_flags=False,
    )

    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(8765, ge=0, le=65535, description="WebSocket and HTTP port (0: any free)")
    redis_url: URL | None = Field(
        None,
        description="Redis URL, e.g. redis://redis:6379/0; unset: in-process memory backplane "
        "(one replica)",
    )
    channel_prefix: str = Field(
        "ws:", max_length=64, description="Redis channel = prefix + channel"
    )
    queue_max_messages: int = Field(256, ge=1, description="per-client queue bound, messages")
    queue_max_bytes: int = Field(1024 * 1024, ge=1024, description="per-client queue bound, bytes")
    slow_consumer_policy: SlowConsumerPolicy = Field(
        "close",
        description="when a client's queue is full: close (1013), drop-oldest or drop-newest",
    )
    ping_interval: Seconds = Field(20.0, description="seconds between keepalive pings")
    ping_timeout: Seconds = Field(20.0, description="seconds to wait for a pong before closing")
    max_message_size: int = Field(
        65536, ge=64, le=16 * 1024 * 1024, description="largest inbound frame, bytes (close 1009)"
    )
    write_limit: int = Field(
        32768,
        ge=1024,
        description="transport write buffer, bytes, above which a client counts as congested and "
        "its messages wait in its queue",
    )
    send_buffer: int | None = Field(
        None,
        ge=4096,
        description="SO_SNDBUF of client sockets, bytes; bounds the kernel memory a stalled "
        "client can pin (unset: kernel autotuning, up to net.ipv4.tcp_wmem)",
    )
    close_timeout: Seconds = Field(
        5.0, description="seconds a closing handshake may take before the socket is aborted"
    )
    open_timeout: Seconds = Field(10.0, description="seconds the opening handshake may take")
    subscribe_timeout: Seconds = Field(
        5.0, description="seconds to wait for the backplane to confirm a subscription"
    )
    compression: Compression = Field(
        "off",
        description="permessage-deflate: off, or deflate (about 50 KiB more memory per "
        "connection and one compression per message per client)",
    )
    max_subscriptions: int = Field(100, ge=1, description="subscriptions per connection")
    anonymous_channels: str = Field(
        "*", description="comma-separated glob patterns anonymous clients may subscribe to"
    )
    anonymous_publish: str = Field(
        "",
        description="comma-separated glob patterns anonymous clients may publish to from the "
        "socket; empty: client publishing is off",
    )
    reconnect_min: Seconds = Field(0.1, description="first backplane reconnect delay cap, seconds")
    reconnect_max: Seconds = Field(10.0, description="largest backplane reconnect delay, seconds")
    log_level: LogLevel = Field("info", description="debug, info, warning or error")

    @field_validator("log_level", "slow_consumer_policy", "compression", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: URL | None) -> URL | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = value.get_secret_value().partition("://")[0]
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _reconnect_bounds(self) -> Settings:
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    @staticmethod
    def patterns(value: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in value.split(",") if p.strip())


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


# --help shows the environment variable of each flag.
for _name, _field in Settings.model_fields.items():
    _field.description = f"{_field.description or ''} [{env_name(_name)}]".strip()
