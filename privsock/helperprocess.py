"""The helper process of one SocketCreator: start it on a SOCK_SEQPACKET
socketpair (or connect to one that systemd starts per connection), forward
its stderr, reap it, and keep the restart budget.

client.py speaks the protocol over ``HelperProcess.chan``; everything about
the process's life is here. A helper that died is replaced on the next
request, at most ``max_restarts`` times per ``restart_window``; one killed by
its seccomp filter never is (restart() by hand).

Every HelperProcess with a running helper is closed by an atexit hook at a
normal interpreter exit. SIGTERM does not give a normal exit by default:
call shutdown_on_signals() once in the main thread, and SIGTERM/SIGINT become
SystemExit, so each helper gets EOF, exits 0 and is reaped by this process.
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

from privsock import spawner
from privsock.errors import (
    CreatorError,
    HelperCannotRestart,
    HelperDied,
    HelperRestartLimit,
    HelperStartError,
    HelperUnreachable,
)

# Takes the bytes of one audit line (privsock.helper.auditrecord's format, one
# JSON object and a newline), the helper's as it wrote it or the boss's own.
AuditSink = Callable[[bytes], None]

# How every audit line starts (auditrecord.FIELDS: "time" first); the helper's
# other stderr lines start "privsock-helper: ".
AUDIT_LINE_START = b'{"time":"'
# One read takes all a reply's lines; a full buffer means there may be more.
_READ = 65536

HELPER_MODULE = "privsock.helper.main"
# What the helper may see of our environment: nothing of ours, and -I makes
# Python ignore PYTHON* variables and the user site directory anyway.
HELPER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


# Every HelperProcess with a running helper, so that a normal interpreter exit
# (sys.exit, SystemExit from shutdown_on_signals) closes and reaps them all.
_LIVE: weakref.WeakSet[HelperProcess] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for process in list(_LIVE):
        process.close()


def end_spawner_thread() -> None:
    """End the spawner thread once no helper runs (privsock.spawner.end), so
    that the process is single-threaded again: a process that then drops
    privilege in its one thread (privsock.dropall.drop) leaves none behind.
    Every helper is forked by that thread (privsock.spawner says why)."""
    if _LIVE:
        raise CreatorError("a helper still runs: close every SocketCreator first")
    spawner.end()


def shutdown_on_signals(
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Make SIGTERM and SIGINT end this process by a normal exit (SystemExit with
    status 128+signal), so ``with`` blocks, ``finally`` and atexit run and every
    helper is closed and reaped: none is left as a zombie or an orphan. Without
    it SIGTERM kills the boss outright, and its helpers die only by their
    parent-death signal. Call it from the main thread."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in signals:
        signal.signal(sig, _exit)


# The helper's imports from outside the standard library: privsock alone
# (tests/test_layout.py and tests/test_helper_launch.py hold it to that).
HELPER_PACKAGES = ("privsock",)


@functools.cache
def helper_path() -> tuple[str, ...]:
    """The directory that holds privsock (HELPER_PACKAGES), taken from the
    package this process runs. Never a search of this process's sys.path: its
    first entry may be the boss's working directory or script directory, and a
    privsock planted there would run as root."""
    spec = sys.modules["privsock"].__spec__
    if spec is None or not spec.submodule_search_locations:
        raise HelperStartError(None, "cannot find privsock's directory, which the helper imports")
    # A package is found in its directory's parent.
    return (os.path.dirname(os.path.normpath(spec.submodule_search_locations[0])),)


def default_helper_argv() -> list[str]:
    """``python -I -S``: no site, so no .pth file, sitecustomize or site-packages
    finder runs as root before the helper's first line. Its sys.path is the
    standard library, then exactly privsock's directory (helper_path)."""
    return [sys.executable, "-I", "-S", "-c", boot_line(helper_path())]


def boot_line(directories: Sequence[str]) -> str:
    """The helper's ``-c`` source: ``directories`` onto sys.path, then main().
    Bytes literals, so the line is ASCII and the helper gets each directory's own
    bytes whatever locale the boss encodes its argv in and the helper decodes it in."""
    dirs = [os.fsencode(d) for d in directories]
    return (
        f"import os, sys; sys.path += [os.fsdecode(d) for d in {dirs!r}]; "
        f"from {HELPER_MODULE} import main; main()"
    )


