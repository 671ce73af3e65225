"""The raw kernel interface `privsock run` needs, and nothing else: a seccomp
filter that hands bind() to a supervisor, the user-notification ioctls,
pidfd_open/pidfd_getfd and process_vm_readv.

libseccomp 2.5.4 has neither SECCOMP_IOCTL_NOTIF_ADDFD nor
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, and hands out the notification fd
only through the filter context that loaded the filter, in the same process.
So the filter is a hand-built six-instruction BPF program and the rest are
raw syscalls and ioctls. Every constant names where it comes from; the
headers are the kernel's uapi (include/uapi/linux/seccomp.h, filter.h,
bpf_common.h, audit.h) and the syscall tables.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

# include/uapi/linux/prctl.h: run's own prctl options (the call, and the options
# the helper shares, PR_SET_PDEATHSIG and PR_SET_DUMPABLE, are in caps)
PR_GET_DUMPABLE = 3
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# -- syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl,
#    include/uapi/asm-generic/unistd.h for arm64) -----------------------------


@dataclass(frozen=True, slots=True)
class Arch:
    audit_arch: int  # include/uapi/linux/audit.h AUDIT_ARCH_*
    nr_bind: int
    nr_seccomp: int


ARCHES = {
    "x86_64": Arch(audit_arch=0xC000003E, nr_bind=49, nr_seccomp=317),
    "aarch64": Arch(audit_arch=0xC00000B7, nr_bind=200, nr_seccomp=277),
}
NR_PIDFD_OPEN = 434  # the same on every architecture (asm-generic, syscall_64.tbl)
NR_PIDFD_GETFD = 438

# -- include/uapi/linux/seccomp.h -------------------------------------------
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3  # Linux 5.0
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5  # Linux 5.19
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0  # Linux 5.5
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0  # Linux 5.9
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1 << 0  # Linux 6.6

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
NOTIF = struct.Struct("=QIIiIQ6Q")  # 80 bytes
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
RESP = struct.Struct("=QqiI")  # 24 bytes
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
ADDFD = struct.Struct("=QIIII")  # 24 bytes


def _ioc(direction: int, nr: int, size: int) -> int:
    # include/uapi/asm-generic/ioctl.h: dir<<30 | size<<16 | type<<8 | nr; SECCOMP_IOC_MAGIC '!'
    return direction << 30 | size << 16 | ord("!") << 8 | nr


_IOC_WRITE, _IOC_READ = 1, 2
IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, NOTIF.size)
IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, RESP.size)
IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)
IOCTL_NOTIF_ADDFD = _ioc(_IOC_WRITE, 3, ADDFD.size)
IOCTL_NOTIF_SET_FLAGS = _ioc(_IOC_WRITE, 4, 8)

# -- include/uapi/linux/bpf_common.h, filter.h --------------------------------
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_OFF_NR, _OFF_ARCH = 0, 4  # offsetof(struct seccomp_data, nr / arch)


class KernelTooOld(Exception):
    """The kernel lacks something `privsock run` needs; the message says what."""


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    )  # fmt: skip


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter)))


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


def arch() -> Arch:
    machine = platform.machine()
    try:
        return ARCHES[machine]
    except KeyError:
        raise KernelTooOld(f"privsock run supports {', '.join(ARCHES)}, not {machine}") from None


def bind_filter(a: Arch) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) for: bind() of this architecture goes to the
    supervisor; every other syscall, and any call through another ABI, is
    allowed. The filter adds no security of its own (the program holds no
    privilege, so whatever it binds itself it binds unprivileged); it only
    routes bind() to the supervisor. The architecture check is what keeps a
    foreign ABI's syscall 49 from being taken for bind()."""
    return [
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_BPF_JEQ_K, 0, 3, a.audit_arch),  # another ABI: allow
        (_BPF_LD_W_ABS, 0, 0, _OFF_NR),
        (_BPF_JEQ_K, 0, 1, a.nr_bind),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


def _syscall(nr: int, *args: int | ctypes.c_void_p | None) -> int:
    ret = int(_libc.syscall(ctypes.c_long(nr), *[
        ctypes.c_long(a) if isinstance(a, int) else a for a in args
    ]))  # fmt: skip
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def install_filter(a: Arch) -> int:
    """Load the bind filter on the calling thread (no_new_privs must be set)
    and return the listener fd (close-on-exec). Every child and exec'd program
    inherits the filter and nobody can remove it."""
    insns = bind_filter(a)
    arr = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    prog = _SockFprog(len(insns), arr)
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    return _syscall(a.nr_seccomp, SECCOMP_SET_MODE_FILTER, flags,
                    ctypes.c_void_p(ctypes.addressof(prog)))  # fmt: skip


