"""Parsing /proc/PID/status and judging it against the hardened-helper promise
(privsock.helper.procstatus). Pure except for one read of this process's own status."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from privsock.helper.caps import CAP_NET_BIND_SERVICE, NET_BIND_SERVICE_MASK
from privsock.helper.procstatus import (
    CAP_SETS,
    ProcStatus,
    StatusFormatError,
    cap_names,
    parse_status,
    report,
    verdict,
)

UID = 998
GID = 997

# A hardened helper as a 6.x kernel prints it (tabs as separators, as in the kernel).
HARDENED = """\
Name:\tprivsock-helper
Umask:\t0077
State:\tS (sleeping)
Tgid:\t4242
Ngid:\t0
Pid:\t4242
PPid:\t4241
TracerPid:\t0
Uid:\t998\t998\t998\t998
Gid:\t997\t997\t997\t997
FDSize:\t64
Groups:\t
NStgid:\t4242
NSpid:\t4242
VmPeak:\t   20128 kB
VmRSS:\t   11424 kB
Threads:\t1
SigQ:\t0/62759
SigBlk:\t0000000000000000
SigIgn:\t0000000001001000
CapInh:\t0000000000000000
CapPrm:\t0000000000000400
CapEff:\t0000000000000400
CapBnd:\t0000000000000400
CapAmb:\t0000000000000000
NoNewPrivs:\t1
Seccomp:\t2
Seccomp_filters:\t1
Speculation_Store_Bypass:\tthread vulnerable
Cpus_allowed_list:\t0-3
Mems_allowed:\t00000000,00000001
voluntary_ctxt_switches:\t12
nonvoluntary_ctxt_switches:\t0
"""


def variant(**lines: str) -> str:
    """HARDENED with some lines replaced: variant(Uid="0 0 0 0")."""
    text = HARDENED
    for key, value in lines.items():
        text, n = re.subn(rf"^{key}:.*$", f"{key}:\t{value}", text, flags=re.M)
        assert n == 1, key
    return text


def without(key: str) -> str:
    text, n = re.subn(rf"^{key}:.*\n", "", HARDENED, flags=re.M)
    assert n == 1
    return text


def judge(text: str, **kw: int) -> list[str]:
    return verdict(parse_status(text), **kw)


# ---------------------------------------------------------------------------
# Parsing


def test_parse_hardened_fixture() -> None:
    st = parse_status(HARDENED)
    assert st == ProcStatus(
        pid=4242,
        name="privsock-helper",
        uids=(UID, UID, UID, UID),
        gids=(GID, GID, GID, GID),
        groups=(),
        caps={"CapInh": 0, "CapPrm": 1024, "CapEff": 1024, "CapBnd": 1024, "CapAmb": 0},
        no_new_privs=1,
        seccomp=2,
        seccomp_filters=1,
    )
    assert tuple(st.caps) == CAP_SETS


def test_parse_distinct_id_fields_in_order() -> None:
    st = parse_status(variant(Uid="1\t2\t3\t4", Gid="5\t6\t7\t8", Groups="10 20 30 "))
    assert st.uids == (1, 2, 3, 4)
    assert st.gids == (5, 6, 7, 8)
    assert st.groups == (10, 20, 30)


def test_parse_groups_with_trailing_space_as_the_kernel_prints() -> None:
    assert parse_status(variant(Groups="997 ")).groups == (GID,)
    assert parse_status(variant(Groups=" ")).groups == ()


def test_parse_without_seccomp_filters_field() -> None:
    st = parse_status(without("Seccomp_filters"))
    assert st.seccomp_filters is None
    assert verdict(st) == []


def test_parse_without_name_is_tolerated() -> None:
    assert parse_status(without("Name")).name == "?"


def test_parse_caps_are_hex() -> None:
    st = parse_status(variant(CapBnd="000001ffffffffff", CapAmb="0000000000000010"))
    assert st.caps["CapBnd"] == (1 << 41) - 1
    assert st.caps["CapAmb"] == 16


def test_name_with_colon_is_not_a_field() -> None:
    st = parse_status(variant(Name="Uid: 0 0 0 0"))
    assert st.name == "Uid: 0 0 0 0"
    assert st.uids == (UID,) * 4


@pytest.mark.parametrize(
    "key",
    ["Pid", "Uid", "Gid", "Groups", *CAP_SETS, "NoNewPrivs", "Seccomp"],
)
def test_missing_field(key: str) -> None:
    with pytest.raises(StatusFormatError, match=key):
        parse_status(without(key))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "\n\n\n",
        "Name: x\nthis is not /proc\n",
        "\x00\x01\x02",
        variant(Uid="998 998 998"),
        variant(Uid="998 998 998 998 998"),
        variant(Gid="997"),
        variant(Uid="root root root root"),
        variant(Gid="1 2 3 x"),
        variant(Groups="10 twenty"),
        variant(Pid="abc"),
        variant(CapEff="zz00000000000400"),
        variant(CapPrm=""),
        variant(NoNewPrivs="yes"),
        variant(Seccomp="filter"),
        variant(Seccomp_filters="many"),
        # Negative numbers: int() takes them, but no kernel prints them, and a
        # negative capability mask used to make verdict()/report() loop forever.
        variant(CapEff="-1"),
        variant(CapBnd="-0000000000000400"),
        variant(CapAmb="-1"),
        variant(Uid="-1\t-1\t-1\t-1"),
        variant(Gid="997\t997\t997\t-997"),
        variant(Groups="-5"),
        variant(NoNewPrivs="-1"),
        variant(Seccomp="-2"),
        variant(Pid="-4242"),
    ],
    ids=lambda t: repr(t[:20]) if len(t) < 20 else repr(t[-60:]),
)
def test_garbage_is_a_format_error(text: str) -> None:
    with pytest.raises(StatusFormatError):
        parse_status(text)


def test_format_error_is_a_value_error() -> None:
    assert issubclass(StatusFormatError, ValueError)


# ---------------------------------------------------------------------------
# verdict


def test_hardened_fixture_has_empty_verdict() -> None:
    assert judge(HARDENED) == []
    assert judge(HARDENED, uid=UID, gid=GID) == []
    # The primary gid listed as a "supplementary" group is allowed by the promise.
    assert judge(variant(Groups=f"{GID}"), uid=UID, gid=GID) == []


@pytest.mark.parametrize("index", range(4))
def test_uid_zero_in_any_field(index: int) -> None:
    uids = [UID] * 4
    uids[index] = 0
    problems = judge(variant(Uid="\t".join(map(str, uids))))
    assert any("a uid is 0" in p for p in problems), problems


@pytest.mark.parametrize("index", range(4))
def test_gid_zero_in_any_field(index: int) -> None:
    gids = [GID] * 4
    gids[index] = 0
    problems = judge(variant(Gid="\t".join(map(str, gids))))
    assert any("a gid is 0" in p for p in problems), problems
    assert not any("uid" in p for p in problems)


def test_root_everything_names_everything() -> None:
    text = variant(
        Uid="0\t0\t0\t0",
        Gid="0\t0\t0\t0",
        Groups="0 1 2",
        CapInh="0000000000000000",
        CapPrm="000001ffffffffff",
        CapEff="000001ffffffffff",
        CapBnd="000001ffffffffff",
        CapAmb="0000000000000000",
        NoNewPrivs="0",
        Seccomp="0",
    )
    problems = " | ".join(judge(text))
    for needle in (
        "a uid is 0",
        "a gid is 0",
        "supplementary groups",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "NoNewPrivs",
        "Seccomp is 0",
    ):
        assert needle in problems


# Every capability bit other than NET_BIND_SERVICE that a kernel could report.
OTHER_CAPS = [bit for bit in range(41) if bit != CAP_NET_BIND_SERVICE]


@pytest.mark.parametrize("cap_set", ["CapPrm", "CapEff", "CapBnd"])
@pytest.mark.parametrize("bit", [0, 7, 12, 13, 21, 40, 63])
def test_extra_cap_in_each_set(cap_set: str, bit: int) -> None:
    mask = NET_BIND_SERVICE_MASK | (1 << bit)
    problems = judge(variant(**{cap_set: f"{mask:016x}"}))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{cap_set} is {mask:016x}")
    assert f"extra {cap_names(1 << bit)[0]}" in problems[0]
    assert "missing" not in problems[0]


@pytest.mark.parametrize("cap_set", ["CapInh", "CapAmb"])
@pytest.mark.parametrize("bit", [0, CAP_NET_BIND_SERVICE, 21, 40])
def test_any_inheritable_or_ambient_cap(cap_set: str, bit: int) -> None:
    problems = judge(variant(**{cap_set: f"{1 << bit:016x}"}))
    assert len(problems) == 1, problems
    assert problems[0].startswith(cap_set)
    assert f"extra {cap_names(1 << bit)[0]}" in problems[0]


@pytest.mark.parametrize("cap_set", ["CapPrm", "CapEff", "CapBnd"])
def test_missing_net_bind_service(cap_set: str) -> None:
    problems = judge(variant(**{cap_set: "0000000000000000"}))
    assert problems == [f"{cap_set} is 0000000000000000 (missing cap_net_bind_service)"]


def test_missing_and_extra_together() -> None:
    problems = judge(variant(CapEff="0000000000002000"))
    assert problems == [
        "CapEff is 0000000000002000 (extra cap_net_raw; missing cap_net_bind_service)"
    ]


def test_every_single_extra_cap_is_caught() -> None:
    for bit in OTHER_CAPS:
        for cap_set in CAP_SETS:
            base = 0 if cap_set in ("CapInh", "CapAmb") else NET_BIND_SERVICE_MASK
            problems = judge(variant(**{cap_set: f"{base | 1 << bit:016x}"}))
            assert problems and cap_set in problems[0], (cap_set, bit)


@pytest.mark.parametrize("value", ["0", "2"])
def test_no_new_privs_not_set(value: str) -> None:
    assert judge(variant(NoNewPrivs=value)) == ["NoNewPrivs is not set"]


@pytest.mark.parametrize("mode", [0, 1, 3])
def test_seccomp_not_filter_mode(mode: int) -> None:
    assert judge(variant(Seccomp=str(mode))) == [f"Seccomp is {mode}, not 2 (filter mode)"]


@pytest.mark.parametrize("groups", ["1", "27", "997 27", "0", "100 200 300"])
def test_supplementary_groups(groups: str) -> None:
    problems = judge(variant(Groups=groups))
    assert any("supplementary groups" in p for p in problems), problems


@pytest.mark.parametrize("index", range(4))
def test_uid_mismatch_with_expected(index: int) -> None:
    uids = [UID] * 4
    uids[index] = 1000
    text = variant(Uid="\t".join(map(str, uids)))
    assert judge(text) == []  # not root, so only the expected uid can catch it
    problems = judge(text, uid=UID)
    assert len(problems) == 1 and "expected all 998" in problems[0]


@pytest.mark.parametrize("index", range(4))
def test_gid_mismatch_with_expected(index: int) -> None:
    gids = [GID] * 4
    gids[index] = 1000
    text = variant(Gid="\t".join(map(str, gids)))
    assert judge(text) == []
    problems = judge(text, gid=GID)
    assert len(problems) == 1 and "expected all 997" in problems[0]


def test_wrong_expected_ids() -> None:
    assert len(judge(HARDENED, uid=UID + 1)) == 1
    assert len(judge(HARDENED, gid=GID + 1)) == 1
    assert len(judge(HARDENED, uid=0, gid=0)) == 2


def test_verdict_is_empty_only_for_the_promised_state() -> None:
    """Each single-line deviation from the fixture yields at least one problem."""
    deviations = {
        "Uid": ["0\t998\t998\t998", "998\t998\t998\t0"],
        "Gid": ["997\t0\t997\t997"],
        "Groups": ["4", "0"],
        "CapInh": ["0000000000000400"],
        "CapPrm": ["0000000000000401", "0000000000000000"],
        "CapEff": ["0000000000200400", "0000000000000000"],
        "CapBnd": ["000001ffffffffff", "0000000000000000"],
        "CapAmb": ["0000000000000400"],
        "NoNewPrivs": ["0"],
        "Seccomp": ["0", "1"],
    }
    for key, values in deviations.items():
        for value in values:
            assert judge(variant(**{key: value})), (key, value)


# ---------------------------------------------------------------------------
# This process


def test_own_status_parses_and_is_not_hardened() -> None:
    text = Path("/proc/self/status").read_text()
    st = parse_status(text)
    assert st.pid == os.getpid()
    assert st.uids[:3] == os.getresuid()
    assert st.gids[:3] == os.getresgid()
    assert set(st.groups) == set(os.getgroups())
    problems = verdict(st)
    # A test runner is never the hardened helper (it has no seccomp filter that
    # leaves exactly NET_BIND_SERVICE), and as root every id check fires as well.
    assert problems
    if os.geteuid() == 0:
        assert any("a uid is 0" in p for p in problems)
        assert any("a gid is 0" in p for p in problems) == (0 in st.gids)
    assert len(report(st)) == 4 + len(CAP_SETS) + 2


# ---------------------------------------------------------------------------
# cap_names and report


def test_cap_names() -> None:
    assert cap_names(0) == []
    assert cap_names(NET_BIND_SERVICE_MASK) == ["cap_net_bind_service"]
    assert cap_names(1) == ["cap_chown"]
    assert cap_names(1 << 21) == ["cap_sys_admin"]
    assert cap_names(1 << 40) == ["cap_checkpoint_restore"]
    assert cap_names(1 << 41) == ["cap_41"]
    assert cap_names(1 << 63) == ["cap_63"]
    assert cap_names((1 << 13) | (1 << 12) | 1) == ["cap_chown", "cap_net_admin", "cap_net_raw"]
    assert len(cap_names((1 << 41) - 1)) == 41
    assert cap_names((1 << 41) - 1)[-1] == "cap_checkpoint_restore"
    assert cap_names(0xFFFF_FFFF_FFFF_FFFF)[-1] == "cap_63"


def test_report_lines() -> None:
    lines = report(parse_status(HARDENED))
    assert lines == [
        "pid       4242 (privsock-helper)",
        "uid       998 998 998 998",
        "gid       997 997 997 997",
        "groups    (none)",
        "CapInh    0000000000000000 -",
        "CapPrm    0000000000000400 cap_net_bind_service",
        "CapEff    0000000000000400 cap_net_bind_service",
        "CapBnd    0000000000000400 cap_net_bind_service",
        "CapAmb    0000000000000000 -",
        "NoNewPrivs 1",
        "Seccomp   2 (1 filters)",
    ]
    assert report(parse_status(without("Seccomp_filters")))[-1] == "Seccomp   2"


def test_expected_filter_count_must_match_exactly() -> None:
    # The helper passes the count it saw before loading its own filter, plus one:
    # Seccomp=2 alone may be a container runtime's filter.
    st = parse_status(HARDENED)
    assert st.seccomp_filters == 1
    assert verdict(st, seccomp_filters=1) == []
    for wrong in (0, 2):
        assert verdict(st, seccomp_filters=wrong) == [
            f"Seccomp_filters is 1, expected {wrong}"
        ]
