"""The `privsock` command against hostile input, as an outsider gives it: bad
types, huge and negative numbers, empty strings, newlines and bytes that are
not UTF-8 in arguments and in the environment, policy files that are not
files, closed or broken stdin/stdout/stderr. Each case is a real subprocess
and must end with one `privsock: ...` line (a usage error may add its usage
lines) and its documented exit code: never a traceback, never half-done."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from privsock import auditjson

from .conftest import DEFAULT_POLICY

PRIVSOCK = str(Path(sys.executable).with_name("privsock"))
POLICY = str(DEFAULT_POLICY)
LONG_SOCKET = "/tmp/" + "x" * 200
NOT_UTF8 = os.fsdecode(b"\xff\xfe")
EXEC = ["exec", "--policy", POLICY, "--user", "nobody", "--listen", "tcp:127.0.0.1:80"]


@dataclass(frozen=True)
class Case:
    args: list[str]
    code: int
    says: str  # in the one message line
    env: Mapping[str, str] = field(default_factory=dict)


def _c(code: int, says: str, *args: str, env: Mapping[str, str] | None = None) -> Case:
    return Case(list(args), code, says, env or {})


ARGUMENTS = {
    # the command line
    "no-command": _c(64, "required: command"),
    "unknown-command": _c(64, "invalid choice", "bind"),
    "inspect-zero": _c(64, "'0' is not a process id", "inspect", "0"),
    "inspect-negative": _c(64, "'-1' is not a process id", "inspect", "--", "-1"),
    "inspect-empty": _c(64, "'' is not a process id", "inspect", ""),
    "inspect-arabic-digits": _c(64, "is not a process id", "inspect", "\u0661\u0662"),
    "inspect-huge": _c(66, "no process 9999999999", "inspect", "9999999999"),
    "backlog-negative": _c(64, "not a backlog", *EXEC, "--backlog", "-1", "--", "true"),
    "backlog-huge": _c(64, "not a backlog", *EXEC, "--backlog", "9" * 30, "--", "true"),
    "backlog-5000-digits": _c(64, "not a backlog", *EXEC, "--backlog", "9" * 5000, "--", "true"),
    "inspect-5000-digits": _c(64, "is not a process id", "inspect", "9" * 5000),
    "listen-port-5000-digits": _c(64, "not a number in 1-65535", "exec", "--user", "nobody",
                                  "--listen", "tcp:127.0.0.1:" + "9" * 5000),
    "allow-port-5000-digits": _c(64, "not a number in 1-65535", "run", "--policy", POLICY,
                                 "--user", "nobody", "--allow", "tcp:" + "9" * 5000, "--", "true"),
    "as-port-5000-digits": _c(64, "not a number in 1-65535", "check-policy", POLICY, "--as",
                              "root", "tcp:0.0.0.0:" + "9" * 5000),
    "backlog-float": _c(64, "not a backlog", *EXEC, "--backlog", "1e3", "--", "true"),
    "rate-wait-nan": _c(64, "not a number of seconds", *EXEC, "--rate-wait", "nan", "--", "true"),
    "rate-wait-inf": _c(64, "not a number of seconds", *EXEC, "--rate-wait", "1e400", "--", "true"),
    "rate-wait-negative": _c(64, "not a number of seconds", *EXEC, "--rate-wait=-1", "--", "true"),
    "listen-empty": _c(64, "argument --listen", "exec", "--user", "nobody", "--listen", ""),
    "listen-port-huge": _c(64, "not a number in 1-65535", "exec", "--user", "nobody",
                           "--listen", "tcp:127.0.0.1:99999999999999999999"),
    "listen-port-arabic": _c(64, "not a number in 1-65535", "exec", "--user", "nobody",
                             "--listen", "tcp:127.0.0.1:\u0668\u0660"),
    "listen-not-utf8": _c(64, "not a numeric IPv4 or IPv6 address", "exec", "--user", "nobody",
                          "--listen", f"tcp:{NOT_UTF8}:80"),
    "name-newline": _c(64, "argument --name", *EXEC, "--name", "a\nb", "--", "true"),
    "setenv-no-name": _c(64, "argument --setenv", *EXEC, "--setenv", "=x", "--", "true"),
    "keep-env-not-utf8": _c(64, "argument --keep-env", *EXEC, "--keep-env", NOT_UTF8, "--", "true"),
    "chdir-empty": _c(64, "give an absolute path", *EXEC, "--chdir", "", "--", "true"),
    "audit-log-empty": _c(64, "expected stderr, file:PATH or syslog", *EXEC, "--audit-log", "",
                          "--", "true"),
    "audit-log-file-empty": _c(64, "needs a path", *EXEC, "--audit-log", "file:", "--", "true"),
    "exec-connect-empty": _c(64, "is not a unix socket path", "exec", "--connect", "",
                             "--listen", "tcp:127.0.0.1:80", "--", "true"),
    "exec-connect-too-long": _c(64, "is not a unix socket path", "exec", "--connect",
                                LONG_SOCKET, "--listen", "tcp:127.0.0.1:80", "--", "true"),
    "run-connect-empty": _c(64, "is not a unix socket path", "run", "--connect", "", "--", "true"),
    "run-connect-too-long": _c(64, "is not a unix socket path", "run", "--connect", LONG_SOCKET,
                               "--", "true"),
    "run-allow-port-zero": _c(64, "argument --allow", "run", "--policy", POLICY, "--user",
                              "nobody", "--allow", "tcp:0", "--", "true"),
    "run-allow-scoped": _c(64, "scoped addresses (%zone) are not supported", "run", "--policy",
                           POLICY, "--user", "nobody", "--allow", "udp:[fe80::1%lo]:53",
                           "--", "true"),
    "check-as-port-huge": _c(64, "not a number in 1-65535", "check-policy", POLICY, "--as", "root",
                             "tcp:0.0.0.0:65536"),
    "check-option-unknown": _c(64, "invalid choice", "check-policy", POLICY, "--option", "x"),
    # users and groups
    "user-empty": _c(67, "no such user: ''", *EXEC[:3], "--user", "", "--listen",
                     "tcp:127.0.0.1:80", "--", "true"),
    "user-newline": _c(67, "no such user: 'no\\nbody'", *EXEC[:3], "--user", "no\nbody",
                       "--listen", "tcp:127.0.0.1:80", "--", "true"),
    "user-huge-uid": _c(67, "no such user", *EXEC[:3], "--user", "9" * 25, "--listen",
                        "tcp:127.0.0.1:80", "--", "true"),
    "user-uid-minus-one": _c(67, "no such user: '4294967295'", *EXEC[:3], "--user", "4294967295",
                             "--listen", "tcp:127.0.0.1:80", "--", "true"),
    "user-arabic-digit": _c(67, "no such user: '\u0661'", *EXEC[:3], "--user", "\u0661",
                            "--listen", "tcp:127.0.0.1:80", "--", "true"),
    "group-arabic-digits": _c(67, "no such group", *EXEC, "--group",
                              "\u0666\u0665\u0665\u0663\u0664", "--", "true"),
    "groups-arabic-digit": _c(67, "no such group", *EXEC, "--groups", "\u0661", "--", "true"),
    "user-5000-digits": _c(67, "no such user", *EXEC[:3], "--user", "9" * 5000, "--listen",
                           "tcp:127.0.0.1:80", "--", "true"),
    "group-huge-gid": _c(67, "no such group", *EXEC, "--group", "9" * 25, "--", "true"),
    "groups-not-utf8": _c(67, "no such group", *EXEC, "--groups", f"{NOT_UTF8},,", "--", "true"),
    "as-user-not-utf8": _c(67, "no user '\\udcff\\udcfe'", "check-policy", POLICY, "--as",
                           NOT_UTF8, "tcp:0.0.0.0:80"),
    # the command
    "command-empty": _c(127, "command not found: ''", *EXEC, "--", ""),
    "command-not-utf8": _c(127, "command not found", *EXEC, "--", NOT_UTF8),
    # policy paths that are not policy files
    "policy-empty-path": _c(66, "the policy path is empty", "check-policy", ""),
    "policy-directory": _c(66, "is a directory, not a regular file", "check-policy", "/tmp"),
    "policy-device": _c(66, "is a device, not a regular file", "check-policy", "/dev/zero"),
    "policy-newline-path": _c(66, "cannot open", "check-policy", "/nonexistent\n/x"),
    "policy-not-utf8-path": _c(66, "cannot open", "check-policy", f"/nonexistent/{NOT_UTF8}"),
    "exec-policy-directory": _c(66, "is a directory", "exec", "--policy", "/tmp", "--user",
                                "nobody", "--listen", "tcp:127.0.0.1:80", "--", "true"),
    "run-policy-directory": _c(66, "is a directory", "run", "--policy", "/tmp", "--user",
                               "nobody", "--", "true"),
    # the environment privsock itself runs in
    "env-ascii-io": _c(66, "cannot open", "check-policy", f"/nonexistent/{NOT_UTF8}",
                       env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C"}),
    "env-bogus-locale": _c(66, "cannot open", "check-policy", "/nonexistent",
                           env={"LANG": "xx_XX.bogus", "LC_ALL": "\n"}),
    "env-activation-garbage": _c(66, "cannot open", "check-policy", "/nonexistent",
                                 env={"LISTEN_FDS": "-1", "LISTEN_PID": "x\n",
                                      "NOTIFY_SOCKET": "\n", "HOME": NOT_UTF8, "PATH": ""}),
}


def message_lines(stderr: str) -> list[str]:
    """stderr without audit lines and without the usage that follows a usage error."""
    lines = []
    for line in stderr.splitlines():
        if line.startswith("usage:"):
            break
        try:
            auditjson.parse(line)
        except ValueError:
            lines.append(line)
    return lines


def cli(
    args: list[str], env: Mapping[str, str] | None = None, **popen: Any
) -> subprocess.CompletedProcess[str]:
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.run(
        [PRIVSOCK, *args], env={**os.environ, **(env or {})}, text=True, timeout=60,
        check=False, errors="surrogateescape", **streams,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("privsock: "), result.stderr
    assert says in lines[0], lines[0]


@pytest.mark.parametrize("case", list(ARGUMENTS.values()), ids=list(ARGUMENTS))
def test_bad_arguments_and_environment(case: Case) -> None:
    result = cli(case.args, case.env)
    assert_one_line(result, case.code, case.says)
    assert result.stdout == ""


# -- policy files -------------------------------------------------------------


def _folder(mode: int) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="privsock-hostile-"))  # in /tmp: root's, sticky
    folder.chmod(mode)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A root-owned 0755 directory, so that the policy walk gets to the file."""
    yield from _folder(0o755)


