"""An audit sink for tests: it takes each line as the client hands it over
(bytes, one JSON object and its newline, privsock.auditsink's contract) and
keeps the parsed record, so a test can look at fields."""

from __future__ import annotations

from typing import Any

from privsock import auditjson


def parsed(line: bytes) -> dict[str, Any]:
    """One line as a sink receives it, checked to be exactly one audit line."""
    assert isinstance(line, bytes), type(line)
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    return auditjson.parse(line)


class Records(list[dict[str, Any]]):
    """``audit_sink=records``: every line it is given, parsed, in order."""

    def __call__(self, line: bytes) -> None:
        self.append(parsed(line))
