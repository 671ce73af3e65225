"""The boss side's exceptions: one type per reply status, plus helper failures."""

from __future__ import annotations

import errno as errno_mod
import os
import signal

from privsock.helper.exitcodes import Exit
from privsock.helper.protocol import Reason, Stage

# What each code privsock-helper exits with means, for the lines the CLI and the
# library print (the helper itself prints its own reason, never these).
DESCRIPTIONS: dict[Exit, str] = {
    Exit.OK: "clean exit (the boss closed the channel)",
    Exit.USAGE: "bad command line",
    Exit.DATAERR: "the policy file is invalid",
    Exit.NOINPUT: "the policy file cannot be read",
    Exit.NOUSER: "a user or group the policy names does not exist",
    Exit.SOFTWARE: "unexpected internal error while serving",
    Exit.OSERR: "a hardening step failed or could not be verified",
    Exit.NOLANDLOCK: (
        "the policy requires Landlock (require_landlock, the default) and the kernel "
        "offers none"
    ),
    Exit.TEMPFAIL: (
        "a shared helper's peer already holds all its connections ([connections] per_user)"
    ),
    Exit.PROTOCOL: "fd 0 is not a SOCK_SEQPACKET socket",
    Exit.NOPERM: "missing privilege: run as root or give CAP_NET_BIND_SERVICE",
    Exit.CONFIG: (
        "configuration: the policy file is insecure (owner or permissions), names root, "
        "or the helper was started as another user than the policy's"
    ),
}
# The codes privsock-helper itself exits with (each has its line above); the
# others are the CLI's.
HELPER_EXITS = frozenset(DESCRIPTIONS)


class CreatorError(Exception):
    """Base of every error privsock raises to its caller."""


class InvalidArgument(CreatorError, ValueError):
    """An argument of the caller has the wrong type or value (port "53",
    port 0, an integer address, ...); nothing was sent to the helper."""


class PolicyDenied(CreatorError):
    def __init__(self, reason: Reason, what: str = "") -> None:
        super().__init__(f"{what + ': ' if what else ''}denied by policy ({reason.name.lower()})")
        self.reason = reason


class RateLimited(CreatorError):
    def __init__(self, retry_after: float, what: str = "") -> None:
        super().__init__(f"{what + ': ' if what else ''}rate limited, retry in {retry_after:.3f}s")
        self.retry_after = retry_after  # seconds


class MalformedRequest(CreatorError):
    """The helper called our request malformed: a bug on this side."""


class CreatorOSError(CreatorError):
    def __init__(self, errno: int, stage: Stage, what: str = "") -> None:
        name = errno_mod.errorcode.get(errno, str(errno))
        super().__init__(
            f"{what + ': ' if what else ''}{stage.name.lower()} failed: "
            f"{name} ({os.strerror(errno)})"
        )
        self.errno = errno
        self.stage = stage


class ProtocolViolation(CreatorError):
    """The helper broke the protocol; it is killed and not trusted further."""


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGSYS:
            return (
                "killed by SIGSYS: the seccomp filter killed it for a forbidden syscall "
                "(look for 'audit type=1326' in the kernel log: dmesg or journalctl -k)"
            )
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    if returncode in HELPER_EXITS:
        return f"exit {returncode}: {DESCRIPTIONS[Exit(returncode)]}"
    return f"exit {returncode}"


def _status(returncode: int | None, detail: str) -> str:
    """How the helper ended, for a message that may go on with its own words
    (``detail``): an exit code's stock description only when there are none,
    so nothing is said twice."""
    if detail and returncode is not None and returncode > 0:
        return f"exit {returncode}"
    return describe_exit(returncode)


class HelperDied(CreatorError):
    def __init__(self, returncode: int | None, detail: str = "") -> None:
        msg = f"privsock helper died ({_status(returncode, detail)})"
        super().__init__(msg + (f": {detail}" if detail else ""))
        self.returncode = returncode
        self.detail = detail

    @property
    def killed_by_seccomp(self) -> bool:
        return self.returncode == -signal.SIGSYS


class HelperStartError(HelperDied):
    """The helper refused to start (bad policy, no privilege, ...) or could not
    be reached; ``detail`` holds its own one-line message."""

    def __init__(self, returncode: int | None, detail: str = "") -> None:
        super().__init__(returncode, detail)
        status = "" if returncode is None else f" ({_status(returncode, detail)})"
        self.args = (f"privsock helper did not start{status}" + (f": {detail}" if detail else ""),)


class HelperUnreachable(HelperStartError):
    """A socket-activated helper (SocketCreator(connect=)) could not be
    reached or hung up before answering: the service is unavailable."""


class HelperRestartLimit(HelperDied):
    """The helper kept dying; the boss stopped restarting it."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, detail)


class HelperCannotRestart(HelperDied):
    """The helper is gone and this process cannot start another: it holds no
    privilege any more (``privsock.drop_privileges``). ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, detail)
        self.args = (
            f"privsock helper is gone and cannot be restarted: {detail}; a boss that drops "
            "its privileges should use SocketCreator(connect=PATH) with a socket-activated "
            "helper (deploy/systemd), which it can reconnect to without privilege",
        )


class FdNotReceived(CreatorError):
    """The helper sent a socket, but the kernel could not install it here
    (MSG_CTRUNC: usually this process is out of file descriptors)."""
