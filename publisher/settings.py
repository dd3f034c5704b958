"""Publisher settings from ``PUBLISHER_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PublisherSettings"]


class PublisherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PUBLISHER_", extra="ignore")

    redis_url: str = Field("redis://localhost:6379/0", description="Redis to publish through")
    channel_prefix: str = Field("ws:", description="Redis channel = prefix + channel")