def probe(a: Arch) -> None:
    """Refuse, naming the missing piece, a kernel that cannot do what
    `privsock run` needs. Each probe makes the call in a form that fails
    harmlessly once the kernel has validated the part in question."""
    # SECCOMP_RET_USER_NOTIF (5.0)
    action = ctypes.c_uint32(SECCOMP_RET_USER_NOTIF)
    try:
        _syscall(a.nr_seccomp, SECCOMP_GET_ACTION_AVAIL, 0,
                 ctypes.c_void_p(ctypes.addressof(action)))  # fmt: skip
    except OSError as exc:
        raise KernelTooOld(
            f"the kernel has no seccomp user notification (SECCOMP_RET_USER_NOTIF, "
            f"Linux 5.0): {exc.strerror}"
        ) from None
    # The flags are checked before the program is copied: EFAULT for a NULL
    # program means both are known, EINVAL that one is not (WAIT_KILLABLE_RECV, 5.19).
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    try:
        _syscall(a.nr_seccomp, SECCOMP_SET_MODE_FILTER, flags, None)
    except OSError as exc:
        if exc.errno != errno.EFAULT:
            raise KernelTooOld(
                "the kernel lacks SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (Linux 5.19): without "
                "it a signal turns an intercepted bind() into EINTR or a retry loop"
            ) from None
    sizes = (ctypes.c_uint16 * 3)()
    _syscall(a.nr_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.c_void_p(ctypes.addressof(sizes)))
    if sizes[0] < NOTIF.size or sizes[1] < RESP.size:
        raise KernelTooOld(f"unexpected seccomp notification sizes {list(sizes)}")
    # pidfd_open (5.3) and pidfd_getfd (5.6), on ourselves.
    try:
        pidfd = pidfd_open(os.getpid())
    except OSError as exc:
        raise KernelTooOld(f"pidfd_open (Linux 5.3) failed: {exc.strerror}") from None
    try:
        os.close(pidfd_getfd(pidfd, 0))
    except OSError as exc:
        raise KernelTooOld(f"pidfd_getfd (Linux 5.6) failed: {exc.strerror}") from None
    finally:
        os.close(pidfd)


def pidfd_open(pid: int) -> int:
    return _syscall(NR_PIDFD_OPEN, pid, 0)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A copy of another process's fd (close-on-exec); needs ptrace access."""
    return _syscall(NR_PIDFD_GETFD, pidfd, targetfd, 0)


def read_memory(pid: int, address: int, length: int) -> bytes:
    """Up to `length` bytes at `address` in process (or thread) `pid`."""
    buf = ctypes.create_string_buffer(length)
    local = _Iovec(ctypes.addressof(buf), length)
    remote = _Iovec(address, length)
    n = int(_libc.process_vm_readv(
        ctypes.c_int(pid), ctypes.byref(local), ctypes.c_ulong(1),
        ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0),
    ))  # fmt: skip
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[:n]


# -- the listener ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    pid: int  # the calling thread's id, in the supervisor's pid namespace
    nr: int
    arch: int
    args: tuple[int, int, int, int, int, int]


def recv(listener: int) -> Notification:
    buf = bytearray(NOTIF.size)  # the kernel wants it zeroed
    fcntl.ioctl(listener, IOCTL_NOTIF_RECV, buf, True)
    nid, pid, _flags, nr, arch_, _ip, *args = NOTIF.unpack(buf)
    return Notification(nid, pid, nr, arch_, tuple(args))


def id_valid(listener: int, nid: int) -> bool:
    """Is the notification still pending: the thread alive and in that very
    syscall? False once it died or was interrupted, and so its pid may be reused."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_ID_VALID, bytearray(struct.pack("=Q", nid)), True)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def send(listener: int, nid: int, *, val: int = 0, error: int = 0, flags: int = 0) -> None:
    """Answer a notification: the syscall returns `val`, or fails with `error`
    (a negative errno), or with flags=CONTINUE the kernel runs it itself.
    OSError(ENOENT) if the caller is gone or was interrupted."""
    fcntl.ioctl(listener, IOCTL_NOTIF_SEND, bytearray(RESP.pack(nid, val, error, flags)), True)


def addfd_setfd(listener: int, nid: int, srcfd: int, newfd: int, cloexec: bool) -> None:
    """Put our `srcfd` at the caller's fd number `newfd`, replacing what was
    there, atomically (SETFD). The syscall is answered separately, by send()."""
    newfd_flags = os.O_CLOEXEC if cloexec else 0
    req = bytearray(ADDFD.pack(nid, SECCOMP_ADDFD_FLAG_SETFD, srcfd, newfd, newfd_flags))
    fcntl.ioctl(listener, IOCTL_NOTIF_ADDFD, req, True)


def sync_wake_up(listener: int) -> bool:
    """Ask the kernel to wake the supervisor and the caller on the same CPU
    (6.6); a cheaper round trip, optional. False if not supported."""
    try:
        fcntl.ioctl(listener, IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True
