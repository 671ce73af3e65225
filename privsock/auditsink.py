"""Where the boss writes audit lines: the logger ``privsock.audit`` (the
library's default), stderr, a file, or syslog.

The line format is privsock.helper.auditrecord's; privsock.auditjson reads it
(docs/audit-log.md documents it for auditors).
A sink is a callable taking the bytes of one line (one JSON object, ending in
a newline): the helper's lines are forwarded as the helper wrote them, with no
parse and no re-encoding, and the boss's own lines come from the same format.
``open_sink("stderr" | "file:PATH" | "syslog")`` builds one from the command
line's ``--audit-log`` value. Every line is written and flushed as it comes, so
a crash loses none already logged. A sink that cannot deliver a line raises
AuditLogError, and the client then fails the request and closes its socket: no
grant goes unlogged.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import sys
import syslog
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, BinaryIO, TextIO

from privsock import auditjson, stdio
from privsock.helper.exitcodes import Exit, Refusal

if TYPE_CHECKING:
    import logging

SPEC_HELP = "stderr, file:PATH or syslog"
# logging.INFO and logging.WARNING, fixed numbers (logging is loaded lazily).
_INFO, _WARNING = 20, 30
AUDIT_LOGGER = "privsock.audit"

# Grants and pongs are routine; everything else is worth a look. A line's
# unescaped quotes are all structural (a string value has each of its quotes
# as \"), so these bytes occur in a line only as its decision field.
_ROUTINE = (b',"decision":"granted",', b',"decision":"pong",')


def routine(line: bytes) -> bool:
    """Whether an audit line is a grant or a pong (logged at INFO, not WARNING)."""
    return _ROUTINE[0] in line or _ROUTINE[1] in line


# EX_UNAVAILABLE: the log's destination cannot be reached or written.
UNAVAILABLE = Exit.UNAVAILABLE


# Every line ends with the user and command fields, null except in the boss's
# lines of `privsock exec`, which fills them in (naming_boss_lines).
_BOSS_SIDE = b',"side":"boss",'
_NULL_NAMES = b',"user":null,"command":null}\n'


def naming_boss_lines(
    sink: Callable[[bytes], None], user: str, command: Sequence[str]
) -> Callable[[bytes], None]:
    """``sink``, with the boss's own lines naming ``user`` and ``command``
    (encoded once, as json.dumps writes them); the helper's lines pass
    through untouched."""
    import json  # noqa: PLC0415 (only exec names its lines: not loaded otherwise)

    tail = (
        b',"user":' + json.dumps(user).encode("ascii")
        + b',"command":' + json.dumps(list(command), separators=(",", ":")).encode("ascii")
        + b"}\n"
    )  # fmt: skip

    def write(line: bytes) -> None:
        if _BOSS_SIDE in line and line.endswith(_NULL_NAMES):
            line = line[: -len(_NULL_NAMES)] + tail
        sink(line)

    return write


class AuditLogError(Refusal):
    """A bad --audit-log value (Exit.USAGE), a log that cannot be opened, or a
    line that cannot be delivered (Exit.UNAVAILABLE): the one refusal type,
    (exit code, one line), under its own name so that a caller can tell a
    failed log from the refusal it was logging (privsock run must not try to
    log the failure of its log)."""


class LoggingSink:
    """Each line as one message of a ``logging`` logger (``privsock.audit``
    by default): the JSON line without its newline, with the parsed record as
    the log record's ``audit`` attribute (parsed only for a line the logger
    will emit). Grants and pongs at INFO, the rest at
    WARNING. SocketCreator's default: the application's logging configuration
    decides where the lines go (with none, Python prints WARNING and above on
    stderr, so denials show and grants do not)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger

    @property
    def logger(self) -> logging.Logger:
        # logging is imported at the first line, not with this module: the
        # library's default sink is built at import, and `privsock exec`,
        # which never uses it, should not load logging for it.
        if self._logger is None:
            import logging  # noqa: PLC0415

            self._logger = logging.getLogger(AUDIT_LOGGER)
        return self._logger

    def __call__(self, line: bytes) -> None:
        logger = self.logger
        level = _INFO if routine(line) else _WARNING
        if logger.isEnabledFor(level):
            text = line.decode("ascii").rstrip("\n")
            logger.log(level, "%s", text, extra={"audit": auditjson.parse(text)})

    def close(self) -> None:
        pass  # the logging configuration is the application's


