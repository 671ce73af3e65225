"""The supervisor of `privsock run`: answers every bind() the program makes.

For each notification, in this order (each step fails closed):

1. read the sockaddr from the calling thread's memory, then check that the
   notification is still valid: if the thread died or was interrupted, its
   pid may belong to another process by now, and what was read is dropped;
2. anything privsock does not serve continues to the kernel
   (SECCOMP_USER_NOTIF_FLAG_CONTINUE), which runs the bind with the
   program's own lack of privilege;
3. open a pidfd on the caller's process and check validity again: from then
   on the pidfd pins that very process; take a copy of its socket
   (pidfd_getfd) and read what it is;
4. bindreq.decide; for Serve, the helper binds a socket of the same family
   and type to the address *as read in step 1* — a program that changes the
   memory afterwards changes nothing the supervisor does;
5. copy O_NONBLOCK, close-on-exec and the carried options onto it; write
   the "delivered" audit line (a line the log cannot take refuses the bind:
   no socket is handed out unlogged); put it at the program's fd number
   (ADDFD with SETFD, which replaces the old socket atomically), then answer
   the bind with 0 (a separate SEND: ADDFD's own SEND flag would make bind()
   return the fd number).

Why CONTINUE is safe: the kernel then performs the bind itself, as the
program, with no privilege; an address changed after the check gains nothing
the program could not do without privsock. The supervisor only ever adds
what the helper's policy grants.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from privsock import auditjson
from privsock.auditsink import AuditLogError
from privsock.client import SocketCreator
from privsock.errors import CreatorError, CreatorOSError, PolicyDenied, RateLimited
from privsock.helper.protocol import Transport
from privsock.run import bindreq, kernel, sockopts

AuditSink = Callable[[bytes], None]  # one audit line (privsock.auditsink)

RATE_LIMIT_WAIT = 1.0  # the longest a bind waits for a rate-limit token


@dataclass
class Counters:
    continued: int = 0
    delivered: int = 0
    refused: int = 0
    dropped: int = 0  # the caller was gone before it could be answered


@dataclass
class Supervisor:
    listener: int
    arch: kernel.Arch
    creator: SocketCreator
    allow: tuple[bindreq.AllowSpec, ...] = ()
    audit_sink: AuditSink | None = None
    unprivileged_port_start: int = 1024
    log: Callable[[str], None] = lambda line: None
    counters: Counters = field(default_factory=Counters)
    # (st_dev, st_ino) of every socket put in place, so that a bind() restarted
    # after its socket was already replaced gets 0 again rather than EINVAL.
    _granted: set[tuple[int, int]] = field(default_factory=set)
    _netns: int = field(default_factory=lambda: os.stat("/proc/self/ns/net").st_ino)

    # -- answers ---------------------------------------------------------

    def _continue(self, nid: int) -> None:
        self.counters.continued += 1
        self._send(nid, flags=kernel.SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def _refuse(
        self, nid: int, tgid: int, what: str, reason: str, err: int = errno.EACCES,
        transport: Transport | None = None,
    ) -> None:  # fmt: skip
        self.counters.refused += 1
        self.log(f"pid {tgid}: bind({what}) refused: {reason}")
        self._note(tgid, what, "denied", reason, transport)
        self._send(nid, error=-err)

    def _send(self, nid: int, *, val: int = 0, error: int = 0, flags: int = 0) -> None:
        try:
            kernel.send(self.listener, nid, val=val, error=error, flags=flags)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self.counters.dropped += 1  # the caller died, or a signal withdrew the call

    def _audit(
        self, tgid: int, what: str, decision: str, reason: str | None,
        transport: Transport | None = None,
    ) -> None:  # fmt: skip
        if self.audit_sink is None:
            return
        rec = auditjson.record(
            now=time.time(), side="run", pid=tgid, request_id=0, request=None,
            decision=decision, reason=reason,
        )  # fmt: skip
        host, _, port = what.rpartition(":")
        rec.update(op="BIND", address=host.strip("[]"), port=int(port),
                   transport=transport.name.lower() if transport else None)  # fmt: skip
        self.audit_sink(auditjson.encode(rec))

    def _unlogged(self, nid: int, tgid: int, what: str, exc: AuditLogError) -> None:
        """A grant that cannot be logged is not handed out; the sink is what
        failed, so this refusal is said here and not audited."""
        self.counters.refused += 1
        self.log(f"pid {tgid}: bind({what}) refused: {exc}")
        self._send(nid, error=-errno.EACCES)

    def _note(
        self, tgid: int, what: str, decision: str, reason: str, transport: Transport | None,
    ) -> None:  # fmt: skip
        """A denial or a drop: nothing was handed out, so a log that cannot take
        the line is said (one line), and the answer to the caller still goes."""
        try:
            self._audit(tgid, what, decision, reason, transport)
        except AuditLogError as exc:
            self.log(f"pid {tgid}: bind({what}) {decision}, not logged: {exc}")

    # -- one notification ---------------------------------------------------

    def handle(self, n: kernel.Notification) -> None:
        if n.arch != self.arch.audit_arch or n.nr != self.arch.nr_bind:
            self._continue(n.id)  # the filter sends nothing else; never block a caller
            return
        fd = _s32(n.args[0])
        addrlen = _s32(n.args[2])
        try:
            raw = kernel.read_memory(n.pid, n.args[1], max(0, min(addrlen, bindreq.SOCKADDR_MAX)))
        except OSError as exc:
            if not kernel.id_valid(self.listener, n.id):
                self.counters.dropped += 1
                return
            if exc.errno not in (errno.EFAULT, 0):
                self.log(
                    f"pid {n.pid}: cannot read its bind() address ({exc.strerror}); "
                    "left to the kernel (a non-dumpable program cannot be served)"
                )
            self._continue(n.id)  # the kernel answers EFAULT, or binds unprivileged
            return
        if not kernel.id_valid(self.listener, n.id):
            self.counters.dropped += 1  # what was read may be another process's memory
            return
        addr = bindreq.parse_sockaddr(raw, addrlen)
        if isinstance(addr, bindreq.Continue) or not bindreq.needs_privilege(
            addr, self.unprivileged_port_start
        ):
            self._continue(n.id)
            return
        self._privileged(n, fd, addr)

    def _privileged(self, n: kernel.Notification, fd: int, addr: bindreq.BindAddress) -> None:
        what = _show(addr)
        try:
            tgid = _tgid(n.pid)
            if os.stat(f"/proc/{n.pid}/ns/net").st_ino != self._netns:
                # The helper binds in our network namespace; one of the program's
                # own is not ours to serve. The kernel decides there.
                self._continue(n.id)
                return
            pidfd = kernel.pidfd_open(tgid)
        except (OSError, ValueError):
            self.counters.dropped += 1  # gone (its /proc entry vanished)
            if kernel.id_valid(self.listener, n.id):
                self._continue(n.id)
            return
        try:
            if not kernel.id_valid(self.listener, n.id):
                self.counters.dropped += 1
                return
            try:
                theirs = socket.socket(fileno=kernel.pidfd_getfd(pidfd, fd))
            except OSError as exc:
                # EBADF, ENOTSOCK: the kernel gives the program the same answer.
                # EPERM: not ours to inspect (a non-dumpable program).
                if exc.errno not in (errno.EBADF, errno.ENOTSOCK):
                    self.log(f"pid {tgid}: cannot take its fd {fd} ({exc.strerror}); "
                             "left to the kernel")  # fmt: skip
                self._continue(n.id)
                return
            with theirs:
                self._serve(n, tgid, fd, addr, what, theirs)
        finally:
            os.close(pidfd)

    def _serve(
        self,
        n: kernel.Notification,
        tgid: int,
        fd: int,
        addr: bindreq.BindAddress,
        what: str,
        theirs: socket.socket,
    ) -> None:
        facts = sockopts.facts(theirs)
        if facts.bound_port and self._already_ours(theirs, addr):
            self._send(n.id, val=0)  # a restarted bind() of the socket already put in place
            return
        tr = bindreq.transport_of(facts)
        verdict = bindreq.decide(addr, facts, self.allow)
        if isinstance(verdict, bindreq.Continue):
            self._continue(n.id)
            return
        if isinstance(verdict, bindreq.Refuse):
            self._refuse(n.id, tgid, what, verdict.reason, transport=tr)
            return
        try:
            new = self._create(verdict)
        except PolicyDenied as exc:
            self._refuse(n.id, tgid, what, f"policy: {exc}", transport=tr)
            return
        except CreatorOSError as exc:
            self._refuse(n.id, tgid, what, f"helper: {exc}", exc.errno, tr)
            return
        except CreatorError as exc:
            self._refuse(n.id, tgid, what, f"helper: {exc}", transport=tr)
            return
        except AuditLogError as exc:
            self._unlogged(n.id, tgid, what, exc)
            return
        with new:
            sockopts.copy(theirs, new)
            cloexec = sockopts.fd_cloexec(tgid, fd)
            if not kernel.id_valid(self.listener, n.id):
                self.counters.dropped += 1
                self._note(tgid, what, "undelivered", "the caller was gone", tr)
                return
            # Logged before it is put in place: once ADDFD has run, the program
            # holds the socket, so a line that cannot be written must stop it here.
            try:
                self._audit(tgid, what, "delivered", None, tr)
            except AuditLogError as exc:
                self._unlogged(n.id, tgid, what, exc)
                return
            try:
                kernel.addfd_setfd(self.listener, n.id, new.fileno(), fd, cloexec)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                self.counters.dropped += 1  # this line withdraws the "delivered" one
                self._note(tgid, what, "undelivered", "the caller was gone", tr)
                return
            st = os.fstat(new.fileno())
            self._granted.add((st.st_dev, st.st_ino))
            self._send(n.id, val=0)
            self.counters.delivered += 1

    def _create(self, v: bindreq.Serve) -> socket.socket:
        deadline = time.monotonic() + RATE_LIMIT_WAIT
        while True:
            try:
                return self.creator.create(
                    v.transport, v.address, v.port,
                    reuseaddr=v.reuseaddr, reuseport=v.reuseport, v6only=v.v6only,
                )  # fmt: skip
            except RateLimited as exc:
                wait = exc.retry_after
                if time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)

    def _already_ours(self, theirs: socket.socket, addr: bindreq.BindAddress) -> bool:
        st = os.fstat(theirs.fileno())
        if (st.st_dev, st.st_ino) not in self._granted:
            return False
        name = theirs.getsockname()
        return bool(name[1] == addr.port and name[0] == str(addr.address))


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    raise ValueError(f"/proc/{tid}/status has no Tgid")


def _show(addr: bindreq.BindAddress) -> str:
    host = f"[{addr.address}]" if addr.family == socket.AF_INET6 else str(addr.address)
    return f"{host}:{addr.port}"
