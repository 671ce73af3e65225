"""The helper's seccomp allowlist, and loading it.

Default action KILL_PROCESS; a foreign architecture (i386 `int 0x80`, x32) is
killed too. Every syscall the serving loop makes is listed here with the reason
it is needed; SECURITY.md repeats the table for operators. Arguments are
filtered wherever the value is a plain integer (seccomp cannot read pointers).
"""

from __future__ import annotations

import mmap
import socket
from typing import NamedTuple

from privsock.helper import libseccomp as scmp
from privsock.helper.drop import NOFILE_LIMIT

# Both socket type flags the kernel accepts ORed into `type`; masked off so that
# SOCK_CLOEXEC (which Python always adds) does not need its own rule.
_TYPE_MASK = 0xFFFFFFFF & ~(socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

# ioctl(SIOCOUTQ): the bytes of our replies the boss has not read yet.
SIOCOUTQ = 0x5411

# The fd the helper keeps /proc/self/status on for its one self-check. It sits
# above the RLIMIT_NOFILE the helper sets, so once closed that number can never
# be handed out again, and `read` on it can never reach anything else.
STATUS_FD = 9

# The fds a socket the helper creates can get: the lowest free numbers under
# RLIMIT_NOFILE, with 0 and 2 always taken. bind() is allowed on these only, each
# compared with EQ on the whole 64-bit argument: the kernel reads the fd as an
# int, so a rule "fd != 0" would let (1 << 32) | 0 through to fd 0.
BIND_FDS = (1, *range(3, NOFILE_LIMIT))


class Allowed(NamedTuple):
    syscall: str
    why: str
    args: tuple[tuple[scmp.Arg, ...], ...] = ((),)  # ORed rules of ANDed conditions


def _eq(arg: int, value: int) -> scmp.Arg:
    return scmp.Arg(arg, scmp.CMP_EQ, value)


ALLOWLIST: tuple[Allowed, ...] = (
    Allowed("recvmsg", "read a request from the boss, only on fd 0", ((_eq(0, 0),),)),
    Allowed("sendmsg", "send a reply (and the new fd) to the boss, only on fd 0", ((_eq(0, 0),),)),
    Allowed(
        "socket",
        "create the requested socket: AF_INET/AF_INET6, STREAM/DGRAM, protocol 0 only",
        tuple(
            (_eq(0, family), scmp.Arg(1, scmp.CMP_MASKED_EQ, _TYPE_MASK, kind), _eq(2, 0))
            for family in (socket.AF_INET, socket.AF_INET6)
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)
        ),
    ),
    Allowed(
        "setsockopt",
        "the three options the protocol knows: SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY",
        (
            (_eq(1, socket.SOL_SOCKET), _eq(2, socket.SO_REUSEADDR)),
            (_eq(1, socket.SOL_SOCKET), _eq(2, socket.SO_REUSEPORT)),
            (_eq(1, socket.IPPROTO_IPV6), _eq(2, socket.IPV6_V6ONLY)),
        ),
    ),
    Allowed(
        "bind",
        "bind the new socket; the address was checked against the policy (and Landlock "
        "checks the TCP port): never fd 0 (the channel) or fd 2 (the log, a journal socket)",
        tuple((_eq(0, fd),) for fd in BIND_FDS),
    ),
    Allowed(
        "ioctl",
        "SIOCOUTQ on fd 0 only: has the boss read our last reply? (one fd in flight)",
        ((_eq(0, 0), _eq(1, SIOCOUTQ)),),
    ),
    Allowed("close", "close the helper's copy of a sent fd, and fds a boss sent it"),
    Allowed("write", "the audit log and fatal messages, only on fd 2", ((_eq(0, 2),),)),
    Allowed(
        "read", "the one read of /proc/self/status for the self-check", ((_eq(0, STATUS_FD),),)
    ),
    Allowed(
        "mmap",
        "the Python allocator; never with PROT_EXEC",
        ((scmp.Arg(2, scmp.CMP_MASKED_EQ, mmap.PROT_EXEC, 0),),),
    ),
    Allowed("munmap", "the Python allocator returns memory"),
    Allowed("mremap", "glibc realloc of large blocks"),
    Allowed("brk", "glibc malloc grows the heap"),
    Allowed("clock_gettime", "the rate limiter's clock and log times, where the vDSO falls back"),
    Allowed("rt_sigreturn", "return from a signal handler (CPython's C-level handler)"),
    Allowed("exit_group", "leave: os._exit"),
)


def build() -> scmp.Filter:
    """The filter, not loaded yet; the caller releases it (a ``with`` block)."""
    flt = scmp.Filter(scmp.ACT_KILL_PROCESS)
    try:
        # A syscall from another ABI (i386, x32) would bypass the x86_64 numbers.
        flt.set_attr(scmp.FLTATR_ACT_BADARCH, scmp.ACT_KILL_PROCESS)
        for entry in ALLOWLIST:
            for conditions in entry.args:
                flt.add_rule(scmp.ACT_ALLOW, entry.syscall, conditions)
    except BaseException:
        flt.release()
        raise
    return flt


def load() -> None:
    """Install the filter on this process. Irreversible; requires no_new_privs
    to be set already (or CAP_SYS_ADMIN, which the helper never has)."""
    with build() as flt:
        flt.load()
