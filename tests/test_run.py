"""`privsock run` with real programs on the real kernel: each binds privileged
ports itself, through its own bind() call, and holds no privilege at all."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from privsock import auditjson
from privsock.auditsink import AuditLogError
from privsock.client import SocketCreator
from privsock.execenv import SAFE_PATH
from privsock.helper import caps
from privsock.helper.exitcodes import Exit
from privsock.run import kernel
from privsock.run.supervise import Supervisor
from tests.auditlines import Records, parsed

from .conftest import TEST_POLICY, unavailable
from .helper_proc import running, socket_activated
from .test_exec import PRIVSOCK, message_lines, status_field, wait_listening

pytestmark = pytest.mark.root

PY = "/usr/bin/python3"  # Debian's: the target user can run it
NOBODY = pwd.getpwnam("nobody")


def privsock_run(policy: Path, *cmd: str, audit: Path | None = None, extra: tuple[str, ...] = (),
                 **popen: Any) -> list[str]:  # fmt: skip
    argv = [PRIVSOCK, "run", "--policy", str(policy), "--user", "nobody", *extra]
    if audit is not None:
        argv += ["--audit-log", f"file:{audit}"]
    return [*argv, "--", *cmd]


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [auditjson.parse(line) for line in path.read_text().splitlines()]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder the target user can read (tmp_path's parents are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="privsock-run-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


# ---------------------------------------------------------------------------
# Many cases in one run: each is a function of the probe; results as JSON.

PROBE = textwrap.dedent(r"""
    import ctypes, errno, fcntl, json, os, socket, struct, threading
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}

    def attempt(name, fn):
        try:
            out[name] = fn()
        except OSError as exc:
            out[name] = {"errno": errno.errorcode.get(exc.errno, exc.errno), "msg": str(exc)}

    def tcp4_nonblocking_inheritable():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.set_inheritable(True)
        fd = s.fileno()
        s.bind(("127.0.0.1", 80))
        s.listen()
        r = {"fd_same": s.fileno() == fd, "addr": list(s.getsockname()),
             "nonblocking": not os.get_blocking(fd), "inheritable": os.get_inheritable(fd),
             "family": s.family.name, "type": s.type.name}
        s.detach()
        return r

    def tcp4_reuseaddr_nodelay():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind(("127.0.0.1", 443))
        r = {"addr": list(s.getsockname()),
             "reuseaddr": s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
             "nodelay": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
             "inheritable": os.get_inheritable(s.fileno()),
             "nonblocking": not os.get_blocking(s.fileno())}
        s.close()
        return r

    def dual_stack():
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 1000))
        s.listen()
        c = socket.create_connection(("127.0.0.1", 1000), timeout=5)
        conn, peer = s.accept()
        r = {"addr": list(s.getsockname()[:2]), "peer": peer[0],
             "v6only": s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)}
        for x in (c, conn, s):
            x.close()
        return r

    def v6only_udp():
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, 49, 1)  # IPV6_RECVPKTINFO, carried over
        s.bind(("::1", 1001))
        r = {"addr": list(s.getsockname()[:2]), "family": s.family.name,
             "v6only": s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
             "recvpktinfo": s.getsockopt(socket.IPPROTO_IPV6, 49)}
        c = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        c.sendto(b"ping", ("::1", 1001))
        r["got"] = s.recv(10).decode()
        c.close(); s.close()
        return r

    def in_a_thread():
        res = {}
        def go():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 1002))
            res["addr"] = list(s.getsockname())
            s.close()
        t = threading.Thread(target=go); t.start(); t.join()
        return res

    def unprivileged():
        s = socket.socket()
        s.bind(("127.0.0.1", 8080))
        r = list(s.getsockname()); s.close()
        return r

    def ssh():
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", 22))
        finally:
            s.close()

    def raw_bind(family, payload, length):
        s = socket.socket(family, socket.SOCK_STREAM)
        buf = ctypes.create_string_buffer(payload, max(len(payload), length))
        if libc.bind(s.fileno(), buf, length) != 0:
            e = ctypes.get_errno()
            s.close()
            raise OSError(e, os.strerror(e))
        s.close()
        return "bound"

    def inet_sockaddr_on_inet6_socket():
        sin = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80)
        sin += socket.inet_aton("127.0.0.1")
        return raw_bind(socket.AF_INET6, sin + bytes(20), 28)

    def inet6_sockaddr_on_inet_socket():
        sin6 = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 80, 0) + bytes(16) + bytes(4)
        return raw_bind(socket.AF_INET, sin6, 28)

    def freebind():
        s = socket.socket()
        s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
        try:
            s.bind(("127.0.0.1", 80))
        finally:
            s.close()

    def rebind():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 8081))
        try:
            s.bind(("127.0.0.1", 53))
        finally:
            s.close()

    def unix():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind("\0privsock-run-test")
        s.close()
        return "bound"

    def udp_reuseaddr():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 53))
        finally:
            s.close()

    def sctp():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)
        try:
            s.bind(("127.0.0.1", 80))
        finally:
            s.close()

    for name, fn in list(globals().items()):
        if callable(fn) and name not in ("attempt", "raw_bind") and fn.__module__ == "__main__" \
                and not isinstance(fn, type):
            attempt(name, fn)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("run-probe")
    policy = folder / "policy.toml"
    policy.write_text(TEST_POLICY)
    policy.chmod(0o644)
    audit = folder / "audit.log"
    result = subprocess.run(
        privsock_run(policy, PY, "-I", "-c", PROBE, audit=audit),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {"out": json.loads(result.stdout), "audit": audit_lines(audit),
            "stderr": result.stderr}  # fmt: skip


def test_a_nonblocking_inheritable_tcp_socket_is_served_as_it_was(
    probe_run: dict[str, Any],
) -> None:
    got = probe_run["out"]["tcp4_nonblocking_inheritable"]
    assert got == {"fd_same": True, "addr": ["127.0.0.1", 80], "nonblocking": True,
                   "inheritable": True, "family": "AF_INET", "type": "SOCK_STREAM"}  # fmt: skip


def test_options_set_before_bind_are_carried(probe_run: dict[str, Any]) -> None:
    got = probe_run["out"]["tcp4_reuseaddr_nodelay"]
    assert got == {"addr": ["127.0.0.1", 443], "reuseaddr": 1, "nodelay": 1,
                   "inheritable": False, "nonblocking": False}  # fmt: skip
    grants = [r for r in probe_run["audit"] if r["side"] == "helper" and r["port"] == 443]
    assert [r["options"] for r in grants] == [["reuseaddr"]]


def test_ipv6_dual_stack_and_v6only(probe_run: dict[str, Any]) -> None:
    out = probe_run["out"]
    assert out["dual_stack"] == {"addr": ["::", 1000], "peer": "::ffff:127.0.0.1", "v6only": 0}
    assert out["v6only_udp"] == {"addr": ["::1", 1001], "family": "AF_INET6", "v6only": 1,
                                 "recvpktinfo": 1, "got": "ping"}  # fmt: skip


def test_a_bind_in_a_thread_is_served(probe_run: dict[str, Any]) -> None:
    assert probe_run["out"]["in_a_thread"] == {"addr": ["127.0.0.1", 1002]}


def test_unprivileged_ports_and_other_families_go_to_the_kernel(
    probe_run: dict[str, Any],
) -> None:
    out = probe_run["out"]
    assert out["unprivileged"] == ["127.0.0.1", 8080]
    assert out["unix"] == "bound"
    assert not [r for r in probe_run["audit"] if r["port"] in (8080, 8081)]


def test_port_22_is_eacces_in_the_programs_words_and_logged(probe_run: dict[str, Any]) -> None:
    assert probe_run["out"]["ssh"] == {"errno": "EACCES", "msg": "[Errno 13] Permission denied"}
    denials = [(r["side"], r["decision"]) for r in probe_run["audit"] if r["port"] == 22]
    assert ("helper", "denied") in denials
    assert ("run", "denied") in denials
    assert "bind(0.0.0.0:22) refused: policy" in probe_run["stderr"]


def test_a_sockaddr_of_another_family_gets_the_kernels_answer(probe_run: dict[str, Any]) -> None:
    out = probe_run["out"]
    assert out["inet_sockaddr_on_inet6_socket"]["errno"] == "EAFNOSUPPORT"
    assert out["inet6_sockaddr_on_inet_socket"]["errno"] == "EAFNOSUPPORT"


def test_prebind_options_that_cannot_be_carried_are_refused(probe_run: dict[str, Any]) -> None:
    assert probe_run["out"]["freebind"]["errno"] == "EACCES"
    assert "IP_FREEBIND set before bind() cannot be carried" in probe_run["stderr"]


def test_already_bound_and_unserved_protocols(probe_run: dict[str, Any]) -> None:
    out = probe_run["out"]
    # Left to the kernel, which checks the port's privilege before "already
    # bound": EACCES, as for any unprivileged program.
    assert out["rebind"]["errno"] == "EACCES"
    # SCTP may be missing from the kernel (EPROTONOSUPPORT at socket()); if the
    # socket exists, its privileged bind is refused.
    assert out["sctp"]["errno"] in ("EACCES", "EPROTONOSUPPORT", "ESOCKTNOSUPPORT")


def test_udp_reuseaddr_is_the_policys_to_refuse(probe_run: dict[str, Any]) -> None:
    assert probe_run["out"]["udp_reuseaddr"]["errno"] == "EACCES"
    assert "bind(127.0.0.1:53) refused: policy: udp:127.0.0.1:53: denied by policy (option)" \
        in probe_run["stderr"]  # fmt: skip


def test_every_grant_was_delivered(probe_run: dict[str, Any]) -> None:
    audit = probe_run["audit"]
    granted = [r for r in audit if r["side"] == "helper" and r["decision"] == "granted"]
    delivered = [r for r in audit if r["side"] == "run" and r["decision"] == "delivered"]
    assert sorted(r["port"] for r in granted) == sorted(r["port"] for r in delivered)
    assert sorted(r["port"] for r in granted) == [80, 443, 1000, 1001, 1002]


# ---------------------------------------------------------------------------
# Real servers.


def _child_pid(supervisor: int, within: float = 10.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        for kid in kids:
            if Path(f"/proc/{kid}/cmdline").read_bytes().startswith(PY.encode()):
                return int(kid)
        time.sleep(0.02)
    raise AssertionError("the command did not start")


def test_http_server_on_port_80_holds_no_privilege(test_policy: Path) -> None:
    with running(privsock_run(test_policy, PY, "-m", "http.server", "80", "--bind", "127.0.0.1"),
                 stdout=subprocess.DEVNULL) as proc:  # fmt: skip
        wait_listening(proc, 80)
        with urllib.request.urlopen("http://127.0.0.1:80/", timeout=10) as resp:
            assert resp.status == 200
        server = _child_pid(proc.pid)
        status = Path(f"/proc/{server}/status").read_text()
        assert status_field(status, "Uid").split() == [str(NOBODY.pw_uid)] * 4
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status_field(status, name), 16) == 0, name
        assert status_field(status, "NoNewPrivs") == "1"
        # The supervisor: the same user, every thread dropped, not dumpable.
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            st = (task / "status").read_text()
            assert status_field(st, "Uid").split() == [str(NOBODY.pw_uid)] * 4, task
            assert int(status_field(st, "CapBnd"), 16) == 0, task
            assert int(status_field(st, "CapEff"), 16) == 0, task
            assert status_field(st, "NoNewPrivs") == "1", task
        assert os.stat(f"/proc/{proc.pid}/mem").st_uid == 0  # non-dumpable: owned by root
        proc.send_signal(signal.SIGTERM)  # forwarded to the server
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM


STATIC_UDP = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
int main(void) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(53);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("bind"); return 1; }
    printf("bound\n");
    fflush(stdout);
    char buf[512];
    struct sockaddr_in peer;
    socklen_t len = sizeof peer;
    ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&peer, &len);
    if (n < 0) { perror("recvfrom"); return 1; }
    char reply[600];
    int m = snprintf(reply, sizeof reply, "static:%.*s", (int)n, buf);
    sendto(s, reply, m, 0, (struct sockaddr *)&peer, len);
    return 0;
}
"""


def test_a_static_binary_binds_udp_53_and_answers(test_policy: Path, shared_dir: Path) -> None:
    src = shared_dir / "udp53.c"
    src.write_text(STATIC_UDP)
    binary = shared_dir / "udp53"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(src)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr  # no libc, no LD_PRELOAD
    with running(privsock_run(test_policy, str(binary))) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "bound\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(10)
            c.sendto(b"hello", ("127.0.0.1", 53))
            assert c.recv(100) == b"static:hello"
        assert proc.wait(timeout=10) == 0


PREFORK = textwrap.dedent(r"""
    import os, socket, sys
    s = socket.socket()
    s.bind(("127.0.0.1", 1004))
    s.listen(16)
    kids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            for _ in range(2):
                c, _ = s.accept()
                c.sendall(b"worker %d\n" % os.getpid())
                c.close()
            os._exit(0)
        kids.append(pid)
    s.close()
    print("ready", flush=True)
    for pid in kids:
        os.waitpid(pid, 0)
