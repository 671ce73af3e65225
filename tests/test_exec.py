"""`privsock exec` as a real command: a real helper binds, the boss drops to the
privsock user with no privilege, and execs a real program on the sockets."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from privsock import auditjson
from privsock.dropall import Target, verify
from privsock.execcmd import parse_listen
from privsock.execenv import SAFE_PATH
from privsock.helper.exitcodes import Exit

from .conftest import REPO
from .helper_proc import DROPPED_STATUS

PRIVSOCK = str(Path(sys.executable).with_name("privsock"))
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
USER = pwd.getpwnam("privsock-demo")

# What the exec'd program sees, as JSON on stdout. The fd list is taken first;
# the listing's own directory fd is closed again by the time fcntl checks each.
PROBE = """
import fcntl, json, os, socket, subprocess, sys
def is_open(fd):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True
fds = sorted(fd for fd in map(int, os.listdir("/proc/self/fd")) if is_open(fd))
socks = []
for fd in range(3, 3 + int(os.environ.get("LISTEN_FDS", "0"))):
    s = socket.socket(fileno=fd)
    socks.append({
        "fd": fd, "family": s.family.name, "type": s.type.name,
        "addr": list(s.getsockname()[:2]),
        "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
        "inheritable": os.get_inheritable(fd),
    })
    s.detach()
with open("/proc/self/status") as f:
    status = f.read()
