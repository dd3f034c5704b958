"""``wspublish CHANNEL JSON`` or ``wspublish CHANNEL --stdin`` (one JSON value per line);
``wspublish CHANNEL --presence`` or ``--presence-stats``; control requests:
``wspublish --user U --disconnect``, ``wspublish CHANNEL --user U
--subscribe`` or ``--unsubscribe``.

With ``--idempotency-key KEY`` or ``--version N``, one message on a history channel is
published at most once (publisher.history).

Exit codes: 0 done (a control request: every gateway acknowledged; a duplicate: already
published), 1 Redis unreachable, 2 bad input, 3 some gateways did not acknowledge within
``--timeout``, 4 a stale version, dropped. Errors are one line on
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import msgspec
from redis.exceptions import RedisError

from publisher import otlp
from publisher.client import CONTROL_TIMEOUT, Publisher
from publisher.control import ControlError
from publisher.envelope import EnvelopeError, check_channel
from publisher.history import Outcome
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
    parser.add_argument("channel", nargs="?", help="channel name, without prefix")
    parser.add_argument("json", nargs="?", help="the message: any JSON value")
    parser.add_argument("--stdin", action="store_true", help="read one JSON value per line")
    exactly = parser.add_argument_group(
        "exactly once", "on a history channel, for one JSON argument (not --stdin)"
    )
    exactly.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a retry with the same KEY within the gateways' idempotency window is not stored "
        "or sent again: it reports the first message's offset",
    )
    exactly.add_argument(
        "--version",
        type=int,
        metavar="N",
        help="the message's version: dropped (exit 4) unless above the channel's current one",
    )
    reading = parser.add_argument_group("presence", "read who is on a channel with presence")
    reading.add_argument(
        "--presence", action="store_true", help="print CHANNEL's members, one JSON object a line"
    )
    reading.add_argument(
        "--presence-stats", action="store_true", help="print CHANNEL's clients and unique users"
    )
    control = parser.add_argument_group(
        "control requests", "act on every connection of one user, on every gateway"
    )
    control.add_argument("--user", help="the user (their tokens' sub) a control request names")
    ops = control.add_mutually_exclusive_group()
    for op, text in (
        ("disconnect", "close every connection of --user (no CHANNEL)"),
        ("subscribe", "put every connection of --user on CHANNEL"),
        ("unsubscribe", "take every connection of --user off CHANNEL"),
    ):
        ops.add_argument(f"--{op}", dest="op", action="store_const", const=op, help=text)
    control.add_argument("--code", type=int, help="--disconnect's close code (default 1008)")
    control.add_argument("--reason", help="--disconnect's close reason")
    control.add_argument(
        "--timeout",
        type=float,
        default=CONTROL_TIMEOUT,
        help="seconds to wait for the gateways' acknowledgements (default: %(default)s)",
    )
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
    if args.presence or args.presence_stats:
        _read_presence(args)
        return
    if args.op is not None or args.user is not None:
        _control(args)
        return
    if args.channel is None:
        _fail(2, "give a CHANNEL")
    if args.stdin == (args.json is not None):
        _fail(2, "give either a JSON argument or --stdin")
    try:
        check_channel(args.channel)
    except EnvelopeError as exc:
        _fail(2, str(exc))
    once = args.idempotency_key is not None or args.version is not None
    if once and args.stdin:
        _fail(2, "--idempotency-key and --version are for one message, not --stdin")
    tracing = otlp.tracing_from_env("wspublish")
    published = receivers = 0
    history = defaults.model_copy(update={"history_channels": args.history_channels}).history()
    with Publisher(
        args.redis_url, prefix=args.prefix, tracer_provider=tracing, history=history
    ) as publisher:
        try:
            if once:
                _append_once(publisher, args)
            for value in () if once else _values(args):
                receivers = publisher.publish(args.channel, value)
                published += 1
        except EnvelopeError as exc:
            _fail(2, f"message {published + 1}: {exc}")
        except (RedisError, OSError) as exc:
            _fail(1, f"cannot publish through Redis: {exc}")
    if tracing is not None:
        tracing.shutdown()  # flush the PRODUCER spans before exiting
    if not args.quiet and not once:
        print(f"published {published} message(s); last one reached {receivers} gateway(s)")


def _append_once(publisher: Publisher, args: argparse.Namespace) -> None:
    """Publish one message with an idempotency key or a version; say what became of it."""
    value = _parse_json(args.json, "JSON")
    appended = publisher.append(
        args.channel, value, idempotency_key=args.idempotency_key, version=args.version
    )
    where = f"offset {appended.offset} of epoch {appended.epoch}"
    if appended.outcome is Outcome.STALE:
        _fail(4, f"version {args.version} is not above the channel's: dropped (top: {where})")
    if not args.quiet:
        if appended.outcome is Outcome.DUPLICATE:
            print(f"already published at {where}: nothing sent again")
        else:
            print(f"published at {where}; reached {appended.receivers} gateway(s)")


def _read_presence(args: argparse.Namespace) -> None:
    if args.channel is None or args.json is not None or args.stdin:
        _fail(2, "--presence and --presence-stats take a CHANNEL and nothing else")
    try:
        check_channel(args.channel)
    except EnvelopeError as exc:
        _fail(2, str(exc))
    with Publisher(args.redis_url, prefix=args.prefix) as publisher:
        try:
            if args.presence_stats:
                clients, users = publisher.presence_stats(args.channel)
                print(f"clients {clients} users {users}")
            else:
                for entry in publisher.presence(args.channel):
                    print(json.dumps(entry, separators=(",", ":")))
        except (RedisError, OSError) as exc:
            _fail(1, f"cannot read presence from Redis: {exc}")


def _control(args: argparse.Namespace) -> None:
    if args.op is None or args.user is None:
        _fail(
            2, "a control request needs --user and one of --disconnect, --subscribe, --unsubscribe"
        )
    if args.json is not None or args.stdin:
        _fail(2, "a control request carries no message")
    if (args.op == "disconnect") != (args.channel is None):
        _fail(2, "--disconnect takes no CHANNEL; --subscribe and --unsubscribe need one")
    fields = {"channel": args.channel} if args.channel is not None else {}
    if args.op == "disconnect":
        fields = {"code": args.code, "reason": args.reason}
    elif args.code is not None or args.reason is not None:
        _fail(2, "--code and --reason are for --disconnect")
    tracing = otlp.tracing_from_env("wspublish")
    with Publisher(args.redis_url, prefix=args.prefix, tracer_provider=tracing) as publisher:
        try:
            result = getattr(publisher, args.op)(args.user, timeout=args.timeout, **fields)
        except ControlError as exc:
            _fail(2, str(exc))
        except (RedisError, OSError) as exc:
            _fail(1, f"cannot send the request through Redis: {exc}")
    if tracing is not None:
        tracing.shutdown()
    if not args.quiet:
        print(
            f"{args.op} {args.user}: {result.connections} connection(s); "
            f"{result.acknowledged} of {result.replicas} gateway(s) acknowledged"
        )
    for why in sorted(set(result.errors)):  # a replica stricter than this publisher
        print(f"refused by a gateway: {why}", file=sys.stderr)
    if result.errors:
        sys.exit(2)
    if not result.complete and args.timeout > 0:
        sys.exit(3)


if __name__ == "__main__":  # pragma: no cover
    main()