POLICY_FILES: dict[str, tuple[bytes, int, str]] = {
    "not-utf8": (b"version = 1\n# \xff\xfe\n", 65, "is not valid UTF-8 (byte 0xff at offset 14)"),
    "nul-byte": (b"version = 1\0\n", 65, "invalid TOML"),
    "nested-arrays": (b"version = 1\nx = " + b"[" * 30000 + b"]" * 30000 + b"\n", 65,
                      "nested too deeply"),
    "too-large": (b"version = 1\n" + b"#" * 70000 + b"\n", 65, "larger than 65536 bytes"),
    "nested-tables": (b"version = 1\nx = " + b"{a=" * 5000 + b"1" + b"}" * 5000 + b"\n", 65,
                      "nested too deeply"),
    "huge-version": (b"version = " + b"9" * 40 + b"\n", 65, "unsupported version"),
    "version-5000-digits": (b"version = " + b"9" * 5000 + b"\n", 65,
                            "invalid TOML: a number has more than 4300 digits"),
    "rate-nan": (b'version = 1\n[helper]\nuser = "privsock"\ngroup = "privsock"\n'
                 b"[rate_limit]\nrate = nan\nburst = 1\n", 65, "rate_limit.rate: nan"),
    "user-with-nul": (b'version = 1\n[helper]\nuser = "priv\\u0000sock"\ngroup = "privsock"\n',
                      65, "is not a valid user name"),
}


