"""deploy/systemd: the units are valid, every directive is explained, and the
helper really works the way they start it: as the policy's user with
CAP_NET_BIND_SERVICE only, on an accepted SOCK_SEQPACKET connection, under
systemd's own sandbox (a real systemd, booted in a container)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsock.helper import protocol
from privsock.helper.exitcodes import Exit
from privsock.helper.policyparse import parse_policy
from privsock.helper.procstatus import parse_status, verdict
from privsock.helperprocess import HELPER_ENV, default_helper_argv, helper_path

from .conftest import DEFAULT_POLICY, REPO
from .containers.harness import PODMAN, Podman, build_rootfs, require_tools
from .helper_proc import proc_status
from .nonroot import NON_ROOT_START, readable_policy

UNITS = REPO / "deploy" / "systemd"
SOCKET_UNIT = UNITS / "privsock-helper.socket"
SERVICE_UNIT = UNITS / "privsock-helper@.service"
INSTALLED_PYTHON = "/usr/bin/python3"  # Debian's, as the package installs it
INSTALLED_PATH = "['/usr/lib/python3/dist-packages']"  # the helper's sys.path there
SOCKET_PATH = "/run/privsock/helper.sock"


def _directives(unit: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def _installed(directory: Path) -> list[Path]:
    """The units as an operator installs them, the interpreter path pointing
    at this checkout's venv (verify insists that ExecStart exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for unit in (SOCKET_UNIT, SERVICE_UNIT):
        text = unit.read_text()
        assert (INSTALLED_PYTHON in text and INSTALLED_PATH in text) or unit is SOCKET_UNIT
        (directory / unit.name).write_text(
            text.replace(INSTALLED_PYTHON, str(REPO / ".venv" / "bin" / "python"))
            .replace(INSTALLED_PATH, repr(list(helper_path())))
        )
        out.append(directory / unit.name)
    if REPO.is_relative_to("/tmp"):
        # A checkout under /tmp (a CI clone, say) is hidden by the unit's own
        # PrivateTmp=; an installed helper lives under /opt or /usr instead.
        dropin = directory / f"{SERVICE_UNIT.name}.d"
        dropin.mkdir(exist_ok=True)
        (dropin / "checkout.conf").write_text(f"[Service]\nBindReadOnlyPaths={REPO}\n")
    return out


def _verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: scripts/bootstrap installs Debian's systemd")
    # --man=no: Documentation= URLs are not checked against man pages. It needs
    # no running systemd: it loads the units offline.
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        cwd=units[0].parent, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_units_verify_without_a_warning(tmp_path: Path) -> None:
    result = _verify(_installed(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("NoNewPrivileges=yes", "NoNewPrivileges=yes\nNoNewPrivilegez=yes"), "Unknown key"),
        (("@system-service seccomp", "@system-servic seccomp"), "Unknown system call group"),
        (("\nExecStart=", "\nUser\nExecStart="), "Missing '='"),
    ],
)
def test_verify_reports_a_broken_unit(
    tmp_path: Path, change: tuple[str, str], complaint: str
) -> None:
    # The control for the test above: a typo does show up (as a warning).
    units = _installed(tmp_path)
    service = units[1]
    service.write_text(service.read_text().replace(*change))
    result = _verify(units)
    assert complaint in result.stdout + result.stderr


def test_every_directive_is_explained() -> None:
    readme = (UNITS / "README.md").read_text()
    for unit in (SOCKET_UNIT, SERVICE_UNIT):
        for key, _ in _directives(unit):
            assert f"`{key}=" in readme, f"{unit.name}: {key}= is not explained in README.md"


