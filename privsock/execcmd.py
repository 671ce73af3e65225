"""``privsock exec``: bind sockets through the helper, then become an ordinary
user and exec a server on them, by the systemd socket-activation convention.

The steps, in this order, each failing closed:

0. (cli) resolve the user, build the clean environment (privsock.execenv) and
   find and check the command and its directory as that user;
1. start the helper and get every socket; any failure ends the run with one
   line naming the socket and why, and nothing is started;
2. listen() on the TCP sockets (``--backlog``), as systemd does for streams;
3. stop the helper (the boss keeps no line to it across the exec);
4. leave the terminal, if there is one (privsock.detach), and drop to
   USER/GROUP with no capability in any set and no_new_privs, checked in
   /proc/thread-self/status (privsock.dropall);
5. exec CMD with the sockets at fds 3, 4, ... in --listen order, LISTEN_FDS,
   LISTEN_PID (the server's pid: exec keeps it), LISTEN_FDNAMES; stdio
   unchanged unless it was a terminal, every other fd closed.

With ``--connect PATH`` the caller is an ordinary user and the helper is the
shared, socket-activated one (deploy/systemd), which reads the caller's uid
with SO_PEERCRED and applies the policy's rules for that user. Nothing needs
root: the same steps, except that step 1 connects instead of starting a
helper, and step 4 keeps the caller's uid, gid and groups and only sheds what
it may hold (dropall.seal: no capability in the inheritable, ambient,
permitted or effective sets, no_new_privs). A root caller is refused
(dropall.caller): the command would run as root.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple, NoReturn

from privsock import arguments, auditsink, detach, dropall
from privsock.auditsink import AuditLogError, Sink
from privsock.client import SocketCreator
from privsock.errors import (
    HELPER_EXITS,
    CreatorError,
    CreatorOSError,
    HelperStartError,
    HelperUnreachable,
    PolicyDenied,
    RateLimited,
)
from privsock.execenv import unexecutable
from privsock.helper import protocol
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.policy import RateLimit
from privsock.helper.policy_file import load_policy
from privsock.helper.protocol import Reason, Transport
from privsock.helperprocess import end_spawner_thread

SD_LISTEN_FDS_START = 3
NOTHING_STARTED = "nothing was started"
DEFAULT_RATE_WAIT = 10.0  # seconds exec waits in all for rate-limit tokens


class Listen(NamedTuple):
    transport: Transport
    address: protocol.IPAddress
    port: int

    def __str__(self) -> str:
        return arguments.spec(protocol.Create(0, self.transport, self.address, self.port))

    @property
    def default_name(self) -> str:
        return f"{self.transport.name.lower()}-{self.port}"


def parse_listen(spec: str) -> Listen:
    """``udp:127.0.0.1:53``, ``tcp:[::]:53``: a transport, a numeric address
    (IPv6 in brackets) and a port. ValueError with the reason otherwise."""
    form = "expected TRANSPORT:ADDRESS:PORT, as in tcp:0.0.0.0:80 or udp:[::1]:53"
    transport, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"{spec!r}: {form}")
    if transport not in ("udp", "tcp"):
        raise ValueError(f"{spec!r}: transport must be udp or tcp, not {transport!r}")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep or ":" not in host:
            raise ValueError(f"{spec!r}: {form}")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{spec!r}: {form}")
        if ":" in host:
            raise ValueError(f"{spec!r}: put an IPv6 address in brackets, as in "
                             f"{transport}:[{host}]:{port}")  # fmt: skip
    if "%" in host:
        raise ValueError(f"{spec!r}: scoped addresses (%zone) are not supported")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{spec!r}: {host!r} is not a numeric IPv4 or IPv6 address "
            "(privsock never resolves names)"
        ) from None
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{spec!r}: port {port!r} is not a number in 1-65535")
    return Listen(Transport[transport.upper()], address, int(port))


def check_name(name: str) -> str:
    """A LISTEN_FDNAMES entry, by systemd's rule: 1-255 printable ASCII
    characters, no ':' (the separator)."""
    if not 1 <= len(name) <= 255 or not name.isascii() or not name.isprintable() or ":" in name:
        raise ValueError(f"{name!r}: a name is 1-255 printable ASCII characters without ':'")
    return name


def _exit_code(exc: CreatorError) -> Exit:
    if isinstance(exc, PolicyDenied):
        return Exit.NOPERM
    if isinstance(exc, RateLimited):
        return Exit.TEMPFAIL
    if isinstance(exc, CreatorOSError):
        return Exit.UNAVAILABLE
    if isinstance(exc, HelperUnreachable):
        return Exit.UNAVAILABLE
    if isinstance(exc, HelperStartError) and exc.returncode in HELPER_EXITS:
        return Exit(exc.returncode)
    return Exit.SOFTWARE


def start_refusal(exc: HelperStartError) -> Refusal:
    """The helper did not start or could not be reached: its exit code (69 for
    a socket-activated helper that is not there), and "helper did not start
    (exit N): its own words", said once."""
    return Refusal(_exit_code(exc), str(exc).removeprefix("privsock "))