@pytest.mark.parametrize("name", list(POLICY_FILES))
def test_hostile_policy_contents(root_dir: Path, name: str) -> None:
    content, code, says = POLICY_FILES[name]
    path = root_dir / "policy.toml"
    path.write_bytes(content)
    assert_one_line(cli(["check-policy", str(path)]), code, says)


def test_a_huge_sparse_policy_is_not_read(root_dir: Path) -> None:
    path = root_dir / "policy.toml"
    with path.open("wb") as f:
        f.truncate(1 << 40)
    assert_one_line(cli(["check-policy", str(path)]), 65, "larger than 65536 bytes")


def test_a_fifo_policy_does_not_block(root_dir: Path) -> None:
    path = root_dir / "policy.toml"
    os.mkfifo(path)
    assert_one_line(cli(["check-policy", str(path)]), 66, "is a FIFO, not a regular file")


def test_a_relative_policy_in_a_removed_directory(root_dir: Path) -> None:
    """Found: os.getcwd() raised FileNotFoundError out of the policy walk."""
    gone = root_dir / "gone"
    for args in (["check-policy", "policy.toml"],
                 ["exec", "--policy", "policy.toml", "--user", "nobody", "--listen",
                  "tcp:127.0.0.1:80", "--", "true"]):  # fmt: skip
        gone.mkdir()
        done = subprocess.run(
            ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone),
             PRIVSOCK, *args],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert_one_line(done, 66, "policy.toml: a relative path, but the current directory "
                        "is gone (No such file or directory); give an absolute path")


