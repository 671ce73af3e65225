"""Where the boss writes audit lines: the logger ``privsock.audit`` (the
library's default), stderr, a file, or syslog.

The line format is privsock.helper.auditrecord (docs/audit-log.md documents it for auditors).
A sink is a callable taking one record; ``open_sink("stderr" | "file:PATH" |
"syslog")`` builds one from the command line's ``--audit-log`` value. Every
line is written and flushed as it comes, so a crash loses none already logged.
A sink that cannot deliver a record raises AuditLogError, and the client then
fails the request and closes its socket: no grant goes unlogged.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import syslog
import threading
import time
from typing import Any, TextIO

from privsock.helper import auditrecord
from privsock.helper.exitcodes import Exit

SPEC_HELP = "stderr, file:PATH or syslog"
AUDIT_LOGGER = "privsock.audit"

# Grants and pongs are routine; everything else is worth a look.
_ROUTINE = frozenset({"granted", "pong"})


# EX_UNAVAILABLE: the log's destination cannot be reached.
UNAVAILABLE = 69


class AuditLogError(ValueError):
    """A bad --audit-log value, a log that cannot be opened, or a record that
    cannot be delivered. ``str(e)`` is one line; ``exit_code`` says which."""

    def __init__(self, message: str, exit_code: int = Exit.USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class LoggingSink:
    """Each record as one message of a ``logging`` logger (``privsock.audit``
    by default): the JSON line without its newline, with the record itself as
    the log record's ``audit`` attribute. Grants and pongs at INFO, the rest at
    WARNING. SocketCreator's default: the application's logging configuration
    decides where the lines go (with none, Python prints WARNING and above on
    stderr, so denials show and grants do not)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(AUDIT_LOGGER)

    def __call__(self, rec: dict[str, Any]) -> None:
        level = logging.INFO if rec.get("decision") in _ROUTINE else logging.WARNING
        if self.logger.isEnabledFor(level):
            line = auditrecord.encode(rec).decode("ascii").rstrip("\n")
            self.logger.log(level, "%s", line, extra={"audit": rec})

    def close(self) -> None:
        pass  # the logging configuration is the application's


class StreamSink:
    """One JSON line per record on a text stream (stderr by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # the helper's lines come from a reader thread

    def __call__(self, rec: dict[str, Any]) -> None:
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(auditrecord.encode(rec).decode("ascii"))
            stream.flush()

    def close(self) -> None:
        pass  # not ours to close


class FileSink:
    """Appends one JSON line per record to a file, each with one write(2), so
    lines from several processes appending to the same file do not interleave.
    The file is created 0640 and never followed through a symlink."""

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self._fd: int | None = os.open(path, flags, 0o640)
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise AuditLogError(f"cannot open audit log {path}: {why}") from None
        self._lock = threading.Lock()

    def __call__(self, rec: dict[str, Any]) -> None:
        line = auditrecord.encode(rec)
        with self._lock:
            if self._fd is None:
                raise AuditLogError(f"audit log {self.path} is closed", UNAVAILABLE)
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                raise AuditLogError(
                    f"cannot write to audit log {self.path}: {exc.strerror}", UNAVAILABLE
                ) from None
            if written != len(line):  # a full disk can cut a write short
                raise AuditLogError(
                    f"cannot write to audit log {self.path}: short write", UNAVAILABLE
                )

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class SyslogSink:
    """Each record as one syslog message (the JSON line without its newline),
    ident "privsock", facility AUTHPRIV: grants at INFO, the rest at WARNING.

    It writes the datagram to /dev/log itself, in the RFC 3164 form glibc's
    syslog(3) uses, because syslog(3) drops a message it cannot deliver without
    a word: a record that does not reach the socket raises AuditLogError. One
    reconnect is tried first, as the daemon may have restarted."""

    def __init__(self, facility: int = syslog.LOG_AUTHPRIV, address: str = "/dev/log") -> None:
        self.facility = facility
        self.address = address
        self._lock = threading.Lock()
        self._closed = False
        self._sock: socket.socket | None = None
        try:
            self._sock = self._connect()
        except OSError as exc:
            raise AuditLogError(
                f"cannot reach syslog at {address}: {exc.strerror}", UNAVAILABLE
            ) from None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def __call__(self, rec: dict[str, Any]) -> None:
        priority = syslog.LOG_INFO if rec.get("decision") in _ROUTINE else syslog.LOG_WARNING
        stamp = time.strftime("%b %e %H:%M:%S")
        line = auditrecord.encode(rec).decode("ascii").rstrip("\n")
        message = f"<{self.facility | priority}>{stamp} privsock[{os.getpid()}]: {line}"
        data = message.encode("ascii")
        with self._lock:
            if self._closed:
                raise AuditLogError(f"audit log syslog ({self.address}) is closed", UNAVAILABLE)
            for _ in range(2):  # the daemon may have restarted: reconnect once
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    self._sock.send(data)
                    return
                except OSError as exc:
                    error = exc
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
            raise AuditLogError(
                f"cannot deliver an audit record to syslog at {self.address}: {error.strerror}",
                UNAVAILABLE,
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None


Sink = LoggingSink | StreamSink | FileSink | SyslogSink


def open_sink(spec: str) -> Sink:
    """The sink for an --audit-log value; AuditLogError (one line) if it is bad."""
    if spec == "stderr":
        return StreamSink()
    if spec == "syslog":
        return SyslogSink()
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        if not path:
            raise AuditLogError("--audit-log file: needs a path, as in file:/var/log/privsock.log")
        return FileSink(path)
    raise AuditLogError(f"--audit-log {spec!r}: expected {SPEC_HELP}")
