"""Dropping the boss to an ordinary user with no privilege at all: before
``privsock exec`` execs a server, and for a library user that keeps running
(``privsock.drop_privileges``); proven from /proc before anything goes on.

The order, started as root: empty the capability bounding set first (that
needs CAP_SETPCAP, which the uid change takes away), clear the inheritable
and ambient sets, drop supplementary groups, setresgid, setresuid (without
keep-caps the kernel clears the permitted and effective sets; they are cleared
by hand as well, in case securebits said otherwise), then no_new_privs. Then
/proc/thread-self/status must show exactly that, or nothing is exec'd.

Capability sets, the bounding set, securebits and no_new_privs belong to each
thread; only the uid/gid/groups change reaches every thread (glibc broadcasts
it). Before an exec, the calling thread is the one whose credentials the
program gets, so ``drop`` covers that thread and checks
/proc/thread-self/status. A process that keeps running needs every thread
dropped: ``drop_privileges`` does the per-thread steps in the calling thread
and in privsock's own spawner thread, refuses while any other thread exists,
and checks /proc/self/task/*/status for each.
"""

from __future__ import annotations

import grp
import os
import pwd
import threading
from collections.abc import Sequence
from typing import NamedTuple

import prctl

from privsock import spawner
from privsock.helper import caps
from privsock.helper.caps import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_NO_NEW_PRIVS,
    cap_last,
    missing_drop_caps,
)
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.procstatus import CAP_SETS, StatusFormatError, cap_names, parse_status


def raw_prctl(option: int, arg2: int) -> None:
    """prctl(option, arg2, 0, 0, 0); a Refusal (OSERR) if the kernel says no."""
    try:
        caps.prctl(option, arg2)
    except OSError as exc:
        raise Refusal(Exit.OSERR, f"{exc.strerror}") from None


class Target(NamedTuple):
    """Who the exec'd program runs as."""

    user: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...] = ()  # supplementary groups


def _read_status() -> str:
    with open("/proc/thread-self/status", encoding="ascii", errors="replace") as f:
        return f.read()


