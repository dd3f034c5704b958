"""Publisher settings from ``PUBLISHER_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from publisher.history import HistoryPolicy

__all__ = ["PublisherSettings"]


class PublisherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PUBLISHER_", extra="ignore")

    redis_url: str = Field("redis://localhost:6379/0", description="Redis to publish through")
    channel_prefix: str = Field("ws:", description="Redis channel = prefix + channel")
    history_channels: str = Field(
        "",
        description="comma-separated glob patterns of channels that keep history, used only "
        "while no gateway has written its own to Redis (publisher.kinds)",
    )
    history_size: int = Field(1000, ge=1, description="messages kept per history channel")
    history_ttl: float = Field(300.0, gt=0, description="seconds a history message is kept")
    history_retention: float = Field(
        86400.0, gt=0, description="seconds a silent history channel keeps its epoch"
    )

    history_idempotency_window: float = Field(
        300.0, gt=0, description="seconds an idempotency key is remembered"
    )

    def history(self) -> HistoryPolicy:
        return HistoryPolicy(
            patterns=tuple(p.strip() for p in self.history_channels.split(",") if p.strip()),
            size=self.history_size,
            ttl=self.history_ttl,
            retention=self.history_retention,
            idempotency_window=self.history_idempotency_window,
        )
