"""What a server started by privsock gets besides its sockets: a clean
environment, and a command found and checked as the user it will run as.

Root's environment is none of the server's business: the server gets what
sudo's env_reset and a systemd unit give, a fixed safe PATH, HOME, USER,
LOGNAME and SHELL of the target user, TERM, LANG and LC_* from the caller, and
only what the operator adds by name (``--keep-env KEY``, ``--setenv KEY=VALUE``).

The command is looked up with that PATH, in a child process that has dropped
to the target user first (privsock.dropall), so that the answer is the one the
kernel will give the server: a file root can run but the user cannot is
refused before anything starts, and the error names the path that was tried.

General on purpose: everything takes the target user and the argv, so that any
launcher (``privsock exec``, a supervisor) can use it.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import pwd
import re
import stat
from collections.abc import Iterable, Mapping, Sequence

from privsock import dropall
from privsock.helper.exitcodes import Exit, Refusal

# systemd's PATH for services, and Debian sudo's secure_path.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Passed from the caller unless told otherwise: the terminal type and the locale.
_KEPT = ("TERM", "LANG")
_KEPT_PREFIX = "LC_"
# Set by the launcher itself (socket activation); nobody may override them.
RESERVED = frozenset({"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_env_name(name: str) -> str:
    """A variable name the operator may pass on: letters, digits and '_', not
    starting with a digit, and none of the socket-activation variables.
    ValueError with the reason otherwise."""
    if not _NAME.match(name):
        raise ValueError(
            f"{name!r} is not a variable name (letters, digits and '_', not starting with a digit)"
        )
    if name in RESERVED:
        raise ValueError(f"{name} is set by privsock itself (socket activation)")
    return name


def parse_setenv(spec: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may be empty and may hold '='); ValueError otherwise."""
    name, sep, value = spec.partition("=")
    if not sep:
        raise ValueError(f"{spec!r}: expected KEY=VALUE")
    return check_env_name(name), value


def clean_environment(
    target: dropall.Target,
    inherited: Mapping[str, str],
    *,
    keep: Iterable[str] = (),
    setenv: Iterable[tuple[str, str]] = (),
) -> dict[str, str]:
    """The server's environment: the safe defaults for ``target``, then the
    ``keep`` names that ``inherited`` has, then ``setenv`` (which wins). The
    socket-activation variables are the caller's to add."""
    env = {
        "PATH": SAFE_PATH,
        "HOME": target.home,
        "USER": target.user,
        "LOGNAME": target.user,
        "SHELL": target.shell,
    }
    for name, value in inherited.items():
        if name in _KEPT or name.startswith(_KEPT_PREFIX):
            env[name] = value
    for name in keep:
        if name in inherited:
            env[check_env_name(name)] = inherited[name]
    for name, value in setenv:
        env[check_env_name(name)] = value
    return env


def refuse_helper_identity(target: dropall.Target, helper_user: str, helper_group: str) -> None:
    """A server must not run as the helper's user or group: a process of that
    uid can kill, stop or starve (the kernel's per-user count of fds in
    flight) every helper of that user, whoever's boss started it."""
    try:
        uid = pwd.getpwnam(helper_user).pw_uid
    except KeyError:
        uid = None  # the helper will refuse to start, and say why
    try:
        gid = grp.getgrnam(helper_group).gr_gid
    except KeyError:
        gid = None
    if target.uid == uid:
        raise Refusal(
            Exit.USAGE,
            f"refusing to run the command as {target.user}, the policy's helper user: "
            "anything running as it can stall or kill every helper; give the server "
            "a user of its own",
        )
    if gid is not None and (target.gid == gid or gid in target.groups):
        raise Refusal(
            Exit.USAGE,
            f"refusing to run the command with group {helper_group}, the policy's helper "
            "group; give the server a group of its own",
        )


def _candidates(name: str, search_path: str) -> list[str]:
    if "/" in name:
        return [name]
    # Empty and relative PATH entries would mean "wherever the server starts":
    # skipped, as sudo's secure path would not have them either.
    return [os.path.join(d, name) for d in search_path.split(":") if d.startswith("/")]


