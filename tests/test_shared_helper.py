"""The shared, socket-activated helper under a real systemd (PID 1 of a
privileged podman container, as in test_deploy.py), with several real
unprivileged users in privsock-clients: per-user rules decide, each audit line
in the journal names the peer the kernel saw, and the four attacks of an
unfair shared helper fail: (a) one user holding every connection, (b) a connect
flood failing the socket unit, (c) reconnecting to refill the rate limit,
(d) a flood of refused or malformed requests pushing a grant out of the
journal. Each prints its figures."""

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
from .containers.harness import PODMAN, Podman, build_rootfs, require_tools
from .test_deploy import SOCKET_PATH, _boot_with_the_socket_unit, _in, _installed
from .test_exec import GUNICORN, PRIVSOCK

pytestmark = [pytest.mark.containers, pytest.mark.slow]

# uid, name; each has its own group of the same id and is in privsock-clients.
USERS = {"alice": 2001, "bob": 2002, "carol": 2003}

SHARED_POLICY = """
version = 1

[rate_limit]
rate = 5.0
burst = 50

[connections]
per_user = 2

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

    def runner_exec(self) -> list[str]:
        return [*PODMAN, "exec", self.name]

    def script(self, user: str, name: str, *args: str) -> dict[str, Any]:
        out = self.as_user(user, self.python, "-I", f"/opt/{name}.py", SOCKET_PATH, *args)
        result: dict[str, Any] = json.loads(out)
        return result

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no helper instance runs (so every slot is free again)."""
        deadline = time.monotonic() + timeout
        while self.run("systemctl", "list-units", "--no-legend", "--state=active,activating,"
                       "deactivating", "privsock-helper@*").strip():  # fmt: skip
            assert time.monotonic() < deadline, "helpers still running"
            time.sleep(0.2)

    def socket_unit(self) -> dict[str, str]:
        out = self.run("systemctl", "show", "privsock-helper.socket",
                       "--property=ActiveState,Result,NAccepted,NRefused,NConnections")  # fmt: skip
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

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
        for script, text in (("ask", ASK), ("hold", HOLD), ("flood", FLOOD),
                             ("reconnect", RECONNECT), ("noise", NOISE), ("hello", HELLO),
                             ("get", GET)):  # fmt: skip
            (rootfs / f"opt/{script}.py").write_text(text)
        name = _boot_with_the_socket_unit(runner, rootfs)
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