""")


def test_prefork_workers_share_the_served_socket(test_policy: Path) -> None:
    with running(privsock_run(test_policy, PY, "-c", PREFORK)) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        answers = set()
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", 1004), timeout=10) as c:
                answers.add(c.makefile().readline().split()[1])
        assert len(answers) == 2  # both workers served
        assert proc.wait(timeout=10) == 0


# ---------------------------------------------------------------------------
# Signals, supervisor death, and the target against its supervisor.

STORM = textwrap.dedent(r"""
    import errno, json, os, signal, socket, sys
    hits = 0
    def on_usr1(signum, frame):
        global hits
        hits += 1
    signal.signal(signal.SIGUSR1, on_usr1)
    signal.siginterrupt(signal.SIGUSR1, False)  # SA_RESTART, as C and Go handlers have
    print(os.getpid(), flush=True)
    sys.stdin.readline()
    ok = eintr = other = 0
    for i in range(int(sys.argv[1])):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", 1003))
            ok += 1
        except InterruptedError:
            eintr += 1
        except OSError as exc:
            other += 1
            print(exc, file=sys.stderr)
        s.close()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the storm may outlast the loop
    print(json.dumps({"ok": ok, "eintr": eintr, "other": other, "signals": hits}), flush=True)
""")


def test_signal_storm_no_eintr_and_every_grant_delivered(test_policy: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    binds = 300
    stop = threading.Event()
    with running(privsock_run(test_policy, PY, "-c", STORM, str(binds), audit=audit),
                 stdin=subprocess.PIPE) as proc:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            target = int(proc.stdout.readline())

            def storm() -> None:
                while not stop.is_set():
                    try:
                        os.kill(target, signal.SIGUSR1)
                    except ProcessLookupError:
                        return
                    time.sleep(0.0002)

            thread = threading.Thread(target=storm, daemon=True)
            thread.start()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            stop.set()
            thread.join()
            assert proc.wait(timeout=30) == 0
        finally:
            stop.set()
    assert result["signals"] >= 50  # the storm did reach it, during the binds
    assert result == {"ok": binds, "eintr": 0, "other": 0, "signals": result["signals"]}
    recs = audit_lines(audit)
    granted = [r for r in recs if r["side"] == "helper" and r["decision"] == "granted"]
    delivered = [r for r in recs if r["side"] == "run" and r["decision"] == "delivered"]
    assert len(granted) == len(delivered) == binds


ORPHAN = textwrap.dedent(r"""
    import errno, json, os, signal, socket, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stays alive when its parent dies
    s = socket.socket(); s.bind(("127.0.0.1", 1008)); s.close()
    print(os.getpid(), flush=True)
    sys.stdin.readline()
    out = {}
    for port in (1008, 8080):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            out[port] = "bound"
        except OSError as exc:
            out[port] = errno.errorcode[exc.errno]
        s.close()
    print(json.dumps(out), flush=True)
