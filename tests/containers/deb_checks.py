"""Run by Debian's /usr/bin/python3 inside the clean Debian 12 container, as
root, after `apt install ./privsock_*.deb`: what a sysadmin would try first.
Prints one JSON object of facts; tests/containers/test_deb_install.py judges
them. Standard library only: this runs before anything else is installed."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time

# The server `privsock exec` starts: it reports who it is on each socket it got.
SERVER = r"""
import os, socket
status = open("/proc/self/status").read().splitlines()
me = {k: v.strip() for k, _, v in (l.partition(":") for l in status)}
facts = " ".join(f"{k}={me[k].split()[0]}" for k in ("Uid", "CapEff", "CapBnd", "NoNewPrivs"))
tcp = socket.socket(fileno=3)
udp = socket.socket(fileno=4)
conn, _ = tcp.accept()
conn.sendall(f"{os.environ['LISTEN_FDNAMES']} {facts}\n".encode())
conn.close()
data, peer = udp.recvfrom(64)
udp.sendto(data.upper(), peer)
"""

# A boss in privsock-clients, through the socket-activated helper.
BOSS = r"""
import sys
from privsock import SocketCreator
with SocketCreator(connect="/run/privsock/helper.sock", audit_sink=None) as creator:
    sock = creator.create("udp", "127.0.0.1", 53)
    print(sock.getsockname()[1], flush=True)
    sys.stdin.readline()  # hold the connection (and the helper) while root inspects it
"""


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kw)


def first_line(path: str) -> str:
    with open(path) as f:
        return f.readline().strip()


def installed() -> dict[str, object]:
    out: dict[str, object] = {}
    out["which"] = {c: shutil.which(c) for c in ("privsock", "privsock-helper", "gcc", "cc")}
    out["shebang"] = {c: first_line(p) for c, p in out["which"].items()
                      if p and c.startswith("privsock")}
    out["version"] = run("privsock", "--version").stdout.strip()
    user = pwd.getpwnam("privsock")
    out["user"] = [user.pw_uid, grp.getgrgid(user.pw_gid).gr_name, user.pw_shell, user.pw_dir]
    out["clients_group"] = grp.getgrnam("privsock-clients").gr_name
    st = os.stat("/etc/privsock/policy.toml")
    out["policy"] = [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]
    out["conffiles"] = run("dpkg-query", "-W", "-f=${Conffiles}", "privsock").stdout.split()
    out["enabled"] = {u: run("systemctl", "is-enabled", u).stdout.strip()
                      for u in ("privsock-helper.socket", "privsock-helper@.service")}
    out["files"] = {p: os.path.exists(p) for p in (
        "/usr/share/doc/privsock/SECURITY.md", "/usr/share/doc/privsock/policy/README.md",
        "/usr/share/doc/privsock/copyright", "/usr/share/man/man1/privsock.1.gz",
        "/usr/share/man/man8/privsock-helper.8.gz", "/lib/systemd/system/privsock-helper.socket",
        "/lib/systemd/system/privsock-helper@.service",
    )}
    check = run("privsock", "check-policy")
    out["check_policy"] = [check.returncode, check.stdout.splitlines()[:1]]
    return out


def exec_server() -> dict[str, object]:
    """privsock exec on the installed default policy, as root, serving as nobody."""
    proc = subprocess.Popen(
        ["privsock", "exec", "--user", "nobody", "--audit-log", "stderr",
         "--listen", "tcp:127.0.0.1:80", "--listen", "udp:127.0.0.1:53",
         "--", "/usr/bin/python3", "-I", "-c", SERVER],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out: dict[str, object] = {}
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", 80), timeout=10) as conn:
                out["tcp"] = conn.makefile().readline().strip()
            break
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.sendto(b"ping", ("127.0.0.1", 53))
        out["udp"] = udp.recv(64).decode()
    _, err = proc.communicate(timeout=30)
    out["exit"] = proc.returncode
    out["audit"] = [json.loads(line)["decision"] for line in err.splitlines()
                    if line.startswith("{")]
    out["stderr"] = err[-2000:]
    return out


def socket_unit() -> dict[str, object]:
    """The socket-activated helper under this container's systemd (PID 1)."""
    out: dict[str, object] = {}
    run("useradd", "--create-home", "--groups", "privsock-clients", "boss")
    started = run("systemctl", "start", "privsock-helper.socket")
    out["start"] = [started.returncode, started.stderr]
    boss = subprocess.Popen(
        ["setpriv", "--reuid=boss", "--regid=boss", "--init-groups", "--",
         "/usr/bin/python3", "-I", "-c", BOSS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert boss.stdout is not None and boss.stdin is not None
    out["bound_port"] = boss.stdout.readline().strip()
    pid = run("systemctl", "show", "--property=MainPID", "--value",
              "privsock-helper@*.service").stdout.split()
    inspect = run("privsock", "inspect", pid[0]) if pid else None
    out["inspect"] = [inspect.returncode, inspect.stdout] if inspect else None
    boss.stdin.write("\n")
    boss.stdin.close()
    boss.wait(timeout=30)
    out["boss"] = [boss.returncode, boss.stderr.read()[-2000:]]
    journal = run("journalctl", "--output=cat", "--identifier=privsock-helper").stdout
    out["journal"] = [json.loads(line)["decision"] for line in journal.splitlines()
                      if line.startswith("{")]
    return out


def purged() -> dict[str, object]:
    out: dict[str, object] = {}
    out["user"] = run("getent", "passwd", "privsock").returncode
    out["groups"] = [run("getent", "group", g).returncode for g in ("privsock", "privsock-clients")]
    out["left"] = [p for p in (
        "/etc/privsock", "/usr/bin/privsock", "/usr/sbin/privsock-helper",
        "/usr/lib/python3/dist-packages/privsock",
        "/usr/share/doc/privsock", "/lib/systemd/system/privsock-helper.socket",
        "/lib/systemd/system/privsock-helper@.service", "/run/privsock",
    ) if os.path.lexists(p)]
    out["dpkg"] = run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "privsock").stdout.strip()
    return out


if __name__ == "__main__":
    step = {"installed": installed, "exec": exec_server, "socket_unit": socket_unit,
            "purged": purged}[sys.argv[1]]
    print(json.dumps(step()))
