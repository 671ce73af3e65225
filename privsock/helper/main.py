"""privsock-helper: start up, harden, prove it, then serve on fd 0.

    privsock-helper --policy FILE

The order is the security argument (SECURITY.md walks through it):

 1. check the privilege: root with SETUID/SETGID/SETPCAP, or the policy's user
    holding CAP_NET_BIND_SERVICE; fd 0 must be an AF_UNIX SOCK_SEQPACKET socket,
    and the kernel tells who is on its other end (SO_PEERCRED, SO_PEERGROUPS);
 2. read and check the policy (root-owned, not writable by others, strict parse);
 3. close every fd but 0 and 2; no core dumps, no new processes;
 4. switch to the policy's user and group keeping only CAP_NET_BIND_SERVICE;
 5. no_new_privs, dumpable 0, pdeathsig, and the parent is still the one we had;
 6. everything is imported at the top of this module; warm up the lazy paths;
    open /proc/self/status for step 9;
 7. apply the Landlock ruleset: TCP bind to the policy's ports only, no TCP
    connect, no filesystem, no abstract unix sockets or signals (needs step 5's
    no_new_privs, and goes before step 8 so the filter needs no Landlock call);
    where the kernel has none, refuse if the policy requires it;
 8. load the seccomp allowlist (KILL_PROCESS);
 9. read /proc/self/status and refuse to serve unless it shows the promise;
10. bind TCP port 0, which no ruleset holds, and refuse to serve unless
    Landlock refuses it with EACCES.

Any failure before serving: one line on stderr and a documented exit code
(privsock.helper.exitcodes). Once the filter is loaded nothing may open a file, so
errors are written to fd 2 by hand and the process leaves with os._exit.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import sys
import time
import warnings
from typing import NamedTuple

from privsock.helper import (
    auditrecord,
    drop,
    landlock,
    peercred,
    protocol,
    seccomp_filter,
    slots,
)  # fmt: skip
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.policy import Peer, Policy, decide, tcp_bind_ports
from privsock.helper.policy_file import load_policy
from privsock.helper.procstatus import parse_status, verdict
from privsock.helper.serve import Session

USAGE = "usage: privsock-helper --policy FILE"


def _say(message: str) -> None:
    # os.write, not print: sys.stdout/stderr objects may be gone, and this must
    # work under the filter (write is allowed on fd 2 only).
    try:
        os.write(2, f"privsock-helper: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass  # nobody is listening; the exit code still tells


def parse_args(argv: list[str]) -> str:
    if len(argv) == 2 and argv[0] == "--policy" and argv[1]:
        return argv[1]
    if len(argv) == 1 and argv[0].startswith("--policy=") and len(argv[0]) > 9:
        return argv[0][9:]
    raise Refusal(Exit.USAGE, USAGE)


def _channel() -> socket.socket:
    try:
        chan = socket.socket(fileno=0)
    except OSError as exc:
        raise Refusal(Exit.PROTOCOL, f"fd 0 is not a socket ({exc.strerror})") from None
    if chan.family != socket.AF_UNIX or chan.type != socket.SOCK_SEQPACKET:
        chan.detach()
        raise Refusal(Exit.PROTOCOL, "fd 0 must be an AF_UNIX SOCK_SEQPACKET socket")
    return chan


def _warm_up(policy: Policy) -> None:
    """Run every lazy path of the loop once, so nothing is first touched
    (imported, cached, compiled) under the filter."""
    req = protocol.Create(1, protocol.Transport.TCP, ipaddress.IPv6Address("::1"), 53,
                          protocol.Option.V6ONLY)  # fmt: skip
    protocol.decode_request(protocol.encode_request(req))
    protocol.decode_request(protocol.encode_request(protocol.Ping(1)))
    for bad in (b"", b"x" * 32):
        try:
            protocol.decode_request(bad)
        except protocol.ProtocolError as exc:
            str(exc)
    decide(policy, protocol.Create(1, protocol.Transport.TCP, ipaddress.IPv4Address("127.0.0.1"),
                                   53), Peer(1, 1, 1, frozenset({1})))  # fmt: skip
    for reply in (protocol.ok(1), protocol.denied(1, protocol.Reason.PORT),
                  protocol.rate_limited(1, 5), protocol.os_error(1, 98, protocol.Stage.BIND)):
        protocol.encode_reply(reply)  # fmt: skip
    # A malformed request's reason quotes what the boss sent: every escape path.
    for audited in (req, protocol.Create(1, protocol.Transport.UDP,
                                         ipaddress.IPv6Address("::ffff:127.0.0.1"), 53)):
        auditrecord.Lines(side="helper", pid=0, peer_uid=1, peer_pid=1).line(
            time.time(), 1, audited, "granted", reason="\"\\\n\x7f\xe9\U0001f600")
    time.monotonic()


class Hardened(NamedTuple):
    """What start-up hands the serving loop."""

    chan: socket.socket  # fd 0, the channel to the boss
    policy: Policy
    pid: int  # our own pid, read before the filter (audit lines carry it)
    landlock: landlock.Applied | str  # the ruleset applied, or why there is none
    peer: Peer  # who is on the other end of fd 0, as the kernel recorded it
    shared: bool  # fd 0 came from accept(): a helper shared by every user of a socket


class _Locked(NamedTuple):
    """Steps 2-6 done: the policy, and what step 9 checks against."""

    policy: Policy
    pid: int
    uid: int  # the ids we now run as
    gid: int
    filters: int  # seccomp filters already stacked on us (a runtime's, say)


def harden(policy_path: str, expected_parent: int) -> Hardened:
    """Steps 1-10. Returns the channel, the policy, our pid, the peer and the
    Landlock ruleset, or raises Refusal."""
    root_start = drop.check_privilege()
    chan = _channel()
    try:
        try:
            peer = peercred.read_peer(chan)
        except OSError as exc:
            raise Refusal(Exit.PROTOCOL, f"cannot tell who is on fd 0: {exc.strerror}") from None
        shared = peercred.accepted(chan)
        locked = _drop_and_lock(policy_path, expected_parent, root_start,
                                peer.uid if shared else None)  # fmt: skip
        ruleset = _landlock(locked.policy)
        try:
            seccomp_filter.load()
        except OSError as exc:
            raise Refusal(Exit.OSERR, f"loading the seccomp filter failed: {exc}") from None
        # From here on: no file opens. The status fd was opened before the filter.
        status = os.read(seccomp_filter.STATUS_FD, 8192).decode("ascii", "replace")
        os.close(seccomp_filter.STATUS_FD)
        # Seccomp=2 alone could be a container runtime's filter: ours must be one more.
        problems = verdict(parse_status(status), uid=locked.uid, gid=locked.gid,
                           seccomp_filters=locked.filters + 1)  # fmt: skip
        if problems:
            raise Refusal(Exit.OSERR, "not hardened as promised, refusing to serve: "
                          + "; ".join(problems))  # fmt: skip
        if isinstance(ruleset, landlock.Applied) and ruleset.net:
            _probe_landlock()
    except BaseException:
        # An unclosed socket object warns on collection, and the warning's repr
        # calls getsockname, which the filter kills. Let go of fd 0 by hand.
        chan.detach()
        raise
    return Hardened(chan, locked.policy, locked.pid, ruleset, peer, shared)


def _landlock(policy: Policy) -> landlock.Applied | str:
    """Step 7. The ruleset applied, or why the kernel offers none (when the
    policy lets the helper run without)."""
    try:
        abi = landlock.abi_version()
    except landlock.Unavailable as exc:
        why = str(exc)
    else:
        if abi >= landlock.NET_ABI or not policy.require_landlock:
            try:
                return landlock.apply(tcp_bind_ports(policy))
            except (landlock.Unavailable, OSError) as exc:
                raise Refusal(Exit.OSERR, f"applying the Landlock ruleset failed: {exc}") from None
        why = f"the kernel's Landlock ABI {abi} has no TCP port rules (ABI {landlock.NET_ABI})"
    if policy.require_landlock:
        raise Refusal(Exit.NOLANDLOCK, f"the policy requires Landlock (helper.require_landlock) "
                      f"but {why}; refusing to start")  # fmt: skip
    return why


def _probe_landlock() -> None:
    """Step 10. Port 0 needs no capability and is in no ruleset (policy ports are
    1-65535), so only Landlock can refuse this bind; the socket is one the
    filter lets the helper create and bind."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    try:
        probe.bind(("127.0.0.1", 0))
    except OSError as exc:
        if exc.errno == errno.EACCES:
            return
        raise Refusal(Exit.OSERR, "Landlock self-check: binding TCP port 0 failed with "
                      f"{exc.strerror}, not EACCES; refusing to serve") from None  # fmt: skip
    finally:
        probe.close()
    raise Refusal(Exit.OSERR, "Landlock self-check: TCP port 0, outside the ruleset, "
                  "could be bound; refusing to serve")  # fmt: skip