def check_rate_limit(policy: str, count: int, rate_wait: float) -> RateLimit | None:
    """The policy's rate limit, read as the helper will read it (None if it
    cannot be: the helper then says why, once). Refusal at once if ``count``
    sockets cannot be had within ``rate_wait`` seconds: a fresh helper's bucket
    holds ``burst`` tokens and refills at ``rate`` per second."""
    try:
        limit = load_policy(policy).rate_limit
    except Refusal:
        return None
    if count <= limit.burst:
        return limit
    need = (count - limit.burst) / limit.rate
    if need > rate_wait:
        raise Refusal(
            Exit.TEMPFAIL,
            f"{count} sockets asked for, but the policy's rate limit gives at most "
            f"{limit.burst} at once and {_rate(limit)} per second after that: the other "
            f"{count - limit.burst} need {need:.1f}s of waiting, more than --rate-wait "
            f"{rate_wait:g}s; raise [rate_limit] burst to {count} in {policy}, or --rate-wait",
        )
    return limit


def _rate(limit: RateLimit) -> str:
    return f"{limit.rate:g}"


def _create(
    creator: SocketCreator,
    listen: Listen,
    *,
    reuseaddr: bool,
    deadline: float,
    on_wait: Callable[[], None],
) -> socket.socket:
    """One socket, waiting for rate-limit tokens until ``deadline`` (calling
    ``on_wait`` before each wait)."""
    while True:
        # A shared helper's first tokens are waited for inside create(), silently
        # (its bucket always starts empty), but only for what is left of --rate-wait.
        creator.rate_wait = max(0.0, deadline - time.monotonic())
        try:
            return creator.create(listen.transport, listen.address, listen.port,
                                  reuseaddr=reuseaddr)  # fmt: skip
        except RateLimited as exc:
            if time.monotonic() + exc.retry_after > deadline:
                raise Refusal(
                    Exit.TEMPFAIL, f"{listen}: still rate limited when --rate-wait ran out"
                ) from None
            on_wait()
            time.sleep(exc.retry_after)
        except PolicyDenied as exc:
            if reuseaddr and exc.reason is Reason.OPTION:
                # exec asked for nothing else: the policy lacks reuseaddr for this socket.
                raise Refusal(
                    Exit.NOPERM,
                    f"{listen}: denied by policy (option reuseaddr, which exec asks for on "
                    'TCP sockets): grant it with options = ["reuseaddr"] in an allow rule for '
                    "tcp only, or pass --no-reuseaddr",
                ) from None
            raise


def _naming(sink: Sink, names: tuple[str, Sequence[str]] | None) -> Callable[[bytes], None]:
    """``sink``, with the boss's own lines naming the user and the command."""
    if names is None:
        return sink
    return auditsink.naming_boss_lines(sink, names[0], names[1])


