"""The envelope's JSON Schema, for publishers in other languages.

Regenerate the committed copy with ``python -m publisher.schema > docs/envelope.schema.json``.
"""

from __future__ import annotations

import json

from publisher.envelope import envelope_json_schema

__all__ = ["envelope_schema"]


def envelope_schema() -> str:
    schema = envelope_json_schema()
    schema["title"] = "wsgateway envelope"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(envelope_schema(), end="")
