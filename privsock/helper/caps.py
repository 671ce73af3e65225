"""prctl options, capability numbers and the raw prctl call: the one copy, for
the helper's drop (drop.py, keeps CAP_NET_BIND_SERVICE), the boss's (dropall.py,
before exec or in a library boss: keeps nothing) and `privsock run`'s
supervisor and program (privsock/run/, whose own prctl options are in
privsock/run/kernel.py: the helper never uses them). python-prctl covers the
rest; these are the calls it lacks."""

from __future__ import annotations

import ctypes
import os

from privsock.helper.exitcodes import Exit, Refusal

# include/uapi/linux/prctl.h
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

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def prctl(option: int, arg2: int) -> int:
    """prctl(option, arg2, 0, 0, 0): its result, or OSError if the kernel says no."""
    ret = int(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return ret


def raw_prctl(option: int, arg2: int) -> None:
    """prctl(option, arg2, 0, 0, 0); a Refusal (OSERR) if the kernel says no."""
    try:
        prctl(option, arg2)
    except OSError as exc:
        raise Refusal(Exit.OSERR, f"prctl({option}, {arg2}) failed: {exc.strerror}") from None


def cap_last() -> int:
    """The highest capability number this kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        return int(f.read())


def missing_drop_caps(effective: int) -> list[str]:
    """The capabilities of DROP_CAPS that the ``effective`` set lacks."""
    return [name for bit, name in DROP_CAPS if not effective >> bit & 1]