""")


def test_supervisor_killed_binds_fail_fast_and_nothing_hangs(test_policy: Path) -> None:
    proc = subprocess.Popen(
        privsock_run(test_policy, PY, "-c", ORPHAN),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    target = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    # Every later bind fails at once, even to an unprivileged port: the filter
    # cannot be removed and nobody answers it.
    assert json.loads(proc.stdout.readline()) == {"1008": "ENOSYS", "8080": "ENOSYS"}
    deadline = time.monotonic() + 10
    while Path(f"/proc/{target}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{target}").exists() or (
        status_field(Path(f"/proc/{target}/status").read_text(), "State").startswith("Z")
    )


def test_the_program_is_killed_with_its_supervisor(test_policy: Path) -> None:
    script = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    proc = subprocess.Popen(
        privsock_run(test_policy, PY, "-c", script),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    target = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not Path(f"/proc/{target}").exists():
            break
        if status_field(Path(f"/proc/{target}/status").read_text(), "State").startswith("Z"):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the program outlived its supervisor (no parent-death signal)")


ATTACK = textwrap.dedent(r"""
    import ctypes, errno, json, os, socket
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    sup = os.getppid()
    out = {"supervisor": sup}
    def err():
        return errno.errorcode[ctypes.get_errno()]
    class Iov(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    buf = ctypes.create_string_buffer(16)
    local, remote = Iov(ctypes.addressof(buf), 16), Iov(0x400000, 16)
    n = libc.process_vm_readv(sup, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    out["process_vm_readv"] = "read" if n >= 0 else err()
    try:
        with open(f"/proc/{sup}/mem", "rb") as f:
            out["mem"] = "opened"
    except OSError as exc:
        out["mem"] = errno.errorcode[exc.errno]
    pidfd = os.pidfd_open(sup)
    got = []
    for fd in range(3, 12):
        r = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        got.append("got" if r >= 0 else err())
    out["pidfd_getfd"] = sorted(set(got))
    r = libc.syscall(101, 0x4206, sup, 0, 0)  # ptrace(PTRACE_SEIZE): attach without a stop
    out["ptrace"] = "attached" if r == 0 else err()
    s = socket.socket(); s.bind(("127.0.0.1", 1007)); s.close()
    print(json.dumps(out))
""")


def check_attack(out: dict[str, Any]) -> None:
    assert out["process_vm_readv"] == "EPERM"
    assert out["mem"] in ("EACCES", "EPERM")
    assert out["pidfd_getfd"] == ["EPERM"]
    assert out["ptrace"] == "EPERM"


def test_the_program_cannot_read_or_rob_its_supervisor(test_policy: Path) -> None:
    result = subprocess.run(privsock_run(test_policy, PY, "-c", ATTACK), capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_attack(json.loads(result.stdout))


# ---------------------------------------------------------------------------
# Narrowing, exit status, usage.


def test_allow_narrows_one_run(test_policy: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    script = textwrap.dedent("""
        import socket
        for port in (1005, 1006):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port)); print(port, "bound")
            except OSError as exc:
                print(port, exc.strerror)
            s.close()
    """)
    result = subprocess.run(
        privsock_run(test_policy, PY, "-c", script, audit=audit, extra=("--allow", "tcp:1005")),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1005 bound", "1006 Permission denied"]
    assert [r["port"] for r in audit_lines(audit) if r["side"] == "helper"
            and r["op"] == "CREATE"] == [1005]  # fmt: skip
    assert "not in this run's --allow list" in result.stderr


def test_exit_status_and_missing_command(test_policy: Path) -> None:
    result = subprocess.run(privsock_run(test_policy, PY, "-c", "raise SystemExit(7)"),
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 7
    result = subprocess.run(privsock_run(test_policy, "no-such-command-xyz"),
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 127
    assert message_lines(result.stderr) == [
        f"privsock: run: command not found: 'no-such-command-xyz' (searched PATH {SAFE_PATH})"
    ]


def test_a_command_root_can_run_but_the_user_cannot_is_refused_by_its_path(
    test_policy: Path, shared_dir: Path
) -> None:
    script = shared_dir / "root-only"
    script.write_text("#!/bin/sh\necho STARTED\n")
    script.chmod(0o700)
    result = subprocess.run(privsock_run(test_policy, str(script)),
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 126
    assert "STARTED" not in result.stdout
    assert message_lines(result.stderr) == [
        f"privsock: run: {script}: not executable by nobody"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "nobody", "--", "true"], "give either --policy FILE"),
        (["--policy", "p.toml", "--", "true"], "--policy needs --user USER"),
        (["--policy", "p.toml", "--user", "nobody"], "no command given"),
        (["--policy", "p.toml", "--user", "nobody", "--allow", "tcp:http", "--", "true"],
         "port 'http' is not a number"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str) -> None:
    result = subprocess.run([PRIVSOCK, "run", *args], capture_output=True, text=True,
                            timeout=30, check=False)  # fmt: skip
    assert result.returncode == 64
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_environment_is_clean(test_policy: Path) -> None:
    result = subprocess.run(
        privsock_run(test_policy, PY, "-c", "import json, os; print(json.dumps(dict(os.environ)))"),
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SECRET_TOKEN": "root's", "TERM": "xterm", "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout)
    assert "SECRET_TOKEN" not in env
    assert env["USER"] == "nobody" and env["HOME"] == NOBODY.pw_dir
    assert env["PATH"] == SAFE_PATH
    assert (env["TERM"], env["LC_ALL"]) == ("xterm", "C.UTF-8")


# ---------------------------------------------------------------------------
# --connect: no root anywhere in the user's chain.


@pytest.fixture
def activated_helper(test_policy: Path, shared_dir: Path) -> Iterator[Path]:
    """A helper per connection, as systemd's Accept=yes socket starts it."""
    with socket_activated(test_policy, shared_dir) as path:
        yield path


