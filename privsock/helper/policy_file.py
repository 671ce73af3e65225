"""Read the policy file, refusing one that anyone but root could have changed.

Like sshd's StrictModes. ``load_policy(path)`` walks the path itself, one
component at a time from ``/`` (a relative path from the working directory,
which the kernel reports without symlinks), so that every check applies to what
is then opened and no check-then-open race is left:

1. every directory on the way is opened with O_PATH | O_NOFOLLOW relative to the
   one before, and checked with fstat on that descriptor: owned by uid 0 and not
   writable by group or others, except that a root-owned sticky directory (like
   /tmp, mode 1777) is accepted, since there nobody but root can rename or remove
   root's entries. ``..`` goes back to the directory the walk came from;
2. a symlink met on the way is opened with O_PATH | O_NOFOLLOW, checked with
   fstat and read with readlinkat on that descriptor: it must be owned by uid 0,
   so no other user can have planted it (not even in a sticky directory, where
   the kernel's fs.protected_symlinks would refuse root to follow it). Its target
   is walked the same way, at most 40 symlinks in all (the kernel's limit);
3. the file is opened relative to its checked directory with O_NOFOLLOW and
   O_NONBLOCK (a FIFO must not block the open), and checked with fstat on that
   descriptor, so the file checked is the file read: a regular file, owned by
   uid 0, and not writable by group or others;
4. it reads at most 64 KiB, decodes strict UTF-8 and parses it (privsock.helper.policy);
5. it resolves the user and group names of its rules to ids (privsock.helper.peernames).

Together this means only root can change what the path names. Every failure is a
Refusal (privsock.helper.exitcodes) with a one-line message naming the path as walked (symlinks
replaced by their targets) and an exit code: NOINPUT when something cannot be
opened or read or the file is not a regular file, CONFIG when it, a symlink or a
directory on the way is insecure, DATAERR when it is too large, not UTF-8, or not
a valid policy (the PolicyError's own line), NOUSER when a rule names a user or
group that does not exist.
"""

from __future__ import annotations

import errno
import os
import stat

from privsock.helper import jsontext, peernames
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.policy import Policy
from privsock.helper.policyparse import PolicyError, parse_policy

MAX_POLICY_BYTES = 64 * 1024
MAX_SYMLINKS = 40  # the kernel's own limit on symlinks in one path walk

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_RULE = "it must be owned by root and writable only by root"
_DIRECTORY_RULE = (
    "every directory above the policy must be owned by root and writable only by root "
    "(or sticky, like /tmp)"
)
_SYMLINK_RULE = "a symlink on the way to the policy must be owned by root"


def load_policy(path: str) -> Policy:
    """Read, check and parse the policy at ``path``; raises Refusal only."""
    fd, walked = _open_checked(path)
    shown = _shown(walked)
    try:
        _check_file(shown, os.fstat(fd))
        data = _read(fd, shown)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise Refusal(
            Exit.DATAERR,
            f"{shown} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})",
        ) from None
    try:
        policy = parse_policy(text, walked)
    except PolicyError as e:
        raise Refusal(Exit.DATAERR, str(e)) from None
    try:
        return peernames.resolve(policy, walked)
    except PolicyError as e:
        raise Refusal(Exit.NOUSER, str(e)) from None


def _open_checked(path: str) -> tuple[int, str]:
    """Walk ``path`` from / as described above; the open file and the path walked."""
    if not path:
        raise Refusal(Exit.NOINPUT, "the policy path is empty")
    if not path.startswith("/"):
        try:
            path = os.getcwd() + "/" + path
        except OSError as exc:  # the current directory was removed
            raise Refusal(Exit.NOINPUT, f"{path}: a relative path, but the current directory "
                          f"is gone ({exc.strerror}); give an absolute path") from None  # fmt: skip
    walk = _Walk(path)
    try:
        return walk.run()
    finally:
        walk.close()


