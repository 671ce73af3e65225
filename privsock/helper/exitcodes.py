"""Exit codes of privsock-helper and `privsock`, sysexits-style, and the one
exception that ends either with a code and a line.

Each refusal has its own code and one line on stderr, so a supervisor,
systemd or a test can tell them apart without parsing text.
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0  # clean exit: EOF on the channel
    FAILED = 1  # inspect: the process is not hardened as promised
    USAGE = 64  # EX_USAGE: bad command line
    DATAERR = 65  # EX_DATAERR: the policy file does not parse or validate
    NOINPUT = 66  # EX_NOINPUT: the policy file cannot be opened
    NOUSER = 67  # EX_NOUSER: a user or group the policy names does not exist
    UNAVAILABLE = 69  # EX_UNAVAILABLE: exec: the address is in use or cannot be bound
    SOFTWARE = 70  # EX_SOFTWARE: unexpected error inside the request loop
    OSERR = 71  # EX_OSERR: a hardening step failed, or self-verification found a difference
    NOLANDLOCK = 72  # the policy requires Landlock and the kernel offers none (EX_OSFILE's slot)
    IOERR = 74  # EX_IOERR: a command's stdout cannot be written
    TEMPFAIL = 75  # EX_TEMPFAIL: exec rate limited; the helper: the peer's user is at per_user
    PROTOCOL = 76  # EX_PROTOCOL: the channel on fd 0 is not a SOCK_SEQPACKET socket
    NOPERM = 77  # EX_NOPERM: missing privilege (not root, no CAP_NET_BIND_SERVICE)
    CONFIG = 78  # EX_CONFIG: the policy file is insecure, or the process does not fit the policy
    CANNOT_EXECUTE = 126  # exec: the command cannot be run, as env(1) and the shell say
    NOT_FOUND = 127  # exec: no such command
    INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C


class Refusal(Exception):
    """Ends start-up, a policy check or ``privsock exec`` with one line
    (``str(e)``) and an exit code."""

    def __init__(self, exit_code: Exit, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
