"""The `privsock` command's own fds 0, 1 and 2: none left closed, and a
write to stdout that fails said in one line (exit 74), never a traceback.

A closed fd 0, 1 or 2 at start is the next fd an open() or socketpair()
returns (the policy, the audit log, the helper's channel), and Python gives
it no stream: sys.stdout or sys.stderr is None, and print(file=None) then
writes to stdout. So each closed one is opened on /dev/null first, as
OpenSSH's sanitise_stdfd does, and remembered:

- stdout: what the command was run to print cannot be delivered, so a write
  to it fails with EBADF, as it would in C (exit 74);
- stderr: there is nowhere to say anything, so only the exit code says it;
  and ``--audit-log stderr`` refuses to start (privsock.auditsink): audit
  lines are never written into nothing.

A failed write to stderr (a full disk, a reader that went away) is dropped
for the same reason; the exit code stands. Text that the stream's encoding
cannot hold (PYTHONIOENCODING=ascii, a file name that is not UTF-8) is
written with backslash escapes rather than raising.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from typing import TextIO, cast

_closed: set[int] = set()


class OutputError(Exception):
    """stdout cannot be written; ``str(e)`` is the reason."""


class _Stdout(io.TextIOBase):
    """sys.stdout: writes go to ``stream``; a failure raises OutputError."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._stream = stream  # None: fd 1 was closed at start

    def write(self, text: str) -> int:
        if self._stream is None:
            raise OutputError(os.strerror(errno.EBADF))
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc)) from None

    def flush(self) -> None:
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            raise OutputError(exc.strerror or str(exc)) from None

    def isatty(self) -> bool:
        return self._stream is not None and self._stream.isatty()

    def fileno(self) -> int:
        return 1


class _Stderr(io.TextIOBase):
    """sys.stderr: what cannot be written is dropped (there is nowhere to say so)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            self._stream.write(text)
            self._stream.flush()
        except OSError:
            pass
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return 2


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _lenient(stream: TextIO) -> TextIO:
    if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
        stream.reconfigure(errors="backslashreplace")
    return stream


def sanitise() -> None:
    """At the start of ``main``: fill closed fds 0-2 with /dev/null and put
    the two guarded streams in place."""
    for fd in (0, 1, 2):
        if not _is_open(fd):
            _closed.add(fd)
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # as an open fd 0-2 would be: CMD gets it
    stdout = None if 1 in _closed or sys.stdout is None else _lenient(sys.stdout)
    sys.stdout = cast(TextIO, _Stdout(stdout))
    if 2 in _closed or sys.stderr is None:
        stderr: TextIO = open(2, "w", errors="backslashreplace", closefd=False)  # noqa: SIM115
    else:
        stderr = _lenient(sys.stderr)
    sys.stderr = cast(TextIO, _Stderr(stderr))


def was_closed(fd: int) -> bool:
    """Whether ``fd`` (0, 1 or 2) was closed when ``sanitise`` ran."""
    return fd in _closed


def silence_stdout() -> None:
    """After an OutputError: fd 1 onto /dev/null, so that the interpreter's
    own flush at exit finds nothing left to fail on."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
