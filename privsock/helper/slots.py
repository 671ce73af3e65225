"""Connection slots per user: at most ``per_user`` helpers at once for one peer uid.

A socket-activated helper serves one connection, and systemd's MaxConnections=
bounds them all together; without a bound per user, one user could hold every
slot (systemd 252's MaxConnectionsPerSource= does not apply to AF_UNIX). So the
helper takes one of ``per_user`` lock files for its peer's uid, ``UID.0`` ..
``UID.N-1`` in the policy's ``lock_dir``, with flock(LOCK_EX | LOCK_NB), before the
filter, and holds it until it exits: the kernel releases the lock with the
process, however it ends. None free means the user already has ``per_user``
helpers: the helper refuses to serve (exit 75, TEMPFAIL), before any request.

The directory must belong to the helper's user (or root) and be writable by
nobody else, or another user could take or swap the lock files; the files are
opened with O_NOFOLLOW relative to that directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from privsock.helper.exitcodes import Exit, Refusal

# Where the held slot lives while serving: above RLIMIT_NOFILE (8), like the
# status fd (9), so it never takes a number a granted socket would get.
SLOT_FD = 8


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


def take(lock_dir: str, uid: int, per_user: int) -> int:
    """Lock one of ``uid``'s slots; returns the fd that holds it. Refusal if the
    directory is unsafe or every slot is taken."""
    try:
        dfd = os.open(lock_dir, _DIR_FLAGS)
    except OSError as exc:
        raise Refusal(Exit.CONFIG, f"connections.lock_dir {lock_dir}: {exc.strerror}") from None
    try:
        st = os.fstat(dfd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise Refusal(
                Exit.CONFIG,
                f"connections.lock_dir {lock_dir} must belong to the helper's user or root "
                f"and be writable by nobody else (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o})",
            )
        for slot in range(per_user):
            try:
                fd = os.open(f"{uid}.{slot}", _FILE_FLAGS, 0o600, dir_fd=dfd)
            except OSError as exc:
                raise Refusal(
                    Exit.OSERR, f"connections.lock_dir {lock_dir}/{uid}.{slot}: {exc.strerror}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise Refusal(Exit.OSERR, f"flock on a connection slot: {exc.strerror}") from None
            return fd
    finally:
        os.close(dfd)
    raise Refusal(
        Exit.TEMPFAIL,
        f"uid {uid} already holds all {per_user} of its connections (connections.per_user)",
    )
