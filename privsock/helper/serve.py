"""The helper's request loop: one request in, one reply out, on fd 0.

Runs under the seccomp filter, so it must make no syscall outside
seccomp_filter.ALLOWLIST: no imports, no file opens, no name lookups, no
tracebacks, and no socket object left for the garbage collector (its
ResourceWarning calls getsockname): every socket is closed explicitly.

The decisions themselves are pure (protocol, policy, ratelimit); this module
only moves bytes and fds.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import time
from collections.abc import Callable

from privsock.helper import auditrecord, protocol
from privsock.helper.policy import Peer, Policy, judge, rules_for
from privsock.helper.protocol import Create, Option, Ping, Reply, Request, Stage, Status, Transport
from privsock.helper.ratelimit import TokenBucket
from privsock.helper.seccomp_filter import SIOCOUTQ

# Room for the fd numbers that can be installed under the helper's NOFILE limit;
# the kernel closes what does not fit and sets MSG_CTRUNC.
ANCBUF = socket.CMSG_SPACE(64 * array.array("i").itemsize)

# Plain ints: IntFlag arithmetic costs about a microsecond per operation.
_SOCKOPTS: tuple[tuple[int, int, int], ...] = (
    (int(Option.REUSEADDR), socket.SOL_SOCKET, socket.SO_REUSEADDR),
    (int(Option.REUSEPORT), socket.SOL_SOCKET, socket.SO_REUSEPORT),
    (int(Option.V6ONLY), socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
)
_V6ONLY = int(Option.V6ONLY)
_STAGE_NAMES = {
    Stage.SOCKET: "socket", Stage.SETSOCKOPT: "setsockopt", Stage.BIND: "bind",
    Stage.SEND: "send",
}  # fmt: skip

# Errors of sendmsg that concern this one fd, not the channel: the kernel counts
# fds in flight per *user*, and every helper runs as the same user, so another
# boss hoarding unread sockets can make our send fail (ETOOMANYREFS).
_SEND_FD_ERRORS = (errno.ETOOMANYREFS, errno.EMFILE, errno.ENOBUFS, errno.ENOMEM)


def unread_replies(chan: socket.socket) -> bool:
    """Whether the boss has replies of ours it has not read."""
    queued = array.array("i", [0])
    fcntl.ioctl(chan.fileno(), SIOCOUTQ, queued, True)
    return queued[0] != 0


def close_passed_fds(ancdata: list[tuple[int, int, bytes]]) -> int:
    """Close every fd a boss pushed at us; returns how many."""
    fds = protocol.received_fds(ancdata)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # not ours after all; nothing to release
    return len(fds)


def make_socket(req: Create) -> tuple[socket.socket | None, Reply]:
    """Create, set options on and bind the requested socket (not listening)."""
    family = socket.AF_INET if req.address.version == 4 else socket.AF_INET6
    kind = socket.SOCK_DGRAM if req.transport is Transport.UDP else socket.SOCK_STREAM
    try:
        sock = socket.socket(family, kind, 0)
    except OSError as exc:
        return None, protocol.os_error(req.request_id, exc.errno or 0, Stage.SOCKET)
    stage = Stage.SETSOCKOPT
    options = int(req.options)
    try:
        for flag, level, name in _SOCKOPTS:
            if options & flag:
                sock.setsockopt(level, name, 1)
        if family == socket.AF_INET6 and not options & _V6ONLY:
            # Be explicit: the policy judged a dual-stack socket; never depend on
            # the net.ipv6.bindv6only sysctl.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        stage = Stage.BIND
        # inet_ntop, not str(): the same address, ten times faster for IPv6.
        sock.bind((socket.inet_ntop(family, req.address.packed), req.port))
    except OSError as exc:
        sock.close()
        return None, protocol.os_error(req.request_id, exc.errno or 0, stage)
    return sock, protocol.ok(req.request_id)


class Session:
    """One boss's session: answer requests on the channel until end of file."""

    def __init__(
        self,
        chan: socket.socket,
        policy: Policy,
        pid: int,
        log: Callable[[bytes], object],
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        peer: Peer | None = None,
        shared: bool = False,
    ) -> None:
        self.chan = chan
        self.peer = peer
        self.policy = policy
        # What decide needs of the policy, computed once: the peer never changes.
        self.rules = rules_for(policy, self.peer)
        # A shared (socket-activated) helper's peer may reconnect at will: its
        # bucket starts empty, so a new connection buys no burst and a user's
        # grants stay within rate x its connections (deploy/systemd/README.md).
        self.shared = shared
        # A shared helper ends the session when a CREATE comes before the wait it
        # gave for the last one has passed: a boss that ignores retry_ms only
        # floods the log, and each connection then writes a bounded number of lines.
        self.retry_at = 0.0
        self.ending = False
        self.bucket = TokenBucket(policy.rate_limit.rate, policy.rate_limit.burst, clock(),
                                  tokens=0.0 if shared else None)  # fmt: skip
        self.pid = pid
        self.lines = auditrecord.Lines(
            side="helper", pid=pid, peer_uid=self.peer.uid if self.peer else None,
            peer_pid=self.peer.pid if self.peer else None,
        )  # fmt: skip
        self.log = log
        self.clock = clock
        self.wallclock = wallclock
        # The request and rule of the socket handle() last granted, for the audit
        # line of a send that fails.
        self.granted: tuple[Create, str] | None = None

    def _audit(self, request_id: int, req: Request | None, decision: str, **kw: object) -> None:
        line = self.lines.line(self.wallclock(), request_id, req, decision, **kw)  # type: ignore[arg-type]
        self.log(line)

    def handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> tuple[
        Reply, socket.socket | None
    ]:
        """Decide one message. Returns the reply and, for OK to CREATE, the socket."""
        rid = protocol.peek_request_id(data)
        if ancdata or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            close_passed_fds(ancdata)
            why = "ancillary data" if ancdata or flags & socket.MSG_CTRUNC else "over-long"
            self._audit(rid, None, "malformed", reason=why)
            return protocol.malformed(rid), None
        try:
            req = protocol.decode_request(data)
        except protocol.ProtocolError as exc:
            self._audit(exc.request_id, None, "malformed", reason=str(exc))
            return protocol.malformed(exc.request_id), None
        if isinstance(req, Ping):
            self._audit(rid, req, "pong")
            return protocol.ok(rid), None
        # One socket in flight per boss: fds in flight count against the user all
        # helpers share, so a boss that stops reading must not hoard them.
        if unread_replies(self.chan):
            self._audit(rid, req, "rate_limited", reason="unread replies", retry_ms=1)
            return protocol.rate_limited(rid, 1), None
        # The token goes before the decision, so probing the policy costs too.
        now = self.clock()
        wait_ms = self.bucket.take(now)
        if wait_ms:
            if self.shared and now < self.retry_at:
                self.ending = True
            self.retry_at = now + wait_ms / 1000.0
            self._audit(rid, req, "rate_limited", retry_ms=wait_ms)
            return protocol.rate_limited(rid, wait_ms), None
        verdict = judge(self.rules, req)
        if not verdict.allowed:
            assert verdict.reason is not None
            self._audit(rid, req, "denied", reason=verdict.reason.name.lower(), rule=verdict.rule)
            return protocol.denied(rid, verdict.reason), None
        sock, reply = make_socket(req)
        if reply.status is Status.OS_ERROR:
            stage = _STAGE_NAMES[Stage(reply.code)]
            self._audit(rid, req, "os_error", reason=stage, rule=verdict.rule, errno=reply.detail)
        else:
            try:
                self._audit(rid, req, "granted", rule=verdict.rule)
                self.granted = (req, verdict.rule)
            except BaseException:
                # EPIPE on the log: close the socket here, or the collector's
                # ResourceWarning calls getsockname, which the filter kills.
                assert sock is not None
                sock.close()
                raise
        return reply, sock

    def serve(self) -> None:
        """Until the boss closes the channel (a zero-length read: on SOCK_SEQPACKET
        an empty message and end-of-file look the same, and both end the session)."""
        while True:
            data, ancdata, flags, _ = self.chan.recvmsg(
                protocol.REQUEST_SIZE + 1, ANCBUF, socket.MSG_CMSG_CLOEXEC
            )
            # msg_flags echoes MSG_CMSG_CLOEXEC; only the truncation bits matter.
            if not data and not ancdata and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                return
            reply, sock = self.handle(data, ancdata, flags)
            if sock is None:
                self.chan.sendmsg([protocol.encode_reply(reply)])
                # On a shared helper the first malformed message ends the session
                # after its reply: garbage costs a connection, not just a line.
                if self.shared and reply.status is Status.MALFORMED:
                    return
                if self.ending:
                    return
                continue
            try:
                fds = array.array("i", [sock.fileno()])
                self.chan.sendmsg(
                    [protocol.encode_reply(reply)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
                )
            except OSError as exc:
                if exc.errno not in _SEND_FD_ERRORS:
                    raise
                # The reply did not go out; say why, without the fd.
                req, rule = self.granted or (None, None)
                self._audit(reply.request_id, req, "os_error", reason="send", rule=rule,
                            errno=exc.errno)  # fmt: skip
                failed = protocol.os_error(reply.request_id, exc.errno or 0, Stage.SEND)
                self.chan.sendmsg([protocol.encode_reply(failed)])
            finally:
                sock.close()
