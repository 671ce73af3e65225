"""`privsock inspect` judges each process by its role: the helper's promise, or
a server that `privsock exec` dropped, chosen from the command line or by
--expect. So SECURITY.md's checklist can be followed after exec, when no
helper is left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privsock.client import SocketCreator
from privsock.helper.exitcodes import Exit
from privsock.helper.procstatus import parse_status
from privsock.helperprocess import default_helper_argv
from privsock.inspection import PROFILES, choose, server_verdict

from .helper_proc import DROPPED_STATUS
from .test_exec import PRIVSOCK

# --- pure: the server profile and the choice ----------------------------------


def test_a_dropped_server_passes() -> None:
    assert server_verdict(parse_status(DROPPED_STATUS)) == []
    with_groups = DROPPED_STATUS.replace("Groups:\t", "Groups:\t995 111")
    assert server_verdict(parse_status(with_groups)) == []  # groups are the server's own
    with_seccomp = DROPPED_STATUS.replace("Seccomp:\t0", "Seccomp:\t2")
    assert server_verdict(parse_status(with_seccomp)) == []


@pytest.mark.parametrize(
    ("before", "after", "problem"),
    [
        ("Uid:\t999\t999\t999\t999", "Uid:\t0\t0\t0\t0", "a uid is 0"),
        ("Uid:\t999\t999\t999\t999", "Uid:\t999\t999\t0\t999", "a uid is 0"),
        ("Uid:\t999\t999\t999\t999", "Uid:\t999\t999\t1000\t999", "the uids differ"),
        ("Gid:\t995\t995\t995\t995", "Gid:\t995\t0\t995\t995", "a gid is 0"),
        ("Gid:\t995\t995\t995\t995", "Gid:\t995\t995\t996\t995", "the gids differ"),
        ("Groups:\t", "Groups:\t0 995", "supplementary group 0 (root) remains"),
        ("CapInh:\t0000000000000000", "CapInh:\t0000000000000400", "CapInh is"),
        ("CapPrm:\t0000000000000000", "CapPrm:\t0000000000000400", "CapPrm is"),
        ("CapEff:\t0000000000000000", "CapEff:\t0000000000000001", "CapEff is"),
        ("CapBnd:\t0000000000000000", "CapBnd:\t000001ffffffffff", "CapBnd is"),
        ("CapAmb:\t0000000000000000", "CapAmb:\t0000000000000400", "CapAmb is"),
        ("NoNewPrivs:\t1", "NoNewPrivs:\t0", "NoNewPrivs is not set"),
    ],
)
def test_the_server_profile_finds_every_difference(
    before: str, after: str, problem: str
) -> None:
    assert before in DROPPED_STATUS
    found = server_verdict(parse_status(DROPPED_STATUS.replace(before, after)))
    assert len(found) == 1 and found[0].startswith(problem), found


@pytest.mark.parametrize(
    ("argv", "profile"),
    [
        (["/usr/bin/python3", "-I", "-m", "privsock.helper.main", "--policy", "p"], "helper"),
        (["/usr/bin/python3", "/usr/bin/privsock-helper", "--policy", "p"], "helper"),
        (["privsock-helper"], "helper"),
        ([*default_helper_argv(), "--policy", "p"], "helper"),
        (["python3", "-c", "print('from privsock.helper.main import main;')"], "server"),
        (["python3", "-I", "from privsock.helper.main import main; main()"], "server"),
        (["gunicorn", "app:app"], "server"),
        (["python3", "-m", "privsock.helper.mainly"], "server"),
        ([], "server"),
    ],
)
def test_the_profile_follows_the_command_line(argv: list[str], profile: str) -> None:
    assert choose(argv, None)[0] == profile
    for expect in ("helper", "server"):
        assert choose(argv, expect) == (expect, f"--expect {expect}")


# --- real processes ---------------------------------------------------------------


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PRIVSOCK, "inspect", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.root
def test_a_server_privsock_exec_dropped_is_hardened(test_policy: Path) -> None:
    # exec keeps the pid: the server runs as the exec's own process.
    server = subprocess.Popen(
        [PRIVSOCK, "exec", "--policy", str(test_policy), "--user", "privsock-demo",
         "--listen", "udp:127.0.0.1:1017", "--audit-log", "file:/dev/null",
         "--", sys.executable, "-I", "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "up\n", server.stderr
        result = inspect(str(server.pid))
        assert result.returncode == Exit.OK, result.stdout
        assert "profile   server (its command line is not the helper's" in result.stdout
        assert "verdict   hardened: non-root, no capability in any set, no_new_privs" in (
            result.stdout
        )
        for cap_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert f"{cap_set:<9} 0000000000000000 -" in result.stdout
        assert "NoNewPrivs 1" in result.stdout
        # Judged as a helper it lacks the one capability and the filter.
        result = inspect("--expect", "helper", str(server.pid))
        assert result.returncode == 1
        assert "profile   helper (--expect helper)" in result.stdout
        assert "verdict   NOT hardened as privsock promises for a helper:" in result.stdout
        assert "missing cap_net_bind_service" in result.stdout
    finally:
        server.communicate(timeout=30)


@pytest.mark.root
def test_the_helper_is_judged_as_a_helper(creator: SocketCreator) -> None:
    assert creator.pid is not None
    result = inspect(str(creator.pid))
    assert result.returncode == Exit.OK, result.stdout
    assert "profile   helper (its command line runs the privsock helper)" in result.stdout
    assert "verdict   hardened: non-root, only CAP_NET_BIND_SERVICE" in result.stdout
    result = inspect("--expect", "server", str(creator.pid))
    assert result.returncode == 1
    assert "CapPrm is 0000000000000400 (cap_net_bind_service)" in result.stdout


def test_a_root_process_fails_either_profile() -> None:
    # This test process: root (or at least not dropped) and no no_new_privs.
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        try:
            time.sleep(0.1)
            for expect in ([], ["--expect", "helper"], ["--expect", "server"],
                           ["--expect", "connect-server"]):  # fmt: skip
                result = inspect(*expect, str(sleeper.pid))
                assert result.returncode == 1, (expect, result.stdout)
                assert "NoNewPrivs is not set" in result.stdout
        finally:
            sleeper.kill()


def test_expect_takes_only_the_three_roles() -> None:
    assert PROFILES == ("helper", "server", "connect-server")
    result = inspect("--expect", "boss", "1")
    assert result.returncode == Exit.USAGE
    assert result.stderr.splitlines()[0] == (
        "privsock: argument --expect: invalid choice: 'boss' "
        "(choose from 'helper', 'server', 'connect-server')"
    )
    for role in PROFILES:  # each is taken (this process then fails it: not dropped)
        result = inspect("--expect", role, str(os.getpid()))
        assert result.returncode == Exit.FAILED, (role, result.stderr)
        assert f"profile   {role} (--expect {role})" in result.stdout