def _drop_and_lock(
    policy_path: str, expected_parent: int, root_start: bool, shared_peer: int | None
) -> _Locked:
    """Steps 2-6. ``shared_peer``: the peer uid of a shared helper, which takes one
    of that user's connection slots (slots.py), or None."""
    try:
        policy = load_policy(policy_path)
        uid, gid = drop.resolve_ids(policy.user, policy.group)
        drop.close_fds(keep=(0, 2))
        drop.set_rlimits()
        if root_start:
            drop.switch_user(uid, gid)
        else:
            drop.keep_user(uid, gid)
        drop.lock(expected_parent)
        if shared_peer is not None and policy.connections is not None:
            slot = slots.take(policy.connections.lock_dir, shared_peer,
                              policy.connections.per_user)  # fmt: skip
            os.dup2(slot, slots.SLOT_FD, inheritable=False)
            os.close(slot)
        pid = os.getpid()
        _warm_up(policy)
        with open("/proc/self/status", encoding="ascii") as f:
            filters = parse_status(f.read()).seccomp_filters
        if filters is None:
            raise Refusal(Exit.OSERR, "the kernel does not report Seccomp_filters in "
                          "/proc/self/status, so the helper cannot prove its filter")  # fmt: skip
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(fd, seccomp_filter.STATUS_FD, inheritable=False)
        os.close(fd)
        drop.limit_nofile()
    except OSError as exc:
        raise Refusal(Exit.OSERR, f"hardening failed: {exc}") from None
    return _Locked(policy, pid, uid, gid, filters)


