"""Dropping the boss to an ordinary user with no privilege at all, before it
execs a server (``privsock exec``), and proving it before the exec.

The order, started as root: empty the capability bounding set first (that
needs CAP_SETPCAP, which the uid change takes away), clear the inheritable
and ambient sets, drop supplementary groups, setresgid, setresuid (without
keep-caps the kernel clears the permitted and effective sets; they are cleared
by hand as well, in case securebits said otherwise), then no_new_privs. Then
/proc/thread-self/status must show exactly that, or nothing is exec'd.

Capability sets and no_new_privs belong to the calling thread, and that is the
thread whose credentials the exec'd program gets; so the check reads the
thread's own status, not the process's.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass

import prctl

from privsock.helper.exitcodes import Exit
from privsock.helper.procstatus import CAP_SETS, StatusFormatError, cap_names, parse_status

_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_SETGID, _CAP_SETUID, _CAP_SETPCAP = 6, 7, 8

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class DropError(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Target:
    """Who the exec'd program runs as."""

    user: str
    uid: int
    gid: int
    home: str


def _prctl(option: int, arg2: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise DropError(Exit.OSERR, f"prctl({option}, {arg2}) failed: {os.strerror(err)}")


def _read_status() -> str:
    with open("/proc/thread-self/status", encoding="ascii", errors="replace") as f:
        return f.read()


def resolve(user: str, group: str | None) -> Target:
    """USER and GROUP (names or numbers; GROUP defaults to USER's primary
    group). Refuses unknown names and root."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise DropError(Exit.NOUSER, f"no such user: {user!r}") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, OverflowError):
            raise DropError(Exit.NOUSER, f"no such group: {group!r}") from None
    if pw.pw_uid == 0 or gid == 0:
        raise DropError(
            Exit.USAGE,
            f"refusing to run the command as root (--user {user}"
            + (f" --group {group})" if group is not None else ")"),
        )
    return Target(pw.pw_name, pw.pw_uid, gid, pw.pw_dir)


def check_privilege() -> None:
    """The drop needs root with SETUID, SETGID and SETPCAP; say so before
    anything starts."""
    if os.geteuid() != 0:
        raise DropError(
            Exit.NOPERM, "privsock exec must be started as root: it drops to --user itself"
        )
    status = parse_status(_read_status())
    missing = [
        name for bit, name in ((_CAP_SETUID, "CAP_SETUID"), (_CAP_SETGID, "CAP_SETGID"),
                               (_CAP_SETPCAP, "CAP_SETPCAP"))
        if not status.caps["CapEff"] >> bit & 1
    ]  # fmt: skip
    if missing:
        raise DropError(
            Exit.NOPERM, f"started as root without {', '.join(missing)}: cannot drop privilege"
        )


def drop(target: Target) -> None:
    """Become target.uid/target.gid with no capability in any set, no
    supplementary groups and no_new_privs; then verify (DropError if not)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            last = int(f.read())
        for cap in range(last + 1):
            _prctl(_PR_CAPBSET_DROP, cap)
        prctl.cap_inheritable.limit()
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
        os.setgroups([])
        os.setresgid(target.gid, target.gid, target.gid)
        os.setresuid(target.uid, target.uid, target.uid)
        prctl.cap_effective.limit()
        prctl.cap_permitted.limit()
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    except (OSError, ValueError) as exc:
        raise DropError(Exit.OSERR, f"dropping to {target.user} failed: {exc}") from None
    problems = verify(_read_status(), target)
    if problems:
        raise DropError(
            Exit.OSERR, "privilege drop not verified, not running the command: "
            + "; ".join(problems),
        )  # fmt: skip


def verify(status_text: str, target: Target) -> list[str]:
    """Every way a /proc status differs from "target's ids, nothing else";
    empty means dropped."""
    try:
        st = parse_status(status_text)
    except StatusFormatError as exc:
        return [f"cannot parse the process status: {exc}"]
    problems = []
    if set(st.uids) != {target.uid}:
        problems.append(f"uids are {st.uids}, expected all {target.uid}")
    if set(st.gids) != {target.gid}:
        problems.append(f"gids are {st.gids}, expected all {target.gid}")
    if st.groups:
        problems.append(f"supplementary groups remain: {list(st.groups)}")
    for name in CAP_SETS:
        if st.caps[name]:
            problems.append(
                f"{name} is {st.caps[name]:016x} ({','.join(cap_names(st.caps[name]))})"
            )
    if st.no_new_privs != 1:
        problems.append("NoNewPrivs is not set")
    return problems
