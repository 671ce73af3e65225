"""`privsock exec --connect PATH`: an ordinary user starts an unmodified
server on a privileged port through a socket-activated helper, with no root
anywhere in its chain. The helper here is started per connection by
systemd-socket-activate, as systemd's Accept=yes socket would
(test_shared_helper.py has the same under a real systemd with several users).

The refusals of the command line need no helper and no root."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from privsock import auditjson
from privsock.client import CONNECT_RATE_WAIT, SocketCreator
from privsock.errors import InvalidArgument, RateLimited
from privsock.helper.procstatus import cap_names

from .conftest import TEST_POLICY
from .helper_proc import socket_activated
from .test_exec import PRIVSOCK, PROBE, message_lines, status_field, wait_listening
from .test_run import shared_dir  # noqa: F401 (a fixture)

NOBODY = {"user": "nobody", "group": "nogroup", "extra_groups": []}
LISTEN = ("--listen", "tcp:127.0.0.1:80")
# With ambient CAP_NET_BIND_SERVICE, as a service with AmbientCapabilities= has it.
WITH_AMBIENT_CAP = [
    "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
    "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service", "--",
]  # fmt: skip


@pytest.fixture
def activated_helper(test_policy: Path, shared_dir: Path) -> Iterator[Path]:  # noqa: F811
    with socket_activated(test_policy, shared_dir) as path:
        yield path


def exec_connect(path: Path | str, *args: str, prefix: tuple[str, ...] = (),
                 **popen: Any) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [*prefix, PRIVSOCK, "exec", "--connect", str(path), *args],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        stdin=subprocess.DEVNULL, **popen,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("option", "value"),
    [("--user", "nobody"), ("--group", "nogroup"), ("--groups", ""), ("--policy", "/etc/p")],
)
def test_identity_options_are_refused_with_connect(option: str, value: str) -> None:
    """The command runs as the caller: naming anyone else is a usage error,
    before any connection is made."""
    result = exec_connect("/nonexistent/helper.sock", option, value, *LISTEN, "--", "true")
    assert result.returncode == 64, result.stderr
    assert result.stderr.splitlines() == [
        f"privsock: exec: {option} cannot be combined with --connect: the command runs as "
        "the caller, and the shared helper's own policy decides by the caller's uid"
    ]


def test_exec_needs_user_or_connect() -> None:
    result = subprocess.run([PRIVSOCK, "exec", *LISTEN, "--", "true"], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 64
    assert result.stderr.splitlines() == [
        "privsock: exec: give --user USER (as root), or --connect PATH (as the user who runs "
        "the command)"
    ]


@pytest.mark.root
def test_root_is_refused_with_connect(activated_helper: Path) -> None:
    """No drop happens with --connect, so a root caller's server would run as
    root: refused before the helper is asked for anything."""
    assert os.geteuid() == 0
    result = exec_connect(activated_helper, *LISTEN, "--", "true")
    assert result.returncode == 64, result.stderr
    assert result.stderr.splitlines() == [
        "privsock: exec: refusing to run the command as root: --connect runs it as the caller, "
        "with no drop; as root, give --user USER (and --policy FILE) instead"
    ]


@pytest.mark.root
def test_a_missing_socket_is_an_unavailable_service(shared_dir: Path) -> None:  # noqa: F811
    missing = shared_dir / "no-helper.sock"
    result = exec_connect(missing, *LISTEN, "--", "true", **NOBODY)
    assert result.returncode == 69, result.stderr
    assert message_lines(result.stderr) == [
        f"privsock: exec: helper did not start: cannot connect to {missing}: "
        "No such file or directory; nothing was started"
    ]


def _boss_lines(stderr: str) -> list[dict[str, Any]]:
    return [auditjson.parse(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.fixture
def probe_connect(activated_helper: Path) -> Callable[..., dict[str, Any]]:
    def run(*args: str, prefix: tuple[str, ...] = (), **popen: Any) -> dict[str, Any]:
        result = exec_connect(
            activated_helper, *args, "--name", "web", *LISTEN, "--", sys.executable, "-I",
            "-c", PROBE, prefix=prefix, **popen,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        seen: dict[str, Any] = json.loads(result.stdout)
        seen["boss"] = _boss_lines(result.stderr)
        return seen

    return run


@pytest.mark.root
def test_an_ordinary_user_gets_port_80_and_the_server_runs_as_itself(
    probe_connect: Callable[..., dict[str, Any]],
) -> None:
    seen = probe_connect("--setenv", "GREETING=hi", "--keep-env", "KEPT",
                         env={"SECRET_TOKEN": "the caller's", "KEPT": "yes",
                              "LISTEN_FDS": "9", "PATH": os.environ["PATH"]},
                         **NOBODY)  # fmt: skip
    print(json.dumps({k: seen[k] for k in ("socks", "fds", "pid")}))
    assert seen["socks"] == [{"fd": 3, "family": "AF_INET", "type": "SOCK_STREAM",
                              "addr": ["127.0.0.1", 80], "listening": 1,
                              "inheritable": True}]  # fmt: skip
    assert seen["fds"] == [0, 1, 2, 3]
    env = seen["env"]
    assert (env["LISTEN_FDS"], env["LISTEN_PID"], env["LISTEN_FDNAMES"]) == (
        "1", str(seen["pid"]), "web")
    # exec's clean environment, as in the root start: nothing else of the caller's.
    assert (env["USER"], env["GREETING"], env["KEPT"]) == ("nobody", "hi", "yes")
    assert "SECRET_TOKEN" not in env
    status = seen["status"]
    assert set(status_field(status, "Uid").split()) == {str(pwd.getpwnam("nobody").pw_uid)}
    assert status_field(status, "NoNewPrivs") == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status_field(status, cap), 16) == 0, cap
    # The boss's own audit line names the user and the command.
    granted = [r for r in seen["boss"] if r["decision"] == "granted"]
    assert [(r["port"], r["user"], r["command"][0]) for r in granted] == [
        (80, "nobody", sys.executable)]


@pytest.mark.root
def test_a_caller_with_capabilities_passes_none_to_the_server(
    probe_connect: Callable[..., dict[str, Any]],
) -> None:
    """A caller holding an ambient capability (a service with
    AmbientCapabilities=) would hand it to the server across the exec: exec
    --connect sheds every capability set it can before the exec."""
    seen = probe_connect(prefix=tuple(WITH_AMBIENT_CAP))
    status = seen["status"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status_field(status, cap), 16) == 0, (cap, status_field(status, cap))
    assert status_field(status, "NoNewPrivs") == "1"


@pytest.mark.root
def test_a_denied_port_starts_nothing(activated_helper: Path, shared_dir: Path) -> None:  # noqa: F811
    marker = shared_dir / "started"
    result = exec_connect(activated_helper, "--listen", "tcp:127.0.0.1:22", "--",
                          "/bin/sh", "-c", f"touch {marker}", **NOBODY)  # fmt: skip
    assert result.returncode == 77, result.stderr
    assert message_lines(result.stderr) == [
        "privsock: exec: tcp:127.0.0.1:22: denied by policy (port); nothing was started"
    ]
    assert not marker.exists()


@pytest.fixture
def rate_limited_helper(request: pytest.FixtureRequest, policy_factory: Callable[[str], Path],
                        shared_dir: Path) -> Iterator[Path]:  # noqa: F811  # fmt: skip
    """A socket-activated helper whose policy grants ``request.param`` sockets
    a second, one at a time: its bucket is empty at each connection, so the
    first token comes 1/rate s after it."""
    policy = policy_factory(TEST_POLICY.replace("rate = 100000.0", f"rate = {request.param}")
                            .replace("burst = 100000", "burst = 1"))  # fmt: skip
    with socket_activated(policy, shared_dir) as path:
        yield path


# The first token 1000 s away (beyond any wait), or 2 s away: within
# SocketCreator's own default wait (CONNECT_RATE_WAIT), which exec must not use.
SLOW, TWO_SECONDS = "0.001", "0.5"


@pytest.mark.root
@pytest.mark.parametrize("rate_limited_helper", [SLOW, TWO_SECONDS], indirect=True)
def test_the_shared_helpers_rate_limit_is_exit_75(rate_limited_helper: Path) -> None:
    """--rate-wait bounds every wait, also the library's for a shared helper's
    first token: 0 refuses at once (before, the library waited its own 2 s
    and the server started)."""
    result = exec_connect(rate_limited_helper, "--rate-wait", "0", *LISTEN, "--", "true",
                          **NOBODY)  # fmt: skip
    assert result.returncode == 75, result.stderr
    assert message_lines(result.stderr) == [
        "privsock: exec: tcp:127.0.0.1:80: still rate limited when --rate-wait ran out; "
        "nothing was started"
    ]
    decisions = [r["decision"] for r in _boss_lines(result.stderr) if r["op"] == "CREATE"]
    assert decisions == ["rate_limited"]


@pytest.mark.root
@pytest.mark.parametrize("rate_limited_helper", [TWO_SECONDS], indirect=True)
def test_a_longer_rate_wait_gets_the_first_token_silently(rate_limited_helper: Path) -> None:
    """The first token of a fresh connection is always waited for: no
    "rate limited" line for it, one rate_limited audit line, then the grant."""
    result = exec_connect(rate_limited_helper, "--rate-wait", "30", *LISTEN, "--", "true",
                          **NOBODY)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert message_lines(result.stderr) == []
    decisions = [r["decision"] for r in _boss_lines(result.stderr) if r["op"] == "CREATE"]
    assert decisions == ["rate_limited", "granted"]


@pytest.mark.root
@pytest.mark.parametrize("rate_limited_helper", [TWO_SECONDS], indirect=True)
def test_socket_creators_rate_wait(rate_limited_helper: Path) -> None:
    """The library's own wait: rate_wait=0 raises RateLimited for the first
    socket; the default (CONNECT_RATE_WAIT, 2 s) waits for it."""
    assert CONNECT_RATE_WAIT == 2.0
    with (SocketCreator(connect=str(rate_limited_helper), audit_sink=None, rate_wait=0) as c,
          pytest.raises(RateLimited)):  # fmt: skip
        c.create("udp", "127.0.0.1", 80)
    with SocketCreator(connect=str(rate_limited_helper), audit_sink=None) as c:
        c.create("udp", "127.0.0.1", 80).close()  # udp: no TIME_WAIT from earlier tests
    with pytest.raises(InvalidArgument, match="rate_wait"):
        SocketCreator(connect=str(rate_limited_helper), rate_wait=float("nan"))


STATIC_SERVER = r"""
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
/* A socket-activated server with no libc to preload into: fd 3 is its socket. */
int main(void) {
    const char *fds = getenv("LISTEN_FDS");
    if (!fds || strcmp(fds, "1") != 0) return 2;
    int c = accept(3, 0, 0);
    if (c < 0) return 3;
    const char reply[] = "static-server\n";
    write(c, reply, sizeof reply - 1);
    close(c);
    return 0;
}
"""


@pytest.mark.root
def test_a_static_server_gets_its_socket(activated_helper: Path, shared_dir: Path) -> None:  # noqa: F811
    """exec --connect hands over a bound socket: how the server is linked does
    not matter (LD_PRELOAD, authbind's way in, never reaches a static binary)."""
    source, binary = shared_dir / "static_server.c", shared_dir / "static_server"
    source.write_text(STATIC_SERVER)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    proc = subprocess.Popen(
        [PRIVSOCK, "exec", "--connect", str(activated_helper), *LISTEN, "--", str(binary)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        cwd="/", **NOBODY,
    )  # fmt: skip
    try:
        wait_listening(proc, 80)
        with socket.create_connection(("127.0.0.1", 80), timeout=10) as c:
            assert c.makefile().readline() == "static-server\n"
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err


BAD_HELPER = Path(__file__).parent / "fakes" / "bad_helper.py"


@pytest.mark.root
def test_a_socket_bound_elsewhere_is_refused(test_policy: Path, shared_dir: Path) -> None:  # noqa: F811
    """Whatever answers at the --connect path (a path someone else suggested,
    a compromised helper) can hand over only sockets bound where exec asked:
    one bound to another address, which the server would then serve, is
    refused and nothing starts."""
    helper = [sys.executable, str(BAD_HELPER), "wrong_address"]
    with socket_activated(test_policy, shared_dir, helper) as path:
        result = exec_connect(path, *LISTEN, "--", "true", **NOBODY)
    assert result.returncode == 70, result.stderr
    [line] = message_lines(result.stderr)
    assert re.fullmatch(
        r"privsock: exec: privsock helper sent a socket bound to 127\.0\.0\.2 port \d+ for "
        r"tcp:127\.0\.0\.1:80; the connection was closed; nothing was started", line), line


@pytest.mark.root
def test_inspect_judges_a_connect_server_by_its_own_promise(activated_helper: Path) -> None:
    """The server keeps its caller's (full) bounding set: `inspect --expect
    connect-server` passes it, `--expect server` names the bounding set."""
    proc = subprocess.Popen(
        [PRIVSOCK, "exec", "--connect", str(activated_helper), *LISTEN, "--", sys.executable,
         "-I", "-c", "import time; time.sleep(60)"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        cwd="/", **NOBODY,
    )  # fmt: skip
    try:
        wait_listening(proc, 80)
        deadline = time.monotonic() + 30
        while b"time.sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the server was not exec'd"
            time.sleep(0.02)
        judged = {expect: subprocess.run([PRIVSOCK, "inspect", "--expect", expect,
                                          str(proc.pid)], capture_output=True, text=True,
                                         timeout=30, check=False)
                  for expect in ("connect-server", "server")}  # fmt: skip
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    ok, strict = judged["connect-server"], judged["server"]
    assert ok.returncode == 0, ok.stdout
    assert "verdict   hardened: non-root, no inheritable, permitted, effective or ambient " \
        "capability, no_new_privs" in ok.stdout  # fmt: skip
    assert strict.returncode == 1, strict.stdout
    assert [ln.strip() for ln in strict.stdout.splitlines() if ln.startswith("  - ")] == [
        f"- CapBnd is {int(_status_of(ok.stdout, 'CapBnd'), 16):016x} "
        f"({','.join(cap_names(int(_status_of(ok.stdout, 'CapBnd'), 16)))})"]


def _status_of(report: str, name: str) -> str:
    return next(ln.split()[1] for ln in report.splitlines() if ln.startswith(name + " "))
