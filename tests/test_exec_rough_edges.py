"""What a new user of `privsock exec` runs into: a TCP rule without reuseaddr,
more sockets than the policy's burst, and the error lines of every path,
each said once on one line."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from privsock.helper.exitcodes import Exit

from .conftest import TEST_POLICY
from .test_exec import PRIVSOCK, message_lines, privsock_exec

pytestmark = pytest.mark.usefixtures("root")

# A port no other test uses: without SO_REUSEADDR a TIME_WAIT left on it would
# make the bind fail.
MINIMAL_TCP = """
version = 1
[helper]
user = "privsock"
group = "privsock"
[[allow]]
transports = ["tcp"]
ports = [8631]
addresses = ["127.0.0.0/8"]
"""


def _slow_policy(burst: int, rate: float) -> str:
    return f"""
version = 1
[helper]
user = "privsock"
group = "privsock"
[rate_limit]
rate = {rate}
burst = {burst}
[[allow]]
transports = ["udp"]
ports = ["1000-1023"]
addresses = ["127.0.0.1/32"]
"""


def _udp(count: int) -> list[str]:
    ports = range(1000, 1000 + count)
    return [arg for port in ports for arg in ("--listen", f"udp:127.0.0.1:{port}")]


# -- 1. reuseaddr --------------------------------------------------------------


def test_tcp_without_reuseaddr_names_the_option_and_both_fixes(
    policy_factory: Callable[[str], Path],
) -> None:
    policy = policy_factory(MINIMAL_TCP)
    result = privsock_exec(
        policy, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:8631",
        "--", "/bin/echo", "RAN",
    )
    assert result.returncode == Exit.NOPERM and result.stdout == ""
    assert message_lines(result.stderr) == [
        "privsock: exec: tcp:127.0.0.1:8631: denied by policy (option reuseaddr, which exec "
        'asks for on TCP sockets): grant it with options = ["reuseaddr"] in an allow rule for '
        "tcp only, or pass --no-reuseaddr; nothing was started"
    ]
    # Both fixes work.
    fixed = privsock_exec(
        policy, "--user", "privsock-demo", "--no-reuseaddr", "--listen", "tcp:127.0.0.1:8631",
        "--", "/bin/echo", "RAN",
    )  # fmt: skip
    assert fixed.returncode == 0 and fixed.stdout == "RAN\n", fixed.stderr
    granted = policy_factory(MINIMAL_TCP + 'options = ["reuseaddr"]\n')
    fixed = privsock_exec(
        granted, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:8631",
        "--", "/bin/echo", "RAN",
    )
    assert fixed.returncode == 0 and fixed.stdout == "RAN\n", fixed.stderr


def test_check_policy_warns_of_it(policy_factory: Callable[[str], Path]) -> None:
    result = subprocess.run(
        [PRIVSOCK, "check-policy", str(policy_factory(MINIMAL_TCP))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "allow[0]: allows tcp port 8631 on 127.0.0.0/8; options: none; note: privsock exec asks "
        'for reuseaddr on TCP sockets, which this rule refuses: add options = ["reuseaddr"], '
        "or run exec with --no-reuseaddr"
    ) in result.stdout.splitlines()[3]


# -- 4. rate limit ---------------------------------------------------------------


def test_more_sockets_than_the_burst_wait_for_tokens_and_say_so(
    policy_factory: Callable[[str], Path],
) -> None:
    # Burst 2 at 20/s: sockets 3 and 4 come about 50 ms apart.
    policy = policy_factory(_slow_policy(burst=2, rate=20.0))
    result = privsock_exec(
        policy, "--user", "privsock-demo", *_udp(4), "--audit-log", "file:/dev/null",
        "--", sys.executable, "-I", "-c", "import os; print(os.environ['LISTEN_FDS'])",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "4\n"
    assert result.stderr.splitlines() == [
        "privsock: exec: rate limited by the policy (bursts of 2, 20/s) after 2 of 4 sockets; "
        "waiting for tokens, at most 10s"
    ]


def test_a_request_that_cannot_fit_is_refused_at_once_and_precisely(
    policy_factory: Callable[[str], Path],
) -> None:
    policy = policy_factory(_slow_policy(burst=2, rate=0.25))
    result = privsock_exec(policy, "--user", "privsock-demo", *_udp(5), "--", "/bin/echo", "RAN")
    assert result.returncode == 75 and result.stdout == ""
    assert message_lines(result.stderr) == [
        "privsock: exec: 5 sockets asked for, but the policy's rate limit gives at most 2 at "
        "once and 0.25 per second after that: the other 3 need 12.0s of waiting, more than "
        f"--rate-wait 10s; raise [rate_limit] burst to 5 in {policy}, or --rate-wait; "
        "nothing was started"
    ]
    assert "{" not in result.stderr  # refused before any helper started or any request
    # --rate-wait 0: never wait, so anything over the burst is refused.
    result = privsock_exec(
        policy, "--user", "privsock-demo", "--rate-wait", "0", *_udp(3), "--", "/bin/echo", "RAN"
    )
    assert result.returncode == 75
    assert "the other 1 need 4.0s of waiting, more than --rate-wait 0s" in result.stderr
    # Within the burst nothing waits.
    result = privsock_exec(
        policy, "--user", "privsock-demo", "--rate-wait", "0", *_udp(2),
        "--audit-log", "file:/dev/null", "--", "/bin/echo", "RAN",
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "3601", "soon"])
def test_rate_wait_must_be_seconds(policy_factory: Callable[[str], Path], value: str) -> None:
    result = privsock_exec(
        policy_factory(MINIMAL_TCP), "--user", "privsock-demo", "--rate-wait", value,
        "--listen", "tcp:127.0.0.1:8631", "--", "/bin/true",
    )  # fmt: skip
    assert result.returncode == Exit.USAGE
    assert f"{value!r} is not a number of seconds in 0-3600" in result.stderr


# -- 7. every error said once ------------------------------------------------------


def _repeats(line: str) -> list[str]:
    """Word sequences said twice in one line: any word right after itself, or
    any three words in a row that occur again."""
    words = re.findall(r"[\w./:=\[\]-]+", line.lower())
    found = [f"{a} {b}" for a, b in itertools.pairwise(words) if a == b]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - 2):
        tri = tuple(words[i : i + 3])
        if tri in seen:
            found.append(" ".join(tri))
        seen.add(tri)
    return found


def test_the_repeat_finder_finds_what_the_issue_saw() -> None:
    assert _repeats("privsock: exec: exec: cannot run 'x'") == ["exec: exec:"]
    assert _repeats(
        "privsock helper did not start (exit 77: missing privilege: run as root or give "
        "CAP_NET_BIND_SERVICE): no CAP_NET_BIND_SERVICE: run as root or give "
        "CAP_NET_BIND_SERVICE"
    )
    assert _repeats("privsock: exec: tcp:0.0.0.0:22: denied by policy (port)") == []


@pytest.fixture
def error_paths(
    policy_factory: Callable[[str], Path], tmp_path: Path
) -> list[tuple[str, list[str], int]]:
    good = policy_factory(TEST_POLICY)
    insecure = policy_factory(TEST_POLICY)
    insecure.chmod(0o666)
    invalid = policy_factory(TEST_POLICY.replace("ports = [22]", "ports = [22, 22]"))
    nouser = policy_factory(TEST_POLICY.replace('user = "privsock"', 'user = "nosuchuser9"'))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    script = locked / "serve"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    listen = ["--listen", "tcp:127.0.0.1:80", "--audit-log", "file:/dev/null"]
    ex = [PRIVSOCK, "exec", "--user", "privsock-demo"]
    rn = [PRIVSOCK, "run", "--user", "privsock-demo", "--audit-log", "file:/dev/null"]
    return [
        ("denied", [*ex, "--policy", str(good), "--listen", "tcp:0.0.0.0:22", "--", "true"], 77),
        ("not found", [*ex, "--policy", str(good), *listen, "--", "no-such-cmd-9"], 127),
        ("cannot run", [*ex, "--policy", str(good), *listen, "--", str(script)], 126),
        ("no policy", [*ex, "--policy", str(tmp_path / "none"), *listen, "--", "true"], 66),
        ("insecure", [*ex, "--policy", str(insecure), *listen, "--", "true"], 78),
        ("invalid", [*ex, "--policy", str(invalid), *listen, "--", "true"], 65),
        ("no user", [*ex, "--policy", str(nouser), *listen, "--", "true"], 67),
        ("no command", [*ex, "--policy", str(good), *listen], 64),
        ("not root", ["setpriv", "--reuid=privsock", "--regid=privsock", "--clear-groups",
                      *ex, "--policy", str(good), *listen, "--", "true"], 77),
        ("run no policy", [*rn, "--policy", str(tmp_path / "none"), "--", "true"], 66),
        ("run insecure", [*rn, "--policy", str(insecure), "--", "true"], 78),
        ("run not found", [*rn, "--policy", str(good), "--", "no-such-cmd-9"], 127),
        ("run no connect", [PRIVSOCK, "run", "--user", "privsock-demo",
                            "--connect", str(tmp_path / "none.sock"), "--", "true"], 69),
        ("check insecure", [PRIVSOCK, "check-policy", str(insecure)], 78),
        ("check invalid", [PRIVSOCK, "check-policy", str(invalid)], 65),
        ("check missing", [PRIVSOCK, "check-policy", str(tmp_path / "none")], 66),
        ("inspect", [PRIVSOCK, "inspect", "999999999"], 66),
    ]  # fmt: skip


def test_every_cli_error_is_one_line_said_once(
    error_paths: list[tuple[str, list[str], int]],
) -> None:
    for name, argv, code in error_paths:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == code, (name, result.stderr)
        lines = message_lines(result.stderr)
        assert len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith("privsock: "), (name, lines)
        assert _repeats(lines[0]) == [], (name, lines[0])
        # The start-up failure's own words say that the helper did not start.
        assert "cannot start the helper" not in lines[0], (name, lines[0])
        assert "Traceback" not in result.stderr


def test_a_helper_that_cannot_start_is_reported_once(test_policy: Path) -> None:
    # The issue's example: the library started without privilege.
    script = (
        "import sys, privsock\n"
        "try:\n"
        f"    privsock.SocketCreator({str(test_policy)!r}, audit_sink=None).start()\n"
        "except privsock.HelperStartError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        ["setpriv", "--reuid=privsock", "--regid=privsock", "--clear-groups",
         sys.executable, "-I", "-c", script],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    line = result.stdout.strip()
    assert line.startswith("privsock helper did not start (exit 77): no CAP_NET_BIND_SERVICE")
    assert _repeats(line) == [], line