ss = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
print(json.dumps({
    "pid": os.getpid(), "fds": fds, "socks": socks, "status": status, "ss": ss,
    "env": dict(os.environ), "cwd": os.getcwd(),
}))
"""

pytestmark = pytest.mark.root


def privsock_exec(
    policy: Path, *args: str, timeout: float = 60, **popen: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PRIVSOCK, "exec", "--policy", str(policy), *args],
        capture_output=True, text=True, timeout=timeout, check=False, **popen,
    )  # fmt: skip


def probe(policy: Path, *listen_args: str, **popen: Any) -> dict[str, Any]:
    result = privsock_exec(
        policy, "--user", "privsock-demo", *listen_args, "--", sys.executable, "-I", "-c", PROBE,
        **popen,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def message_lines(stderr: str) -> list[str]:
    """stderr without the audit lines."""
    out = []
    for line in stderr.splitlines():
        try:
            auditjson.parse(line)
        except ValueError:
            out.append(line)
    return out


def wait_listening(proc: subprocess.Popen[str], port: int, within: float = 30.0) -> None:
    """Poll /proc/net/tcp until 127.0.0.1:port is in LISTEN state (0A)."""
    local = f"0100007F:{port:04X}"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":
                return
        assert proc.poll() is None, "privsock exec ended before listening"
        time.sleep(0.02)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port} within {within}s")


def status_field(status: str, name: str) -> str:
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(name)


def test_child_gets_the_sockets_the_environment_and_no_privilege(test_policy: Path) -> None:
    seen = probe(
        test_policy,
        "--listen", "udp:127.0.0.1:1015", "--listen", "tcp:[::1]:1016",
        "--name", "dns", "--name", "web", "--backlog", "7",
        env={"LISTEN_FDNAMES": "stale", "PATH": os.environ["PATH"]},
    )  # fmt: skip
    env = seen["env"]
    assert env["LISTEN_FDS"] == "2"
    assert env["LISTEN_PID"] == str(seen["pid"])
    assert env["LISTEN_FDNAMES"] == "dns:web"
    assert (env["USER"], env["HOME"]) == ("privsock-demo", USER.pw_dir)
    assert seen["socks"] == [
        {"fd": 3, "family": "AF_INET", "type": "SOCK_DGRAM", "addr": ["127.0.0.1", 1015],
         "listening": 0, "inheritable": True},
        {"fd": 4, "family": "AF_INET6", "type": "SOCK_STREAM", "addr": ["::1", 1016],
         "listening": 1, "inheritable": True},
    ]  # fmt: skip
    # ss shows a listening socket's backlog as its Send-Q.
    assert any(
        line.split()[2] == "7" and line.split()[3] == "[::1]:1016"
        for line in seen["ss"].splitlines()
    ), seen["ss"]
    status = seen["status"]
    assert status_field(status, "Uid").split() == [str(USER.pw_uid)] * 4
    assert status_field(status, "Gid").split() == [str(USER.pw_gid)] * 4
    # By default USER's own groups from the group database, as systemd's User= gives.
    assert status_field(status, "Groups").split() == [
        str(g) for g in sorted(set(os.getgrouplist("privsock-demo", USER.pw_gid)))
    ]
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status_field(status, name), 16) == 0, name
    assert status_field(status, "NoNewPrivs") == "1"


def test_groups_gives_exactly_those_supplementary_groups(test_policy: Path) -> None:
    nogroup = grp.getgrnam("nogroup").gr_gid
    for given, expected in [(f"nogroup,{USER.pw_gid}", sorted({nogroup, USER.pw_gid})),
                            ("", [])]:  # fmt: skip
        seen = probe(test_policy, "--listen", "udp:127.0.0.1:1015", "--groups", given)
        assert status_field(seen["status"], "Groups").split() == [str(g) for g in expected]
        assert status_field(seen["status"], "NoNewPrivs") == "1"


def test_default_names_are_transport_dash_port(test_policy: Path) -> None:
    seen = probe(test_policy, "--listen", "udp:127.0.0.1:53", "--listen", "tcp:0.0.0.0:80")
    assert seen["env"]["LISTEN_FDNAMES"] == "udp-53:tcp-80"
    assert [s["addr"] for s in seen["socks"]] == [["127.0.0.1", 53], ["0.0.0.0", 80]]


def test_no_other_fd_reaches_the_command(test_policy: Path, tmp_path: Path) -> None:
    # An inheritable fd the boss was started with, and the boss's own audit file:
    # neither may reach the command.
    r, w = os.pipe()
    try:
        seen = probe(
            test_policy, "--listen", "tcp:127.0.0.1:1017",
            "--audit-log", f"file:{tmp_path / 'audit.log'}", pass_fds=(w,),
        )  # fmt: skip
    finally:
        os.close(r)
        os.close(w)
    assert seen["fds"] == [0, 1, 2, 3]


def test_stdio_is_passed_unchanged(test_policy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with out.open("w") as f:
        result = subprocess.run(
            [PRIVSOCK, "exec", "--policy", str(test_policy), "--user", "privsock-demo",
             "--listen", "udp:127.0.0.1:1018", "--", sys.executable, "-I", "-c",
             "import os, sys; print(os.readlink('/proc/self/fd/1')); print(input())"],
            stdout=f, input="from stdin", stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_text().splitlines() == [str(out), "from stdin"]


def test_denied_port_starts_nothing_and_says_why_in_one_line(test_policy: Path) -> None:
    result = privsock_exec(
        test_policy, "--user", "privsock-demo", "--listen", "udp:127.0.0.1:1019",
        "--listen", "tcp:0.0.0.0:22", "--", "/bin/echo", "STARTED",
    )  # fmt: skip
    assert result.returncode == Exit.NOPERM
    assert result.stdout == ""
    assert message_lines(result.stderr) == [
        "privsock: exec: tcp:0.0.0.0:22: denied by policy (port); nothing was started"
    ]


def test_address_in_use_is_named(test_policy: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 1020))
        taken.listen(1)
        result = privsock_exec(
            test_policy, "--user", "privsock-demo", "--listen", "udp:127.0.0.1:1020",
            "--listen", "tcp:127.0.0.1:1020", "--", "/bin/echo", "STARTED",
        )  # fmt: skip
    assert result.returncode == 69
    assert result.stdout == ""
    assert message_lines(result.stderr) == [
        "privsock: exec: tcp:127.0.0.1:1020: bind failed: EADDRINUSE "
        "(Address already in use); nothing was started"
    ]


def test_both_sides_log_grants_to_the_audit_file(test_policy: Path, tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    result = privsock_exec(
        test_policy, "--user", "privsock-demo", "--listen", "udp:127.0.0.1:1021",
        "--audit-log", f"file:{log}", "--", "/bin/true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the audit lines went to the file only
    # The helper's line arrives through a reader thread: either may come first.
    grants = sorted(
        (rec["side"], rec["transport"], rec["port"])
        for rec in map(auditjson.parse, log.read_text().splitlines())
        if rec["decision"] == "granted"
    )
    assert grants == [("boss", "udp", 1021), ("helper", "udp", 1021)]
    # The boss's line names whom the socket is for: the user and the command.
    named = {
        rec["side"]: (rec["user"], rec["command"])
        for rec in map(auditjson.parse, log.read_text().splitlines())
        if rec["decision"] == "granted"
    }
    assert named == {"boss": ("privsock-demo", ["/bin/true"]), "helper": (None, None)}


@pytest.fixture
def wsgi_dir() -> Iterator[Path]:
    """A directory the privsock user can read (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="privsock-wsgi-"))
    path.chmod(0o755)
    (path / "hello.py").write_text(textwrap.dedent("""
        import os

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [f"hello from uid {os.getuid()}".encode()]
    """))
    yield path
    shutil.rmtree(path)