class HelperProcess:
    """One helper at a time: ``policy`` (start it as a child) or ``connect``
    (a socket-activated helper: no child process, and a restart is a reconnect).
    ``audit_sink`` gets each of the helper's audit lines, as bytes."""

    def __init__(
        self,
        *,
        policy: str | None,
        connect: str | None,
        helper_argv: Sequence[str],
        audit_sink: AuditSink | None,
        start_timeout: float,
        max_restarts: int,
        restart_window: float,
    ) -> None:
        self.policy = policy
        self.connect_path = connect
        self.helper_argv = list(helper_argv)
        self.audit_sink = audit_sink
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: socket.socket | None = None
        self._stderr: int | None = None  # the helper's stderr pipe, non-blocking
        self._partial = b""
        self._messages: collections.deque[str] = collections.deque(maxlen=20)
        self._starts: collections.deque[float] = collections.deque()
        self._fatal: HelperDied | None = None  # set once restarting is refused
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.chan is not None

    def launch(self) -> socket.socket:
        """Start (or connect to) a helper and return the channel; the caller
        checks the handshake. Raises HelperStartError if it cannot be run or reached."""
        if self.chan is not None:
            raise CreatorError("this SocketCreator already has a helper")
        self._closed = False
        self._starts.append(time.monotonic())
        if self.connect_path is not None:
            return self._connect(self.connect_path)
        assert self.policy is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = spawner.SPAWNER.submit(
                subprocess.Popen, [*self.helper_argv, "--policy", self.policy],
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                close_fds=True, env=HELPER_ENV,
            ).result()  # fmt: skip
        except OSError as exc:
            ours.close()
            raise HelperStartError(None, f"cannot run {self.helper_argv[0]}: {exc}") from exc
        finally:
            theirs.close()
        self.chan = ours
        _LIVE.add(self)
        self._messages.clear()
        assert self.proc.stderr is not None
        # No reader thread: the helper writes its audit line before each reply,
        # so the line is in the pipe by the time the reply is; drain it then.
        self._stderr = self.proc.stderr.fileno()
        os.set_blocking(self._stderr, False)
        return ours

    def _connect(self, path: str) -> socket.socket:
        chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        chan.settimeout(self.start_timeout)
        try:
            chan.connect(path)
        except OSError as exc:
            chan.close()
            why = exc.strerror or str(exc)  # "AF_UNIX path too long" has no errno
            raise HelperUnreachable(None, f"cannot connect to {path}: {why}") from None
        self.chan = chan
        _LIVE.add(self)
        return chan

    def may_restart(self) -> None:
        """Raise unless a new helper may be started now: not after close(), not
        after a seccomp kill, not before the first start, and within the budget."""
        if self._closed:
            raise CreatorError("this SocketCreator was closed")
        if self._fatal is not None:
            raise self._fatal
        if not self._starts:
            raise CreatorError("the helper was never started: call start() first")
        now = time.monotonic()
        while self._starts and now - self._starts[0] > self.restart_window:
            self._starts.popleft()
        if len(self._starts) > self.max_restarts:
            self._fatal = HelperRestartLimit(
                f"the helper died {len(self._starts)} times within "
                f"{self.restart_window:g}s; not restarting it (see its audit log)"
            )
            raise self._fatal
        self.check_can_start()

    def check_can_start(self) -> None:
        """Before a restart: a process that dropped its privileges cannot start
        a helper, so say that rather than relay the new helper's refusal. (A
        custom helper_argv may bring its own privilege: it is left to try.)"""
        if self.connect_path is not None or self.helper_argv != default_helper_argv():
            return
        why = spawner.start_blocker()
        if why is not None:
            self._fatal = HelperCannotRestart(why)
            raise self._fatal

    def reset(self) -> None:
        """Forget the restart budget and a seccomp kill (restart() by hand)."""
        if self.chan is not None:
            self.reap()
        self._fatal = None
        self._starts.clear()

    def close(self) -> int | None:
        """End the helper (closing the channel is its signal to exit) and reap it.
        Returns its exit status."""
        self._closed = True
        _LIVE.discard(self)
        return self.reap()

    def kill(self) -> None:
        """The helper misbehaved: kill and reap it. (A connected helper is not
        our child: closing the channel ends it.)"""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        self.reap()

    def died(self) -> HelperDied:
        """The channel broke: reap the helper and say how it ended."""
        returncode = self.reap()
        died = HelperDied(returncode, self.last_message())
        if died.killed_by_seccomp:
            # A filter violation is a bug or an attack: restarting would give an
            # exploit another try, so it takes a human (restart()).
            self._fatal = HelperDied(
                returncode, "not restarted automatically after a seccomp kill; "
                "call restart() once the cause is known",
            )  # fmt: skip
        return died

    def reap(self) -> int | None:
        """Close the channel (a helper's cue to exit) and reap the helper,
        killing it if it has not gone within 2 s."""
        proc = self.proc
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if proc is None:
            return None
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.drain_stderr(final=True)
        self.proc = None
        return proc.returncode

    @property
    def messages(self) -> tuple[str, ...]:
        """The helper's stderr lines besides audit lines, oldest first (the last 20)."""
        return tuple(self._messages)

    def last_message(self) -> str:
        return self._messages[-1] if self._messages else ""

    def drain_stderr(self, final: bool = False) -> None:
        """Forward the helper's audit lines; keep its other messages for errors.
        ``final``: the helper is gone, read to the end and close the pipe."""
        fd = self._stderr
        if fd is None:
            return
        # The helper writes a request's line before its reply, so once the reply
        # is here so is the line: one read takes it, and a read that does not
        # fill the buffer has emptied the pipe (no second read to see EAGAIN).
        chunks = [self._partial]
        while True:
            try:
                chunk = os.read(fd, _READ)
            except BlockingIOError:
                break
            if not chunk:
                final = True
                break
            chunks.append(chunk)
            if len(chunk) < _READ and not final:
                break
        *lines, self._partial = b"".join(chunks).split(b"\n")
        if final:
            lines.append(self._partial)
            self._partial = b""
            assert self.proc is not None and self.proc.stderr is not None
            self.proc.stderr.close()
            self._stderr = None
        sink = self.audit_sink
        for raw in lines:
            if raw.startswith(AUDIT_LINE_START):
                if sink is not None:
                    sink(raw + b"\n")  # the helper's bytes, not parsed or re-encoded
            elif raw:
                text = raw.decode("utf-8", "replace")
                self._messages.append(text.removeprefix("privsock-helper: "))
