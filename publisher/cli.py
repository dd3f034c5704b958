"""``wspublish CHANNEL JSON`` or ``wspublish CHANNEL --stdin`` (one JSON value per line).

Exit codes: 0 published, 1 Redis unreachable, 2 bad input. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import msgspec
from redis.exceptions import RedisError

from publisher import otlp
from publisher.client import Publisher
from publisher.envelope import EnvelopeError, check_channel
from publisher.settings import PublisherSettings

__all__ = ["main"]


def _fail(code: int, message: str) -> NoReturn:
    print(f"wspublish: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_json(text: str, where: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        _fail(2, f"{where} is not valid JSON: {exc}")


def _values(args: argparse.Namespace) -> Iterator[Any]:
    if args.stdin:
        for number, line in enumerate(sys.stdin, 1):
            if line.strip():
                yield _parse_json(line, f"line {number}")
    else:
        yield _parse_json(args.json, "JSON")


def main(argv: Sequence[str] | None = None) -> None:
    defaults = PublisherSettings()
    parser = argparse.ArgumentParser(
        prog="wspublish", description="Publish JSON to wsgateway clients through Redis."
    )
    parser.add_argument("channel", help="channel name, without prefix")
    parser.add_argument("json", nargs="?", help="the message: any JSON value")
    parser.add_argument("--stdin", action="store_true", help="read one JSON value per line")
    parser.add_argument(
        "--redis-url",
        default=defaults.redis_url,
        help="[PUBLISHER_REDIS_URL] (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix",
        default=defaults.channel_prefix,
        help="Redis channel prefix [PUBLISHER_CHANNEL_PREFIX] (default: %(default)s)",
    )
    parser.add_argument(
        "--history-channels",
        default=defaults.history_channels,
        metavar="PATTERNS",
        help="comma-separated glob patterns of channels that keep history: their messages are "
        "numbered and stored in the channel's stream [PUBLISHER_HISTORY_CHANNELS] "
        "(default: %(default)r)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    if args.stdin == (args.json is not None):
        _fail(2, "give either a JSON argument or --stdin")
    try:
        check_channel(args.channel)
    except EnvelopeError as exc:
        _fail(2, str(exc))
    tracing = otlp.tracing_from_env("wspublish")
    published = receivers = 0
    history = defaults.model_copy(update={"history_channels": args.history_channels}).history()
    with Publisher(
        args.redis_url, prefix=args.prefix, tracer_provider=tracing, history=history
    ) as publisher:
        try:
            for value in _values(args):
                receivers = publisher.publish(args.channel, value)
                published += 1
        except EnvelopeError as exc:
            _fail(2, f"message {published + 1}: {exc}")
        except (RedisError, OSError) as exc:
            _fail(1, f"cannot publish through Redis: {exc}")
    if tracing is not None:
        tracing.shutdown()  # flush the PRODUCER spans before exiting
    if not args.quiet:
        print(f"published {published} message(s); last one reached {receivers} gateway(s)")


if __name__ == "__main__":  # pragma: no cover
    main()