def _judge(path: str, user: str) -> tuple[Exit, str] | None:
    """None if ``path`` is a file this process may execute, else why not."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return Exit.NOT_FOUND, f"{path}: no such file"
    except PermissionError:
        return Exit.CANNOT_EXECUTE, (
            f"{path}: permission denied for {user} (a directory on the way is not searchable)"
        )
    except OSError as exc:
        return Exit.CANNOT_EXECUTE, f"{path}: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return Exit.CANNOT_EXECUTE, f"{path}: is a directory"
    if not stat.S_ISREG(st.st_mode):
        return Exit.CANNOT_EXECUTE, f"{path}: not a regular file"
    if not os.access(path, os.X_OK):
        return Exit.CANNOT_EXECUTE, f"{path}: not executable by {user}"
    return None


def lookup(name: str, search_path: str, user: str) -> str:
    """Find ``name`` as execvp does, judged by this process's own credentials:
    the first executable candidate, else the first candidate that exists but
    cannot be run (126), else not found (127). Returns an absolute path."""
    if not name:
        raise Refusal(Exit.NOT_FOUND, "command not found: ''")
    refused: tuple[Exit, str] | None = None
    for path in _candidates(name, search_path):
        problem = _judge(path, user)
        if problem is None:
            return os.path.abspath(path)
        if problem[0] != Exit.NOT_FOUND and refused is None:
            refused = problem
        if "/" in name:
            refused = refused or problem
    if refused is not None:
        raise Refusal(*refused)
    raise Refusal(Exit.NOT_FOUND, f"command not found: {name!r} (searched PATH {search_path})")


def check_directory(user: str, chdir: str | None) -> None:
    """The directory the server will start in must be open to ``user`` by its
    path: ``chdir`` if given (it must be absolute), else the current one. A
    current directory under a directory the user may not enter would otherwise
    be a way in. Changes into ``chdir``."""
    if chdir is not None:
        if not chdir.startswith("/"):
            raise Refusal(Exit.USAGE, f"--chdir {chdir}: give an absolute path")
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise Refusal(
                Exit.NOINPUT, f"--chdir {chdir}: {exc.strerror} (as {user})"
            ) from None
        return
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise Refusal(
            Exit.NOINPUT, f"the current directory is gone ({exc.strerror}); give --chdir DIR"
        ) from None
    try:
        by_path, here = os.stat(cwd), os.stat(".")
        reachable = (by_path.st_dev, by_path.st_ino) == (here.st_dev, here.st_ino)
    except OSError:
        reachable = False
    if not reachable:
        raise Refusal(
            Exit.NOINPUT,
            f"the current directory {cwd} is not open to {user}; "
            "start from another directory or give --chdir DIR",
        )


def find_command(
    target: dropall.Target,
    argv: Sequence[str],
    *,
    search_path: str,
    chdir: str | None = None,
    stay: bool = False,
) -> str:
    """Resolve ``argv[0]`` with ``search_path`` and check it, and the starting
    directory (``chdir`` or the current one), as ``target`` would: in a child
    that drops to ``target`` first (``stay``: this process already runs as
    target, and the child only sheds what it may hold, dropall.seal). Returns
    the command's absolute path, or raises Refusal (127 not found, 126 cannot
    be run, 66 directory). Run before any socket is taken."""
    if not argv:
        raise Refusal(Exit.USAGE, "no command given (put it after --)")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it reports through the pipe and never returns
        os.close(rfd)
        code, message = 0, ""
        try:
            if stay:
                dropall.seal(target)
            else:
                dropall.drop(target)
            check_directory(target.user, chdir)
            message = lookup(argv[0], search_path, target.user)
        except Refusal as exc:
            code, message = exc.exit_code, str(exc)
        except BaseException as exc:  # reported: never raised in the fork
            code, message = Exit.SOFTWARE, f"checking the command failed: {exc!r}"
        try:
            os.write(wfd, json.dumps([code, message]).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    try:
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    try:
        code, message = json.loads(b"".join(chunks))
    except ValueError:
        raise Refusal(
            Exit.SOFTWARE,
            f"checking the command as {target.user} failed "
            f"(exit status {os.waitstatus_to_exitcode(status)})",
        ) from None
    if code:
        raise Refusal(Exit(code), message)
    return str(message)


def unexecutable(exc: OSError, path: str, user: str) -> Refusal:
    """The error for an execve that failed after all (the file changed since
    find_command)."""
    code = Exit.NOT_FOUND if exc.errno == errno.ENOENT else Exit.CANNOT_EXECUTE
    return Refusal(code, f"cannot run {path} as {user}: {exc.strerror}")
