"""What /proc/PID/status says about a process's privilege, and whether that is
the state privsock promises for a serving helper. Pure: text in, verdict out.

The promise (SECURITY.md): a non-root uid and gid, no supplementary groups
except possibly the primary gid, CapPrm = CapEff = CapBnd = exactly
CAP_NET_BIND_SERVICE, CapInh = CapAmb = 0, NoNewPrivs = 1 and Seccomp = 2
(filter mode). Both the helper (on itself, after loading seccomp) and
`privsock inspect PID` judge with ``verdict``.
"""

from __future__ import annotations

from typing import NamedTuple

from privsock.helper.caps import NET_BIND_SERVICE_MASK

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

# Bits to names for a readable verdict; numbers above this list print as cap_N.
_CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
    "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
    "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
    "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)


def cap_names(mask: int) -> list[str]:
    names = []
    bit = 0
    while mask >> bit:
        if mask >> bit & 1:
            names.append(
                "cap_" + _CAP_NAMES[bit] if bit < len(_CAP_NAMES) else f"cap_{bit}"
            )
        bit += 1
    return names


class StatusFormatError(ValueError):
    """The text is not a /proc/PID/status we understand."""


class ProcStatus(NamedTuple):
    pid: int
    name: str
    uids: tuple[int, int, int, int]  # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    caps: dict[str, int]  # CapInh, CapPrm, CapEff, CapBnd, CapAmb
    no_new_privs: int
    seccomp: int
    seccomp_filters: int | None  # None on kernels without the field


def _nat(text: str, base: int = 10) -> int:
    # int() also takes "-1", and a negative mask would make cap_names loop forever.
    value = int(text, base)
    if value < 0:
        raise StatusFormatError(f"negative number {text!r}")
    return value


def parse_status(text: str) -> ProcStatus:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    try:
        uids = tuple(_nat(x) for x in fields["Uid"].split())
        gids = tuple(_nat(x) for x in fields["Gid"].split())
        if len(uids) != 4 or len(gids) != 4:
            raise StatusFormatError("Uid/Gid lines do not have four fields")
        return ProcStatus(
            pid=_nat(fields["Pid"]),
            name=fields.get("Name", "?"),
            uids=(uids[0], uids[1], uids[2], uids[3]),
            gids=(gids[0], gids[1], gids[2], gids[3]),
            groups=tuple(_nat(x) for x in fields["Groups"].split()),
            caps={name: _nat(fields[name], 16) for name in CAP_SETS},
            no_new_privs=_nat(fields["NoNewPrivs"]),
            seccomp=_nat(fields["Seccomp"]),
            seccomp_filters=(
                _nat(fields["Seccomp_filters"]) if "Seccomp_filters" in fields else None
            ),
        )
    except KeyError as exc:
        raise StatusFormatError(f"missing field {exc.args[0]}") from None
    except ValueError as exc:
        raise StatusFormatError(str(exc)) from None


def verdict(
    st: ProcStatus,
    *,
    uid: int | None = None,
    gid: int | None = None,
    seccomp_filters: int | None = None,
) -> list[str]:
    """Every way ``st`` differs from the promise; empty means hardened.
    ``uid``/``gid``, when given, are the ids the process must run as;
    ``seccomp_filters`` the exact number of stacked filters it must have."""
    problems: list[str] = []
    if 0 in st.uids:
        problems.append(f"a uid is 0 (Uid: {' '.join(map(str, st.uids))})")
    if 0 in st.gids:
        problems.append(f"a gid is 0 (Gid: {' '.join(map(str, st.gids))})")
    if uid is not None and set(st.uids) != {uid}:
        problems.append(f"uids are {st.uids}, expected all {uid}")
    if gid is not None and set(st.gids) != {gid}:
        problems.append(f"gids are {st.gids}, expected all {gid}")
    if set(st.groups) - {st.gids[0]}:
        problems.append(f"supplementary groups remain: {list(st.groups)}")
    expected = {
        "CapInh": 0,
        "CapPrm": NET_BIND_SERVICE_MASK,
        "CapEff": NET_BIND_SERVICE_MASK,
        "CapBnd": NET_BIND_SERVICE_MASK,
        "CapAmb": 0,
    }
    for name, want in expected.items():
        have = st.caps[name]
        if have != want:
            extra = cap_names(have & ~want)
            missing = cap_names(want & ~have)
            detail = []
            if extra:
                detail.append("extra " + ",".join(extra))
            if missing:
                detail.append("missing " + ",".join(missing))
            problems.append(f"{name} is {have:016x} ({'; '.join(detail)})")
    if st.no_new_privs != 1:
        problems.append("NoNewPrivs is not set")
    if st.seccomp != 2:
        problems.append(f"Seccomp is {st.seccomp}, not 2 (filter mode)")
    if seccomp_filters is not None and st.seccomp_filters != seccomp_filters:
        problems.append(f"Seccomp_filters is {st.seccomp_filters}, expected {seccomp_filters}")
    return problems


def report(st: ProcStatus) -> list[str]:
    """Human lines for `privsock inspect`."""
    lines = [
        f"pid       {st.pid} ({st.name})",
        f"uid       {' '.join(map(str, st.uids))}",
        f"gid       {' '.join(map(str, st.gids))}",
        f"groups    {' '.join(map(str, st.groups)) or '(none)'}",
    ]
    for name in CAP_SETS:
        value = st.caps[name]
        lines.append(f"{name:<9} {value:016x} {','.join(cap_names(value)) or '-'}")
    lines.append(f"NoNewPrivs {st.no_new_privs}")
    filters = "" if st.seccomp_filters is None else f" ({st.seccomp_filters} filters)"
    if st.seccomp_filters and st.seccomp_filters > 1:
        filters += "; a container runtime's or a parent's filters count too"
    lines.append(f"Seccomp   {st.seccomp}{filters}")
    return lines
