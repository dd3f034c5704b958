"""Every setting of a replica, from ``GATEWAY_*`` environment variables and ``wsgateway`` flags.

Flags win over environment variables, which win over defaults. ``wsgateway --help`` lists
each setting with its variable and default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.envelope import MAX_BYTES
from publisher.history import HistoryPolicy
from publisher.presence import PresencePolicy

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
        description="Redis URL, e.g. redis://redis:6379/0, or redis+cluster://host:port (any "
        "node of a Redis Cluster, 7+: sharded pub/sub); unset: in-process memory backplane "
        "(one replica)",
    )
    redis_max_connections: int = Field(
        32,
        ge=1,
        description="Redis connections for commands (publishes, history reads) besides the "
        "one pub/sub connection; more requests at once wait for one",
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
    max_envelope_bytes: int = Field(
        MAX_BYTES,
        ge=1024,
        description="largest envelope taken from the backplane, bytes; larger ones are "
        "counted malformed (size) and dropped",
    )
    backlog_messages: int = Field(
        1000,
        ge=1,
        description="messages from the backplane waiting to be fanned out, per channel; "
        "beyond, the channel's oldest are shed (a replica that cannot keep up)",
    )
    backlog_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024 * 1024,
        description="bytes from the backplane waiting to be fanned out, all channels; beyond, "
        "the oldest messages of the busiest channel are shed",
    )
    write_limit: int = Field(
        32768,
        ge=1024,
        description="transport write buffer, bytes, above which a client counts as congested and "
        "its messages wait in its queue",
    )
    coalesce: Literal["adaptive", "window", "off"] = Field(
        "adaptive",
        description="how a channel's messages are batched into one write per client: adaptive "
        "holds them (up to coalesce_window) only while the replica uses more than "
        "coalesce_busy of its core, as much as keeps it there; window always holds them "
        "coalesce_window after the channel's last write; off writes every message on its "
        "own (the most CPU). What arrives together (one Redis read) goes out together in all "
        "but off (docs/performance.md)",
    )
    coalesce_window: float = Field(
        0.02,
        ge=0,
        le=1,
        description="seconds: the longest a channel's messages wait after its last write "
        "(adaptive), or the fixed wait (window); the first message after a quiet spell goes at "
        "once, so a channel at most 1/window messages a second is never held",
    )
    coalesce_busy: float = Field(
        0.75,
        gt=0,
        le=1,
        description="share of one core the replica may use (or wait for, on a core it "
        "shares) before adaptive coalescing holds messages: lower trades latency under load "
        "for less CPU per delivery; 1 holds them only when the core is saturated",
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
    open_timeout: Seconds = Field(
        5.0,
        description="seconds from accepting a socket to the end of its opening handshake; "
        "then it is closed",
    )
    subscribe_timeout: Seconds = Field(
        5.0, description="seconds to wait for the backplane to confirm a subscription"
    )
    compression: Compression = Field(
        "off",
        description="permessage-deflate: off, or deflate (about 50 KiB more memory per "
        "connection and one compression per message per client)",
    )
    max_connections: int = Field(
        10000, ge=1, description="connections per replica; beyond it the handshake gets HTTP 503"
    )
    max_connections_per_user: int = Field(
        100,
        ge=0,
        description="connections one user (a token's sub) may hold on one replica; beyond it "
        "the handshake gets HTTP 429; 0: no limit",
    )
    max_handshakes: int = Field(
        1000,
        ge=1,
        description="sockets still in their opening handshake (HTTP probes included); a new "
        "one beyond it replaces the oldest",
    )
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        le=1024 * 1024,
        description="bytes a client may send before its handshake ends (request line and "
        "headers); beyond: HTTP 431",
    )
    fd_reserve: int = Field(
        256,
        ge=16,
        description="file descriptors kept for Redis, probes and logs: client sockets beyond "
        "the file limit minus this are refused at once (raise it with many Redis Cluster "
        "nodes: each may take GATEWAY_REDIS_MAX_CONNECTIONS)",
    )
    max_subscriptions: int = Field(100, ge=1, description="subscriptions per connection")
    rate_limit: float = Field(
        50.0,
        gt=0,
        description="inbound frames per second per connection (messages, fragments, pings, "
        "pongs), burst the same; close 1008 beyond",
    )
    stall_timeout: Seconds = Field(
        10.0,
        description="seconds a client may leave its transport blocked (not reading) before it "
        "is cut off",
    )
    drain_seconds: float = Field(
        10.0,
        ge=0,
        description="on SIGTERM, close connections with 1001 in batches spread over this many "
        "seconds",
    )
    shutdown_timeout: Seconds = Field(
        20.0,
        description="on SIGTERM, exit after at most this many seconds, cutting off what is left",
    )
    anonymous_channels: str = Field(
        "*", description="comma-separated glob patterns anonymous clients may subscribe to"
    )
    anonymous_publish: str = Field(
        "",
        description="comma-separated glob patterns anonymous clients may publish to from the "
        "socket; empty: client publishing is off",
    )
    personal_channels: Literal["on", "off"] = Field(
        "off",
        description="on: every connection with a token is subscribed at connect to its user's "
        "personal channel @<sub>, which no one else may subscribe to (that rule holds either way)",
    )
    jwt_secret: SecretStr | None = Field(
        None, description="HS256 secret; set it (or the public key file) and tokens are required"
    )
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key file for RS256/ES256 tokens"
    )
    jwt_audience: str | None = Field(None, description="required 'aud' claim, if set")
    jwt_issuer: str | None = Field(None, description="required 'iss' claim, if set")
    jwt_leeway: float = Field(0.0, ge=0, description="seconds of clock skew allowed on 'exp'")
    max_token_bytes: int = Field(
        8192,
        ge=256,
        le=1024 * 1024,
        description="longest token (at the handshake and in a refresh), bytes: a longer one is "
        "refused before it is decoded (decoding costs 30 to 50 us per KB)",
    )
    allowed_origins: str | None = Field(
        None,
        description="comma-separated Origin values or re:<regex> entries; others get HTTP 403 "
        "(clients that send no Origin are not browsers and pass); unset: any",
    )
    reconnect_min: Seconds = Field(0.1, description="first backplane reconnect delay cap, seconds")
    reconnect_max: Seconds = Field(10.0, description="largest backplane reconnect delay, seconds")
    probe_interval: Seconds = Field(
        5.0, description="seconds between publish-to-self probes of the Redis subscription"
    )
    probe_timeout: Seconds = Field(
        3.0, description="seconds a probe may take before the Redis connection is replaced"
    )
    history_channels: str = Field(
        "",
        description="comma-separated glob patterns of channels that keep history: their "
        "messages carry offsets and clients can resume with 'since' (replicas write them to "
        "Redis, where publishers read them)",
    )
    history_size: int = Field(1000, ge=1, description="messages kept per history channel")
    history_ttl: Seconds = Field(300.0, description="seconds a history message is kept")
    history_retention: Seconds = Field(
        86400.0,
        description="seconds a silent history channel keeps its stream and epoch; after that "
        "its offsets restart in a new epoch",
    )
    state_channels: str = Field(
        "",
        description="comma-separated glob patterns of state channels: history channels whose "
        "subscribers get the latest message right after 'subscribed' (a price, a scoreboard, "
        "a document), and whose resume brings only the latest",
    )
    delta_channels: str = Field(
        "",
        description="comma-separated glob patterns of history (or state) channels whose "
        "subscribers may ask for their messages as Fossil deltas (subscribe option "
        '"delta": "fossil"): after one full message, each update costs only what changed',
    )
    delta_max_bytes: int = Field(
        65536,
        ge=0,
        description="largest message text (bytes of its data) a delta is made of or against; "
        "larger ones go as full text, as do those more than half new: a delta costs the "
        "replica's loop about 0.1 us per new byte and 0.01 us per unchanged byte",
    )
    history_idempotency_window: Seconds = Field(
        300.0,
        description="seconds a publisher's idempotency key is remembered: a retry with the "
        "same key within it is not stored or sent twice",
    )
    presence_channels: str = Field(
        "",
        description="comma-separated glob patterns of channels that keep presence: who is "
        "subscribed, across replicas, read with the presence and presence_stats ops",
    )
    join_leave_channels: str = Field(
        "",
        description="comma-separated glob patterns of channels whose subscribers get join and "
        "leave frames; only channels with presence too (the leaves of a crashed replica's "
        "clients come from it)",
    )
    presence_ttl: Seconds = Field(
        60.0,
        description="seconds a presence entry lives unless its replica renews it (every third "
        "of it); must exceed three presence leases",
    )
    presence_lease: Seconds = Field(
        10.0,
        description="seconds a replica's lease lives unless renewed (every sixth of it): the "
        "surviving replicas send the leaves of a dead replica's clients at most this much, "
        "plus a third of it, after it died",
    )
    presence_page: int = Field(
        1000,
        ge=1,
        le=10000,
        description="members one presence reply lists, by default and at most (about: Redis "
        "returns a channel of up to 512 members whole)",
    )
    presence_read_rate: float = Field(
        1.0,
        gt=0,
        description="presence and presence_stats requests a second per connection (burst ten "
        "times it, to page through a large room); beyond: the limit error. Each reads up to "
        "GATEWAY_PRESENCE_PAGE members from Redis",
    )
    presence_window: Seconds = Field(
        0.1,
        description="seconds a replica gathers joins and leaves before writing them to Redis; "
        "each channel gets at most one join and one leave frame per window",
    )
    anonymous_presence: str = Field(
        "*",
        description="comma-separated glob patterns of channels whose presence anonymous "
        "clients may read (tokens say it in their presence claim)",
    )
    replay_max_messages: int = Field(
        1000,
        ge=1,
        description="most messages one resume (subscribe with since) may replay; a client "
        "further behind gets recovered: false and starts from the top",
    )
    replay_max_bytes: int = Field(
        4 * 1024 * 1024,
        ge=65536,
        description="most envelope bytes one resume may replay (and one read of a history "
        "brings); a client further behind gets recovered: false",
    )
    demo_page: Literal["auto", "on", "off"] = Field(
        "auto",
        description="the browser demo page at /: auto serves it on the embedded memory "
        "backplane only",
    )
    metrics: Literal["on", "off"] = Field(
        "on", description="the Prometheus /metrics endpoint on the gateway's port"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="json: one object a line; text: for people; auto: text on a terminal"
    )
    log_level: LogLevel = Field("info", description="debug, info, warning or error")

    @field_validator(
        "log_level",
        "log_format",
        "metrics",
        "demo_page",
        "personal_channels",
        "slow_consumer_policy",
        "compression",
        mode="before",
    )
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("coalesce", mode="before")
    @classmethod
    def _coalesce_was_a_switch(cls, value: Any) -> Any:
        """``GATEWAY_COALESCE`` was true or false before it had modes: keep their meaning."""
        if isinstance(value, bool):
            return "adaptive" if value else "off"
        if isinstance(value, str):
            value = value.lower()
            return {"true": "adaptive", "false": "off"}.get(value, value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: URL | None) -> URL | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = value.get_secret_value().partition("://")[0]
        if scheme not in ("redis", "rediss", "unix", "redis+cluster"):
            raise ValueError("must start with redis://, rediss://, unix:// or redis+cluster://")
        return value

    @field_validator("jwt_public_key_file")
    @classmethod
    def _readable_public_key(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                load_pem_public_key(value.read_bytes())
            except (OSError, ValueError, TypeError) as exc:
                raise ValueError(f"cannot load a PEM public key from {value}: {exc}") from None
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origin_rules(cls, value: str | None) -> str | None:
        if value is not None:
            for entry in cls.patterns(value):
                if entry.startswith("re:"):
                    try:
                        re.compile(entry[3:])
                    except re.error as exc:
                        raise ValueError(f"bad regular expression {entry!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        if self.jwt_secret is not None and self.jwt_public_key_file is not None:
            raise ValueError("set GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY_FILE, not both")
        if self.shutdown_timeout <= self.drain_seconds:
            raise ValueError("shutdown_timeout must be longer than drain_seconds")
        if self.join_leave_channels.strip() and not self.presence_channels.strip():
            raise ValueError("join_leave_channels needs presence_channels")
        if self.presence_ttl <= 3 * self.presence_lease:
            raise ValueError("presence_ttl must exceed three presence leases")
        return self

    def history(self) -> HistoryPolicy:
        state = self.patterns(self.state_channels)
        history = self.patterns(self.history_channels)
        return HistoryPolicy(
            patterns=history + tuple(p for p in state if p not in history),
            state=state,
            size=self.history_size,
            ttl=self.history_ttl,
            retention=self.history_retention,
            idempotency_window=self.history_idempotency_window,
        )

    def presence(self) -> PresencePolicy:
        return PresencePolicy(
            patterns=self.patterns(self.presence_channels),
            join_leave=self.patterns(self.join_leave_channels),
            ttl=self.presence_ttl,
            lease=self.presence_lease,
            page=self.presence_page,
            window=self.presence_window,
        )

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