# -- stdin, stdout and stderr ----------------------------------------------------


def test_output_to_a_closed_stdout_is_an_error() -> None:
    """Found: exit 0 and nothing printed; now EBADF, as a C program gets."""
    result = cli(["check-policy", POLICY], stdout=None, preexec_fn=lambda: os.close(1))
    assert_one_line(result, 74, "privsock: cannot write to stdout: Bad file descriptor")


@pytest.mark.parametrize("args", [["check-policy", POLICY], ["--help"], ["--version"],
                                  ["inspect", "1"]], ids=["check-policy", "help", "version",
                                                           "inspect"])
def test_output_to_a_full_device_is_an_error(args: list[str]) -> None:
    """Found: a traceback (OSError: No space left on device)."""
    with open("/dev/full", "w") as full:
        result = cli(args, stdout=full, stderr=subprocess.PIPE)
    assert_one_line(result, 74, "privsock: cannot write to stdout: No space left on device")


def test_output_to_a_pipe_nobody_reads_is_an_error() -> None:
    """Found: a traceback (BrokenPipeError), as in `privsock check-policy | head -c1`
    once the reader has gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        result = cli(["check-policy", POLICY], stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)
    assert_one_line(result, 74, "privsock: cannot write to stdout: Broken pipe")


def test_errors_with_stderr_closed_never_go_to_stdout() -> None:
    """Found: with fd 2 closed Python has no sys.stderr, and print(file=None)
    wrote the error line to stdout, into what a script reads as the verdict."""
    result = cli(["check-policy", "/nonexistent"], stdout=subprocess.PIPE, stderr=None,
                 preexec_fn=lambda: os.close(2))
    assert result.returncode == 66
    assert result.stdout == ""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the server (nobody) can write its findings to."""
    yield from _folder(0o777)


def _exec_recording(shared_dir: Path, extra: list[str], command: str = "exec") -> list[str]:
    """exec (or run) argv whose server writes where its fds 0-2 point, then
    exits (each read before the file is opened, which takes the lowest free fd)."""
    script = ("import os, sys\n"
              "seen = [os.readlink(f'/proc/self/fd/{n}') if os.path.exists(f'/proc/self/fd/{n}')"
              " else 'closed' for n in (0, 1, 2)]\n"
              "open(sys.argv[1], 'w').write('\\n'.join(seen))\n")
    listen = ["--listen", "udp:127.0.0.1:53"] if command == "exec" else []
    return [command, "--policy", POLICY, "--user", "nobody", *listen, *extra,
            "--", "/usr/bin/python3", "-c", script, str(shared_dir / "fds")]


@pytest.mark.root
@pytest.mark.parametrize("command", ["exec", "run"])
@pytest.mark.parametrize("fd", [0, 1, 2])
def test_exec_with_a_closed_stdio_fd_gives_the_server_dev_null(
    shared_dir: Path, fd: int, command: str
) -> None:
    """Found: with fd 1 closed, exec got its socket and then died of an
    AttributeError (sys.stdout is None), half-done, and run died before
    starting the program; a closed fd 0 or 2 was passed on closed, for the
    server's first socket or file to land on."""
    audit = shared_dir / "audit.log"
    result = cli(_exec_recording(shared_dir, ["--audit-log", f"file:{audit}"], command),
                 preexec_fn=lambda: os.close(fd))  # fmt: skip
    assert "Traceback" not in result.stderr
    assert result.returncode == 0, result.stderr
    seen = (shared_dir / "fds").read_text().splitlines()
    assert seen[fd] == "/dev/null", seen
    if command == "exec":
        assert [r["decision"] for r in map(auditjson.parse, audit.read_text().splitlines())
                if r["op"] == "CREATE"] == ["granted", "granted"]  # fmt: skip


@pytest.mark.root
@pytest.mark.parametrize("command", ["exec", "run"])
@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_exec_never_grants_what_a_dead_stderr_cannot_log(
    shared_dir: Path, stderr: str, command: str
) -> None:
    """--audit-log stderr (the default) on a closed stderr, or one that cannot
    be written: exit 69 and the server never starts; no grant goes into nothing."""
    argv = _exec_recording(shared_dir, [], command)
    if stderr == "closed":
        result = cli(argv, stderr=None, preexec_fn=lambda: os.close(2))
    else:
        with open("/dev/full", "w") as full:
            result = cli(argv, stderr=full)
    assert result.returncode == 69
    assert not (shared_dir / "fds").exists()
