"""Dropping everything but CAP_NET_BIND_SERVICE, in the one order that works.

Two ways in:
* root start: shrink the bounding set while CAP_SETPCAP is held, keep caps
  across the uid change, setgroups([]) / setresgid / setresuid, then set every
  capability set explicitly (after setresuid CapPrm still holds the full set);
* non-root start (systemd AmbientCapabilities=, a container's --cap-add): the
  process must already be the policy's user with CAP_NET_BIND_SERVICE
  permitted and a bounding set of only that capability, because without
  CAP_SETUID/CAP_SETPCAP neither can be changed.

Then, after the uid change (it resets them): no_new_privs, dumpable 0,
pdeathsig, and a check that the parent did not die in between.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import signal

from privsock.helper.caps import (
    CAP_NET_BIND_SERVICE,
    NET_BIND_SERVICE_MASK,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAPBSET_DROP,
    PR_SET_DUMPABLE,
    PR_SET_KEEPCAPS,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    cap_last,
    capset,
    missing_drop_caps,
    prctl,
)
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.procstatus import cap_names

# The most fds the helper ever holds: 0 (channel), 2 (log), one new socket,
# and room for fds a boss pushes at it, which it closes at once. The kernel drops
# (and sets MSG_CTRUNC for) any it cannot install under this limit.
NOFILE_LIMIT = 8

def _cap_set(name: str) -> int:
    """One capability set of this process, e.g. "CapEff", from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1], 16)
    raise Refusal(Exit.OSERR, f"/proc/self/status has no {name} line")


def resolve_ids(user: str, group: str) -> tuple[int, int]:
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise Refusal(Exit.NOUSER, f"the policy's user {user!r} does not exist") from None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise Refusal(Exit.NOUSER, f"the policy's group {group!r} does not exist") from None
    if uid == 0 or gid == 0:
        raise Refusal(Exit.CONFIG, f"the policy's user/group {user}:{group} is root")
    return uid, gid


def check_privilege() -> bool:
    """True for a root start, False for a non-root start. Refuses a process that
    cannot end up with CAP_NET_BIND_SERVICE, and a root without the capabilities
    the drop itself needs (it never serves unhardened instead)."""
    if not _cap_set("CapPrm") >> CAP_NET_BIND_SERVICE & 1:
        raise Refusal(
            Exit.NOPERM,
            "no CAP_NET_BIND_SERVICE: run as root or give CAP_NET_BIND_SERVICE "
            "(systemd AmbientCapabilities=, podman --cap-add=NET_BIND_SERVICE)",
        )
    if os.geteuid() != 0:
        return False
    missing = missing_drop_caps(_cap_set("CapEff"))
    if missing:
        raise Refusal(
            Exit.NOPERM,
            f"started as root without {', '.join(missing)}, so it cannot drop to its user; "
            "add them (they are dropped before serving) or start it as its user "
            "with CAP_NET_BIND_SERVICE only",
        )
    return True


def close_fds(keep: tuple[int, ...] = (0, 2)) -> None:
    """Close every fd but ``keep``: nothing the starter left open reaches the loop."""
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listdir fd itself, already gone


def set_rlimits() -> None:
    # No core dumps (memory may hold the policy), no processes of our own. NOFILE
    # comes later, once the status fd is in place (see seccomp_filter.STATUS_FD).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


def limit_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE_LIMIT, NOFILE_LIMIT))


def _set_only_bind_caps() -> None:
    # Every set written whole: CAP_NET_BIND_SERVICE permitted and effective,
    # nothing inheritable (which empties ambient too); then ambient explicitly.
    capset(effective=NET_BIND_SERVICE_MASK, permitted=NET_BIND_SERVICE_MASK, inheritable=0)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def switch_user(uid: int, gid: int) -> None:
    """Root start: become uid/gid holding only CAP_NET_BIND_SERVICE."""
    try:
        # Every capability this kernel knows, not a list fixed at some build.
        for cap in range(cap_last() + 1):
            if cap != CAP_NET_BIND_SERVICE:
                prctl(PR_CAPBSET_DROP, cap)
        prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        prctl(PR_SET_KEEPCAPS, 0)
        _set_only_bind_caps()
    except (OSError, ValueError) as exc:
        raise Refusal(Exit.OSERR, f"dropping to uid {uid} gid {gid} failed: {exc}") from exc


def keep_user(uid: int, gid: int) -> None:
    """Non-root start: no switch is possible, so the process must already be the
    policy's user, and its bounding set must already be the one capability."""
    ids = os.getresuid(), os.getresgid()
    if ids != ((uid,) * 3, (gid,) * 3):
        raise Refusal(
            Exit.CONFIG,
            f"started as uids {ids[0]} gids {ids[1]} without CAP_SETUID, "
            f"but the policy names uid {uid} gid {gid}; start it as that user",
        )
    if set(os.getgroups()) - {gid}:
        raise Refusal(
            Exit.CONFIG,
            f"supplementary groups {os.getgroups()} cannot be dropped without CAP_SETGID",
        )
    extra = _cap_set("CapBnd") & ~(1 << CAP_NET_BIND_SERVICE)
    if extra:
        raise Refusal(
            Exit.OSERR,
            f"the capability bounding set holds more than CAP_NET_BIND_SERVICE "
            f"({','.join(cap_names(extra))}) "
            "and a non-root helper cannot shrink it: use CapabilityBoundingSet="
            "CAP_NET_BIND_SERVICE (systemd) or --cap-drop=ALL --cap-add=NET_BIND_SERVICE",
        )
    try:
        _set_only_bind_caps()
    except (OSError, ValueError) as exc:
        raise Refusal(Exit.OSERR, f"setting capabilities failed: {exc}") from exc


def lock(expected_parent: int) -> None:
    """After the uid change, which resets pdeathsig and dumpable."""
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_DUMPABLE, 0)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError as exc:
        raise Refusal(Exit.OSERR, f"prctl lock-down failed: {exc}") from exc
    # The parent may have died before pdeathsig was armed; then nobody would kill us.
    if os.getppid() != expected_parent:
        raise Refusal(Exit.OSERR, "the parent exited during start-up")