def _number(text: str) -> int | None:
    """A uid or gid given as a number: ASCII digits only (not "١٢"), at most 10
    of them (int() refuses more than 4300); None: a name."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else None


def _passwd(user: str) -> pwd.struct_passwd:
    uid = _number(user)
    return pwd.getpwuid(uid) if uid is not None else pwd.getpwnam(user)


def _gid(group: str) -> int:
    gid = _number(group)
    return grp.getgrgid(gid).gr_gid if gid is not None else grp.getgrnam(group).gr_gid


def resolve(user: str, group: str | None) -> Target:
    """USER and GROUP (names or numbers; GROUP defaults to USER's primary
    group). Refuses unknown names and root."""
    try:
        pw = _passwd(user)
    except (KeyError, OverflowError):
        raise Refusal(Exit.NOUSER, f"no such user: {user!r}") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = _gid(group)
        except (KeyError, OverflowError):
            raise Refusal(Exit.NOUSER, f"no such group: {group!r}") from None
    if pw.pw_uid == 0 or gid == 0:
        raise Refusal(
            Exit.USAGE,
            f"refusing to run the command as root (--user {user}"
            + (f" --group {group})" if group is not None else ")"),
        )
    return Target(pw.pw_name, pw.pw_uid, gid, pw.pw_dir, pw.pw_shell)


def with_groups(target: Target, groups: Sequence[str] | None) -> Target:
    """``target`` with supplementary groups: USER's own from the group
    database (None: what systemd's User= and runuser give), or exactly
    ``groups`` (names or numbers; empty for none). Refuses unknown groups and
    root's."""
    if groups is None:
        gids = os.getgrouplist(target.user, target.gid)
    else:
        gids = []
        for name in groups:
            try:
                gids.append(_gid(name))
            except (KeyError, OverflowError):
                raise Refusal(Exit.NOUSER, f"no such group: {name!r}") from None
    if 0 in gids:
        raise Refusal(
            Exit.USAGE,
            f"refusing to give the command the root group as a supplementary group "
            f"({target.user} is in it); choose the groups with --groups",
        )
    return target._replace(groups=tuple(sorted(set(gids))))


def check_privilege(
    not_root: str = "must be started as root: it drops to --user itself",
) -> None:
    """The drop needs root with SETUID, SETGID and SETPCAP; say so before
    anything starts (``not_root``: the message for a non-root caller)."""
    if os.geteuid() != 0:
        raise Refusal(Exit.NOPERM, not_root)
    missing = missing_drop_caps(parse_status(_read_status()).caps["CapEff"])
    if missing:
        raise Refusal(
            Exit.NOPERM, f"started as root without {', '.join(missing)}: cannot drop privilege"
        )


def _empty_thread_sets() -> None:
    """This thread, while it still holds CAP_SETPCAP: an empty bounding set,
    no inheritable and no ambient capabilities."""
    for cap in range(cap_last() + 1):
        raw_prctl(PR_CAPBSET_DROP, cap)
    prctl.cap_inheritable.limit()
    raw_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def _switch_ids(target: Target) -> None:
    # glibc makes every thread of the process take these (its setxid broadcast).
    os.setgroups(list(target.groups))
    os.setresgid(target.gid, target.gid, target.gid)
    os.setresuid(target.uid, target.uid, target.uid)


def _seal_thread() -> None:
    """This thread, after the uid change: nothing permitted or effective (the
    kernel clears them unless keep-caps was set), and no_new_privs."""
    prctl.cap_effective.limit()
    prctl.cap_permitted.limit()
    raw_prctl(PR_SET_NO_NEW_PRIVS, 1)


def drop(target: Target) -> None:
    """Become target.uid/target.gid with no capability in any set, no
    supplementary groups and no_new_privs; then verify (Refusal if not).
    Covers the calling thread only: for ``privsock exec``, which execs next."""
    try:
        _empty_thread_sets()
        _switch_ids(target)
        _seal_thread()
    except (OSError, ValueError) as exc:
        raise Refusal(Exit.OSERR, f"dropping to {target.user} failed: {exc}") from None
    problems = verify(_read_status(), target)
    if problems:
        raise Refusal(
            Exit.OSERR, "privilege drop not verified, not running the command: "
            + "; ".join(problems),
        )  # fmt: skip


def caller() -> Target:
    """The calling user, as ``privsock exec --connect`` runs the command: its
    real uid and gid and its current supplementary groups. Refuses root (any
    of the real, effective or saved uids 0): that caller drops with --user."""
    if 0 in os.getresuid():
        raise Refusal(
            Exit.USAGE,
            "refusing to run the command as root: --connect runs it as the caller, with "
            "no drop; as root, give --user USER (and --policy FILE) instead",
        )
    uid = os.getuid()
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        raise Refusal(Exit.NOUSER, f"uid {uid} has no entry in the user database") from None
    return Target(pw.pw_name, uid, os.getgid(), pw.pw_dir, pw.pw_shell,
                  tuple(sorted(set(os.getgroups()))))  # fmt: skip


def seal(target: Target) -> None:
    """For a caller that already is ``target`` (``caller()``): no uid change,
    so nothing here needs privilege. Empty the inheritable, ambient, permitted
    and effective sets (lowering them is always allowed) and set no_new_privs,
    then verify. The bounding set stays as the caller had it: emptying it
    needs CAP_SETPCAP, and with no_new_privs no exec can gain a capability
    from it (no set-uid, no file capabilities). Covers the calling thread."""
    try:
        raw_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        prctl.cap_inheritable.limit()
        _seal_thread()
    except (OSError, ValueError) as exc:
        raise Refusal(Exit.OSERR, f"shedding privilege as {target.user} failed: {exc}") from None
    problems = verify(_read_status(), target, bounding=False)
    if problems:
        raise Refusal(
            Exit.OSERR, "privilege shedding not verified, not running the command: "
            + "; ".join(problems),
        )  # fmt: skip


def _threads() -> dict[int, str]:
    """tid -> name of every thread of this process: Python's name for a
    Python thread, the kernel's (comm) for any other."""
    named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    threads = {}
    for entry in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{entry}/comm", encoding="utf-8", errors="replace") as f:
                threads[int(entry)] = named.get(int(entry)) or f.read().strip()
        except FileNotFoundError:
            pass  # it has just exited
    return threads


def drop_privileges(user: str | int, group: str | int | None = None) -> Target:
    """Drop this whole process, every thread of it, to ``user`` and ``group``
    (names or ids; the group defaults to the user's primary group): no
    capability in any set (bounding set included), no supplementary groups,
    no_new_privs. Needs root; refuses root as the target.

    The bounding set and no_new_privs belong to each thread, so a thread left
    out could regain root by exec'ing a set-uid program. The drop covers the
    calling thread and privsock's own spawner thread, and raises Refusal,
    changing nothing, while the process has any other thread: call it before
    starting threads of your own. Afterwards it reads the status of every
    thread (/proc/self/task/*/status) and raises Refusal unless each shows
    the drop; then the process is half-dropped and should exit.

    Helpers already running keep serving. One that dies cannot be restarted
    by a dropped process (that needs privilege): use
    ``SocketCreator(connect=PATH)`` with a socket-activated helper
    (deploy/systemd) if the boss must survive helper deaths."""
    if isinstance(user, bool) or not isinstance(user, str | int):
        raise TypeError(f"user must be a name or a uid, not {type(user).__name__}")
    if isinstance(group, bool) or not isinstance(group, str | int | None):
        raise TypeError(f"group must be a name, a gid or None, not {type(group).__name__}")
    target = resolve(str(user), None if group is None else str(group))
    check_privilege(f"privsock.drop_privileges needs root: this is uid {os.geteuid()}")
    if threading.current_thread().name.startswith("privsock-spawner"):
        raise Refusal(Exit.USAGE, "not dropping privileges from privsock's spawner thread")
    me = threading.get_native_id()
    ours = {me, spawner.call(threading.get_native_id)}
    others = {tid: name for tid, name in _threads().items() if tid not in ours}
    if others:
        listed = ", ".join(f"{tid} ({name})" for tid, name in sorted(others.items()))
        raise Refusal(
            Exit.USAGE,
            f"not dropping privileges: this process has {len(others)} other thread(s) "
            f"({listed}); each thread keeps its own bounding set and no_new_privs, so drop "
            "before starting threads",
        )
    try:
        spawner.call(_empty_thread_sets)
        _empty_thread_sets()
        _switch_ids(target)
        spawner.call(_seal_thread)
        _seal_thread()
    except (OSError, ValueError) as exc:
        raise Refusal(Exit.OSERR, f"dropping to {target.user} failed: {exc}") from None
    for tid, name in _threads().items():
        try:
            with open(f"/proc/self/task/{tid}/status", encoding="ascii", errors="replace") as f:
                problems = verify(f.read(), target)
        except FileNotFoundError:
            continue
        if problems:
            raise Refusal(
                Exit.OSERR,
                f"privilege drop not verified for thread {tid} ({name}): " + "; ".join(problems),
            )
    return target


def verify(status_text: str, target: Target, *, bounding: bool = True) -> list[str]:
    """Every way a /proc status differs from "target's ids, nothing else";
    empty means dropped. ``bounding=False``: the bounding set is not judged
    (seal(): an unprivileged caller cannot empty it)."""
    try:
        st = parse_status(status_text)
    except StatusFormatError as exc:
        return [f"cannot parse the process status: {exc}"]
    problems = []
    if set(st.uids) != {target.uid}:
        problems.append(f"uids are {st.uids}, expected all {target.uid}")
    if set(st.gids) != {target.gid}:
        problems.append(f"gids are {st.gids}, expected all {target.gid}")
    if set(st.groups) != set(target.groups):
        problems.append(
            f"supplementary groups are {list(st.groups)}, expected {sorted(target.groups)}"
        )
    for name in CAP_SETS:
        if st.caps[name] and (bounding or name != "CapBnd"):
            problems.append(
                f"{name} is {st.caps[name]:016x} ({','.join(cap_names(st.caps[name]))})"
            )
    if st.no_new_privs != 1:
        problems.append("NoNewPrivs is not set")
    return problems
