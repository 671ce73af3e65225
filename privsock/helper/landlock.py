"""The helper's Landlock ruleset: the kernel itself holds the policy's TCP ports,
and denies every filesystem access, abstract unix socket and signal.

Seccomp cannot read bind()'s address (a pointer), so without this, code running
inside the helper could bind any port its capability allows. Landlock checks
the port in the kernel: TCP bind only to the ports of ``policy.tcp_bind_ports``,
no TCP connect at all, no file opened or created by path (a unix socket bound
to a path included), no abstract unix socket reached, no signal sent outside
the helper. UDP has no Landlock rights in ABI 7, the newest this module knows.

Three syscalls through ctypes; every number below comes from the kernel:
syscall numbers from arch/x86/entry/syscalls/syscall_64.tbl, everything else
from include/uapi/linux/landlock.h. The ruleset is applied after no_new_privs
(landlock_restrict_self requires it) and before the seccomp filter, which
therefore needs no Landlock syscall.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from typing import NamedTuple

# arch/x86/entry/syscalls/syscall_64.tbl
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

# include/uapi/linux/landlock.h
CREATE_RULESET_VERSION = 1 << 0
RULE_NET_PORT = 2  # enum landlock_rule_type: LANDLOCK_RULE_NET_PORT

ACCESS_NET_BIND_TCP = 1 << 0
ACCESS_NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

# LANDLOCK_ACCESS_FS_*: bits 0-12 (EXECUTE ... MAKE_SYM) since ABI 1, then one
# right per ABI: REFER (13) in 2, TRUNCATE (14) in 3, IOCTL_DEV (15) in 5.
_FS_ABI1 = (1 << 13) - 1
ACCESS_FS_REFER = 1 << 13
ACCESS_FS_TRUNCATE = 1 << 14
ACCESS_FS_IOCTL_DEV = 1 << 15

# The first ABI that has each kind of right.
NET_ABI = 4  # TCP bind and connect (Linux 6.7)
SCOPE_ABI = 6  # abstract unix sockets and signals (Linux 6.12)
KNOWN_ABI = 7  # the newest ABI whose rights this module knows (Linux 6.15)


def fs_rights(abi: int) -> int:
    """Every filesystem access right the ABI knows: all handled, none allowed."""
    rights = _FS_ABI1
    if abi >= 2:
        rights |= ACCESS_FS_REFER
    if abi >= 3:
        rights |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        rights |= ACCESS_FS_IOCTL_DEV
    return rights


def net_rights(abi: int) -> int:
    return ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP if abi >= NET_ABI else 0


def scopes(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= SCOPE_ABI else 0


class _RulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr. Passed whole even to older kernels: they
    # accept a larger struct as long as the fields they do not know are zero.
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _NetPortAttr(ctypes.Structure):
    # struct landlock_net_port_attr; the port in host byte order.
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


class Unavailable(Exception):
    """The kernel (or a seccomp filter in front of it) offers no Landlock."""


class Applied(NamedTuple):
    abi: int  # the kernel's ABI version
    fs: int  # handled filesystem rights
    net: int  # handled network rights (0 below ABI 4: no port rules)
    scoped: int
    tcp_ports: int  # how many TCP bind rules were added

    def summary(self) -> str:
        parts = [f"ABI {self.abi}", "no filesystem"]
        if self.net:
            parts.append(f"TCP bind to {self.tcp_ports} port(s) only, no TCP connect")
        else:
            parts.append(f"no TCP port rules (they need ABI {NET_ABI})")
        if self.scoped:
            parts.append("no abstract unix sockets or signals outside")
        return ", ".join(parts) + "; UDP not covered"


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    ctypes.set_errno(0)
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The kernel's Landlock ABI, or Unavailable with the reason."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(CREATE_RULESET_VERSION))  # fmt: skip
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise Unavailable(
                "the kernel has no Landlock, or a seccomp filter hides it (ENOSYS)"
            ) from None
        if exc.errno == errno.EOPNOTSUPP:
            raise Unavailable("Landlock is built in but disabled at boot (EOPNOTSUPP)") from None
        raise Unavailable(f"landlock_create_ruleset: {exc.strerror}") from None


def _add_port_rules(ruleset: int, ports: Iterable[int]) -> int:
    """One TCP bind rule per port. A policy may grant all 65,535 ports, so the
    loop makes the bare call with arguments converted once (about 1 µs a rule)."""
    call, nr, fd = _libc.syscall, ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset)
    kind, flags = ctypes.c_int(RULE_NET_PORT), ctypes.c_uint32(0)
    rule = _NetPortAttr(ACCESS_NET_BIND_TCP, 0)
    ref = ctypes.byref(rule)
    count = 0
    for port in ports:
        rule.port = port
        if call(nr, fd, kind, ref, flags) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_add_rule(port {port}): {os.strerror(err)}")
        count += 1
    return count


def apply(tcp_ports: Iterable[int]) -> Applied:
    """Restrict this process for good. Raises Unavailable if the kernel has no
    Landlock, OSError if a step fails on a kernel that has it."""
    abi = abi_version()
    known = min(abi, KNOWN_ABI)
    attr = _RulesetAttr(fs_rights(known), net_rights(known), scopes(known))
    ruleset = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))  # fmt: skip
    count = 0
    try:
        if attr.handled_access_net:
            count = _add_port_rules(ruleset, tcp_ports)
        _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return Applied(abi, attr.handled_access_fs, attr.handled_access_net, attr.scoped, count)
