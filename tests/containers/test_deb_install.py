"""The Debian package installed for real: `apt install ./privsock_*_all.deb`
in a clean Debian 12 root directory (minbase: no compiler, no python3) with
no network, under a real systemd as PID 1. Then `privsock exec` serves, the
socket-activated unit serves a boss in privsock-clients, and a purge leaves
nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsock import __version__

from .debian_rootfs import RootfsError, cached_rootfs
from .harness import LABEL, PODMAN, require_tools, ulimit_options

REPO = Path(__file__).resolve().parents[2]
CHECKS = Path(__file__).with_name("deb_checks.py")
TIMEOUT = 180.0

pytestmark = [pytest.mark.containers, pytest.mark.slow]


class Container:
    def __init__(self, name: str) -> None:
        self.name = name
        self.env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                    "LC_ALL": "C"}  # fmt: skip

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PODMAN, "exec", "--env=DEBIAN_FRONTEND=noninteractive", self.name, *argv],
            capture_output=True, text=True, timeout=TIMEOUT, env=self.env, check=False,
        )  # fmt: skip

    def must(self, *argv: str) -> str:
        done = self.run(*argv)
        assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def check(self, step: str) -> dict[str, object]:
        out = self.must("/usr/bin/python3", "-I", "/mnt/checks/deb_checks.py", step)
        facts: dict[str, object] = json.loads(out)
        return facts


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    subprocess.run([str(REPO / "deploy/debian/build-deb"), str(out)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    return out / f"privsock_{__version__}_all.deb"


@pytest.fixture(scope="module")
def container(deb: Path) -> Iterator[Container]:
    """systemd as PID 1 in a copy-on-write overlay of the cached root directory
    (the cache is never changed); the .deb and the check script mounted read-only."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it runs rootful podman")
    require_tools()
    try:
        rootfs = cached_rootfs()
    except RootfsError as exc:
        pytest.fail(f"no clean Debian 12 root directory: {exc}", pytrace=False)
    name = f"privsock-deb-{os.getpid()}-{time.monotonic_ns()}"
    box = Container(name)
    cmd = [
        *PODMAN, "run", "--detach", f"--name={name}", f"--label={LABEL}={os.getpid()}-deb",
        "--pull=never", "--privileged", "--systemd=always", "--network=none",
        *ulimit_options(),
        f"--volume={deb.parent}:/mnt/deb:ro", f"--volume={CHECKS.parent}:/mnt/checks:ro",
        "--rootfs", f"{rootfs}:O", "/lib/systemd/systemd",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=box.env,
                       check=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while box.run("systemctl", "is-system-running").stdout.strip() not in (
            "running", "degraded",
        ):  # fmt: skip
            assert time.monotonic() < deadline, "systemd did not finish booting"
            time.sleep(0.2)
        yield box
    finally:
        subprocess.run([*PODMAN, "rm", "--force", "--time=0", "--ignore", name],
                       capture_output=True, timeout=60, env=box.env, check=False)  # fmt: skip


def test_install_serve_and_purge(container: Container, deb: Path) -> None:
    box = container
    # A clean system: no Python, no compiler, no network; only the local apt
    # repository holding what the Depends line pulls in.
    assert box.run("test", "-e", "/usr/bin/python3").returncode == 1
    assert box.run("sh", "-c", "command -v gcc cc c99 tcc clang").stdout == ""
    box.must("apt-get", "update", "-q")
    box.must("apt-get", "install", "-y", "-q", f"/mnt/deb/{deb.name}")

    got = box.check("installed")
    assert got["which"] == {"privsock": "/usr/bin/privsock",
                            "privsock-helper": "/usr/sbin/privsock-helper",
                            "gcc": None, "cc": None}  # fmt: skip
    assert got["shebang"] == {"privsock": "#!/usr/bin/python3 -I",
                              "privsock-helper": "#!/usr/bin/python3 -IS"}  # fmt: skip
    assert got["version"] == f"privsock {__version__}"
    uid, group, shell, home = got["user"]  # type: ignore[misc]
    assert 0 < uid < 1000, "privsock must be a system user"
    assert (group, shell, home) == ("privsock", "/usr/sbin/nologin", "/nonexistent")
    assert got["clients_group"] == "privsock-clients"
    assert got["policy"] == [0, 0, "0o644"]
    assert got["conffiles"][0] == "/etc/privsock/policy.toml"  # type: ignore[index]
    assert got["enabled"] == {"privsock-helper.socket": "disabled",
                              "privsock-helper@.service": "static"}  # fmt: skip
    assert all(got["files"].values()), got["files"]  # type: ignore[attr-defined]
    assert got["check_policy"] == [0, ["/etc/privsock/policy.toml: OK, the helper would "
                                       "accept this policy"]]  # fmt: skip

    served = box.check("exec")
    assert served["exit"] == 0, served["stderr"]
    uid_nobody = "65534"
    assert served["tcp"] == (f"tcp-80:udp-53 Uid={uid_nobody} CapEff=0000000000000000 "
                             "CapBnd=0000000000000000 NoNewPrivs=1")  # fmt: skip
    assert served["udp"] == "PING"
    assert served["audit"].count("granted") >= 2, served["stderr"]  # type: ignore[attr-defined]

    unit = box.check("socket_unit")
    assert unit["start"] == [0, ""]
    assert unit["bound_port"] == "53", unit["boss"]
    code, report = unit["inspect"]  # type: ignore[misc]
    assert code == 0, report
    assert "verdict   hardened" in report
    assert unit["boss"] == [0, ""]
    assert "granted" in unit["journal"]  # type: ignore[operator]

    # The policy is a conffile: an administrator's edit survives a reinstall
    # (as an upgrade) and a remove; only a purge takes it away.
    edit = "# edited by the administrator"
    box.must("sh", "-c", f"echo '{edit}' >> /etc/privsock/policy.toml")
    box.must("apt-get", "install", "-y", "-q", "--reinstall", f"/mnt/deb/{deb.name}")
    assert box.must("tail", "-n1", "/etc/privsock/policy.toml").strip() == edit
    box.must("apt-get", "remove", "-y", "-q", "privsock")
    assert box.must("tail", "-n1", "/etc/privsock/policy.toml").strip() == edit
    assert box.run("test", "-e", "/usr/bin/privsock").returncode == 1
    box.must("getent", "passwd", "privsock")

    box.must("apt-get", "purge", "-y", "-q", "privsock")
    gone = box.check("purged")
    assert gone == {"user": 2, "groups": [2, 2], "left": [], "dpkg": ""}, gone
