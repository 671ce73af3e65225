"""The audit record as a dict, for the boss: build one (record), write it
(encode), read a line back (parse).

The format, its fields and their order are privsock.helper.auditrecord's; the
helper itself writes auditrecord.Lines.line and never builds a dict or loads
json. A property test holds ``encode(record(...))`` and ``Lines(...).line(...)``
byte for byte equal.
"""

from __future__ import annotations

import json
from typing import Any

from privsock.helper.auditrecord import FIELDS, option_names, rfc3339
from privsock.helper.protocol import Create, Ping, Request


def record(
    *,
    now: float,
    side: str,
    pid: int,
    request_id: int,
    request: Request | None,
    decision: str,
    reason: str | None = None,
    rule: str | None = None,
    errno: int | None = None,
    retry_ms: int | None = None,
    peer_uid: int | None = None,
    peer_pid: int | None = None,
) -> dict[str, Any]:
    create = request if isinstance(request, Create) else None
    return {
        "time": rfc3339(now),
        "side": side,
        "pid": pid,
        "id": request_id,
        "op": "CREATE" if create else "PING" if isinstance(request, Ping) else None,
        "transport": create.transport.name.lower() if create else None,
        "address": str(create.address) if create else None,
        "port": create.port if create else None,
        "options": option_names(create.options) if create else [],
        "decision": decision,
        "reason": reason,
        "rule": rule,
        "errno": errno,
        "retry_ms": retry_ms,
        "peer_uid": peer_uid,
        "peer_pid": peer_pid,
        "user": None,
        "command": None,
    }


def encode(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode("ascii") + b"\n"


def parse(line: str | bytes) -> dict[str, Any]:
    """One audit line back to its record; ValueError if it is not one."""
    rec = json.loads(line)
    if not isinstance(rec, dict) or tuple(rec) != FIELDS:
        raise ValueError("not a privsock audit line")
    return rec