def run(argv: list[str]) -> int:
    expected_parent = os.getppid()
    # Warnings would format source lines (opening files) under the filter.
    warnings.simplefilter("ignore")
    # Ctrl-C in the boss's terminal reaches the whole process group; the boss
    # ends the helper by closing the channel, which is always clean.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        policy_path = parse_args(argv)
        hardened = harden(policy_path, expected_parent)
    except Refusal as exc:
        _say(str(exc))
        return exc.exit_code
    chan, policy, pid, peer = hardened.chan, hardened.policy, hardened.pid, hardened.peer
    if isinstance(hardened.landlock, landlock.Applied):
        shown = hardened.landlock.summary()
    else:
        shown = f"unavailable ({hardened.landlock})"
    _say(f"hardened, serving (pid {pid}, policy {policy_path}, peer uid {peer.uid} "
         f"pid {peer.pid}); Landlock: {shown}")  # fmt: skip
    try:
        Session(chan, policy, pid, log=lambda line: os.write(2, line), peer=peer,
                shared=hardened.shared).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the boss is gone mid-exchange: same as end-of-file
    finally:
        chan.detach()  # see harden(): no socket object may be collected open
    return Exit.OK


def main() -> None:
    try:
        code = run(sys.argv[1:])
    except BaseException as exc:
        _say(f"fatal: {type(exc).__name__}: {exc}")
        code = Exit.SOFTWARE
    # os._exit: interpreter shutdown makes syscalls the filter forbids.
    os._exit(code)


if __name__ == "__main__":
    main()
