"""The shared, socket-activated helper under a real systemd (PID 1 of a
privileged podman container, as in test_deploy.py), with several real
unprivileged users in privsock-clients: per-user rules decide, and each audit
line in the journal names the peer the kernel saw."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import REPO
from .containers.harness import Podman, build_rootfs, require_tools
from .test_deploy import SOCKET_PATH, _in, _installed

pytestmark = [pytest.mark.containers, pytest.mark.slow]

# uid, name; each has its own group of the same id and is in privsock-clients.
USERS = {"alice": 2001, "bob": 2002, "carol": 2003}

SHARED_POLICY = """
version = 1

[rate_limit]
rate = 50.0
burst = 10

# alice runs the web server.
[[allow]]
transports = ["tcp"]
ports = [80]
addresses = ["0.0.0.0/0", "::/0"]
options = ["reuseaddr"]
users = ["alice"]

# Everyone may serve DNS on loopback.
[[allow]]
transports = ["udp", "tcp"]
ports = [53]
addresses = ["127.0.0.0/8"]

[[deny]]
ports = [22]
"""

# In the container, as one user: connect, PING, then one CREATE per argument
# ("tcp:0.0.0.0:80"); prints the reply status of each as JSON.
ASK = r"""
import ipaddress, json, socket, sys
from privsock.helper import protocol
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.settimeout(30)
s.send(protocol.encode_request(protocol.Ping(1)))
assert protocol.decode_reply(s.recv(64)).status is protocol.Status.OK
out = {}
for rid, spec in enumerate(sys.argv[2:], 2):
    tr, addr, port = spec.split(":")
    opts = protocol.Option.REUSEADDR if tr == "tcp" else protocol.Option(0)
    req = protocol.Create(rid, protocol.Transport[tr.upper()], ipaddress.ip_address(addr),
                          int(port), opts)
    for _ in range(100):  # a fresh connection's bucket starts empty: wait for a token
        s.send(protocol.encode_request(req))
        data, fds, _, _ = socket.recv_fds(s, 64, 1)
        reply = protocol.decode_reply(data)
        for fd in fds:
            socket.socket(fileno=fd).close()
        if reply.status is not protocol.Status.RATE_LIMITED:
            break
        import time; time.sleep(reply.detail / 1000)
    out[spec] = reply.status.name
print(json.dumps(out))
"""


class Shared:
    """A booted container with the units, the users and the shared policy."""

    def __init__(self, runner: Podman, name: str) -> None:
        self.runner = runner
        self.name = name
        self.python = str(REPO / ".venv" / "bin" / "python")

    def run(self, *argv: str, check: bool = False) -> str:
        return _in(self.runner, self.name, *argv, check=check)

    def as_user(self, user: str, *argv: str) -> str:
        return self.run("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                        "--", *argv)  # fmt: skip

    def ask(self, user: str, *specs: str) -> dict[str, str]:
        out = self.as_user(user, self.python, "-I", "/opt/ask.py", SOCKET_PATH, *specs)
        result: dict[str, str] = json.loads(out)
        return result

    def audit(self) -> list[dict[str, Any]]:
        journal = self.run("journalctl", "--output=cat", "--identifier=privsock-helper")
        return [json.loads(line) for line in journal.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it runs rootful podman")
    require_tools()
    runner = Podman()
    rootfs = build_rootfs(owner=0, policies={"policy.toml": SHARED_POLICY})
    try:
        (rootfs / "etc/machine-id").touch(mode=0o444)
        with (rootfs / "etc/passwd").open("a") as passwd:
            for user, uid in USERS.items():
                passwd.write(f"{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n")
        with (rootfs / "etc/group").open("a") as group:
            for user, uid in USERS.items():
                group.write(f"{user}:x:{uid}:\n")
            group.write(f"privsock-clients:x:990:{','.join(USERS)}\n")
        _installed(rootfs / "etc/systemd/system")
        (rootfs / "opt").mkdir()
        (rootfs / "opt/ask.py").write_text(ASK)
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
        yield Shared(runner, name)
    finally:
        runner.cleanup()
        shutil.rmtree(rootfs, ignore_errors=True)


def test_per_user_rules_under_systemd(shared: Shared) -> None:
    """alice gets port 80, bob does not; both get loopback DNS; the journal's
    audit lines name each peer by the uid the kernel saw."""
    got = {u: shared.ask(u, "tcp:0.0.0.0:80", "udp:127.0.0.1:53") for u in ("alice", "bob")}
    print(json.dumps(got))
    assert got == {
        "alice": {"tcp:0.0.0.0:80": "OK", "udp:127.0.0.1:53": "OK"},
        "bob": {"tcp:0.0.0.0:80": "DENIED", "udp:127.0.0.1:53": "OK"},
    }
    lines = [r for r in shared.audit() if r["decision"] in ("granted", "denied")]
    by_peer = {(r["peer_uid"], r["port"]): (r["decision"], r["rule"]) for r in lines}
    assert by_peer[(USERS["alice"], 80)] == ("granted", "allow[0]")
    assert by_peer[(USERS["bob"], 80)] == ("denied", "default")
    assert by_peer[(USERS["bob"], 53)] == ("granted", "allow[1]")
    assert all(isinstance(r["peer_pid"], int) and r["peer_pid"] > 1 for r in lines)