class StreamSink:
    """Each line on a stream, flushed at once: a binary stream gets the bytes,
    a text stream (``io.StringIO``) gets them decoded. By default fd 2, with
    one write(2) per line and not through sys.stderr, which the CLI makes drop
    what it cannot write (privsock.stdio): a line stderr cannot take raises
    AuditLogError."""

    def __init__(self, stream: TextIO | BinaryIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # several SocketCreators may share one sink

    def __call__(self, line: bytes) -> None:
        stream = self._stream
        with self._lock:
            if stream is None:
                _write_stderr(line)
                return
            if isinstance(stream, io.TextIOBase):
                stream.write(line.decode("ascii"))
            else:
                stream.write(line)  # type: ignore[arg-type]
            stream.flush()

    def close(self) -> None:
        pass  # not ours to close


def _write_stderr(line: bytes) -> None:
    sys.stderr.flush()  # our own lines before this one
    try:
        written = os.write(2, line)
    except OSError as exc:
        raise AuditLogError(
            UNAVAILABLE, f"cannot write audit lines to stderr: {exc.strerror}"
        ) from None
    if written != len(line):
        raise AuditLogError(UNAVAILABLE, "cannot write audit lines to stderr: short write")


class FileSink:
    """Appends each line to a file with one write(2), so
    lines from several processes appending to the same file do not interleave.
    The file is created 0640 and never followed through a symlink."""

    def __init__(self, path: str) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self._fd: int | None = os.open(path, flags, 0o640)
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise AuditLogError(Exit.USAGE, f"cannot open audit log {path}: {why}") from None
        self._lock = threading.Lock()

    def __call__(self, line: bytes) -> None:
        with self._lock:
            if self._fd is None:
                raise AuditLogError(UNAVAILABLE, f"audit log {self.path} is closed")
            try:
                written = os.write(self._fd, line)
            except OSError as exc:
                raise AuditLogError(
                    UNAVAILABLE, f"cannot write to audit log {self.path}: {exc.strerror}"
                ) from None
            if written != len(line):  # a full disk can cut a write short
                raise AuditLogError(
                    UNAVAILABLE, f"cannot write to audit log {self.path}: short write"
                )

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class SyslogSink:
    """Each line as one syslog message (the JSON line without its newline),
    ident "privsock", facility AUTHPRIV: grants at INFO, the rest at WARNING.

    It writes the datagram to /dev/log itself, in the RFC 3164 form glibc's
    syslog(3) uses, because syslog(3) drops a message it cannot deliver without
    a word: a line that does not reach the socket raises AuditLogError. One
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
                UNAVAILABLE, f"cannot reach syslog at {address}: {exc.strerror}"
            ) from None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def __call__(self, line: bytes) -> None:
        priority = syslog.LOG_INFO if routine(line) else syslog.LOG_WARNING
        stamp = time.strftime("%b %e %H:%M:%S")
        head = f"<{self.facility | priority}>{stamp} privsock[{os.getpid()}]: "
        data = head.encode("ascii") + line.rstrip(b"\n")
        with self._lock:
            if self._closed:
                raise AuditLogError(UNAVAILABLE, f"audit log syslog ({self.address}) is closed")
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
                UNAVAILABLE,
                f"cannot deliver an audit record to syslog at {self.address}: {error.strerror}",
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
        if stdio.was_closed(2):
            raise AuditLogError(
                UNAVAILABLE, "--audit-log stderr: stderr is closed, so audit lines would be "
                "lost; give file:PATH or syslog",
            )  # fmt: skip
        return StreamSink()
    if spec == "syslog":
        return SyslogSink()
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        if not path:
            raise AuditLogError(
                Exit.USAGE, "--audit-log file: needs a path, as in file:/var/log/privsock.log"
            )
        return FileSink(path)
    raise AuditLogError(Exit.USAGE, f"--audit-log {spec!r}: expected {SPEC_HELP}")
