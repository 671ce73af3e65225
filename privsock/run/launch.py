"""Starting the program of `privsock run` under the bind filter.

The child, between fork and exec, in this order:

1. a new session (setsid): the program is not the terminal's controlling
   process and cannot push input into it (TIOCSTI needs the controlling tty);
   and no terminal fd either: a terminal stdin becomes /dev/null, a terminal
   stdout or stderr a pipe that the supervisor copies to the terminal
   (privsock.run.command.Terminal), so the program can neither read the
   starter's keystrokes nor change the terminal's settings;
2. the privilege drop to USER (root start), or no_new_privs alone (user
   start): no capability in any set, verified from /proc/thread-self/status;
3. PR_SET_PDEATHSIG, *after* the uid change (which resets it), then a check
   that the supervisor is still its parent: a dead supervisor leaves binds
   failing with ENOSYS, so the program should end with it;
4. the filter, whose listener fd goes to the supervisor over a private
   socketpair and is then closed here: the program never holds it;
5. exec, with the command looked up as USER (privsock.execenv.lookup, as
   ``privsock exec`` does: 127 not found, 126 cannot be run, the path named).
   An exec failure is reported to the supervisor over the same socketpair
   (close-on-exec: EOF means the exec succeeded).
"""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from privsock import dropall, execenv
from privsock.helper import caps
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.protocol import received_fds
from privsock.run import kernel

PDEATHSIG = signal.SIGTERM
START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Launched:
    pid: int
    listener: int


def _report(chan: socket.socket, code: int, message: str) -> None:
    try:
        chan.send(b"E%d:%s" % (code, message.encode("utf-8", "replace")[:4000]))
    except OSError:
        pass


def _child(
    chan: socket.socket,
    arch: kernel.Arch,
    command: Sequence[str],
    env: Mapping[str, str],
    target: dropall.Target | None,
    supervisor: int,
    path: str,
    stdio: Mapping[int, int],
) -> None:
    os.setsid()
    for fd, replacement in stdio.items():
        os.dup2(replacement, fd)  # the copy at 0-2 is inheritable
    if target is not None:
        dropall.drop(target)
    else:
        caps.prctl(caps.PR_SET_NO_NEW_PRIVS, 1)
    caps.prctl(caps.PR_SET_PDEATHSIG, PDEATHSIG)
    if os.getppid() != supervisor:
        os._exit(Exit.SOFTWARE)  # the supervisor is already gone
    try:
        listener = kernel.install_filter(arch)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        _report(chan, Exit.UNAVAILABLE, "another seccomp listener already watches this process "
                "(privsock run, LXD's syscall interception, a container's notifier): "
                "privsock run cannot nest under it")  # fmt: skip
        os._exit(Exit.UNAVAILABLE)
    chan.sendmsg([b"L"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [listener]).tobytes())])  # fmt: skip
    os.close(listener)
    # Python ignores these two, and an ignored signal stays ignored across exec.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    # Looked up here, as USER already: the answer is the one the exec gets
    # (127 not found, 126 cannot be run, the path tried named; a Refusal
    # reaches the supervisor through spawn()).
    who = target.user if target is not None else "this user"
    found = execenv.lookup(command[0], path, who)
    try:
        os.execve(found, list(command), dict(env))  # noqa: S606 (argv as given, no shell)
    except OSError as exc:
        refusal = execenv.unexecutable(exc, found, who)
        _report(chan, refusal.exit_code, str(refusal))
        os._exit(refusal.exit_code)


def spawn(
    arch: kernel.Arch,
    command: Sequence[str],
    env: Mapping[str, str],
    target: dropall.Target | None,
    stdio: Mapping[int, int] | None = None,
) -> Launched:
    """Fork and exec the program under the filter, with ``stdio`` (fd ->
    replacement) in place of the supervisor's own stdio; return its pid and
    the listener once the exec has happened. Refusal (the child reaped) if
    any step before the exec failed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    supervisor = os.getpid()
    path = env.get("PATH", os.defpath)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child; its failures reach the parent)
        ours.close()
        try:
            _child(theirs, arch, command, env, target, supervisor, path, stdio or {})
        except Refusal as exc:
            _report(theirs, exc.exit_code, str(exc))
        except BaseException as exc:
            _report(theirs, Exit.OSERR, f"cannot start the command: {exc}")
        os._exit(Exit.OSERR)
    theirs.close()
    with ours:
        ours.settimeout(START_TIMEOUT)
        try:
            listener = _receive_listener(ours)
            _wait_exec(ours)
        except Refusal:
            _reap(pid)
            raise
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
            raise
    return Launched(pid, listener)


def _receive_listener(chan: socket.socket) -> int:
    try:
        data, anc, _flags, _ = chan.recvmsg(4096, socket.CMSG_SPACE(4))
    except TimeoutError:
        raise Refusal(Exit.SOFTWARE, "the command did not start in time") from None
    fds = received_fds(anc)
    if data == b"L" and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    raise _failure(data)


def _wait_exec(chan: socket.socket) -> None:
    try:
        data = chan.recv(4096)
    except TimeoutError:
        raise Refusal(Exit.SOFTWARE, "the command did not start in time") from None
    if data:
        raise _failure(data)


def _failure(data: bytes) -> Refusal:
    if data.startswith(b"E") and b":" in data:
        code, _, message = data[1:].partition(b":")
        if code.isdigit():
            known = int(code) in set(Exit)
            return Refusal(Exit(int(code)) if known else Exit.SOFTWARE,
                           message.decode("utf-8", "replace"))  # fmt: skip
    return Refusal(Exit.SOFTWARE, "the command's start-up ended without a word")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
