"""SocketCreator: the boss's requests to one helper process.

SocketCreator sends a Create (built once by privsock.arguments.build_create)
or a PING, checks the reply, and turns it into a socket or a typed
exception. The helper process itself (starting it or connecting to a
socket-activated one, the restart budget, its stderr, reaping, the atexit
hook, shutdown_on_signals) is privsock.helperprocess's job. Every wait is
bounded. A helper that breaks the protocol, or stops answering, is killed: it
is not trusted further.

The audit sink takes the bytes of each line: the helper's are forwarded as
it wrote them (privsock.helperprocess reads them once the reply is in, since
the helper writes a request's line before its reply), then the boss's own. If
the sink raises for either, the request fails with that exception and its
socket is closed: no grant goes unlogged.

Life cycle: use it as a context manager (``with SocketCreator(policy) as c:``),
or call close().
"""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import NoReturn

from privsock import arguments
from privsock.auditsink import LoggingSink
from privsock.errors import (
    CreatorError,
    CreatorOSError,
    FdNotReceived,
    HelperDied,
    HelperStartError,
    HelperUnreachable,
    InvalidArgument,
    MalformedRequest,
    PolicyDenied,
    ProtocolViolation,
    RateLimited,
)
from privsock.helper import auditrecord, protocol
from privsock.helper.protocol import Reply, Request, Stage, Status, Transport
from privsock.helperprocess import AuditSink, HelperProcess, default_helper_argv

# Audit lines go to the logger privsock.audit unless the caller gives a sink.
DEFAULT_SINK = LoggingSink()

_DECISIONS = {
    Status.OK: "granted", Status.DENIED: "denied", Status.RATE_LIMITED: "rate_limited",
    Status.MALFORMED: "malformed", Status.OS_ERROR: "os_error",
}  # fmt: skip
_ANCBUF = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def _bound(sock: socket.socket) -> tuple[protocol.IPAddress, int] | None:
    """The address and port ``sock`` is bound to; None if it is not bound."""
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if not isinstance(name, tuple) or len(name) < 2 or not name[1]:
        return None
    # parse_address: ipaddress.ip_address, cached per text (the same few addresses
    # come back request after request).
    return arguments.parse_address(name[0]), int(name[1])


# How long SocketCreator(connect=...) waits by default, per create(), for a
# rate-limited helper's tokens before it raises RateLimited (its rate_wait).
CONNECT_RATE_WAIT = 2.0