def test_the_service_holds_the_hardening_directives() -> None:
    directives = _directives(SERVICE_UNIT)
    settings = dict(directives)
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    assert settings["ProtectSystem"] == "strict"
    assert settings["PrivateTmp"] == "yes"
    assert settings["StandardInput"] == "socket"
    # The helper refuses any user but the policy's, and must be able to load
    # its own seccomp filter (systemd's @system-service lacks seccomp).
    policy = parse_policy(DEFAULT_POLICY.read_text())
    assert (settings["User"], settings["Group"]) == (policy.user, policy.group)
    filters = [value for key, value in directives if key == "SystemCallFilter"]
    assert "seccomp" in filters[0].split()
    # Nor its Landlock syscalls (systemd 252 has them only in @known).
    for name in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"):
        assert name in filters[0].split()
    # Never these: they would break what the helper hands out (see README.md).
    for key in ("PrivateNetwork", "PrivateUsers", "IPAddressDeny", "DynamicUser"):
        assert key not in settings
    assert dict(_directives(SOCKET_UNIT))["ListenSequentialPacket"] == SOCKET_PATH


@pytest.fixture
def shared_policy(root: None) -> Iterator[Path]:
    with readable_policy() as path:
        yield path


def _create(request_id: int, transport: str, address: str, port: int) -> bytes:
    req = protocol.Create(request_id, protocol.Transport[transport.upper()],
                          ipaddress.ip_address(address), port)  # fmt: skip
    return protocol.encode_request(req)


def test_non_root_start_on_an_accepted_connection(shared_policy: Path, tmp_path: Path) -> None:
    """What the units do, without systemd: the policy's user, the capability
    ambient and alone in the bounding set, fd 0 an accepted SEQPACKET connection."""
    path = str(tmp_path / "helper.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(1)
        boss = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boss.connect(path)
        conn, _ = listener.accept()
    with boss, conn:
        helper = subprocess.Popen(
            [*NON_ROOT_START, *default_helper_argv(), "--policy", str(shared_policy)],
            stdin=conn, stderr=subprocess.PIPE, env=HELPER_ENV,
        )  # fmt: skip
        conn.close()
        boss.settimeout(30)
        boss.send(protocol.encode_request(protocol.Ping(1)))
        assert protocol.decode_reply(boss.recv(64)).status is protocol.Status.OK
        assert verdict(parse_status(proc_status(helper.pid))) == []
        boss.send(_create(2, "udp", "127.0.0.1", 53))
        data, fds, _, _ = socket.recv_fds(boss, 64, 1)
        assert protocol.decode_reply(data).status is protocol.Status.OK
        with socket.socket(fileno=fds[0]) as sock:
            assert sock.getsockname() == ("127.0.0.1", 53)
    _, err = helper.communicate(timeout=30)
    assert helper.returncode == Exit.OK, err


# -- the units under a real systemd -------------------------------------------

# Runs inside the container as a user in group privsock-clients: one boss
# connection, then `privsock inspect` on the helper systemd started for it.
BOSS = """
import ipaddress, json, socket, subprocess, sys, time
from privsock.helper import protocol
T = protocol.Transport
out = {}
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.strerror}))
    sys.exit(0)
s.settimeout(30)
s.send(protocol.encode_request(protocol.Ping(1)))
out["ping"] = protocol.decode_reply(s.recv(64)).status.name
for rid, (tr, addr, port) in enumerate([(T.UDP, "127.0.0.1", 53), (T.TCP, "0.0.0.0", 22)], 2):
    while True:  # a shared helper's bucket starts empty: wait for a token
        s.send(protocol.encode_request(protocol.Create(rid, tr, ipaddress.ip_address(addr), port)))
        data, fds, _, _ = socket.recv_fds(s, 64, 1)
        reply = protocol.decode_reply(data)
        if reply.status is not protocol.Status.RATE_LIMITED:
            break
        time.sleep(reply.detail / 1000)
    names = [socket.socket(fileno=f).getsockname() for f in fds]
    out[f"{addr}:{port}"] = [protocol.decode_reply(data).status.name, names]
pid = subprocess.run(["systemctl", "show", "--property=MainPID", "--value", "privsock-helper@*"],
                     capture_output=True, text=True, check=True).stdout.split()[0]
inspect = subprocess.run(
    [sys.executable, "-I", "-c", "from privsock.cli import main; main()", "inspect", pid],
    capture_output=True, text=True)
out["inspect"] = [inspect.returncode, inspect.stdout]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def systemd_container() -> Iterator[tuple[Podman, str]]:
    """A container whose PID 1 is systemd, with the units installed and the
    socket listening. --privileged: systemd needs to set up the namespaces and
    filters the units ask for, as on a host."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it runs rootful podman")
    require_tools()
    runner = Podman()
    policies = {"policy.toml": DEFAULT_POLICY.read_text()}
    rootfs = build_rootfs(owner=0, policies=policies)
    try:
        (rootfs / "etc/machine-id").touch(mode=0o444)
        with (rootfs / "etc/group").open("a") as group:
            group.write("privsock-clients:x:990:nobody\n")
        _installed(rootfs / "etc/systemd/system")
        (rootfs / "opt").mkdir()
        (rootfs / "opt/boss.py").write_text(BOSS)
        name = _boot_with_the_socket_unit(runner, rootfs)
        yield runner, name
    finally:
        runner.cleanup()
        shutil.rmtree(rootfs, ignore_errors=True)


