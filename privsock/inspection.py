"""What ``privsock inspect`` judges a process against, one profile per role, and
what it can say of Landlock from outside.

* ``helper``: the serving helper's promise (``procstatus.verdict``): non-root,
  exactly CAP_NET_BIND_SERVICE permitted, effective and bounding, no_new_privs,
  a seccomp filter.
* ``server``: a program ``privsock exec`` (or ``privsock.drop_privileges``)
  dropped: non-root, every uid and every gid the same (nothing to switch back
  to), no root group, no capability in any set, no_new_privs. Seccomp is not
  required: exec loads none.
* ``connect-server``: a program ``privsock exec --connect`` started as its
  caller: the same, except that the bounding set is not judged (an
  unprivileged caller cannot empty it; no_new_privs keeps any exec from
  gaining a capability from it). Only by ``--expect``: nothing in a server's
  command line says how it was started.

The profile is chosen from the process's command line (the helper runs
``privsock.helper.main``, as a module or from ``-c``, or ``privsock-helper``)
unless ``--expect`` names it.
"""

from __future__ import annotations

import os

from privsock.helper import landlock
from privsock.helper.procstatus import CAP_SETS, ProcStatus, cap_names, verdict

PROFILES = ("helper", "server", "connect-server")

HELPER_OK = "hardened: non-root, only CAP_NET_BIND_SERVICE, no_new_privs, seccomp filter"
SERVER_OK = "hardened: non-root, no capability in any set, no_new_privs (a dropped server)"
CONNECT_SERVER_OK = ("hardened: non-root, no inheritable, permitted, effective or ambient "
                     "capability, no_new_privs (a server exec --connect started; its bounding "
                     "set is its caller's)")  # fmt: skip


def is_helper_command(argv: list[str]) -> bool:
    for before, arg in zip(["", *argv], argv, strict=False):
        if arg == "privsock.helper.main" or os.path.basename(arg) == "privsock-helper":
            return True
        # SocketCreator's start: python -I -S -c "...; from privsock.helper.main import main; ..."
        if before == "-c" and arg.endswith("from privsock.helper.main import main; main()"):
            return True
    return False


def choose(argv: list[str], expect: str | None) -> tuple[str, str]:
    """(profile, why it was chosen)."""
    if expect is not None:
        return expect, f"--expect {expect}"
    if is_helper_command(argv):
        return "helper", "its command line runs the privsock helper"
    return "server", "its command line is not the helper's; --expect helper to judge it as one"


def server_verdict(st: ProcStatus, *, bounding: bool = True) -> list[str]:
    """Every way ``st`` differs from a fully dropped server; empty means dropped.
    ``bounding=False``: the bounding set is not judged (connect-server)."""
    problems: list[str] = []
    for kind, ids in (("uid", st.uids), ("gid", st.gids)):
        shown = " ".join(map(str, ids))
        if 0 in ids:
            problems.append(f"a {kind} is 0 ({kind.capitalize()}: {shown})")
        elif len(set(ids)) != 1:
            problems.append(f"the {kind}s differ ({shown}): it could switch back to another")
    if 0 in st.groups:
        problems.append(f"supplementary group 0 (root) remains: {list(st.groups)}")
    for name in CAP_SETS:
        if (have := st.caps[name]) and (bounding or name != "CapBnd"):
            problems.append(f"{name} is {have:016x} ({','.join(cap_names(have))})")
    if st.no_new_privs != 1:
        problems.append("NoNewPrivs is not set")
    return problems


def judge(st: ProcStatus, profile: str) -> tuple[list[str], str]:
    """(problems, the verdict's words when there are none)."""
    if profile == "helper":
        return verdict(st), HELPER_OK
    if profile == "connect-server":
        return server_verdict(st, bounding=False), CONNECT_SERVER_OK
    return server_verdict(st), SERVER_OK


def landlock_line() -> str:
    """What can be seen of Landlock from outside: the kernel's ABI, as this
    process's own context sees it. The kernel shows no process's ruleset in
    /proc; the helper's start-up line states its own, and with
    require_landlock (the default) it never serves without one."""
    try:
        abi = landlock.abi_version()
    except landlock.Unavailable as exc:
        return (f"Landlock  unavailable here: {exc}; a helper started here serves only if "
                "its policy sets require_landlock = false, and then TCP ports are held by "
                "its own code alone")  # fmt: skip
    if abi < landlock.NET_ABI:
        return (
            f"Landlock  kernel ABI {abi}: no TCP port rules (ABI {landlock.NET_ABI}); "
            "a helper serves here only if its policy sets require_landlock = false"
        )
    return (f"Landlock  kernel ABI {abi} as seen here; a process's ruleset is not in /proc: "
            "the helper's start-up line states its own (\"Landlock: ABI ...\")")  # fmt: skip