class SocketCreator:
    """``SocketCreator(policy)`` starts its own helper (this process needs root,
    or CAP_NET_BIND_SERVICE as the policy's user); ``SocketCreator(connect=PATH)``
    connects to a socket-activated helper instead: no child process, no privilege,
    and a restart is a reconnect. Such a helper's bucket starts empty, so with
    connect= each create() waits up to ``rate_wait`` seconds (an attribute the
    caller may change between calls; default CONNECT_RATE_WAIT, 0: never) for
    its tokens before it raises RateLimited."""

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
        rate_wait: float = CONNECT_RATE_WAIT,
    ) -> None:
        if (policy is None) == (connect is None):
            raise InvalidArgument("give either a policy file (start a helper) or connect=PATH")
        for name, value in (("policy", policy), ("connect", connect)):
            if value is not None and not isinstance(value, str | os.PathLike):
                raise InvalidArgument(f"{name} must be a path, not {value!r}")
        self.policy = os.path.abspath(policy) if policy is not None else None
        self.connect_path = connect
        self.audit_sink = audit_sink
        self.start_timeout = start_timeout
        self.reply_timeout = reply_timeout
        if not rate_wait >= 0:  # also refuses nan
            raise InvalidArgument(f"rate_wait must be a number of seconds >= 0, not {rate_wait!r}")
        self.rate_wait = rate_wait
        self.process = HelperProcess(
            policy=self.policy, connect=connect,
            helper_argv=helper_argv or default_helper_argv(), audit_sink=audit_sink,
            start_timeout=start_timeout, max_restarts=max_restarts,
            restart_window=restart_window,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._next_id = 0

    # -- life cycle -------------------------------------------------------

    def __enter__(self) -> SocketCreator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def helper_messages(self) -> tuple[str, ...]:
        """What the helper wrote on stderr besides audit lines, oldest first (the
        last 20): its start-up line, which says whether Landlock holds its ports."""
        return self.process.messages

    @property
    def running(self) -> bool:
        return self.process.running

    def start(self) -> None:
        """Start (or connect to) the helper and wait until it answers PING: it
        only serves once hardened and verified. Raises HelperStartError."""
        self.process.launch()
        try:
            self._exchange(protocol.Ping(self._new_id()), self.start_timeout)
        except HelperDied as exc:
            self.process.reap()
            if self.connect_path is not None:
                raise HelperUnreachable(
                    None, f"the helper behind {self.connect_path} closed the connection "
                    "before answering (see its journal: journalctl -u 'privsock-helper@*')",
                ) from None  # fmt: skip
            raise HelperStartError(exc.returncode, self.process.last_message()) from None

    def close(self) -> int | None:
        """End the helper (closing the channel is its signal to exit) and reap it.
        Returns its exit status."""
        return self.process.close()

    def restart(self) -> None:
        """Start a new helper by hand, also after a seccomp kill or the restart
        limit; sockets already handed out stay valid."""
        with self._lock:
            self.process.reset()
            self.process.check_can_start()
            self.start()

    # -- requests ---------------------------------------------------------

    def _ensure_helper(self) -> None:
        """A helper that died is replaced on the next request, within the
        process's restart budget (privsock.helperprocess)."""
        if self.process.chan is None:
            self.process.may_restart()
            self.start()

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
        tr, addr, port, opts = create.transport, create.address, create.port, create.options
        with self._lock:
            self._ensure_helper()
            req = protocol.Create(self._new_id(), tr, addr, port, opts)
            reply, fd = self._exchange(req, self.reply_timeout)
            # A socket-activated helper's bucket starts empty (a reconnect must buy
            # no burst): wait for its first tokens rather than fail, up to rate_wait.
            waited = 0.0
            while (fd is None and reply.status is Status.RATE_LIMITED
                   and self.connect_path is not None
                   and waited + reply.detail / 1000 <= self.rate_wait):  # fmt: skip
                self._log_boss(req, reply)
                time.sleep(reply.detail / 1000)
                waited += reply.detail / 1000
                req = protocol.Create(self._new_id(), tr, addr, port, opts)
                reply, fd = self._exchange(req, self.reply_timeout)
        if fd is None:
            self._log_boss(req, reply)
            raise self._error(reply, arguments.spec(create))
        sock = socket.socket(fileno=fd)
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        kind = socket.SOCK_DGRAM if tr is Transport.UDP else socket.SOCK_STREAM
        if sock.family != family or sock.type != kind:
            sock.close()
            what = arguments.spec(create)
            self._kill(f"sent a {sock.family.name}/{sock.type.name} socket for {what}")
        # Bound where asked: a socket bound elsewhere (or not at all, which a
        # later listen() would bind to a random port) is not what was granted.
        bound = _bound(sock)
        if bound != (addr, create.port):
            sock.close()
            where = "no address" if bound is None else f"{bound[0]} port {bound[1]}"
            self._kill(f"sent a socket bound to {where} for {arguments.spec(create)}")
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
        chan = self.process.chan
        if chan is None:
            raise HelperDied(None, "no helper is running")
        try:
            chan.sendmsg([protocol.encode_request(req)])
        except OSError:
            raise self.process.died() from None
        if chan.gettimeout() != timeout:
            chan.settimeout(timeout)
        try:
            data, ancdata, flags, _ = chan.recvmsg(
                protocol.REPLY_SIZE + 1, _ANCBUF, socket.MSG_CMSG_CLOEXEC
            )
        except TimeoutError:
            self._kill(f"no reply within {timeout:g}s")
        except OSError:
            raise self.process.died() from None
        fds = protocol.received_fds(ancdata)
        if not data and not ancdata:
            raise self.process.died()
        try:
            self.process.drain_stderr()
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

    def _kill(self, why: str) -> NoReturn:
        """The helper misbehaved: kill it (a connected one is not our child:
        disconnect from it), reap it, raise."""
        self.process.kill()
        ended = "it was killed" if self.connect_path is None else "the connection was closed"
        raise ProtocolViolation(f"privsock helper {why}; {ended}")

    def _log_boss(self, req: Request, reply: Reply) -> None:
        """The boss's own audit line for a reply, so the log holds both sides."""
        sink = self.audit_sink
        if sink is None:
            return
        reason: str | None = None
        if reply.reason is not None:
            reason = reply.reason.name.lower()
        elif reply.stage is not None:
            reason = reply.stage.name.lower()
        sink(auditrecord.Lines(side="boss", pid=os.getpid()).line(
            time.time(), req.request_id, req, _DECISIONS[reply.status], reason=reason,
            errno=reply.detail if reply.status is Status.OS_ERROR else None,
            retry_ms=reply.detail if reply.status is Status.RATE_LIMITED else None,
        ))  # fmt: skip

