"""Frames as JSON lines, shared by the file and stdout sinks.

Bytes become ``{"$hex": "..."}`` (JSON has no byte strings); the id is the UUID text form.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson

from engine.frame import Frame


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$hex": bytes(value).hex()}
    raise TypeError(f"not JSON-serialisable: type={type(value).__name__}")


def frame_json(frame: Frame) -> bytes:
    """One JSON line (with the newline) for ``frame``."""
    obj = {
        "id": str(uuid.UUID(bytes=frame.id)),
        "ts": frame.ts,
        "src": frame.src,
        "kind": frame.kind,
        "headers": frame.headers,
        "body": frame.body,
    }
    try:
        return orjson.dumps(obj, default=_default,
                            option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # orjson refuses integers beyond 64 bits (valid CBOR); the stdlib takes them. A sink
        # that raised here would retry the batch forever.
        return (json.dumps(obj, default=_default, separators=(",", ":")) + "\n").encode()
