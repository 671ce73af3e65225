"""Read the policy file, refusing one that anyone but root could have changed.

Like sshd's StrictModes. ``load_policy(path)``:

1. resolves ``path`` with os.path.realpath, so symlinks are followed first and the
   checks below apply to the real file and the directories above it. The symlinks
   themselves and the directories they live in are not checked: point the helper at
   a path whose symlinks (if any) are in root-only directories;
2. opens the real path with O_NOFOLLOW (a symlink swapped in since step 1 fails to
   open) and O_NONBLOCK (a FIFO must not block the open);
3. checks the open descriptor with fstat, so the file checked is the file read: it
   must be a regular file, owned by uid 0, and not writable by group or others;
4. checks every directory above it, up to /: owned by uid 0 and not writable by
   group or others, except that a root-owned sticky directory (like /tmp, mode 1777)
   is accepted, since there nobody but root can rename or remove root's entries.
   Together with step 3 this means only root can change what the path names;
5. reads at most 64 KiB, decodes strict UTF-8 and parses it (privsock.helper.policy).

Every failure is a PolicyFileError with a one-line message naming the real path and
an exit code: NOINPUT when the file cannot be opened or read or is not a regular
file, CONFIG when it or a directory above it is insecure, DATAERR when it is too
large, not UTF-8, or not a valid policy (the PolicyError's own line).
"""

from __future__ import annotations

import json
import os
import stat

from privsock.helper.exitcodes import Exit
from privsock.helper.policy import Policy
from privsock.helper.policyparse import PolicyError, parse_policy

MAX_POLICY_BYTES = 64 * 1024

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_FILE_RULE = "it must be owned by root and writable only by root"
_DIRECTORY_RULE = (
    "every directory above the policy must be owned by root and writable only by root "
    "(or sticky, like /tmp)"
)


class PolicyFileError(Exception):
    """The policy file cannot be used. ``str(e)`` is one line; ``exit_code`` says why."""

    def __init__(self, message: str, exit_code: Exit) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def load_policy(path: str) -> Policy:
    """Read, check and parse the policy at ``path``; raises PolicyFileError only."""
    real = os.path.realpath(path)
    shown = _shown(real)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as e:
        raise PolicyFileError(f"{shown}: cannot open: {e.strerror}", Exit.NOINPUT) from None
    try:
        _check_file(shown, os.fstat(fd))
        _check_directories(real)
        data = _read(fd, shown)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise PolicyFileError(
            f"{shown} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})",
            Exit.DATAERR,
        ) from None
    try:
        return parse_policy(text, real)
    except PolicyError as e:
        raise PolicyFileError(str(e), Exit.DATAERR) from None


def _check_file(shown: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise PolicyFileError(
            f"{shown} is {_file_type(st.st_mode)}, not a regular file", Exit.NOINPUT
        )
    if st.st_uid != 0:
        raise PolicyFileError(f"{shown} is owned by uid {st.st_uid}; {_FILE_RULE}", Exit.CONFIG)
    writers = _writers(st.st_mode)
    if writers:
        raise PolicyFileError(
            f"{shown} is writable by {writers} (mode {stat.S_IMODE(st.st_mode):04o}); {_FILE_RULE}",
            Exit.CONFIG,
        )


def _check_directories(real: str) -> None:
    directory = real
    while directory != "/":
        directory = os.path.dirname(directory)
        shown = _shown(directory)
        try:
            st = os.lstat(directory)
        except OSError as e:
            raise PolicyFileError(f"{shown}: cannot check: {e.strerror}", Exit.NOINPUT) from None
        if not stat.S_ISDIR(st.st_mode):
            # realpath saw a directory here; something replaced it since.
            raise PolicyFileError(f"{shown} is no longer a directory", Exit.CONFIG)
        if st.st_uid != 0:
            raise PolicyFileError(
                f"{shown} is owned by uid {st.st_uid}; {_DIRECTORY_RULE}", Exit.CONFIG
            )
        writers = _writers(st.st_mode)
        if writers and not st.st_mode & stat.S_ISVTX:
            raise PolicyFileError(
                f"{shown} is writable by {writers} (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"{_DIRECTORY_RULE}",
                Exit.CONFIG,
            )


def _read(fd: int, shown: str) -> bytes:
    # Read one byte past the cap, so a file that is too large (or grows) is noticed.
    data = b""
    while len(data) <= MAX_POLICY_BYTES:
        try:
            chunk = os.read(fd, MAX_POLICY_BYTES + 1 - len(data))
        except OSError as e:
            raise PolicyFileError(f"{shown}: cannot read: {e.strerror}", Exit.NOINPUT) from None
        if not chunk:
            return data
        data += chunk
    raise PolicyFileError(
        f"{shown} is larger than {MAX_POLICY_BYTES} bytes, the most a policy may be",
        Exit.DATAERR,
    )


def _writers(mode: int) -> str:
    """ "group", "others", "group and others", or "" when only the owner may write."""
    return " and ".join(
        n for bit, n in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit
    )


def _file_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket"


def _shown(path: str) -> str:
    # A path may hold any byte but NUL and /; keep the message on one line.
    return path if path.isprintable() else json.dumps(path)
