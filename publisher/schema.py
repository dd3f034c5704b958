"""The JSON Schemas of what services publish, for publishers in other languages.

Regenerate the committed copies with ``python -m publisher.schema > docs/envelope.schema.json``
and ``python -m publisher.schema control > docs/control.schema.json``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from publisher.control import control_json_schema
from publisher.envelope import envelope_json_schema

__all__ = ["control_schema", "envelope_schema"]


def _document(schema: dict[str, Any], title: str) -> str:
    schema["title"] = title
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def envelope_schema() -> str:
    return _document(envelope_json_schema(), "wsgateway envelope")


def control_schema() -> str:
    return _document(control_json_schema(), "wsgateway control request")


if __name__ == "__main__":  # pragma: no cover
    print(control_schema() if sys.argv[1:] == ["control"] else envelope_schema(), end="")