def test_gunicorn_serves_on_port_80_as_privsock(test_policy: Path, wsgi_dir: Path) -> None:
    proc = subprocess.Popen(
        [PRIVSOCK, "exec", "--policy", str(test_policy), "--user", "privsock-demo",
         "--listen", "tcp:127.0.0.1:80", "--", GUNICORN, "--workers", "1",
         "--chdir", str(wsgi_dir), "hello:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Once the socket listens, a connection waits in its backlog until
        # gunicorn accepts it: only the listen() needs waiting for.
        wait_listening(proc, 80)
        with urllib.request.urlopen("http://127.0.0.1:80/", timeout=30) as reply:
            body = reply.read().decode()
        assert reply.status == 200
        assert body == f"hello from uid {USER.pw_uid}"
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert status_field(status, "Uid").split() == [str(USER.pw_uid)] * 4
        assert int(status_field(status, "CapBnd"), 16) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


LISTEN = ["--listen", "tcp:127.0.0.1:80"]
BAD_ARGS: list[tuple[list[str], int, str]] = [
    (["--listen", "tcp:localhost:80"], Exit.USAGE, "'localhost' is not a numeric"),
    (["--listen", "tcp:127.0.0.1:65536"], Exit.USAGE, "not a number in 1-65535"),
    (["--listen", "tcp:127.0.0.1:0"], Exit.USAGE, "not a number in 1-65535"),
    (["--listen", "tcp:127.0.0.1:http"], Exit.USAGE, "not a number in 1-65535"),
    (["--listen", "sctp:127.0.0.1:80"], Exit.USAGE, "transport must be udp or tcp"),
    (["--listen", "tcp:::1:80"], Exit.USAGE, "put an IPv6 address in brackets"),
    (["--listen", "tcp:80"], Exit.USAGE, "expected TRANSPORT:ADDRESS:PORT"),
    (["--listen", "tcp:[fe80::1%lo]:80"], Exit.USAGE, "scoped addresses"),
    (["--listen", "tcp:127.0.0.1:80", "--name", "a:b"], Exit.USAGE, "without ':'"),
    (["--listen", "tcp:127.0.0.1:80", "--name", "a", "--name", "b"], Exit.USAGE,
     "2 --name for 1 --listen"),
    (["--listen", "tcp:127.0.0.1:80", *LISTEN], Exit.USAGE,
     "the same --listen is given twice"),
    (["--listen", "tcp:127.0.0.1:80", "--backlog", "-1"], Exit.USAGE, "not a backlog"),
    (["--listen", "tcp:127.0.0.1:80", "--audit-log", "file:"], Exit.USAGE, "needs a path"),
    (["--listen", "tcp:127.0.0.1:80", "--audit-log", "mail"], Exit.USAGE, "expected stderr"),
    (["--setenv", "NOEQUALS", *LISTEN], Exit.USAGE, "'NOEQUALS': expected KEY=VALUE"),
    (["--setenv", "1X=y", *LISTEN], Exit.USAGE, "'1X' is not a variable name"),
    (["--setenv", "LISTEN_FDS=9", *LISTEN], Exit.USAGE, "LISTEN_FDS is set by privsock itself"),
    (["--keep-env", "A-B", *LISTEN], Exit.USAGE, "'A-B' is not a variable name"),
    (["--keep-env", "LISTEN_PID", *LISTEN], Exit.USAGE, "LISTEN_PID is set by privsock"),
    (["--user", "privsock", *LISTEN], Exit.USAGE,
     "refusing to run the command as privsock, the policy's helper user"),
    (["--user", str(pwd.getpwnam("privsock").pw_uid), *LISTEN], Exit.USAGE,
     "the policy's helper user"),
    (["--group", "privsock", *LISTEN], Exit.USAGE,
     "refusing to run the command with group privsock, the policy's helper group"),
    (["--groups", "nosuchgroup9", *LISTEN], Exit.NOUSER, "no such group: 'nosuchgroup9'"),
    (["--groups", "root", *LISTEN], Exit.USAGE, "refusing to give the command the root group"),
    (["--groups", "privsock", *LISTEN], Exit.USAGE, "the policy's helper group"),
    (["--user", "nosuchuser", *LISTEN], Exit.NOUSER, "no such user: 'nosuchuser'"),
    (["--group", "nosuchgroup", *LISTEN], Exit.NOUSER, "no such group: 'nosuchgroup'"),
    (["--user", "root", *LISTEN], Exit.USAGE, "refusing to run the command as root"),
    (["--group", "root", *LISTEN], Exit.USAGE, "refusing to run the command as root"),
    ([], Exit.USAGE, "the following arguments are required: --listen"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "code", "message"), BAD_ARGS)
def test_bad_arguments_get_one_line(
    test_policy: Path, args: list[str], code: int, message: str
) -> None:
    if "--user" not in args:
        args = ["--user", "privsock-demo", *args]
    result = privsock_exec(test_policy, *args, "--", "/bin/echo", "STARTED")
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    first = result.stderr.splitlines()[0]
    assert first.startswith("privsock: ") and message in first, result.stderr
    assert "Traceback" not in result.stderr


def test_the_environment_is_clean_and_only_named_variables_pass(test_policy: Path) -> None:
    caller = {
        "SECRET_TOKEN": "root's secret", "XDG_RUNTIME_DIR": "/run/user/0",
        "PATH": "/root/.pyenv/shims:" + os.environ["PATH"], "PYENV_ROOT": "/root/.pyenv",
        "TERM": "xterm-test", "LANG": "C.UTF-8", "LC_TIME": "C", "LD_PRELOAD": "/tmp/evil.so",
        "KEEP_ME": "kept", "NOT_SET_HERE": "x",
    }  # fmt: skip
    del caller["NOT_SET_HERE"]
    seen = probe(
        test_policy, "--listen", "udp:127.0.0.1:1015", "--keep-env", "KEEP_ME",
        "--keep-env", "NOT_SET_HERE", "--setenv", "APP_MODE=a=b", "--setenv", "TERM=vt100",
        env=caller,
    )  # fmt: skip
    assert seen["env"] == {
        "PATH": SAFE_PATH, "HOME": USER.pw_dir, "USER": "privsock-demo", "LOGNAME": "privsock-demo",
        "SHELL": USER.pw_shell, "TERM": "vt100", "LANG": "C.UTF-8", "LC_TIME": "C",
        "KEEP_ME": "kept", "APP_MODE": "a=b",
        "LISTEN_FDS": "1", "LISTEN_PID": str(seen["pid"]), "LISTEN_FDNAMES": "udp-1015",
    }  # fmt: skip


def test_the_command_is_looked_up_in_the_clean_path_not_roots(
    test_policy: Path, tmp_path: Path
) -> None:
    # A command only root's PATH has (a 0700 directory, as /root/.pyenv/shims is).
    (tmp_path / "privsock-only-in-roots-path").write_text("#!/bin/sh\necho STARTED\n")
    (tmp_path / "privsock-only-in-roots-path").chmod(0o755)
    (tmp_path / "python3").write_text("#!/bin/sh\necho SHIM\n")
    (tmp_path / "python3").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    result = privsock_exec(
        test_policy, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:80", "--",
        "privsock-only-in-roots-path", env=env,
    )  # fmt: skip
    assert result.returncode == 127
    assert result.stderr.splitlines() == [
        "privsock: exec: command not found: 'privsock-only-in-roots-path' "
        f"(searched PATH {SAFE_PATH})"
    ]
    result = privsock_exec(
        test_policy, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:80", "--",
        "python3", "-c", "import sys; print(sys.executable)", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{shutil.which('python3', path=SAFE_PATH)}\n"


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        ([], Exit.USAGE, "no command given (put it after --)"),
        (["no-such-command-xyz"], 127,
         f"command not found: 'no-such-command-xyz' (searched PATH {SAFE_PATH})"),
        (["/no/such/server"], 127, "/no/such/server: no such file"),
        (["/etc/passwd"], 126, "/etc/passwd: not executable by privsock-demo"),
        (["/usr/bin"], 126, "/usr/bin: is a directory"),
        (["/dev/null"], 126, "/dev/null: not a regular file"),
    ],
)  # fmt: skip
def test_a_command_the_user_cannot_run_is_refused_before_anything_starts(
    test_policy: Path, command: list[str], code: int, message: str
) -> None:
    result = privsock_exec(
        test_policy, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:80", "--", *command
    )
    assert result.returncode == code
    assert result.stderr.splitlines() == [f"privsock: exec: {message}"]  # not even a PING


def test_a_command_root_can_run_but_the_user_cannot_is_refused_by_its_path(
    test_policy: Path,
) -> None:
    # mkdtemp makes a 0700 directory: root finds the file, the privsock user
    # cannot reach it.
    script = Path(tempfile.mkdtemp()) / "server"
    try:
        script.write_text("#!/bin/sh\necho STARTED\n")
        script.chmod(0o755)
        result = privsock_exec(
            test_policy, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:80", "--",
            str(script),
        )  # fmt: skip
    finally:
        shutil.rmtree(script.parent)
    assert result.returncode == 126
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"privsock: exec: {script}: permission denied for privsock-demo "
        "(a directory on the way is not searchable)"
    ]