def _boot_with_the_socket_unit(runner: Podman, rootfs: Path) -> str:
    """Boot systemd in a container on ``rootfs`` (no network), wait until it is
    up and start privsock-helper.socket; the container's name."""
    name, cmd, env = runner.command(
        rootfs, ["--detach", "--privileged", "--systemd=always", "--network=none"],
        ["/usr/lib/systemd/systemd"],
    )  # fmt: skip
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
    deadline = time.monotonic() + 60
    while _in(runner, name, "systemctl", "is-system-running").strip() not in (
        "running", "degraded",
    ):  # fmt: skip
        assert time.monotonic() < deadline, "systemd did not finish booting"
        time.sleep(0.2)
    _in(runner, name, "systemctl", "start", "privsock-helper.socket", check=True)
    return name


def _in(runner: Podman, name: str, *argv: str, check: bool = False) -> str:
    done = subprocess.run(
        [*PODMAN, "exec", name, *argv],
        capture_output=True, text=True, timeout=120, env=runner.env, check=False,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr
    return done.stdout


def _boss(runner: Podman, name: str, *identity: str) -> dict[str, object]:
    python = str(REPO / ".venv" / "bin" / "python")
    out = _in(runner, name, "setpriv", *identity, "--", python, "-I", "/opt/boss.py", SOCKET_PATH)
    result: dict[str, object] = json.loads(out)
    return result


@pytest.mark.containers
@pytest.mark.slow
def test_socket_activated_helper_under_systemd(systemd_container: tuple[Podman, str]) -> None:
    runner, name = systemd_container
    got = _boss(runner, name, "--reuid=nobody", "--regid=nogroup", "--init-groups")
    assert got["ping"] == "OK"
    assert got["127.0.0.1:53"] == ["OK", [["127.0.0.1", 53]]]
    assert got["0.0.0.0:22"] == ["DENIED", []]
    code, report = got["inspect"]  # type: ignore[misc]
    assert code == 0, report
    assert "verdict   hardened" in report
    assert "CapBnd    0000000000000400 cap_net_bind_service" in report
    # The audit log went to the journal, where the boss cannot touch it.
    journal = _in(runner, name, "journalctl", "--output=cat", "--identifier=privsock-helper")
    decisions = [json.loads(line)["decision"] for line in journal.splitlines()
                 if line.startswith("{")]  # fmt: skip
    decisions = [d for d in decisions if d != "rate_limited"]
    assert decisions[-3:] == ["pong", "granted", "denied"]
    # ...and so did its start-up line: the unit lets it apply its Landlock ruleset.
    assert any(
        "hardened, serving" in line and "; Landlock: ABI " in line
        for line in journal.splitlines()
    ), journal


@pytest.mark.containers
@pytest.mark.slow
def test_only_privsock_clients_may_connect(systemd_container: tuple[Podman, str]) -> None:
    runner, name = systemd_container
    got = _boss(runner, name, "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    assert got == {"connect": "Permission denied"}
