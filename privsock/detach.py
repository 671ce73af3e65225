"""Keeping a server away from the terminal it was launched from.

A launcher started from root's interactive shell holds that shell's terminal:
as stdio, and as its controlling terminal. A server that inherits either can
push input into the terminal with the TIOCSTI ioctl (root's shell then runs
it), read root's keystrokes, or change the terminal's settings. So, when there
is a terminal, the launcher splits in two, as ``su --pty`` and sudo's
``use_pty`` do:

* the **server** process starts a new session (so it has no controlling
  terminal and cannot get root's back), takes /dev/null for a terminal stdin
  and a pipe for a terminal stdout or stderr, drops to the target user and
  returns, to exec the server (which keeps this pid, for LISTEN_PID);
* the **relay** (the original process, which the shell waits for) closes the
  server's sockets, drops to the same unprivileged user, makes itself
  non-dumpable (so the server, sharing its uid, cannot ptrace it or open its
  terminal through /proc), copies the pipes to the terminal, forwards SIGHUP,
  SIGINT, SIGQUIT, SIGTERM, SIGUSR1 and SIGUSR2 to the server, suspends the
  server with itself on Ctrl-Z, and exits with the server's status.

With no terminal at all (systemd, a pipeline under a supervisor) nothing
splits: the caller drops and execs in place, as before.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time
from collections.abc import Sequence

import prctl

from privsock import dropall
from privsock.helper.exitcodes import Exit, Refusal

FORWARDED = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
)  # fmt: skip
_SUSPEND = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
_CHUNK = 65536


def controlling_tty(stat_text: str) -> int:
    """The tty_nr field of /proc/PID/stat: 0 when there is no controlling
    terminal. The command name may hold spaces and ')', so fields are counted
    after its last ')'."""
    fields = stat_text.rpartition(")")[2].split()
    if len(fields) < 5:
        raise ValueError("not a /proc/PID/stat line")
    return int(fields[4])


def has_terminal() -> bool:
    """Is any of stdin, stdout, stderr a terminal, or does this process have
    a controlling terminal (which /dev/tty opens, whatever stdio is)?"""
    if any(os.isatty(fd) for fd in (0, 1, 2)):
        return True
    with open("/proc/self/stat", encoding="ascii", errors="replace") as f:
        return controlling_tty(f.read()) != 0


def _threads_left(within: float = 2.0) -> int:
    """How many threads this process has, once any just joined have left the
    kernel too (a joined Python thread may still be exiting there)."""
    deadline = time.monotonic() + within
    while (threads := len(os.listdir("/proc/self/task"))) > 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    return threads


def _become(target: dropall.Target, stay: bool) -> None:
    """dropall.drop(target); or, for a caller that already is target
    (``privsock exec --connect``), dropall.seal(target)."""
    if stay:
        dropall.seal(target)
    else:
        dropall.drop(target)


def leave_terminal(
    target: dropall.Target, *, server_fds: Sequence[int], stay: bool = False
) -> None:
    """Become ``target`` with no terminal, ready to exec a server that gets
    ``server_fds`` (``stay``: this process already runs as target, and only
    sheds what it may hold, dropall.seal). Without a terminal: drop and return. With
    one: return in a new process that has left it (new session, no terminal on
    stdio, dropped, dies with SIGTERM if the relay dies); this process becomes
    the relay and never returns, except by raising Refusal after killing the
    server process if its own drop fails."""
    if not has_terminal():
        _become(target, stay)
        return
    threads = _threads_left()
    if threads != 1:
        # The relay drops privilege too, and that takes effect in one thread only.
        raise Refusal(
            Exit.SOFTWARE, f"cannot leave the terminal with {threads} threads running"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    # The server gets pipes in place of a terminal stdout and stderr.
    relayed = {fd: os.pipe() for fd in (1, 2) if os.isatty(fd)}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    relay_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _become_server(target, relayed, old_mask, relay_pid, stay)
        return
    _relay(target, pid, relayed, server_fds, old_mask, stay)


def _become_server(
    target: dropall.Target,
    relayed: dict[int, tuple[int, int]],
    old_mask: set[int | signal.Signals],
    relay_pid: int,
    stay: bool,
) -> None:
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.setsid()  # a new session has no controlling terminal
    if os.isatty(0):
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    for fd, (r, w) in relayed.items():
        os.dup2(w, fd)
        os.close(r)
        os.close(w)
    _become(target, stay)
    # After the uid change, which clears it; then make sure the relay did not
    # die before it was set.
    prctl.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != relay_pid:
        os._exit(Exit.SOFTWARE)


def _relay(
    target: dropall.Target,
    pid: int,
    relayed: dict[int, tuple[int, int]],
    server_fds: Sequence[int],
    old_mask: set[int | signal.Signals],
    stay: bool,
) -> None:
    pidfd = os.pidfd_open(pid)

    def forward(signum: int, frame: object) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            pass  # already gone: its status is on the way

    def suspend(signum: int, frame: object) -> None:
        # Ctrl-Z: stop the server too, and wake it when the shell wakes us.
        forward(signal.SIGSTOP, frame)
        os.kill(os.getpid(), signal.SIGSTOP)
        forward(signal.SIGCONT, frame)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for sig in _SUSPEND:
        signal.signal(sig, suspend)
    for fd in server_fds:
        os.close(fd)
    for _, w in relayed.values():
        os.close(w)
    try:
        _become(target, stay)
        prctl.set_dumpable(False)  # after the uid change, which may reset it
    except Refusal:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    status = _copy_until_exit(pid, pidfd, {r: fd for fd, (r, _) in relayed.items()})
    _exit_like(status)


def _copy_until_exit(pid: int, pidfd: int, outputs: dict[int, int]) -> int:
    """Copy each pipe to its terminal fd until the server exits, then what is
    left in the pipes. Returns the server's wait status."""
    sel = selectors.DefaultSelector()
    sel.register(pidfd, selectors.EVENT_READ)
    for r in outputs:
        sel.register(r, selectors.EVENT_READ)
    dead: set[int] = set()  # terminal fds that failed: what was meant for them is dropped
    while True:
        for key, _ in sel.select():
            if key.fd == pidfd:
                _, status = os.waitpid(pid, 0)
                for r in list(outputs):
                    if r in sel.get_map():
                        os.set_blocking(r, False)
                        while pass_on(r, outputs[r], dead):
                            pass
                return status
            if not pass_on(key.fd, outputs[key.fd], dead):
                sel.unregister(key.fd)
                os.close(key.fd)


def pass_on(r: int, out: int, dead: set[int]) -> bool:
    """One read from pipe ``r``, all of it written to ``out``. False at end of
    file, or when a non-blocking pipe is empty."""
    try:
        data = os.read(r, _CHUNK)
    except BlockingIOError:
        return False
    view = memoryview(data)
    while view and out not in dead:
        try:
            view = view[os.write(out, view) :]
        except OSError:
            dead.add(out)  # the terminal is gone: keep draining, so the server never blocks
    return bool(data)


def _exit_like(status: int) -> None:
    """Exit as the server did: its code, or death by its signal."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sig = -code
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
        code = 128 + sig
    os._exit(code)