def test_chdir_starts_the_command_there(test_policy: Path) -> None:
    seen = probe(test_policy, "--listen", "udp:127.0.0.1:1015", "--chdir", "/usr/share")
    assert seen["cwd"] == "/usr/share"


def test_the_starting_directory_must_be_open_to_the_user(test_policy: Path) -> None:
    private = Path(tempfile.mkdtemp())  # 0700, root's
    try:
        (private / "inner").mkdir(mode=0o755)
        for args, cwd, message in [
            (["--chdir", str(private)], REPO,
             f"--chdir {private}: Permission denied (as privsock-demo)"),
            (["--chdir", "/no/such/dir"], REPO,
             "--chdir /no/such/dir: No such file or directory (as privsock-demo)"),
            (["--chdir", "usr"], REPO, "--chdir usr: give an absolute path"),
            # Open itself, but under a directory the user may not enter: it
            # would be a way in that the user's own path lookups do not have.
            ([], private / "inner", f"the current directory {private / 'inner'} is not open "
             "to privsock-demo; start from another directory or give --chdir DIR"),
        ]:  # fmt: skip
            result = privsock_exec(
                test_policy, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:80", *args,
                "--", "/bin/echo", "STARTED", cwd=cwd,
            )  # fmt: skip
            assert result.stderr.splitlines() == [f"privsock: exec: {message}"]
            assert result.returncode == (Exit.USAGE if args[1:] == ["usr"] else Exit.NOINPUT)
    finally:
        shutil.rmtree(private)