def acquire(
    policy: str | None,
    listens: Sequence[Listen],
    *,
    backlog: int,
    reuseaddr: bool,
    sink: Sink,
    rate_wait: float = DEFAULT_RATE_WAIT,
    names: tuple[str, Sequence[str]] | None = None,
    connect: str | None = None,
) -> list[socket.socket]:
    """Steps 1-3: every socket bound (TCP listening), the helper stopped; or
    Refusal, with every socket closed and the helper stopped. Waits up to
    ``rate_wait`` seconds in all for rate-limit tokens. ``names`` (user,
    argv) go into the boss's own audit lines: who the sockets are for.
    ``connect``: ask the socket-activated helper at that path (``policy`` is
    None: the policy is the helper's, and need not be readable here)."""
    limit = check_rate_limit(policy, len(listens), rate_wait) if policy is not None else None
    socks: list[socket.socket] = []
    told: list[bool] = []

    def on_wait() -> None:
        if not told:  # once: the line says how long it may take in all
            told.append(True)
            bucket = f" (bursts of {limit.burst}, {_rate(limit)}/s)" if limit else ""
            print(f"privsock: exec: rate limited by the policy{bucket} after {len(socks)} of "
                  f"{len(listens)} sockets; waiting for tokens, at most {rate_wait:g}s",
                  file=sys.stderr, flush=True)  # fmt: skip

    try:
        with SocketCreator(policy, connect=connect, audit_sink=_naming(sink, names),
                           rate_wait=rate_wait) as creator:  # fmt: skip
            deadline = time.monotonic() + rate_wait
            for listen in listens:
                # SO_REUSEADDR on TCP, as systemd does: a restart need not wait for TIME_WAIT.
                tcp = listen.transport is Transport.TCP
                sock = _create(creator, listen, reuseaddr=reuseaddr and tcp,
                               deadline=deadline, on_wait=on_wait)  # fmt: skip
                socks.append(sock)
                if tcp:
                    try:
                        sock.listen(backlog)
                    except OSError as exc:
                        raise Refusal(
                            Exit.UNAVAILABLE, f"{listen}: listen failed: {exc.strerror}"
                        ) from None
    except BaseException as exc:
        for sock in socks:
            sock.close()
        if isinstance(exc, HelperStartError):
            raise start_refusal(exc) from None
        if isinstance(exc, CreatorError):
            raise Refusal(_exit_code(exc), str(exc)) from None
        if isinstance(exc, AuditLogError):  # no grant goes unlogged
            raise Refusal(Exit(exc.exit_code), str(exc)) from None
        raise
    return socks


def place_fds(socks: Sequence[socket.socket]) -> int:
    """Put the sockets at fds 3.. (inheritable) and close every other fd from 3
    up. Returns how many were placed."""
    n = len(socks)
    first_free = SD_LISTEN_FDS_START + n
    # Move each above the target range first, so that no dup2 below clobbers one.
    raw = [sock.detach() for sock in socks]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first_free) for fd in raw]
    for fd in raw:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
    # Up to the highest fd open, not just the limit: it may have been lowered since.
    highest = max(map(int, os.listdir("/proc/self/fd")))
    os.closerange(first_free, max(highest + 1, os.sysconf("SC_OPEN_MAX")))
    return n


def listen_env(pid: int, names: Sequence[str]) -> dict[str, str]:
    """The socket-activation variables, for the process that keeps ``pid``."""
    return {
        "LISTEN_FDS": str(len(names)),
        "LISTEN_PID": str(pid),
        "LISTEN_FDNAMES": ":".join(names),
    }


@contextmanager
def _nothing_started() -> Iterator[None]:
    """A refusal of exec's own steps (not of the drop) says that nothing ran."""
    try:
        yield
    except Refusal as exc:
        raise Refusal(exc.exit_code, f"{exc}; {NOTHING_STARTED}") from None


def run(
    *,
    policy: str | None,
    target: dropall.Target,
    listens: Sequence[Listen],
    names: Sequence[str],
    path: str,
    command: Sequence[str],
    env: Mapping[str, str],
    chdir: str | None,
    backlog: int,
    reuseaddr: bool,
    sink: Sink,
    rate_wait: float = DEFAULT_RATE_WAIT,
    connect: str | None = None,
) -> NoReturn:
    """Steps 1-5 for ``command``, already found at ``path`` by
    execenv.find_command, with the environment ``env`` (plus LISTEN_*), in
    ``chdir`` (or the current directory). ``connect``: through the shared
    helper at that path, as the caller (``target`` is dropall.caller()).
    Returns only by raising Refusal."""
    stay = connect is not None
    if stay:
        if dropall.caller() != target:
            raise Refusal(Exit.SOFTWARE, f"--connect runs the command as the caller, "
                          f"not as {target.user}")  # fmt: skip
    else:
        dropall.check_privilege()
    with _nothing_started():
        socks = acquire(
            policy, listens, backlog=backlog, reuseaddr=reuseaddr, sink=sink,
            rate_wait=rate_wait, names=(target.user, [path, *command[1:]]), connect=connect,
        )  # fmt: skip
    sink.close()
    end_spawner_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    n = place_fds(socks)
    detach.leave_terminal(
        target, server_fds=range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n), stay=stay
    )
    with _nothing_started():
        if chdir is not None:
            try:
                os.chdir(chdir)
            except OSError as exc:
                raise Refusal(Exit.NOINPUT, f"--chdir {chdir}: {exc.strerror}") from None
        full_env = {**env, **listen_env(os.getpid(), names)}
        # Python ignores these two; an ignored signal stays ignored across exec.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        try:
            os.execve(path, list(command), full_env)  # noqa: S606 (no shell: argv as given)
        except OSError as exc:
            raise unexecutable(exc, path, target.user) from None