# A WSGI application, and a client that waits for it (inside the container).
HELLO = r"""
import os

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"hello from uid {os.getuid()}".encode()]
"""
GET = r"""
import sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=30) as reply:
            print(reply.status, reply.read().decode())
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""
EXEC_CONNECT = [PRIVSOCK, "exec", "--connect", SOCKET_PATH, "--listen", "tcp:0.0.0.0:80",
                "--", GUNICORN, "--workers", "1", "--chdir", "/opt", "hello:app"]  # fmt: skip


def _as(user: str) -> list[str]:
    group = "nogroup" if user == "nobody" else user
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--"]


def test_exec_connect_serves_port_80_for_the_user_the_policy_names(shared: Shared) -> None:
    """The authbind replacement, with no root in the user's chain: alice runs
    an unmodified gunicorn on port 80 through the shared helper, and a request
    is answered by her server; bob, whom the policy does not give port 80,
    gets a one-line refusal and no server; nobody, outside privsock-clients,
    cannot reach the helper. The journal's audit lines name each peer, and
    alice's grant names the pid that became her server."""
    shared.wait_idle()
    # The front door: only root can put a socket file where exec --connect looks.
    doors = shared.run("stat", "-c", "%n %U %G %a", "/run/privsock", SOCKET_PATH).splitlines()
    assert doors == ["/run/privsock root root 755",
                     f"{SOCKET_PATH} root privsock-clients 660"]  # fmt: skip
    before = len(shared.audit())
    # alice's command runs in the background; its stderr (the boss's audit
    # lines) goes to a file root's shell opens for it.
    line = " ".join([*_as("alice"), *EXEC_CONNECT])
    subprocess.run([*PODMAN, "exec", "--detach", shared.name, "sh", "-c",
                    f"exec {line} </dev/null >/run/alice.out 2>/run/alice.err"],
                   env=shared.runner.env, check=True, timeout=60,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    answer = shared.as_user("carol", shared.python, "-I", "/opt/get.py", "http://127.0.0.1:80/")
    print(json.dumps({"answer": answer.strip()}))
    assert answer.strip() == f"200 hello from uid {USERS['alice']}"

    refused = {}
    for user in ("bob", "nobody"):
        done = subprocess.run(
            [*PODMAN, "exec", shared.name, *_as(user), *EXEC_CONNECT], env=shared.runner.env,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        refused[user] = (done.returncode, [ln for ln in done.stderr.splitlines()
                                           if not ln.startswith("{")])  # fmt: skip
    print(json.dumps(refused))
    assert refused == {
        "bob": (77, ["privsock: exec: tcp:0.0.0.0:80: denied by policy (port); "
                     "nothing was started"]),
        "nobody": (69, [f"privsock: exec: helper did not start: cannot connect to {SOCKET_PATH}: "
                        "Permission denied; nothing was started"]),
    }  # fmt: skip
    # Only alice's server listens on 80 (bob's gunicorn never started).
    listening = shared.run("ss", "-Hltnp", "sport = :80")
    assert listening.count("LISTEN") == 1, listening

    lines = [r for r in shared.audit()[before:] if r["op"] == "CREATE" and r["port"] == 80]
    print(json.dumps([(r["peer_uid"], r["peer_pid"], r["decision"]) for r in lines]))
    granted = [r for r in lines if r["decision"] == "granted"]
    denied = [r for r in lines if r["decision"] == "denied"]
    assert [r["peer_uid"] for r in granted] == [USERS["alice"]]
    assert [r["peer_uid"] for r in denied] == [USERS["bob"]]
    server = granted[0]["peer_pid"]
    # The pid that asked is the one exec turned into the server: alice's gunicorn.
    status = shared.run("cat", f"/proc/{server}/status")
    cmdline = shared.run("cat", f"/proc/{server}/cmdline").split("\0")
    assert GUNICORN in cmdline[:2], cmdline
    assert _field(status, "Uid").split() == [str(USERS["alice"])] * 4
    assert _field(status, "NoNewPrivs") == "1"
    assert int(_field(status, "CapEff"), 16) == int(_field(status, "CapAmb"), 16) == 0
    # The boss's own line names the user and the command.
    boss = [json.loads(ln) for ln in shared.run("cat", "/run/alice.err").splitlines()
            if ln.startswith("{")]  # fmt: skip
    assert [(r["user"], r["command"][0]) for r in boss if r["decision"] == "granted"] == [
        ("alice", GUNICORN)]
    shared.run("kill", "-TERM", str(server))


def _field(status: str, name: str) -> str:
    return next(ln.split(":", 1)[1].strip() for ln in status.splitlines()
                if ln.startswith(name + ":"))  # fmt: skip


# As one user: open N connections, PING each, print which were served, keep
# them all open for HOLD seconds.
HOLD = r"""
import json, socket, sys, time
from privsock.helper import protocol
n, hold = int(sys.argv[2]), float(sys.argv[3])
socks, served = [], []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    s.settimeout(30)
    try:
        s.send(protocol.encode_request(protocol.Ping(1)))
        served.append(s.recv(64) != b"")
    except OSError:
        served.append(False)
    socks.append(s)
print(json.dumps(served), flush=True)
time.sleep(hold)
"""

# As one user: connect and close as fast as possible, N times.
FLOOD = r"""
import json, socket, sys, time
n, refused = int(sys.argv[2]), 0
start = time.monotonic()
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(sys.argv[1])
    except OSError:
        refused += 1
    s.close()
print(json.dumps({"connects": n, "seconds": time.monotonic() - start, "refused": refused}))
"""

# As one user, WORKERS threads for SECONDS: connect, take grants until the
# first RATE_LIMITED, close, reconnect at once. Prints grants and the time span.
RECONNECT = r"""
import ipaddress, json, socket, sys, threading, time
from privsock.helper import protocol
path, workers, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
req = protocol.encode_request(protocol.Create(
    2, protocol.Transport.UDP, ipaddress.ip_address("127.0.0.1"), 53))
grants, connections = [0], [0]
lock = threading.Lock()
start = time.monotonic()
def work():
    while time.monotonic() - start < seconds:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(30)
        try:
            s.connect(path)
            with lock:
                connections[0] += 1
            while True:
                s.send(req)
                data, fds, _, _ = socket.recv_fds(s, 64, 1)
                for fd in fds:
                    socket.socket(fileno=fd).close()
                if not data or protocol.decode_reply(data).status is not protocol.Status.OK:
                    break
                with lock:
                    grants[0] += 1
        except OSError:
            pass
        finally:
            s.close()
threads = [threading.Thread(target=work) for _ in range(workers)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"grants": grants[0], "connections": connections[0],
                  "seconds": time.monotonic() - start}))
"""

# As one user, on one connection: COUNT requests of one kind (CREATE refused
# by the rate limit, or malformed), each answered before the next, then
# (on a new connection if this one was closed) one grant with id MARK.
NOISE = r"""
import ipaddress, json, socket, sys, time
from privsock.helper import protocol
path, kind, count, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
create = protocol.encode_request(protocol.Create(
    2, protocol.Transport.UDP, ipaddress.ip_address("127.0.0.1"), 53))
msg = create if kind == "create" else b"\x00" * 5
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.settimeout(30)
    return s
s, answered, start = connect(), 0, time.monotonic()
try:
    for _ in range(count):
        s.send(msg)
        data, fds, _, _ = socket.recv_fds(s, 64, 1)
        for fd in fds:
            socket.socket(fileno=fd).close()
        if not data:
            break
        answered += 1
except OSError:
    pass
seconds = time.monotonic() - start
closed = False
try:
    s.send(protocol.encode_request(protocol.Ping(1)))
    closed = s.recv(64) == b""
except OSError:
    closed = True
if closed:
    s = connect()
grant = protocol.encode_request(protocol.Create(
    mark, protocol.Transport.UDP, ipaddress.ip_address("127.0.0.1"), 53))
while True:
    s.send(grant)
    data, fds, _, _ = socket.recv_fds(s, 64, 1)
    for fd in fds:
        socket.socket(fileno=fd).close()
    reply = protocol.decode_reply(data)
    if reply.status is not protocol.Status.RATE_LIMITED:
        break
    time.sleep(reply.detail / 1000)
print(json.dumps({"sent": count, "answered": answered, "seconds": seconds,
                  "closed_after": answered if closed else None, "mark": reply.status.name}))
"""


PER_USER = 2  # SHARED_POLICY's [connections] per_user
RATE = 5.0  # SHARED_POLICY's rate


def test_a_one_user_cannot_take_every_connection(shared: Shared) -> None:
    """alice opens 2 more connections than per_user and keeps them: only
    per_user are served, and bob is served meanwhile (before: 4 idle
    connections of one user made everyone else's fail)."""
    shared.wait_idle()
    cmd = [*shared.runner_exec(), "setpriv", "--reuid=alice", "--regid=alice",
           "--init-groups", "--", shared.python, "-I", "/opt/hold.py", SOCKET_PATH,
           str(PER_USER + 2), "20"]  # fmt: skip
    alice = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=shared.runner.env)
    try:
        assert alice.stdout is not None
        held = json.loads(alice.stdout.readline())
        # The refused helpers have exited (and their units stopped): the slots
        # must survive that (RuntimeDirectoryPreserve=), so one more is refused too.
        time.sleep(2)
        again = json.loads(shared.as_user("alice", shared.python, "-I", "/opt/hold.py",
                                          SOCKET_PATH, "1", "0"))  # fmt: skip
        bob = shared.ask("bob", "udp:127.0.0.1:53")
    finally:
        alice.kill()
        alice.wait()
    print(f"(a) alice holds {sum(held)} of {len(held)} connections (per_user {PER_USER}); "
          f"another of hers served: {again[0]}; bob: {bob}")  # fmt: skip
    assert held == [True] * PER_USER + [False, False]
    assert again == [False]
    assert bob == {"udp:127.0.0.1:53": "OK"}


def test_b_a_connect_flood_does_not_fail_the_socket_unit(shared: Shared) -> None:
    """1,000 connects as fast as one process makes them (before: 201 in 0.04 s
    failed the unit with trigger-limit-hit and removed the socket file)."""
    shared.wait_idle()
    flood = shared.script("carol", "flood", "1000")
    shared.wait_idle(timeout=180)
    unit = shared.socket_unit()
    bob = shared.ask("bob", "udp:127.0.0.1:53")
    print(f"(b) {flood['connects']} connects in {flood['seconds']:.2f} s "
          f"({flood['connects'] / flood['seconds']:.0f}/s, {flood['refused']} refused by "
          f"connect); socket unit {unit}; bob afterwards: {bob}")  # fmt: skip
    assert (unit["ActiveState"], unit["Result"]) == ("active", "success")
    assert shared.run("stat", "-c", "%F", SOCKET_PATH).strip() == "socket"
    assert bob == {"udp:127.0.0.1:53": "OK"}


def test_c_reconnecting_does_not_refill_the_rate_limit(shared: Shared) -> None:
    """alice reconnects as fast as she can from per_user threads, taking grants
    until each connection's first RATE_LIMITED: her grants stay within
    per_user x rate x time (before: 1,904 grants in 2 s against a rate of 50/s)."""
    shared.wait_idle()
    got = shared.script("alice", "reconnect", str(PER_USER), "3")
    bound = PER_USER * RATE * got["seconds"]
    print(f"(c) {got['grants']} grants over {got['connections']} connections in "
          f"{got['seconds']:.2f} s = {got['grants'] / got['seconds']:.1f}/s; bound "
          f"per_user x rate = {PER_USER * RATE:.0f}/s, {bound:.1f} in that time")  # fmt: skip
    assert got["connections"] > PER_USER  # she did reconnect
    assert got["grants"] <= bound


def _lines_of(shared: Shared, uid: int) -> list[dict[str, Any]]:
    return [r for r in shared.audit() if r["peer_uid"] == uid]


@pytest.mark.parametrize(("kind", "count"), [("create", 50_000), ("malformed", 50_000)])
def test_d_no_flood_keeps_a_grant_out_of_the_journal(
    shared: Shared, kind: str, count: int
) -> None:
    """bob sends 50,000 requests that cost no grant (refused by the empty
    bucket, or malformed), then asks for one socket: its grant is in the
    journal (before: journald's per-unit limit, 10,000 lines in 30 s scaled up
    by the free space, dropped it after about 35,000). A shared helper ends the
    session at the first malformed message, and at a CREATE sent before the
    wait it gave for the last one, so each connection writes a few lines. The first malformed
    message ends the session, so garbage costs a connection each."""
    shared.wait_idle()
    mark = 0xC0FFEE if kind == "create" else 0xC0FFEF
    got = shared.script("bob", "noise", kind, str(count), str(mark))
    shared.wait_idle()
    lines = _lines_of(shared, USERS["bob"])
    grant = [r for r in lines if r["id"] == mark]
    noise = [r for r in lines if r["decision"] == ("malformed" if kind == "malformed"
                                                  else "rate_limited")]  # fmt: skip
    suppressed = shared.run("journalctl", "--output=cat", "--grep=Suppressed").strip()
    print(f"(d) {kind}: {got['answered']} of {got['sent']} answered in {got['seconds']:.2f} s, "
          f"session closed after {got['closed_after']}; journal: {len(noise)} {kind} lines "
          f"of bob's, grant {mark:#x}: {[r['decision'] for r in grant]}; "
          f"journald suppressed: {suppressed or 'nothing'}")  # fmt: skip
    assert got["mark"] == "OK"
    assert [r["decision"] for r in grant if r["decision"] != "rate_limited"] == ["granted"]
    assert not suppressed
    if kind == "malformed":
        assert got["closed_after"] == 1
    else:  # the second CREATE came before the first's retry_ms: session over
        assert got["closed_after"] == 2