class _Walk:
    """The state of one walk: the components still to go (last first) and the
    checked directories walked so far, each (descriptor, path walked)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.todo = _components(path)
        self.stack = [(_open_directory(None, "/", "/"), "/")]
        self.symlinks = 0

    def run(self) -> tuple[int, str]:
        if not self.todo or self.todo[0] == ".." or self.path.endswith(("/", "/.")):
            raise Refusal(
                Exit.NOINPUT,
                f"{_shown(self.path)} names a directory, not a regular file",
            )
        while True:
            name = self.todo.pop()
            fd, where = self.stack[-1]
            here = where.rstrip("/") + "/" + name
            if name == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
                continue
            if not self.todo:
                try:
                    return os.open(name, _OPEN_FLAGS, dir_fd=fd), here
                except OSError as e:
                    if e.errno != errno.ELOOP:  # ELOOP: a symlink, followed below
                        raise _cannot("open", here, e) from None
            self._enter(fd, name, here)

    def _enter(self, dir_fd: int, name: str, here: str) -> None:
        """Go into directory ``name``, or follow it if it is a symlink."""
        last = not self.todo
        fd = _open_path(dir_fd, name, here)
        try:
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                target = self._symlink(fd, st, here)
            elif last:
                # It was a symlink when the open above failed; it was replaced since.
                raise Refusal(Exit.CONFIG, f"{_shown(here)} changed while it was opened")
            elif stat.S_ISDIR(st.st_mode):
                _check_directory(here, st)
                self.stack.append((fd, here))
                fd = -1  # the stack owns it now
                return
            else:
                raise Refusal(Exit.NOINPUT, f"{_shown(here)} is not a directory")
        finally:
            if fd >= 0:
                os.close(fd)
        parts = _components(target)
        names_directory = not parts or parts[0] == ".." or target.endswith(("/", "/."))
        if not target or (last and names_directory):
            raise Refusal(Exit.NOINPUT, f"{_shown(here)} -> {_shown(target)} does not name a file")
        self.todo += parts
        if target.startswith("/"):
            while len(self.stack) > 1:
                os.close(self.stack.pop()[0])

    def _symlink(self, fd: int, st: os.stat_result, here: str) -> str:
        """The target of the symlink open at ``fd``, if it may be followed."""
        self.symlinks += 1
        if self.symlinks > MAX_SYMLINKS:
            raise Refusal(
                Exit.NOINPUT,
                f"{_shown(self.path)}: more than {MAX_SYMLINKS} symlinks on the way",
            )
        if st.st_uid != 0:
            raise Refusal(
                Exit.CONFIG,
                f"{_shown(here)} is a symlink owned by uid {st.st_uid}; {_SYMLINK_RULE}",
            )
        try:
            return os.readlink("", dir_fd=fd)  # readlinkat on the descriptor checked
        except OSError as e:
            raise _cannot("read the symlink", here, e) from None

    def close(self) -> None:
        for fd, _ in self.stack:
            os.close(fd)
        self.stack.clear()


def _components(path: str) -> list[str]:
    """The names in ``path``, last first (so that pop() gives the next one)."""
    return [c for c in reversed(path.split("/")) if c not in ("", ".")]


def _open_directory(dir_fd: int | None, name: str, shown: str) -> int:
    fd = _open_path(dir_fd, name, shown)
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise Refusal(Exit.NOINPUT, f"{_shown(shown)} is not a directory")
        _check_directory(shown, st)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_path(dir_fd: int | None, name: str, shown: str) -> int:
    try:
        return os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise _cannot("open", shown, e) from None


def _cannot(what: str, shown: str, e: OSError) -> Refusal:
    return Refusal(Exit.NOINPUT, f"{_shown(shown)}: cannot {what}: {e.strerror}")


def _check_file(shown: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Refusal(Exit.NOINPUT, f"{shown} is {_file_type(st.st_mode)}, not a regular file")
    if st.st_uid != 0:
        raise Refusal(Exit.CONFIG, f"{shown} is owned by uid {st.st_uid}; {_FILE_RULE}")
    writers = _writers(st.st_mode)
    if writers:
        raise Refusal(
            Exit.CONFIG,
            f"{shown} is writable by {writers} (mode {stat.S_IMODE(st.st_mode):04o}); {_FILE_RULE}",
        )


def _check_directory(directory: str, st: os.stat_result) -> None:
    shown = _shown(directory)
    if st.st_uid != 0:
        raise Refusal(Exit.CONFIG, f"{shown} is owned by uid {st.st_uid}; {_DIRECTORY_RULE}")
    writers = _writers(st.st_mode)
    if writers and not st.st_mode & stat.S_ISVTX:
        raise Refusal(
            Exit.CONFIG,
            f"{shown} is writable by {writers} (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"{_DIRECTORY_RULE}",
        )


def _read(fd: int, shown: str) -> bytes:
    # Read one byte past the cap, so a file that is too large (or grows) is noticed.
    data = b""
    while len(data) <= MAX_POLICY_BYTES:
        try:
            chunk = os.read(fd, MAX_POLICY_BYTES + 1 - len(data))
        except OSError as e:
            raise Refusal(Exit.NOINPUT, f"{shown}: cannot read: {e.strerror}") from None
        if not chunk:
            return data
        data += chunk
    raise Refusal(
        Exit.DATAERR,
        f"{shown} is larger than {MAX_POLICY_BYTES} bytes, the most a policy may be",
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
    return path if path.isprintable() else jsontext.string(path)
