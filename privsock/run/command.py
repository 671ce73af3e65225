"""`privsock run`: an unmodified program binds privileged ports itself.

    privsock run --policy FILE --user USER [--group G] -- CMD ARGS   (as root)
    privsock run --connect PATH -- CMD ARGS                          (as the user)

Root start, in order: probe the kernel; start the helper (as root: it drops
itself); start CMD as USER under the bind filter (privsock.run.launch); drop
this process, every thread of it, to USER as well, and make it non-dumpable
so that CMD, running as the same user, can neither read its memory nor take
its fds; then supervise (privsock.run.supervise) until CMD and everything it
started have ended, forwarding signals to CMD. The exit status is CMD's.

User start: the same with a socket-activated helper (SocketCreator(connect=)),
no drop needed: the supervisor and CMD are the user already. The supervisor
still sets no_new_privs and makes itself non-dumpable.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from privsock import detach, dropall, execcmd, execenv
from privsock.auditsink import AuditLogError, Sink
from privsock.client import SocketCreator
from privsock.errors import HelperStartError
from privsock.helper import caps
from privsock.helper.exitcodes import Exit, Refusal
from privsock.run import bindreq, kernel, launch
from privsock.run.supervise import Supervisor

FORWARDED = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGWINCH,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RunOptions:
    command: Sequence[str]
    policy: str | None = None
    connect: str | None = None
    target: dropall.Target | None = None
    allow: tuple[bindreq.AllowSpec, ...] = ()


def _say(line: str) -> None:
    print(f"privsock: run: {line}", file=sys.stderr, flush=True)


def environment(target: dropall.Target | None) -> dict[str, str]:
    """CMD's environment. Root start: what ``privsock exec`` gives a server
    (privsock.execenv: the safe PATH, the target user's identity, TERM, LANG
    and LC_*; nothing else of root's). User start (--connect): the caller's
    own environment, unchanged: the caller and CMD are the same user, so there
    is nothing of a more privileged caller to keep from it."""
    if target is None:
        return dict(os.environ)
    return execenv.clean_environment(target, os.environ)


def unprivileged_port_start() -> int:
    """Ports below this need privilege in our network namespace (1024 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def drop_supervisor(target: dropall.Target) -> None:
    """This process, every thread of it (privsock's spawner thread too), to
    USER with nothing left, verified per thread; then non-dumpable (the uid
    change resets that flag, so it comes after)."""
    dropall.drop_privileges(target.uid, target.gid)


def make_undumpable() -> None:
    caps.prctl(caps.PR_SET_DUMPABLE, 0)
    if caps.prctl(kernel.PR_GET_DUMPABLE, 0) != 0:
        raise Refusal(Exit.OSERR, "could not make the supervisor non-dumpable")


class Terminal:
    """Keeps the program away from the terminal privsock run was started on, as
    ``su --pty`` and sudo's ``use_pty`` keep a command from it: a terminal
    stdin becomes /dev/null for the program, a terminal stdout or stderr a
    pipe whose other end the supervisor copies to the terminal. Stdio that is
    not a terminal (a file, a pipe, a journal stream) is passed unchanged."""

    def __init__(self) -> None:
        self.child: dict[int, int] = {}  # the program's fd -> what it gets
        self.relays: dict[int, int] = {}  # pipe read end -> our fd it goes to
        self.dead: set[int] = set()  # our fds that failed: what was meant for them is dropped
        if _isatty(0):
            self.child[0] = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        for fd in (1, 2):
            if _isatty(fd):
                r, w = os.pipe2(os.O_CLOEXEC)
                self.child[fd] = w
                self.relays[r] = fd

    def started(self) -> None:
        """The program has its copies: close ours."""
        for fd in self.child.values():
            os.close(fd)
        self.child.clear()

    def copy(self, r: int) -> bool:
        """Pass on what the program wrote (privsock.detach.pass_on: all of it,
        and a terminal that is gone is drained into nothing, so the program
        never blocks); False at its end, with the pipe closed."""
        if detach.pass_on(r, self.relays[r], self.dead):
            return True
        os.close(r)
        del self.relays[r]
        return False

    def drain(self) -> None:
        """At the end: what is left in the pipes, without waiting for writers
        that outlive the program (a daemon holding the pipe)."""
        for r in list(self.relays):
            os.set_blocking(r, False)
            while r in self.relays and self.copy(r):
                pass
        for r in list(self.relays):
            os.close(r)
        self.relays.clear()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _children() -> set[int]:
    kids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                kids.update(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return kids


class _Loop:
    """The supervisor's one thread: notifications, signals (through Python's
    wakeup fd), children to reap, and the terminal's pipes, in one poll."""

    def __init__(self, sup: Supervisor, cmd_pid: int, terminal: Terminal | None) -> None:
        self.sup, self.cmd_pid, self.terminal = sup, cmd_pid, terminal
        self.status: int | None = None  # CMD's, once reaped
        self.hung_up = False  # nothing left under the filter (or told to leave)
        self.poller = select.poll()
        self.poller.register(sup.listener, select.POLLIN)
        for r in terminal.relays if terminal is not None else ():
            self.poller.register(r, select.POLLIN)

    def reap(self) -> None:
        for pid in _children() - {self.sup.creator.pid or -1}:
            try:
                done, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done == self.cmd_pid:
                self.status = os.waitstatus_to_exitcode(st)

    def on_signals(self, signums: bytes) -> None:
        for signum in signums:
            if signum == signal.SIGCHLD:
                self.reap()
            elif self.status is None:
                os.kill(self.cmd_pid, signum)
            elif signum in (signal.SIGINT, signal.SIGTERM):
                self.hung_up = True  # CMD is gone; leave what it left behind

    def on_listener(self, ev: int) -> None:
        if ev & select.POLLIN:
            try:
                n = kernel.recv(self.sup.listener)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return  # the caller went away before we looked
                raise
            self.sup.handle(n)
        elif ev & (select.POLLHUP | select.POLLERR):
            self.hung_up = True
            self.poller.unregister(self.sup.listener)

    def run(self, wake_r: int) -> int:
        self.poller.register(wake_r, select.POLLIN)
        relays = self.terminal.relays if self.terminal is not None else {}
        self.reap()
        while self.status is None or not self.hung_up:
            for fd, ev in self.poller.poll():
                if fd == wake_r:
                    self.on_signals(os.read(wake_r, 512))
                elif fd in relays:
                    assert self.terminal is not None
                    if not self.terminal.copy(fd):
                        self.poller.unregister(fd)
                else:
                    self.on_listener(ev)
        return self.status if self.status >= 0 else 128 - self.status


def serve(sup: Supervisor, cmd_pid: int, terminal: Terminal | None = None) -> int:
    """Answer binds and forward signals until CMD has ended and nothing under
    the filter is left (the listener hangs up once the last such process is
    reaped: this process is their subreaper). Returns CMD's exit status."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in (*FORWARDED, signal.SIGCHLD):
        signal.signal(sig, lambda s, f: None)
    try:
        return _Loop(sup, cmd_pid, terminal).run(wake_r)
    finally:
        if terminal is not None:
            terminal.drain()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)


def run(opts: RunOptions, sink: Sink | None) -> int:
    """The whole command; Refusal for anything that stops it before CMD runs."""
    try:
        arch = kernel.arch()
        kernel.probe(arch)
    except kernel.KernelTooOld as exc:
        raise Refusal(Exit.UNAVAILABLE, f"this kernel cannot run it: {exc}") from None
    root_start = opts.policy is not None
    if root_start:
        dropall.check_privilege("--policy starts the helper and needs root; "
                                "as an ordinary user, use --connect PATH")  # fmt: skip
    elif opts.target is None and os.geteuid() == 0:
        raise Refusal(Exit.USAGE, "refusing to run the command as root: give --user")
    # Orphans of CMD come to us, so that daemonizing programs stay served.
    caps.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)
    # The supervisor waits for rate-limit tokens itself, at most RATE_LIMIT_WAIT a bind.
    creator = SocketCreator(opts.policy, connect=opts.connect, audit_sink=sink, rate_wait=0)
    try:
        try:
            creator.start()
        except HelperStartError as exc:
            raise execcmd.start_refusal(exc) from None
        except AuditLogError as exc:  # the start-up PING's lines cannot be logged
            raise Refusal(Exit(exc.exit_code), f"{exc}; nothing was started") from None
        env = environment(opts.target)
        terminal = Terminal()
        try:
            launched = launch.spawn(arch, opts.command, env, opts.target, terminal.child)
        finally:
            terminal.started()
        try:
            if opts.target is not None:
                drop_supervisor(opts.target)
            else:
                caps.prctl(caps.PR_SET_NO_NEW_PRIVS, 1)
            make_undumpable()
        except (Refusal, OSError):
            os.kill(launched.pid, signal.SIGKILL)
            os.waitpid(launched.pid, 0)
            raise
        kernel.sync_wake_up(launched.listener)
        sup = Supervisor(
            listener=launched.listener, arch=arch, creator=creator, allow=opts.allow,
            audit_sink=sink, unprivileged_port_start=unprivileged_port_start(), log=_say,
        )  # fmt: skip
        return serve(sup, launched.pid, terminal)
    finally:
        creator.close()
