"""The example echo service's own checks: whose sockets these are, and telling
the truth about its privilege."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from privsock.examples.echo import ActivationError, identity, listen_fds

from .helper_proc import DROPPED_STATUS


def test_listen_fds_follows_sd_listen_fds() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "77", "LISTEN_FDNAMES": "udp-53:tcp-53"}
    assert listen_fds(env, 77) == [(3, "udp-53"), (4, "tcp-53")]
    assert listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": "77"}, 77) == [(3, "fd0")]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no LISTEN_FDS/LISTEN_PID"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "78"}, "not my pid 77"),
        ({"LISTEN_FDS": "0", "LISTEN_PID": "77"}, "not a number of sockets"),
        ({"LISTEN_FDS": "-1", "LISTEN_PID": "77"}, "not a number of sockets"),
        ({"LISTEN_FDS": "x", "LISTEN_PID": "77"}, "not a number of sockets"),
        ({"LISTEN_FDS": "2", "LISTEN_PID": "77", "LISTEN_FDNAMES": "a"}, "1 names for 2"),
    ],
)
def test_listen_fds_refuses_what_is_not_ours(env: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError, match=message):
        listen_fds(env, 77)


def test_identity_says_no_privilege_only_when_true() -> None:
    said = identity(DROPPED_STATUS)
    assert "I hold no privilege: CapEff=0 CapPrm=0 CapBnd=0 NoNewPrivs=1." in said
    for before, after in [
        ("CapEff:\t0000000000000000", "CapEff:\t0000000000000400"),
        ("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff"),
        ("CapAmb:\t0000000000000000", "CapAmb:\t0000000000000400"),
        ("NoNewPrivs:\t1", "NoNewPrivs:\t0"),
        ("Uid:\t999\t999\t999\t999", "Uid:\t999\t999\t0\t999"),
    ]:
        said = identity(DROPPED_STATUS.replace(before, after))
        assert "WARNING: I hold privilege" in said and "no privilege" not in said, after


def test_started_with_someone_elses_sockets_it_refuses_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-m", "privsock.examples.echo"],
        env={"LISTEN_FDS": "1", "LISTEN_PID": "1"},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 64
    assert re.fullmatch(
        r"privsock echo: LISTEN_PID is '1', not my pid \d+: not my sockets\n", result.stderr
    )
