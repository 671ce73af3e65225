"""SocketCreator: the boss's end of the channel to one helper process.

It starts the helper on a SOCK_SEQPACKET socketpair (the helper's fd 0), or
connects to a helper that systemd starts per connection (deploy/systemd: a
socket unit with Accept=yes, so the boss never needs privilege), checks the
handshake with PING, and turns each reply into a socket or a typed
exception. Every wait is bounded. A helper that breaks the protocol, or stops
answering, is killed: it is not trusted further.

If the audit sink raises, the request fails with that exception and its
socket is closed: no grant goes unlogged.

Life cycle: use it as a context manager (``with SocketCreator(policy) as c:``),
or call close(). Every creator still open at a normal interpreter exit is
closed by an atexit hook. SIGTERM does not give a normal exit by default:
call shutdown_on_signals() once in the main thread, and SIGTERM/SIGINT become
SystemExit, so each helper gets EOF, exits 0 and is reaped by this process.
"""

from __future__ import annotations

import array
import atexit
import collections
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from privsock import arguments, spawner
from privsock.auditsink import LoggingSink
from privsock.errors import (
    CreatorError,
    CreatorOSError,
    HelperCannotRestart,
    HelperDied,
    HelperRestartLimit,
    HelperStartError,
    InvalidArgument,
    MalformedRequest,
    PolicyDenied,
    ProtocolViolation,
    RateLimited,
)
from privsock.helper import auditrecord, protocol
from privsock.helper.protocol import Reply, Request, Stage, Status, Transport

AuditSink = Callable[[dict[str, Any]], None]
# Audit lines go to the logger privsock.audit unless the caller gives a sink.
DEFAULT_SINK = LoggingSink()

HELPER_MODULE = "privsock.helper.main"
# What the helper may see of our environment: nothing of ours, and -I makes
# Python ignore PYTHON* variables and the user site directory anyway.
HELPER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

_DECISIONS = {
    Status.OK: "granted", Status.DENIED: "denied", Status.RATE_LIMITED: "rate_limited",
    Status.MALFORMED: "malformed", Status.OS_ERROR: "os_error",
}  # fmt: skip
_ANCBUF = socket.CMSG_SPACE(4 * array.array("i").itemsize)


class FdNotReceived(CreatorError):
    """The helper sent a socket, but the kernel could not install it here
    (MSG_CTRUNC: usually this process is out of file descriptors)."""


# Every helper is forked by one long-lived thread (privsock.spawner says why).
_SPAWNER = spawner.SPAWNER


# Every creator with a running helper, so that a normal interpreter exit
# (sys.exit, SystemExit from shutdown_on_signals) closes and reaps them all.
_LIVE: weakref.WeakSet[SocketCreator] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for creator in list(_LIVE):
        creator.close()


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


def default_helper_argv() -> list[str]:
    return [sys.executable, "-I", "-m", HELPER_MODULE]