def test_refuses_to_run_unprivileged(test_policy: Path) -> None:
    result = privsock_exec(
        test_policy, "--user", "privsock-demo", "--listen", "tcp:127.0.0.1:80", "--", "/bin/true",
        user="privsock", group="privsock",
    )  # fmt: skip
    assert result.returncode == Exit.NOPERM
    assert result.stderr.splitlines() == [
        "privsock: exec: must be started as root: it drops to --user itself"
    ]


# -- pure parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("udp:127.0.0.1:53", "udp:127.0.0.1:53"),
        ("tcp:[::]:53", "tcp:[::]:53"),
        ("tcp:0.0.0.0:80", "tcp:0.0.0.0:80"),
        ("tcp:[0:0::1]:443", "tcp:[::1]:443"),
        ("udp:[::ffff:127.0.0.1]:53", "udp:[::ffff:7f00:1]:53"),
    ],
)
def test_parse_listen_accepts(spec: str, expected: str) -> None:
    assert str(parse_listen(spec)) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "udp", "udp:", "udp:127.0.0.1", "udp:127.0.0.1:", ":127.0.0.1:53", "UDP:127.0.0.1:53",
     "udp:127.0.0.1:+53", "udp:127.0.0.1:٥٣", "udp:[::1]53", "udp:[::1:53", "udp:[127.0.0.1]:53",
     "udp:127.1:53", "udp: 127.0.0.1:53", "udp:127.0.0.1:53:53", "udp:host.example:53"],
)  # fmt: skip
def test_parse_listen_refuses(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("CapBnd:\t0000000000000000", "CapBnd:\t0000000000000400"), "CapBnd"),
        (("CapInh:\t0000000000000000", "CapInh:\t0000000000000001"), "CapInh"),
        (("CapAmb:\t0000000000000000", "CapAmb:\t0000000000000400"), "CapAmb"),
        (("CapPrm:\t0000000000000000", "CapPrm:\t0000000000000080"), "CapPrm"),
        (("NoNewPrivs:\t1", "NoNewPrivs:\t0"), "NoNewPrivs"),
        (("Uid:\t999\t999\t999\t999", "Uid:\t999\t999\t0\t999"), "uids"),
        (("Gid:\t995\t995\t995\t995", "Gid:\t995\t0\t995\t995"), "gids"),
        (("Groups:\t", "Groups:\t27"), "supplementary"),
        (("CapEff:", "CapEfff:"), "cannot parse"),
    ],
)
def test_verify_finds_every_difference(change: tuple[str, str], problem: str) -> None:
    target = Target("privsock", 999, 995, "/nonexistent", "/usr/sbin/nologin")
    assert verify(DROPPED_STATUS, target) == []
    problems = verify(DROPPED_STATUS.replace(*change), target)
    assert len(problems) == 1 and problem in problems[0], problems
