"""The six libseccomp 2.5 calls the helper makes, through ctypes, and no more.

libseccomp turns rules into the BPF program (syscall numbers, the architecture
check); this module only hands it the helper's rules: seccomp_init,
seccomp_attr_set, seccomp_syscall_resolve_name, seccomp_rule_add_array,
seccomp_load and seccomp_release. Every result is checked: libseccomp returns
a negative errno, which becomes an OSError naming the call and the rule, so a
filter that lacks a rule or an attribute is never loaded. The library is
opened by its fixed soname (Debian's libseccomp2), not looked up through
ctypes.util, which would run ldconfig.

Every constant and type below is from libseccomp's include/seccomp.h (2.5.4).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import NamedTuple

# #define SCMP_ACT_KILL_PROCESS 0x80000000U, SCMP_ACT_ALLOW 0x7fff0000U
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000

# enum scmp_filter_attr: SCMP_FLTATR_ACT_BADARCH, the action for a foreign ABI
FLTATR_ACT_BADARCH = 2

# enum scmp_compare: the two SCMP_CMP_* the allowlist uses
CMP_EQ = 4
CMP_MASKED_EQ = 7  # (argument & datum_a) == datum_b

# #define __NR_SCMP_ERROR -1: what seccomp_syscall_resolve_name returns for an
# unknown name. Other negative numbers are libseccomp's pseudo-syscalls, names
# that exist on other architectures only: a rule for one would add nothing.
NR_SCMP_ERROR = -1


class Arg(NamedTuple):
    """One condition of a rule: argument ``arg`` (0-5) compared by ``op``."""

    arg: int
    op: int
    datum_a: int
    datum_b: int = 0


class _ArgCmp(ctypes.Structure):
    # struct scmp_arg_cmp {unsigned int arg; enum scmp_compare op;
    #                      scmp_datum_t datum_a, datum_b;}, scmp_datum_t = uint64_t
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),  # an enum of small positive values: int-sized
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


_ctx = ctypes.c_void_p  # typedef void *scmp_filter_ctx
_lib = ctypes.CDLL("libseccomp.so.2")
_lib.seccomp_init.argtypes = (ctypes.c_uint32,)
_lib.seccomp_init.restype = _ctx
_lib.seccomp_attr_set.argtypes = (_ctx, ctypes.c_int, ctypes.c_uint32)
_lib.seccomp_attr_set.restype = ctypes.c_int
_lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
_lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
_lib.seccomp_rule_add_array.argtypes = (
    _ctx, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
)  # fmt: skip
_lib.seccomp_rule_add_array.restype = ctypes.c_int
_lib.seccomp_load.argtypes = (_ctx,)
_lib.seccomp_load.restype = ctypes.c_int
_lib.seccomp_release.argtypes = (_ctx,)
_lib.seccomp_release.restype = None


def _check(result: int, call: str) -> None:
    if result < 0:
        raise OSError(-result, f"{call}: {os.strerror(-result)}")


class Filter:
    """A filter being built (scmp_filter_ctx). Use it in a ``with`` block: the
    context is released on every path, loaded or not."""

    def __init__(self, default_action: int) -> None:
        ctx = _lib.seccomp_init(default_action)
        if not ctx:  # NULL, and no errno: an invalid action, or no memory
            raise OSError(errno.EINVAL, f"seccomp_init({default_action:#x}) failed")
        self._ctx: int | None = ctx

    def __enter__(self) -> Filter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx:
            _lib.seccomp_release(ctx)

    def set_attr(self, attr: int, value: int) -> None:
        _check(_lib.seccomp_attr_set(self._ctx, attr, value),
               f"seccomp_attr_set({attr}, {value:#x})")  # fmt: skip

    def add_rule(self, action: int, syscall: str, conditions: tuple[Arg, ...]) -> None:
        """``action`` for ``syscall`` when every condition holds (none: always)."""
        nr = _lib.seccomp_syscall_resolve_name(syscall.encode("ascii"))
        if nr < 0:  # NR_SCMP_ERROR, or a syscall of another architecture
            raise OSError(errno.EINVAL, f"seccomp_syscall_resolve_name: no syscall {syscall!r} "
                          f"on this architecture ({nr})")  # fmt: skip
        for c in conditions:  # ctypes would wrap these silently; libseccomp checks the rest
            if not (0 <= c.datum_a < 1 << 64 and 0 <= c.datum_b < 1 << 64):
                raise OSError(errno.EINVAL, f"seccomp rule for {syscall}: {c} is not 64-bit")
        array = (_ArgCmp * len(conditions))(*(_ArgCmp(*c) for c in conditions))
        _check(_lib.seccomp_rule_add_array(self._ctx, action, nr, len(conditions), array),
               f"seccomp_rule_add_array({syscall}, {conditions})")  # fmt: skip

    def load(self) -> None:
        """Install the filter on this process (irreversible)."""
        _check(_lib.seccomp_load(self._ctx), "seccomp_load")
