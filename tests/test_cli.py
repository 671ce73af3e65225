"""`privsock check-policy` and `privsock inspect`, run as real commands."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from privsock.client import SocketCreator
from privsock.errors import DESCRIPTIONS
from privsock.helper.exitcodes import Exit

from .conftest import DEFAULT_POLICY, REPO


def privsock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from privsock.cli import main; main()", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_check_policy_accepts_the_default_and_explains_it() -> None:
    result = privsock("check-policy", str(DEFAULT_POLICY))
    assert result.returncode == Exit.OK, result.stderr
    assert "OK" in result.stdout
    assert "port 53" in result.stdout and "port 22" in result.stdout
    assert "runs as user privsock" in result.stdout


def test_check_policy_warns_when_reuseport_is_granted() -> None:
    result = privsock("check-policy", str(REPO / "policy" / "examples" / "bench.toml"))
    assert result.returncode == Exit.OK, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING: ")]
    assert [w.split(" grants reuseport on ")[0] for w in warnings] == [
        "WARNING: allow[0]", "WARNING: allow[1]",
    ]  # fmt: skip
    assert all("any boss of any helper running as privsock" in w for w in warnings)
    default = privsock("check-policy", str(DEFAULT_POLICY))
    assert "WARNING" not in default.stdout + default.stderr


def test_check_policy_refuses_a_users_symlink_in_tmp(policy_factory: Callable[[str], Path]) -> None:
    """The reported case: nobody plants a symlink in /tmp to a root-owned policy."""
    target = policy_factory((REPO / "policy" / "examples" / "bench.toml").read_text())
    folder = Path(tempfile.mkdtemp(prefix="privsock-symlink-"))  # in /tmp: root's, sticky
    try:
        folder.chmod(0o1777)
        link = folder / "x.toml"
        link.symlink_to(target)
        os.lchown(link, pwd.getpwnam("nobody").pw_uid, -1)
        result = privsock("check-policy", str(link))
    finally:
        shutil.rmtree(folder)
    assert result.returncode == Exit.CONFIG, result.stdout
    assert result.stderr == (
        f"privsock: REFUSED: {link} is a symlink owned by uid {pwd.getpwnam('nobody').pw_uid}; "
        "a symlink on the way to the policy must be owned by root\n"
    )


def test_check_policy_gives_the_helpers_verdict_on_an_insecure_file(test_policy: Path) -> None:
    test_policy.chmod(0o646)
    result = privsock("check-policy", str(test_policy))
    assert result.returncode == Exit.CONFIG
    assert result.stderr.startswith("privsock: REFUSED: ")
    assert "writable by other" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_check_policy_names_the_bad_key(policy_factory: Callable[[str], Path]) -> None:
    path = policy_factory("version = 1\n[rate_limit]\nrate = -1\nburst = 3\n")
    result = privsock("check-policy", str(path))
    assert result.returncode == Exit.DATAERR
    assert "rate_limit.rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_policy_missing_file() -> None:
    result = privsock("check-policy", "/nonexistent/policy.toml")
    assert result.returncode == Exit.NOINPUT
    assert "No such file" in result.stderr


@pytest.mark.root
def test_inspect_says_a_running_helper_is_hardened(creator: SocketCreator) -> None:
    assert creator.pid is not None
    result = privsock("inspect", str(creator.pid))
    assert result.returncode == Exit.OK, result.stdout
    assert "verdict   hardened" in result.stdout
    assert "CapEff    0000000000000400 cap_net_bind_service" in result.stdout
    assert "NoNewPrivs 1" in result.stdout
    assert "Seccomp   2" in result.stdout
    assert "Landlock  kernel ABI " in result.stdout


# privsock inspect where a seccomp filter answers ENOSYS for the Landlock syscalls.
INSPECT_WITHOUT_LANDLOCK = """
import errno, sys
from privsock import cli
import pyseccomp as sc
runtime = sc.SyscallFilter(sc.ALLOW)
runtime.add_rule(sc.ERRNO(errno.ENOSYS), "landlock_create_ruleset")
runtime.load()
sys.argv[0] = "privsock"
cli.main()
"""


@pytest.mark.root
def test_inspect_says_when_landlock_is_unavailable(creator: SocketCreator) -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-c", INSPECT_WITHOUT_LANDLOCK, "inspect", str(creator.pid)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == Exit.OK, result.stderr
    assert "Landlock  unavailable here: the kernel has no Landlock, or a seccomp filter" in (
        result.stdout
    )


def test_inspect_says_this_process_is_not_hardened() -> None:
    result = privsock("inspect", str(os.getpid()))
    assert result.returncode == 1
    assert "NOT hardened" in result.stdout
    assert "NoNewPrivs is not set" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["inspect", "abc"], Exit.USAGE, "is not a process id"),
        (["inspect", "0"], Exit.USAGE, "is not a process id"),
        (["inspect", "999999999"], Exit.NOINPUT, "no process 999999999"),
        ([], Exit.USAGE, "required: command"),
        (["frobnicate"], Exit.USAGE, "invalid choice"),
        (["check-policy", "a.toml", "b.toml"], Exit.USAGE, "unrecognized arguments"),
    ],
)
def test_bad_arguments_get_one_line_and_a_usage(args: list[str], code: int, message: str) -> None:
    result = privsock(*args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_lists_every_helper_exit_code() -> None:
    readme = (REPO / "README.md").read_text()
    for code, text in DESCRIPTIONS.items():
        assert f"| {int(code)} | `{code.name}` | {text} |" in readme


def test_the_cli_loads_only_what_exec_runs() -> None:
    """`privsock exec` starts fast: importing the CLI loads neither run's
    supervisor nor check-policy's rendering nor the json/logging a sink of
    exec's never uses; each is imported by the command that needs it."""
    probe = "import sys, privsock.cli; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True,
                          check=True)  # fmt: skip
    loaded = set(done.stdout.split())
    assert "privsock.execcmd" in loaded
    for lazy in ("privsock.run.command", "privsock.run.bindreq", "privsock.run.supervise",
                 "privsock.run.kernel", "privsock.policyview"):  # fmt: skip
        assert lazy not in loaded, lazy


def test_python_m_privsock_is_the_cli() -> None:
    done = subprocess.run([sys.executable, "-I", "-m", "privsock", "--version"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "privsock 0.1.0")
