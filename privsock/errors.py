"""The boss side's exceptions: one type per reply status, plus helper failures."""

from __future__ import annotations

import errno as errno_mod
import os
import signal

from privsock.helper.exitcodes import DESCRIPTIONS, HELPER_EXITS, Exit
from privsock.helper.protocol import Reason, Stage


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