class SocketCreator:
    """``SocketCreator(policy)`` starts its own helper (this process needs root,
    or CAP_NET_BIND_SERVICE as the policy's user); ``SocketCreator(connect=PATH)``
    connects to a socket-activated helper instead: no child process, no privilege,
    and a restart is a reconnect."""

    def __init__(
        self,
        policy: str | None = None,
        *,
        connect: str | None = None,
        helper_argv: Sequence[str] | None = None,
        audit_sink: AuditSink | None = DEFAULT_SINK,
        start_timeout: float = 10.0,
        reply_timeout: float = 5.0,
        max_restarts: int = 5,
        restart_window: float = 60.0,
    ) -> None:
        if (policy is None) == (connect is None):
            raise InvalidArgument("give either a policy file (start a helper) or connect=PATH")
        for name, value in (("policy", policy), ("connect", connect)):
            if value is not None and not isinstance(value, str | os.PathLike):
                raise InvalidArgument(f"{name} must be a path, not {value!r}")
        self.policy = os.path.abspath(policy) if policy is not None else None
        self.connect_path = connect
        self.helper_argv = list(helper_argv or default_helper_argv())
        self.audit_sink = audit_sink
        self.start_timeout = start_timeout
        self.reply_timeout = reply_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: socket.socket | None = None
        self._stderr: int | None = None  # the helper's stderr pipe, non-blocking
        self._partial = b""
        self._messages: collections.deque[str] = collections.deque(maxlen=20)
        self._lock = threading.Lock()
        self._next_id = 0
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._starts: collections.deque[float] = collections.deque()
        self._fatal: HelperDied | None = None  # set once restarting is refused
        self._closed = False

    # -- life cycle -------------------------------------------------------

    def __enter__(self) -> SocketCreator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def helper_messages(self) -> tuple[str, ...]:
        """What the helper wrote on stderr besides audit lines, oldest first (the
        last 20): its start-up line, which says whether Landlock holds its ports."""
        return tuple(self._messages)

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._chan is not None

    def start(self) -> None:
        """Start (or connect to) the helper and wait until it answers PING: it
        only serves once hardened and verified. Raises HelperStartError."""
        if self._chan is not None:
            raise CreatorError("this SocketCreator already has a helper")
        self._closed = False
        self._starts.append(time.monotonic())
        if self.connect_path is not None:
            self._connect(self.connect_path)
            return
        assert self.policy is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = _SPAWNER.submit(
                subprocess.Popen, [*self.helper_argv, "--policy", self.policy],
                stdin=theirs.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                close_fds=True, env=HELPER_ENV,
            ).result()  # fmt: skip
        except OSError as exc:
            ours.close()
            raise HelperStartError(None, f"cannot run {self.helper_argv[0]}: {exc}") from exc
        finally:
            theirs.close()
        self._chan = ours
        _LIVE.add(self)
        self._messages.clear()
        assert self._proc.stderr is not None
        # No reader thread: the helper writes its audit line before each reply,
        # so the line is in the pipe by the time the reply is; drain it then.
        self._stderr = self._proc.stderr.fileno()
        os.set_blocking(self._stderr, False)
        try:
            self._exchange(protocol.Ping(self._new_id()), self.start_timeout)
        except HelperDied as exc:
            self._reap_quietly()
            raise HelperStartError(exc.returncode, self._last_message()) from None

    def _connect(self, path: str) -> None:
        chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        chan.settimeout(self.start_timeout)
        try:
            chan.connect(path)
        except OSError as exc:
            chan.close()
            raise HelperStartError(None, f"cannot connect to {path}: {exc.strerror}") from None
        self._chan = chan
        _LIVE.add(self)
        try:
            self._exchange(protocol.Ping(self._new_id()), self.start_timeout)
        except HelperDied:
            self._reap_quietly()
            raise HelperStartError(
                None, f"the helper behind {path} closed the connection before answering "
                "(see its journal: journalctl -u 'privsock-helper@*')",
            ) from None  # fmt: skip

    def close(self) -> int | None:
        """End the helper (closing the channel is its signal to exit) and reap it.
        Returns its exit status."""
        self._closed = True
        _LIVE.discard(self)
        return self._reap_quietly()

    # -- requests ---------------------------------------------------------

    def restart(self) -> None:
        """Start a new helper by hand, also after a seccomp kill or the restart
        limit; sockets already handed out stay valid."""
        with self._lock:
            if self._chan is not None:
                self._reap_quietly()
            self._fatal = None
            self._starts.clear()
            self._check_can_start()
            self.start()

    def _ensure_helper(self) -> None:
        """Supervision: a helper that died is replaced on the next request, at
        most max_restarts times per restart_window; a seccomp kill never is."""
        if self._chan is not None:
            return
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
        self._check_can_start()
        self.start()

    def _check_can_start(self) -> None:
        """Before a restart: a process that dropped its privileges cannot start
        a helper, so say that rather than relay the new helper's refusal. (A
        custom helper_argv may bring its own privilege: it is left to try.)"""
        if self.connect_path is not None or self.helper_argv != default_helper_argv():
            return
        why = spawner.start_blocker()
        if why is not None:
            self._fatal = HelperCannotRestart(why)
            raise self._fatal

    def ping(self) -> None:
        with self._lock:
            self._ensure_helper()
            self._exchange(protocol.Ping(self._new_id()), self.reply_timeout)

    def create(
        self,
        transport: str | Transport,
        address: str | protocol.IPAddress,
        port: int,
        *,
        reuseaddr: bool = False,
        reuseport: bool = False,
        v6only: bool = False,
    ) -> socket.socket:
        """A socket bound to (address, port), not listening, from the helper."""
        # InvalidArgument for anything the helper would call malformed (port 0, ...).
        return self.create_from(arguments.build_create(
            transport, address, port, reuseaddr=reuseaddr, reuseport=reuseport, v6only=v6only
        ))  # fmt: skip

    def create_from(self, create: protocol.Create) -> socket.socket:
        """The socket for a request from arguments.build_create (sent under a
        fresh request id)."""
        what = arguments.spec(create)
        tr, addr = create.transport, create.address
        with self._lock:
            self._ensure_helper()
            req = dataclasses.replace(create, request_id=self._new_id())
            reply, fd = self._exchange(req, self.reply_timeout)
        if fd is None:
            self._log_boss(req, reply)
            raise self._error(reply, what)
        sock = socket.socket(fileno=fd)
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        kind = socket.SOCK_DGRAM if tr is Transport.UDP else socket.SOCK_STREAM
        if sock.family != family or sock.type != kind:
            sock.close()
            self._kill(f"sent a {sock.family.name}/{sock.type.name} socket for {what}")
        try:
            self._log_boss(req, reply)
        except BaseException:
            sock.close()  # a grant that cannot be logged is not handed out
            raise
        return sock

    def _error(self, reply: Reply, what: str) -> CreatorError:
        if reply.status is Status.DENIED:
            assert reply.reason is not None
            return PolicyDenied(reply.reason, what)
        if reply.status is Status.RATE_LIMITED:
            return RateLimited(reply.detail / 1000.0, what)
        if reply.status is Status.OS_ERROR:
            return CreatorOSError(reply.detail, Stage(reply.code), what)
        return MalformedRequest(f"{what}: the helper called the request malformed")

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        return self._next_id

    def _exchange(self, req: Request, timeout: float) -> tuple[Reply, int | None]:
        chan = self._chan
        if chan is None:
            raise HelperDied(None, "no helper is running")
        try:
            chan.sendmsg([protocol.encode_request(req)])
        except OSError:
            raise self._died() from None
        if chan.gettimeout() != timeout:
            chan.settimeout(timeout)
        try:
            data, ancdata, flags, _ = chan.recvmsg(
                protocol.REPLY_SIZE + 1, _ANCBUF, socket.MSG_CMSG_CLOEXEC
            )
        except TimeoutError:
            self._kill(f"no reply within {timeout:g}s")
        except OSError:
            raise self._died() from None
        fds = protocol.received_fds(ancdata)
        if not data and not ancdata:
            raise self._died()
        try:
            self._drain_stderr()
            return self._check_reply(req, data, ancdata, flags, fds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _check_reply(
        self,
        req: Request,
        data: bytes,
        ancdata: list[tuple[int, int, bytes]],
        flags: int,
        fds: list[int],
    ) -> tuple[Reply, int | None]:
        if flags & socket.MSG_TRUNC:
            self._kill("sent an over-long reply")
        try:
            reply = protocol.decode_reply(data)
        except protocol.ProtocolError as exc:
            self._kill(f"sent an invalid reply ({exc})")
        if reply.request_id != req.request_id:
            self._kill(f"answered request {reply.request_id}, expected {req.request_id}")
        wants_fd = protocol.reply_carries_fd(reply, req)
        if flags & socket.MSG_CTRUNC:
            if wants_fd and not fds:
                raise FdNotReceived(
                    "the helper sent a socket but this process could not receive it "
                    "(MSG_CTRUNC; out of file descriptors?)"
                )
            self._kill("sent truncated ancillary data")
        foreign = [a for a in ancdata if a[:2] != (socket.SOL_SOCKET, socket.SCM_RIGHTS)]
        if foreign or len(fds) != int(wants_fd):
            self._kill(f"sent {len(fds)} fds with a {reply.status.name} reply")
        return reply, (fds[0] if wants_fd else None)

    # -- helper failure -----------------------------------------------------

    def _kill(self, why: str) -> NoReturn:
        """The helper misbehaved: kill it, reap it, raise. (A connected helper is
        not our child: closing the channel ends it.)"""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        self._reap_quietly()
        raise ProtocolViolation(f"privsock helper {why}; it was killed")

    def _died(self) -> HelperDied:
        returncode = self._reap_quietly()
        died = HelperDied(returncode, self._last_message())
        if died.killed_by_seccomp:
            # A filter violation is a bug or an attack: restarting would give an
            # exploit another try, so it takes a human (restart()).
            self._fatal = HelperDied(
                returncode, "not restarted automatically after a seccomp kill; "
                "call restart() once the cause is known",
            )  # fmt: skip
        return died

    def _reap_quietly(self) -> int | None:
        """Close the channel (a helper's cue to exit) and reap the helper,
        killing it if it has not gone within 2 s."""
        proc = self._proc
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if proc is None:
            return None
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._drain_stderr(final=True)
        self._proc = None
        return proc.returncode

    def _last_message(self) -> str:
        return self._messages[-1] if self._messages else ""

    def _drain_stderr(self, final: bool = False) -> None:
        """Forward the helper's audit lines; keep its other messages for errors.
        ``final``: the helper is gone, read to the end and close the pipe."""
        fd = self._stderr
        if fd is None:
            return
        chunks = [self._partial]
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                final = True
                break
            chunks.append(chunk)
        *lines, self._partial = b"".join(chunks).split(b"\n")
        if final:
            lines.append(self._partial)
            self._partial = b""
            assert self._proc is not None and self._proc.stderr is not None
            self._proc.stderr.close()
            self._stderr = None
        for raw in lines:
            if raw:
                self._stderr_line(raw.decode("utf-8", "replace"))

    def _stderr_line(self, line: str) -> None:
        if self.audit_sink is None and line.startswith("{"):
            return  # an audit line nobody wants: not worth parsing
        try:
            rec = auditrecord.parse(line)
        except ValueError:
            self._messages.append(line.removeprefix("privsock-helper: "))
            return
        if self.audit_sink is not None:
            self.audit_sink(rec)

    def _log_boss(self, req: Request, reply: Reply) -> None:
        """The boss's own audit line for a reply, so the log holds both sides."""
        if self.audit_sink is None:
            return
        reason: str | None = None
        if reply.reason is not None:
            reason = reply.reason.name.lower()
        elif reply.stage is not None:
            reason = reply.stage.name.lower()
        self.audit_sink(auditrecord.record(
            now=time.time(), side="boss", pid=os.getpid(), request_id=req.request_id,
            request=req, decision=_DECISIONS[reply.status], reason=reason,
            errno=reply.detail if reply.status is Status.OS_ERROR else None,
            retry_ms=reply.detail if reply.status is Status.RATE_LIMITED else None,
        ))  # fmt: skip

