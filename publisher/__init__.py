"""Publish messages to wsgateway clients through Redis.

>>> from publisher import Publisher
>>> with Publisher("redis://localhost:6379/0") as pub:
...     pub.publish("news", {"headline": "hello"})   # returns how many gateways received it
"""

from publisher.client import AsyncPublisher, Publisher
from publisher.envelope import EnvelopeError, EnvelopeV1, EnvelopeV2, build_envelope, parse_envelope

__all__ = [
    "AsyncPublisher",
    "EnvelopeError",
    "EnvelopeV1",
    "EnvelopeV2",
    "Publisher",
    "build_envelope",
    "parse_envelope",
]