def test_connect_as_an_unprivileged_user(activated_helper: Path) -> None:
    result = subprocess.run(
        [PRIVSOCK, "run", "--connect", str(activated_helper), "--", PY, "-c", ATTACK],
        capture_output=True, text=True, timeout=60, check=False, user="nobody", group="nogroup",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_attack(json.loads(result.stdout))
    boss = [auditjson.parse(line) for line in result.stderr.splitlines() if line.startswith("{")]
    seen = [(r["side"], r["port"], r["decision"]) for r in boss if r["op"] != "PING"]
    assert seen == [("boss", 1007, "granted"), ("run", 1007, "delivered")]


def test_connect_as_root_without_user_is_refused(activated_helper: Path) -> None:
    result = subprocess.run(
        [PRIVSOCK, "run", "--connect", str(activated_helper), "--", "true"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 64
    assert message_lines(result.stderr) == [
        "privsock: run: refusing to run the command as root: give --user"
    ]


def test_connect_to_a_missing_socket_is_an_unavailable_service(shared_dir: Path) -> None:
    missing = shared_dir / "no-helper.sock"
    result = subprocess.run(
        [PRIVSOCK, "run", "--connect", str(missing), "--", "true"],
        capture_output=True, text=True, timeout=60, check=False, user="nobody", group="nogroup",
    )  # fmt: skip
    assert result.returncode == 69, result.stderr
    assert message_lines(result.stderr) == [
        f"privsock: run: helper did not start: cannot connect to {missing}: "
        "No such file or directory"
    ]


# ---------------------------------------------------------------------------
# The terminal, and a notification whose caller is gone.

TERMINAL = textwrap.dedent(r"""
    import errno, fcntl, json, os, select, termios
    # What can be read on stdin within 2 s: /dev/null says end of file at once.
    ready = select.select([0], [], [], 2)[0]
    r = {"own_session": os.getsid(0) == os.getpid(),
         "isatty": [os.isatty(fd) for fd in range(3)],
         "stdin": os.read(0, 100).decode() if ready else "nothing within 2 s"}
    for fd in (0, 1, 2):
        try:
            fcntl.ioctl(fd, termios.TIOCSTI, b"x")
            r[f"tiocsti_{fd}"] = "pushed"
        except OSError as exc:
            r[f"tiocsti_{fd}"] = errno.errorcode[exc.errno]
    try:
        os.close(os.open("/dev/tty", os.O_RDWR))
        r["dev_tty"] = "opened"
    except OSError as exc:
        r["dev_tty"] = errno.errorcode[exc.errno]
    print("RESULT" + json.dumps(r), flush=True)
""")


def test_the_program_gets_no_terminal(test_policy: Path) -> None:
    """Started from a terminal (a real pty here), the program has no
    controlling terminal and no terminal fd: it cannot push input into the
    terminal (TIOCSTI), read what is typed there, or change its settings. Its
    output still reaches the terminal, through the supervisor."""
    argv = privsock_run(test_policy, PY, "-c", TERMINAL)
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover (the child: privsock run on a terminal of its own)
        os.execv(argv[0], argv)
    os.write(master, b"typed secret\n")
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([master], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break  # EIO: the last process on the terminal closed it
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    line = next(x for x in text.splitlines() if x.startswith("RESULT"))
    assert json.loads(line[len("RESULT"):]) == {
        "own_session": True, "isatty": [False, False, False], "stdin": "",
        "tiocsti_0": "ENOTTY", "tiocsti_1": "ENOTTY", "tiocsti_2": "ENOTTY", "dev_tty": "ENXIO",
    }  # fmt: skip


DECOY = textwrap.dedent(r"""
    import ctypes, socket, struct, sys
    s = socket.socket()
    addr = ctypes.create_string_buffer(
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", 80)
        + socket.inet_aton("127.0.0.1") + bytes(8))
    print(s.fileno(), ctypes.addressof(addr), flush=True)
    sys.stdin.readline()
""")


def test_a_stale_notification_is_dropped_before_the_helper_is_asked(test_policy: Path) -> None:
    """A notification whose caller died: its pid may be another process's by
    now (here a decoy holding a socket and a port-80 sockaddr at the places the
    notification names). Nothing may be read from it or asked for it."""
    arch = kernel.arch()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the caller)
        try:
            caps.prctl(caps.PR_SET_NO_NEW_PRIVS, 1)
            listener = kernel.install_filter(arch)
            socket.send_fds(theirs, [b"L"], [listener])
            socket.socket().bind(("127.0.0.1", 80))
        finally:
            os._exit(0)
    theirs.close()
    _, (listener,), _, _ = socket.recv_fds(ours, 1, 1)
    ours.close()
    decoy = subprocess.Popen([PY, "-c", DECOY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        n = kernel.recv(listener)  # the caller waits in bind(80)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert decoy.stdout is not None
        fd, address = map(int, decoy.stdout.readline().split())
        records = Records()
        with SocketCreator(str(test_policy), audit_sink=records) as creator:
            sup = Supervisor(listener=listener, arch=arch, creator=creator,
                             audit_sink=records)  # fmt: skip
            sup.handle(dataclasses.replace(n, pid=decoy.pid, args=(fd, address, 16, 0, 0, 0)))
        assert sup.counters.dropped == 1
        assert sup.counters.delivered == 0
        assert [r for r in records if r["op"] == "CREATE"] == []
    finally:
        os.close(listener)
        decoy.kill()
        decoy.wait()


def _fails_on_create(record: dict[str, Any]) -> bool:
    return bool(record["op"] == "CREATE")


def _fails_on_delivered(record: dict[str, Any]) -> bool:
    return bool(record["decision"] == "delivered")


@pytest.mark.parametrize("fails_on", [_fails_on_create, _fails_on_delivered],
                         ids=["grant", "delivered"])  # fmt: skip
def test_an_audit_log_failure_refuses_the_bind_and_the_supervisor_goes_on(
    test_policy: Path, fails_on: Callable[[dict[str, Any]], bool]
) -> None:
    """The grant of a bind cannot be logged (the sink fails on the boss's
    CREATE line, or on the run's "delivered" line): the socket is not handed
    out, the bind gets EACCES and the program keeps its own unbound socket,
    the supervisor says one line and keeps serving."""
    arch = kernel.arch()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the caller)
        try:
            caps.prctl(caps.PR_SET_NO_NEW_PRIVS, 1)
            listener = kernel.install_filter(arch)
            socket.send_fds(theirs, [b"L"], [listener])
            os.close(listener)
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", 1019))  # no TCP test connects to it: no TIME_WAIT
                theirs.send(b"0")
            except OSError as exc:
                theirs.send(f"{exc.errno} {sock.getsockname()}".encode())
        finally:
            os._exit(0)
    theirs.close()
    _, (listener,), _, _ = socket.recv_fds(ours, 1, 1)

    def sink(line: bytes) -> None:
        if fails_on(parsed(line)):
            raise AuditLogError(Exit.UNAVAILABLE, "audit log file:/x: No space left on device")

    said: list[str] = []
    try:
        with SocketCreator(str(test_policy), audit_sink=sink) as creator:
            sup = Supervisor(listener=listener, arch=arch, creator=creator,
                             audit_sink=sink, log=said.append)  # fmt: skip
            sup.handle(kernel.recv(listener))
        ours.settimeout(30)
        assert ours.recv(64) == f"{errno.EACCES} ('0.0.0.0', 0)".encode()
        assert (sup.counters.refused, sup.counters.delivered) == (1, 0)
        assert [line.split(": ", 1)[1] for line in said] == [
            "bind(127.0.0.1:1019) refused: audit log file:/x: No space left on device"
        ]
    finally:
        os.close(listener)
        ours.close()
        os.waitpid(pid, 0)


def test_an_audit_log_that_takes_nothing_starts_nothing(
    test_policy: Path, shared_dir: Path
) -> None:
    """--audit-log file:/dev/full: the start-up PING's lines cannot be written,
    so the run stops there with one line and 69; the program never runs."""
    shared_dir.chmod(0o777)
    marker = shared_dir / "ran"
    argv = privsock_run(test_policy, "/usr/bin/touch", str(marker))
    argv[argv.index("--") : argv.index("--")] = ["--audit-log", "file:/dev/full"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 69, result.stderr
    assert result.stderr.splitlines() == [
        "privsock: run: cannot write to audit log /dev/full: No space left on device; "
        "nothing was started"
    ]
    assert not marker.exists()


FLIP = textwrap.dedent(r"""
    import ctypes, json, socket, struct, threading
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", 1009)
        + socket.inet_aton("127.0.0.1") + bytes(8))
    ports = [struct.pack("!H", 1009), struct.pack("!H", 22)]
    done = threading.Event()
    def flip():
        i = 0
        while not done.is_set():
            ctypes.memmove(ctypes.addressof(buf) + 2, ports[i % 2], 2)
            i += 1
    t = threading.Thread(target=flip)
    t.start()
    bound, refused, other = [], 0, []
    for _ in range(80):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if libc.bind(s.fileno(), buf, 16) == 0:
            bound.append(s.getsockname()[1])
        elif ctypes.get_errno() == 13:
            refused += 1
        else:
            other.append(ctypes.get_errno())
        s.close()
    done.set()
    t.join()
    print(json.dumps({"bound": bound, "refused": refused, "other": other}))
""")


def test_an_address_flipped_under_the_supervisor_gains_nothing(
    test_policy: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    result = subprocess.run(privsock_run(test_policy, PY, "-c", FLIP, audit=audit),
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["other"] == []
    assert len(out["bound"]) + out["refused"] == 80
    assert set(out["bound"]) <= {1009}  # never a socket on 22
    helper = [r for r in audit_lines(audit) if r["side"] == "helper" and r["op"] == "CREATE"]
    assert {r["port"] for r in helper if r["decision"] == "granted"} <= {1009}
    assert len([r for r in helper if r["decision"] == "granted"]) == len(out["bound"])
    print(f"flipped address: {len(out['bound'])} grants on 1009, {out['refused']} refusals")


# ---------------------------------------------------------------------------
# Known limits: each is refused clearly, never served wrongly.

UNDUMPABLE = textwrap.dedent(r"""
    import ctypes, errno, socket
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 80))
        print("bound")
    except OSError as exc:
        print(errno.errorcode[exc.errno])
""")


def test_a_non_dumpable_program_is_left_to_the_kernel_and_told_why(test_policy: Path) -> None:
    result = subprocess.run(privsock_run(test_policy, PY, "-c", UNDUMPABLE), capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EACCES"  # the kernel's answer to an unprivileged bind
    assert "cannot read its bind() address (Operation not permitted); left to the kernel" \
        in result.stderr  # fmt: skip


def test_run_does_not_nest_and_says_so(test_policy: Path, activated_helper: Path) -> None:
    inner = [PRIVSOCK, "run", "--connect", str(activated_helper), "--", "true"]
    result = subprocess.run(privsock_run(test_policy, *inner), capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 69, result.stderr
    assert message_lines(result.stderr)[-1] == (
        "privsock: run: another seccomp listener already watches this process (privsock run, "
        "LXD's syscall interception, a container's notifier): privsock run cannot nest under it"
    )


def test_run_lines_name_the_transport(probe_run: dict[str, Any]) -> None:
    run = {(r["port"], r["transport"], r["decision"]) for r in probe_run["audit"]
           if r["side"] == "run"}  # fmt: skip
    assert {(80, "tcp", "delivered"), (1001, "udp", "delivered"), (22, "tcp", "denied")} <= run


def test_a_static_go_server_is_served(test_policy: Path, shared_dir: Path) -> None:
    """Go calls bind() through its own syscall package, not libc: the case
    LD_PRELOAD tools such as authbind cannot serve. CGO_ENABLED=0 makes it static."""
    go = shutil.which("go")
    if go is None:
        unavailable("go is not installed; `scripts/bootstrap --containers` installs golang-go")
    binary = shared_dir / "run_server"
    env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off",
           "GOCACHE": str(shared_dir / "gocache"), "GOPATH": str(shared_dir / "gopath")}
    source = Path(__file__).parent / "data" / "run_server.go"
    subprocess.run([go, "build", "-o", str(binary), str(source)], check=True,
                   capture_output=True, timeout=300, env=env)  # fmt: skip
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    with running(privsock_run(test_policy, str(binary))) as proc:
        assert proc.stdout is not None
        # Port 22 is refused in Go's own words.
        assert proc.stdout.readline() == "ready listen tcp 127.0.0.1:22: bind: permission denied\n"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(10)
            c.sendto(b"hi", ("127.0.0.1", 53))
            assert c.recv(100) == b"go-udp:hi"
        with socket.create_connection(("127.0.0.1", 80), timeout=10) as c:
            assert c.makefile().readline() == "go-tcp\n"
        assert proc.wait(timeout=10) == 0


DAEMON = textwrap.dedent(r"""
    import os, socket, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # the daemon: its parent and grandparent are gone
            time.sleep(0.5)
            s = socket.socket()
            s.bind(("127.0.0.1", 1010))
            print("daemon bound", s.getsockname()[1], "ppid", os.getppid(), flush=True)
            os._exit(0)
        os._exit(0)
    os.wait()
    print("cmd exits", flush=True)
""")


def test_a_daemonizing_program_stays_served(test_policy: Path) -> None:
    proc = subprocess.Popen(privsock_run(test_policy, PY, "-c", DAEMON), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The supervisor is the orphan's subreaper and served it after CMD had exited.
    assert out.splitlines() == ["cmd exits", f"daemon bound 1010 ppid {proc.pid}"]


def test_exec_inside_the_program_keeps_the_filter(test_policy: Path) -> None:
    script = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 1011)); print('bound')"
    result = subprocess.run(
        privsock_run(test_policy, "/bin/sh", "-c", f'{PY} -c "{script}"; exec {PY} -c "{script}"'),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["bound", "bound"]


NETNS = textwrap.dedent(r"""
    import os, socket, subprocess
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    s = socket.socket()
    s.bind(("127.0.0.1", 80))  # root of its own user namespace: its own bind
    s.listen()
    c = socket.create_connection(("127.0.0.1", 80), timeout=5)
    print("reached its own socket", flush=True)
""")


def test_a_program_in_its_own_network_namespace_binds_there(test_policy: Path) -> None:
    """A program that made a user and network namespace of its own may bind 80
    there itself; a socket from the helper would live in the host's namespace
    instead, where its own clients cannot reach it."""
    probe = subprocess.run(["unshare", "-Urn", "true"], user="nobody", capture_output=True,
                           check=False)  # fmt: skip
    if probe.returncode != 0:
        unavailable("unprivileged user namespaces are not available here (`unshare -Urn` as "
                    f"nobody: {probe.stderr.decode(errors='replace').strip()})")
    result = subprocess.run(
        privsock_run(test_policy, "unshare", "-Urn", PY, "-c", NETNS),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reached its own socket\n"


def test_ctrl_c_on_the_terminal_stops_the_program(test_policy: Path) -> None:
    """The program has no terminal; Ctrl-C reaches the supervisor (in the
    terminal's foreground group), which passes SIGINT on."""
    script = "import socket, time; socket.socket().bind(('127.0.0.1', 1013)); " \
        "print('serving', flush=True); time.sleep(60)"  # fmt: skip
    argv = privsock_run(test_policy, PY, "-c", script)
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover (the child: privsock run on a terminal of its own)
        # As a shell starts a foreground job: a suite run in the background
        # (`make test &`) has SIGINT and SIGQUIT ignored, and an ignored signal
        # stays ignored across exec, down to the program, which Ctrl-C then misses.
        for sig in (signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        os.execv(argv[0], argv)
    seen = b""
    deadline = time.monotonic() + 60
    while b"serving" not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 1)[0]:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
    assert b"serving" in seen, seen
    os.write(master, b"\x03")  # the terminal's INTR character
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if select.select([master], [], [], 0.2)[0]:
            try:
                os.read(master, 4096)
            except OSError:
                pass
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("Ctrl-C did not stop privsock run")
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGINT  # KeyboardInterrupt's
