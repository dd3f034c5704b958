"""``redis+cluster://`` URLs: a Redis Cluster named by one or more of its nodes. Pure."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["SCHEME", "is_cluster_url", "parse_cluster_url"]

SCHEME = "redis+cluster"


def is_cluster_url(url: str) -> bool:
    return url.startswith(SCHEME + "://")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Seed nodes and connection options of ``redis+cluster://[user:password@]h:p[,h:p]``.

    Any node will do as a seed: the rest of the topology is discovered from it.
    """
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError("a cluster URL starts with redis+cluster://")
    credentials, _, hosts = parts.netloc.rpartition("@")
    options: dict[str, Any] = {}
    if credentials:
        user, _, password = credentials.partition(":")
        options["username"] = unquote(user) or None
        options["password"] = unquote(password) or None
    seeds: list[tuple[str, int]] = []
    for host_port in hosts.split(","):
        host, _, port = host_port.rpartition(":")
        seeds.append((host or "localhost", int(port or 6379)))
    return seeds, options
