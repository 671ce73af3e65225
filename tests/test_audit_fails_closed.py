"""No grant goes unlogged: a boss-side audit sink that cannot deliver a record
fails the request, and the socket is closed, never handed out."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from privsock import auditjson
from privsock.auditsink import UNAVAILABLE, AuditLogError, SyslogSink
from privsock.client import SocketCreator
from privsock.helper import protocol
from privsock.helper.protocol import Transport
from tests.auditlines import parsed

PRIVSOCK = str(Path(sys.executable).with_name("privsock"))


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def port_is_free(transport: str, port: int) -> bool:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class BrokenSink:
    """Logs every line but one side's line for a grant, which it cannot deliver."""

    def __init__(self, side: str = "boss") -> None:
        self.side = side
        self.records: list[dict[str, Any]] = []

    def __call__(self, line: bytes) -> None:
        rec = parsed(line)
        if rec["side"] == self.side and rec["decision"] == "granted":
            raise AuditLogError(UNAVAILABLE, "disk full")
        self.records.append(rec)


@pytest.mark.root
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_grant_the_boss_cannot_log_is_closed(
    root: None, test_policy: Path, transport: str
) -> None:
    sink = BrokenSink()
    with SocketCreator(str(test_policy), audit_sink=sink) as creator:
        before = open_fds()
        with pytest.raises(AuditLogError, match="disk full") as failed:
            creator.create(transport, "127.0.0.1", 1013)
        # Closed, not left to the garbage collector: the exception, which a caller
        # may keep, still holds create()'s frame and so its variables.
        assert failed.value.__traceback__ is not None
        assert open_fds() == before
        creator.ping()  # the helper is fine, and has closed its copy by now
        assert port_is_free(transport, 1013)
    helper = [r for r in sink.records if r["side"] == "helper" and r["op"] == "CREATE"]
    assert [r["decision"] for r in helper] == ["granted"]


@pytest.mark.root
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_grant_whose_helper_line_cannot_be_logged_is_closed(
    root: None, test_policy: Path, transport: str
) -> None:
    """The helper's own line for the grant is forwarded before create() returns,
    and a sink that fails on it means no socket: the fd that came with the
    reply is closed, and the boss's line is never written."""
    sink = BrokenSink("helper")
    with SocketCreator(str(test_policy), audit_sink=sink) as creator:
        before = open_fds()
        with pytest.raises(AuditLogError, match="disk full"):
            creator.create(transport, "127.0.0.1", 1013)
        assert open_fds() == before
        creator.ping()
        assert port_is_free(transport, 1013)
    assert [r for r in sink.records if r["op"] == "CREATE"] == []


def _record() -> bytes:
    req = protocol.Create(3, Transport.UDP, ipaddress.ip_address("127.0.0.1"), 53)
    return auditjson.encode(auditjson.record(
        now=1_800_000_000.0, side="boss", pid=1, request_id=3, request=req, decision="granted"
    ))  # fmt: skip


@pytest.fixture
def syslogd(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A stand-in for the syslog daemon's /dev/log, at a path of our own."""
    path = tmp_path / "log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(10)
    yield server, path
    server.close()


def test_syslog_sink_refuses_to_open_without_a_daemon(tmp_path: Path) -> None:
    with pytest.raises(AuditLogError) as refused:
        SyslogSink(address=str(tmp_path / "log"))
    assert str(refused.value) == f"cannot reach syslog at {tmp_path}/log: No such file or directory"
    assert refused.value.exit_code == UNAVAILABLE


def test_syslog_sink_fails_a_record_it_cannot_deliver(
    syslogd: tuple[socket.socket, Path],
) -> None:
    server, path = syslogd
    sink = SyslogSink(address=str(path))
    sink(_record())
    head, _, body = server.recv(65536).decode().partition(": ")
    assert head.startswith(f"<{(10 << 3) | 6}>") and f" privsock[{os.getpid()}]" in head
    assert auditjson.parse(body)["decision"] == "granted"
    server.close()
    path.unlink()  # the daemon is gone
    with pytest.raises(AuditLogError) as failed:
        sink(_record())
    assert str(failed.value).startswith(f"cannot deliver an audit record to syslog at {path}: ")
    sink.close()


def test_syslog_sink_reconnects_to_a_restarted_daemon(
    syslogd: tuple[socket.socket, Path],
) -> None:
    server, path = syslogd
    sink = SyslogSink(address=str(path))
    server.close()
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as restarted:
        restarted.bind(str(path))
        restarted.settimeout(10)
        sink(_record())
        assert b"privsock[" in restarted.recv(65536)
    sink.close()


@pytest.mark.root
def test_a_grant_fails_when_syslog_goes_away(
    root: None, test_policy: Path, syslogd: tuple[socket.socket, Path]
) -> None:
    server, path = syslogd
    sink = SyslogSink(address=str(path))
    with SocketCreator(str(test_policy), audit_sink=sink) as creator:
        creator.create("udp", "127.0.0.1", 1014).close()
        server.close()
        path.unlink()
        with pytest.raises(AuditLogError):
            sink(_record())  # the sink notices, and drops its own socket
        before = open_fds()
        with pytest.raises(AuditLogError, match="cannot deliver an audit record to syslog"):
            creator.create("udp", "127.0.0.1", 1014)
        assert open_fds() == before
        with pytest.raises(AuditLogError):
            creator.ping()  # the helper's pong cannot be logged either
    assert port_is_free("udp", 1014)
    sink.close()


@pytest.mark.root
@pytest.mark.parametrize("command", ["exec", "run"])
def test_syslog_with_no_dev_log_starts_nothing(
    test_policy: Path, tmp_path: Path, command: str
) -> None:
    """`--audit-log syslog` where nothing listens on /dev/log: a clear line, exit 69,
    and CMD never runs (in a mount namespace where /dev/log, if any, is dead)."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux unshare is needed for this test"
    marker = tmp_path / "ran"
    hide = '[ -e /dev/log ] && mount --bind /dev/null /dev/log; exec "$@"'
    what = ["--listen", "udp:127.0.0.1:1015"] if command == "exec" else []
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", hide, "sh",
         PRIVSOCK, command, "--policy", str(test_policy), "--user", "nobody", *what,
         "--audit-log", "syslog", "--", "/usr/bin/touch", str(marker)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == UNAVAILABLE, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"privsock: {command}: cannot reach syslog at /dev/log: ")
    assert lines[0].endswith("; nothing was started")
    assert not marker.exists()
