"""prctl options, capability numbers, the raw prctl call and capset: the one
copy, for the helper's drop (drop.py, keeps CAP_NET_BIND_SERVICE), the boss's
(dropall.py, before exec or in a library boss: keeps nothing) and `privsock
run`'s supervisor and program (privsock/run/, whose own prctl options are in
privsock/run/kernel.py: the helper never uses them). The helper needs no
python-prctl: these are all the calls it makes."""

from __future__ import annotations

import ctypes
import os

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# include/uapi/linux/capability.h
CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
CAP_NET_BIND_SERVICE = 10
NET_BIND_SERVICE_MASK = 1 << CAP_NET_BIND_SERVICE
# What a root start needs to drop to another user: checked before anything starts.
DROP_CAPS = ((CAP_SETUID, "CAP_SETUID"), (CAP_SETGID, "CAP_SETGID"), (CAP_SETPCAP, "CAP_SETPCAP"))
# 64-bit sets, as two __user_cap_data_struct: bits 0-31, then 32-63.
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_LINUX_CAPABILITY_U32S_3 = 2


class _CapHeader(ctypes.Structure):
    # struct __user_cap_header_struct {__u32 version; int pid;}
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    # struct __user_cap_data_struct {__u32 effective, permitted, inheritable;}
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_libc = ctypes.CDLL("libc.so.6", use_errno=True)
# glibc exports the raw capset(2) though no header declares it.
_libc.capset.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))
_libc.capset.restype = ctypes.c_int


def prctl(option: int, arg2: int) -> int:
    """prctl(option, arg2, 0, 0, 0): its result, or OSError if the kernel says no."""
    # glibc's prctl is variadic and reads unsigned longs; some options refuse
    # any non-zero arg3-arg5, so they are passed at that width, not as C ints.
    zero = ctypes.c_ulong(0)
    ret = int(_libc.prctl(option, ctypes.c_ulong(arg2), zero, zero, zero))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {arg2}): {os.strerror(err)}")
    return ret


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's three capability sets (bit masks) in one
    capset(2); OSError if the kernel says no (EPERM: a capability that is not
    permitted, EINVAL: a version it does not take), and nothing changes."""
    sets = (effective, permitted, inheritable)
    if any(not 0 <= s < 1 << 64 for s in sets):
        raise ValueError(f"capset: a set is not a 64-bit mask: {sets}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)  # pid 0: this thread
    data = (_CapData * _LINUX_CAPABILITY_U32S_3)(
        *(_CapData(*(s >> shift & 0xFFFFFFFF for s in sets)) for shift in (0, 32))
    )
    if _libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset(effective {effective:#x}, permitted {permitted:#x}, "
                      f"inheritable {inheritable:#x}): {os.strerror(err)}")  # fmt: skip


def cap_last() -> int:
    """The highest capability number this kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        return int(f.read())


def missing_drop_caps(effective: int) -> list[str]:
    """The capabilities of DROP_CAPS that the ``effective`` set lacks."""
    return [name for bit, name in DROP_CAPS if not effective >> bit & 1]
