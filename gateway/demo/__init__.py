"""The browser demo page served at ``/``: static files, read once, with strict headers."""

from __future__ import annotations

from importlib import resources

__all__ = ["PATHS", "asset"]

_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript"),
}
PATHS = frozenset(_FILES)

#: The page loads only its own script and talks only to its own origin's WebSocket.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
    "connect-src 'self' ws: wss:; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def asset(path: str) -> tuple[str, str]:
    """The text and content type served at ``path`` (one of :data:`PATHS`)."""
    name, content_type = _FILES[path]
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8"), content_type
