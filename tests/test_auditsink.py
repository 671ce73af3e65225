"""The audit log destinations: stderr, a file, syslog (through the real glibc
syslog(3), into a /dev/log socket of our own in a private mount namespace)."""

from __future__ import annotations

import io
import ipaddress
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from privsock import auditjson
from privsock.auditsink import (
    AuditLogError,
    FileSink,
    StreamSink,
    naming_boss_lines,
    open_sink,
    routine,
)
from privsock.helper import protocol
from privsock.helper.protocol import Transport


def record(decision: str = "granted", port: int = 53) -> dict[str, Any]:
    req = protocol.Create(7, Transport.UDP, ipaddress.ip_address("127.0.0.1"), port)
    return auditjson.record(
        now=1_800_000_000.25, side="boss", pid=42, request_id=7, request=req,
        decision=decision, reason="port" if decision == "denied" else None,
    )  # fmt: skip


def rec(decision: str = "granted", port: int = 53) -> bytes:
    """A line as a sink is given it: bytes, one JSON object and its newline."""
    return auditjson.encode(record(decision, port))


def test_stream_sink_writes_one_parseable_line_per_record() -> None:
    out = io.StringIO()
    sink = StreamSink(out)
    sink(rec())
    sink(rec("denied", 22))
    lines = out.getvalue().splitlines()
    assert [auditjson.parse(line)["decision"] for line in lines] == ["granted", "denied"]
    assert auditjson.parse(lines[1])["port"] == 22


def test_file_sink_appends_flushed_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("earlier line\n")
    sink = FileSink(str(path))
    sink(rec())
    # Readable at once, before close: nothing waits in a buffer.
    assert path.read_bytes().splitlines(keepends=True)[1:] == [rec()]
    sink(rec("denied", 22))
    sink.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "earlier line"
    assert [auditjson.parse(line)["decision"] for line in lines[1:]] == ["granted", "denied"]


def test_file_sink_creates_the_file_0640(tmp_path: Path) -> None:
    path = tmp_path / "new.log"
    old = os.umask(0)
    try:
        FileSink(str(path)).close()
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


def test_file_sink_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("")
    link = tmp_path / "link.log"
    link.symlink_to(target)
    with pytest.raises(AuditLogError, match="it is a symlink"):
        FileSink(str(link))
    assert target.read_text() == ""


def test_file_sink_unopenable_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(AuditLogError) as info:
        FileSink(str(tmp_path / "no" / "such" / "dir.log"))
    assert "No such file or directory" in str(info.value)
    assert "\n" not in str(info.value)


def test_open_sink_parses_the_cli_values(tmp_path: Path) -> None:
    assert isinstance(open_sink("stderr"), StreamSink)
    sink = open_sink(f"file:{tmp_path / 'x.log'}")
    assert isinstance(sink, FileSink)
    sink.close()
    for bad in ("", "file:", "stdout", "syslog:local0", "FILE:/x"):
        with pytest.raises(AuditLogError):
            open_sink(bad)


SYSLOG_PROBE = """
import json, socket, subprocess, sys
from privsock.auditsink import SyslogSink
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/dev"], check=True)
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
log.bind("/dev/log")
log.settimeout(10)
sink = SyslogSink()
for line in sys.stdin.buffer:
    sink(line)
    print(log.recv(65536).decode(), flush=True)
sink.close()
"""


@pytest.mark.root
def test_syslog_sink_sends_one_authpriv_message_per_record() -> None:
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux unshare is needed for this test"
    lines = rec() + rec("denied", 22)
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", sys.executable, "-c",
         textwrap.dedent(SYSLOG_PROBE)],
        input=lines, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    messages = result.stdout.decode().splitlines()
    assert len(messages) == 2
    authpriv = 10 << 3
    for message, (priority, decision) in zip(
        messages, [(6, "granted"), (4, "denied")], strict=True
    ):
        # RFC 3164 as glibc sends it: <PRI>TIMESTAMP ident[pid]: message
        assert message.startswith(f"<{authpriv | priority}>")
        head, _, body = message.partition(": ")
        assert head.endswith("]") and " privsock[" in head
        assert auditjson.parse(body)["decision"] == decision


def test_stream_sink_passes_the_bytes_to_a_binary_stream() -> None:
    out = io.BytesIO()
    StreamSink(out)(rec())
    assert out.getvalue() == rec()


def test_routine_reads_only_the_decision_field() -> None:
    """Grants and pongs are routine (INFO); the bytes that say so cannot be
    forged from inside a string value, whose quotes are escaped."""
    req = protocol.Create(7, Transport.UDP, ipaddress.ip_address("127.0.0.1"), 53)
    for decision in ("granted", "pong", "denied", "rate_limited", "malformed", "os_error"):
        line = auditjson.encode(auditjson.record(
            now=1.0, side="helper", pid=1, request_id=7, request=req, decision=decision,
            reason=',"decision":"granted",', rule=',"decision":"pong",',
        ))  # fmt: skip
        assert routine(line) == (decision in ("granted", "pong")), decision


@pytest.mark.parametrize("command", [["/bin/true"], ["/x", 'a "quoted", arg', "caf\u00e9", "\n"]])
def test_naming_boss_lines_fills_in_the_boss_lines_only(command: list[str]) -> None:
    seen: list[bytes] = []
    sink = naming_boss_lines(seen.append, "privsock-demo", command)
    helper = auditjson.encode({**record(), "side": "helper"})
    sink(helper)
    sink(rec())
    assert seen[0] == helper
    assert seen[1] == auditjson.encode({**record(), "user": "privsock-demo", "command": command})
