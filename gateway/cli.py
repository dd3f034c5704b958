"""``wsgateway``: run one replica until SIGTERM or SIGINT.

Exit codes: 0 after a clean shutdown, 2 for an invalid setting, 1 when the replica cannot start
(for example, its port is taken).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from gateway.logs import configure_logging
from gateway.server import Gateway
from gateway.settings import Settings, env_name, flag_name

__all__ = ["load_settings", "main"]

log = logging.getLogger("gateway")


class InvalidSetting(Exception):
    pass


def load_settings(argv: Sequence[str]) -> Settings:
    """Settings from flags, then ``GATEWAY_*`` variables; InvalidSetting names the culprit."""
    try:
        return Settings(_cli_parse_args=list(argv))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        if field in Settings.model_fields:
            name = f"{env_name(field)} ({flag_name(field)})"
            secret = "url" in field or "secret" in field
            shown = "" if secret else f", got {first.get('input')!r}"
            raise InvalidSetting(f"invalid setting {name}: {first['msg']}{shown}") from None
        raise InvalidSetting(f"invalid settings: {first['msg']}") from None
    except SettingsError as exc:
        raise InvalidSetting(str(exc).splitlines()[0]) from None


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(settings: Settings) -> None:
    gateway = Gateway(settings)
    await gateway.start()
    log.info(
        "listening on %s:%d, backplane %s%s",
        settings.host,
        gateway.port,
        gateway.backplane_name,
        " (in-process, one replica; set GATEWAY_REDIS_URL to run several)"
        if gateway.backplane_name == "memory"
        else "",
    )
    # Everything made so far (modules, settings, telemetry) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it (31 ms each).
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            log.info(
                "%s received, shutting down: %d connections close over up to %.0f s "
                "(GATEWAY_DRAIN_SECONDS); %s closes them now",
                signal.Signals(signum).name,
                len(gateway.sessions),
                settings.drain_seconds,
                "Ctrl-C again" if signum == signal.SIGINT else "the same signal again",
            )
            stop.set()
        else:
            log.info("%s received again: closing every connection now", signal.Signals(signum).name)
            gateway.stop_draining()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await gateway.shutdown()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed: a faster loop for the same code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on some platforms
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(args)
    except InvalidSetting as exc:
        print(f"wsgateway: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format)
    raise_file_limit()
    try:
        run(serve(settings))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
