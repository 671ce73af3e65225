"""End to end with the real helper started as root: real privilege drop, real
seccomp, real fd passing."""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from privsock.client import SocketCreator
from privsock.errors import (
    CreatorOSError,
    HelperDied,
    HelperRestartLimit,
    HelperStartError,
    PolicyDenied,
    RateLimited,
)
from privsock.helper import protocol
from privsock.helper.exitcodes import Exit
from privsock.helper.procstatus import parse_status, verdict
from privsock.helper.protocol import Reason, Stage, Status, Transport

from .helper_proc import HelperChannel, fd_count, gone, proc_status

pytestmark = pytest.mark.root


def _create_bytes(port: int = 53, rid: int = 7, **kw: object) -> bytes:
    req = protocol.Create(rid, Transport.UDP, ipaddress.ip_address("127.0.0.1"), port)
    return protocol.encode_request(req)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_create_binds_where_asked(creator: SocketCreator, transport: str, address: str) -> None:
    # reuseaddr on TCP only: the policy can never grant it for UDP (port hijack).
    sock = creator.create(transport, address, 53, reuseaddr=transport == "tcp")
    with sock:
        assert sock.getsockname()[:2] == (address, 53)
        assert sock.family == (socket.AF_INET if "." in address else socket.AF_INET6)
        assert sock.type == (socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == (transport == "tcp")
        # Bound, not listening: the boss decides when and with what backlog.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        assert sock.get_inheritable() is False  # received with MSG_CMSG_CLOEXEC


def test_options_are_set_as_requested(creator: SocketCreator) -> None:
    with creator.create("tcp", "::", 1001, v6only=True, reuseport=True) as s:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    with creator.create("tcp", "::", 1002) as s:
        # Without V6ONLY the helper sets dual-stack explicitly (the policy judged it so).
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0


def test_port_22_is_denied_by_port(creator: SocketCreator) -> None:
    with pytest.raises(PolicyDenied) as info:
        creator.create("tcp", "0.0.0.0", 22)
    assert info.value.reason is Reason.PORT


def test_address_outside_policy_is_denied_by_address(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = policy_factory(
        """
        version = 1
        [[allow]]
        transports = ["udp"]
        ports = [53]
        addresses = ["127.0.0.1/32"]
        """
    )
    with SocketCreator(str(policy), audit_sink=None) as c:
        c.create("udp", "127.0.0.1", 53).close()
        with pytest.raises(PolicyDenied) as info:
            c.create("udp", "127.0.0.2", 53)
        assert info.value.reason is Reason.ADDRESS


def test_rate_limit_trips_with_correct_retry_after(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = policy_factory(
        """
        version = 1
        [rate_limit]
        rate = 2.0
        burst = 3
        [[allow]]
        transports = ["udp"]
        ports = [53]
        addresses = ["127.0.0.0/8"]
        """
    )
    with SocketCreator(str(policy), audit_sink=None) as c:
        for _ in range(3):
            c.create("udp", "127.0.0.1", 53, reuseaddr=False).close()
        with pytest.raises(RateLimited) as info:
            c.create("udp", "127.0.0.1", 53)
        # One token takes 500 ms at 2/s; some of it has already passed.
        assert 0.0 < info.value.retry_after <= 0.5
        # Denied requests cost a token too (probing is limited).
        with pytest.raises(RateLimited):
            c.create("udp", "127.0.0.1", 22)
        time.sleep(info.value.retry_after + 0.05)
        c.create("udp", "127.0.0.1", 53).close()


MALFORMED = [
    b"",  # handled separately: a zero-length message ends the session
    b"PS",
    b"PS\x01\x01\x00\x00\x00\x07",
    bytes(32),
    b"XS" + bytes(30),
]


def _mutations() -> list[bytes]:
    good = bytearray(_create_bytes())
    out = []
    for offset, value in [
        (0, 0x51), (2, 2), (3, 0), (3, 9), (8, 0), (8, 3), (9, 5), (10, 0), (11, 0),
        (20, 1), (29, 0x08), (28, 0x80), (31, 1), (30, 1), (29, 0x04),
    ]:  # fmt: skip
        bad = bytearray(good)
        bad[offset] = value
        if offset in (10, 11):
            bad[10] = bad[11] = 0  # port 0
        out.append(bytes(bad))
    out.append(bytes(good) + b"\0")  # 33 bytes
    out.append(bytes(good)[:31])
    out.append(bytes(good) * 100)  # over-long, truncated by the kernel
    return out


@pytest.mark.parametrize("data", _mutations(), ids=lambda d: f"len{len(d)}-{d[:12].hex()}")
def test_malformed_gets_malformed_and_helper_goes_on(raw: HelperChannel, data: bytes) -> None:
    reply, fds = raw.exchange(data)
    assert fds == []
    decoded = protocol.decode_reply(reply)
    assert decoded.status is Status.MALFORMED
    assert decoded.request_id == protocol.peek_request_id(data)
    reply, fds = raw.exchange(_create_bytes(rid=99))
    assert protocol.decode_reply(reply).status is Status.OK
    assert len(fds) == 1
    os.close(fds[0])


def test_ping_with_payload_is_malformed(raw: HelperChannel) -> None:
    data = bytearray(protocol.encode_request(protocol.Ping(5)))
    data[20] = 1
    reply, _ = raw.exchange(bytes(data))
    assert protocol.decode_reply(reply).status is Status.MALFORMED


def test_fds_sent_to_helper_are_refused_and_closed(raw: HelperChannel, tmp_path: Path) -> None:
    before = fd_count(raw.pid)
    r, w = os.pipe()
    f = os.open(tmp_path / "x", os.O_CREAT | os.O_RDWR)
    s1, s2 = socket.socketpair()
    try:
        for _ in range(20):
            reply, fds = raw.exchange(_create_bytes(rid=11), [r, w, f, s1.fileno()])
            assert fds == []
            assert protocol.decode_reply(reply).status is Status.MALFORMED
        assert fd_count(raw.pid) == before
        # The helper closed its copies: the pipe's write end is now only ours.
        os.close(w)
        assert os.read(r, 1) == b""
    finally:
        for fd in (r, f):
            os.close(fd)
        s1.close()
        s2.close()


def test_zero_length_message_ends_the_session_cleanly(raw: HelperChannel) -> None:
    raw.send(b"")
    assert raw.proc.wait(timeout=5) == Exit.OK


def test_helper_status_shows_exactly_the_promise(creator: SocketCreator) -> None:
    assert creator.pid is not None
    status = parse_status(proc_status(creator.pid))
    pw = pwd.getpwnam("privsock")
    assert verdict(status, uid=pw.pw_uid, gid=pw.pw_gid) == []
    assert status.caps == {
        "CapInh": 0, "CapPrm": 0x400, "CapEff": 0x400, "CapBnd": 0x400, "CapAmb": 0,
    }  # fmt: skip
    assert status.uids == (pw.pw_uid,) * 4
    assert status.groups == ()
    assert status.no_new_privs == 1
    assert status.seccomp == 2
    text = proc_status(creator.pid)
    assert "\nCoreDumping:\t0" in text or "CoreDumping" not in text
    # Only fds 0 (channel) and 2 (log) are open while idle.
    assert sorted(map(int, os.listdir(f"/proc/{creator.pid}/fd"))) == [0, 2]


def test_second_tcp_bind_without_reuseaddr_is_eaddrinuse(creator: SocketCreator) -> None:
    with creator.create("tcp", "127.0.0.1", 1003) as first:
        first.listen(1)
        with pytest.raises(CreatorOSError) as info:
            creator.create("tcp", "127.0.0.1", 1003)
    assert info.value.errno == errno.EADDRINUSE
    assert info.value.stage is Stage.BIND


# Each action keeps its socket in a variable: a socket object collected open warns,
# and the warning's repr calls getsockname, which would be a SIGSYS of its own.
FORBIDDEN = {
    "open": "r = os.open('/etc/hostname', os.O_RDONLY)",
    "execve": "os.execv('/bin/true', ['true'])",
    "connect": (
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('127.0.0.1', 9))"
    ),
    "af_packet": "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)",
    "socket_raw": "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)",
    "af_unix": "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)",
    "setsockopt_other": (
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)"
    ),
    "write_stdout": "os.write(1, b'x')",
}
ALLOWED = "s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.bind(('::1', 1010)); s.close()"

# Exit 3: the call was let through; exit 4: it failed with an error instead of
# killing the process. Either way the filter did not stop it.
HARDEN_THEN = """
import os, socket, sys
from privsock.helper import main
hardened = main.harden(sys.argv[1], os.getppid())
os.write(2, b"hardened\\n")
try:
    {action}
except BaseException:
    os._exit(4)
os._exit(3)
"""


def _harden_then(policy: Path, action: str) -> subprocess.CompletedProcess[bytes]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        return subprocess.run(
            [sys.executable, "-I", "-c", HARDEN_THEN.format(action=action), str(policy)],
            stdin=theirs, capture_output=True, timeout=30, check=False,
        )  # fmt: skip


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_forbidden_syscall_after_hardening_is_sigsys(
    root: None, test_policy: Path, name: str
) -> None:
    result = _harden_then(test_policy, FORBIDDEN[name])
    assert b"hardened" in result.stderr, result.stderr
    assert result.returncode == -signal.SIGSYS, result.stderr


def test_allowed_syscalls_after_hardening_work(root: None, test_policy: Path) -> None:
    # The control for the test above: the harness itself does not die.
    result = _harden_then(test_policy, ALLOWED)
    assert result.returncode == 3, result.stderr


BOSS = """
import sys, time
from privsock.client import SocketCreator
from privsock.errors import HelperRestartLimit
c = SocketCreator(sys.argv[1], audit_sink=None)
c.start()
print(c.pid, flush=True)
time.sleep(60)
"""


def test_helper_dies_within_a_second_of_the_boss(root: None, test_policy: Path) -> None:
    boss = subprocess.Popen(
        [sys.executable, "-c", BOSS, str(test_policy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert boss.stdout is not None
        helper_pid = int(boss.stdout.readline())
        assert not gone(helper_pid, 0)
        boss.kill()
        boss.wait()
        assert gone(helper_pid, 1.0)
    finally:
        boss.kill()
        boss.wait()


def test_sigkilled_helper_raises_helper_died(creator: SocketCreator) -> None:
    assert creator.pid is not None
    os.kill(creator.pid, signal.SIGKILL)
    with pytest.raises(HelperDied) as info:
        creator.create("udp", "127.0.0.1", 53)
    assert info.value.returncode == -signal.SIGKILL
    assert "SIGKILL" in str(info.value)


def test_sigsys_death_is_reported_as_seccomp(creator: SocketCreator) -> None:
    assert creator.pid is not None
    os.kill(creator.pid, signal.SIGSYS)
    with pytest.raises(HelperDied) as info:
        creator.ping()
    assert info.value.killed_by_seccomp
    assert "seccomp" in str(info.value) and "type=1326" in str(info.value)


# -- start-up refusals ---------------------------------------------------------


def _start(policy: Path, **popen: object) -> subprocess.CompletedProcess[bytes]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        return subprocess.run(
            [sys.executable, "-I", "-m", "privsock.helper.main", "--policy", str(policy)],
            stdin=theirs, capture_output=True, timeout=30, check=False, **popen,  # type: ignore[arg-type]
        )  # fmt: skip


def test_refuses_without_privilege(root: None, test_policy: Path) -> None:
    result = _start(test_policy, user="privsock", group="privsock")
    assert result.returncode == Exit.NOPERM
    assert b"run as root or give CAP_NET_BIND_SERVICE" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_refuses_world_writable_policy(root: None, test_policy: Path) -> None:
    test_policy.chmod(0o666)
    result = _start(test_policy)
    assert result.returncode == Exit.CONFIG
    assert b"writable" in result.stderr


def test_refuses_policy_with_typo(root: None, policy_factory: Callable[[str], Path]) -> None:
    policy = policy_factory("version = 1\n[[allow]]\ntransports=['udp']\nprots=[53]\n")
    result = _start(policy)
    assert result.returncode == Exit.DATAERR
    assert b"prots" in result.stderr


def test_refuses_nonexistent_user(root: None, policy_factory: Callable[[str], Path]) -> None:
    policy = policy_factory(
        "version = 1\n[helper]\nuser = \"nosuchuser\"\ngroup = \"privsock\"\n"
        "[[allow]]\ntransports=['udp']\nports=[53]\naddresses=['0.0.0.0/0']\n"
    )
    result = _start(policy)
    assert result.returncode == Exit.NOUSER
    assert b"nosuchuser" in result.stderr


def test_refuses_stdin_that_is_not_seqpacket(root: None, test_policy: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-m", "privsock.helper.main", "--policy", str(test_policy)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False,
    )
    assert result.returncode == Exit.PROTOCOL


def test_start_error_carries_the_helpers_message(root: None, test_policy: Path) -> None:
    test_policy.chmod(0o666)
    with pytest.raises(HelperStartError) as info:
        SocketCreator(str(test_policy), audit_sink=None).start()
    assert info.value.returncode == Exit.CONFIG
    assert "writable" in str(info.value)


# -- supervision ---------------------------------------------------------------


def test_dead_helper_is_replaced_on_next_request(creator: SocketCreator) -> None:
    kept = creator.create("udp", "127.0.0.1", 1004)
    first = creator.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    with pytest.raises(HelperDied):
        creator.ping()
    with creator.create("udp", "127.0.0.1", 1005) as fresh:
        assert fresh.getsockname()[1] == 1005
    assert creator.pid not in (None, first)
    # A socket handed out by the dead helper stays valid.
    with kept, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"still here", ("127.0.0.1", 1004))
        kept.settimeout(5)
        assert kept.recv(64) == b"still here"


def test_restart_bound_trips_with_a_permanent_error(root: None, test_policy: Path) -> None:
    with SocketCreator(str(test_policy), audit_sink=None, max_restarts=2) as c:
        for _ in range(3):
            assert c.pid is not None
            os.kill(c.pid, signal.SIGKILL)
            with pytest.raises(HelperDied):
                c.ping()
            if _ < 2:
                c.ping()  # restarted
        with pytest.raises(HelperRestartLimit, match="died 3 times"):
            c.ping()
        with pytest.raises(HelperRestartLimit):
            c.ping()  # permanent, not a new attempt
        c.restart()  # a human decides
        c.ping()


def test_seccomp_kill_is_not_restarted_automatically(creator: SocketCreator) -> None:
    assert creator.pid is not None
    os.kill(creator.pid, signal.SIGSYS)
    with pytest.raises(HelperDied):
        creator.ping()
    with pytest.raises(HelperDied, match="not restarted automatically after a seccomp kill"):
        creator.ping()
    creator.restart()
    creator.ping()


# -- what the start-up sequence guarantees ----------------------------------------


def test_inherited_fds_are_closed_before_serving(root: None, test_policy: Path) -> None:
    r, w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "privsock.helper.main", "--policy", str(test_policy)],
        stdin=theirs, stderr=subprocess.DEVNULL, pass_fds=(w,),
    )  # fmt: skip
    theirs.close()
    try:
        ours.settimeout(10)
        ours.send(protocol.encode_request(protocol.Ping(1)))
        assert protocol.decode_reply(ours.recv(64)).status is Status.OK
        assert sorted(map(int, os.listdir(f"/proc/{proc.pid}/fd"))) == [0, 2]
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # no copy of the write end is left in the helper
    finally:
        ours.close()
        proc.wait(timeout=10)
        os.close(r)
        if w >= 0:
            os.close(w)


def test_rlimits_forbid_core_dumps_processes_and_more_fds(creator: SocketCreator) -> None:
    limits = Path(f"/proc/{creator.pid}/limits").read_text().splitlines()
    table = {line[:26].strip(): line[26:].split()[:2] for line in limits[1:]}
    assert table["Max core file size"] == ["0", "0"]
    assert table["Max processes"] == ["0", "0"]
    assert table["Max open files"] == ["8", "8"]
    assert table["Max locked memory"] == ["0", "0"]


SKIP_DROP = """
import os, sys
from privsock.helper import drop, main
drop.switch_user = lambda uid, gid: None  # a drop that silently did nothing
os._exit(main.run(["--policy", sys.argv[1]]))
"""


def test_helper_that_cannot_prove_its_hardening_does_not_serve(
    root: None, test_policy: Path
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        result = subprocess.run(
            [sys.executable, "-I", "-c", SKIP_DROP, str(test_policy)],
            stdin=theirs, capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(64)  # it never answered anything
    assert result.returncode == Exit.OSERR
    assert b"not hardened as promised, refusing to serve" in result.stderr
    assert b"a uid is 0" in result.stderr


UNDER_A_FILTER = """
import os, sys
import pyseccomp as sc
flt = sc.SyscallFilter(sc.ALLOW)  # what a container runtime's profile looks like from here
flt.add_rule(sc.ERRNO(1), "acct")
flt.load()
os.execv(sys.executable, [sys.executable, "-I", "-m", "privsock.helper.main", *sys.argv[1:]])
"""


def test_helper_loads_its_own_filter_under_a_runtimes_filter(
    root: None, test_policy: Path
) -> None:
    # Seccomp: 2 is already true before the helper loads anything; only one more
    # stacked filter proves that its own allowlist is in place.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", UNDER_A_FILTER, "--policy", str(test_policy)],
        stdin=theirs, stderr=subprocess.PIPE,
    )  # fmt: skip
    theirs.close()
    try:
        ours.settimeout(10)
        ours.send(protocol.encode_request(protocol.Ping(1)))
        assert protocol.decode_reply(ours.recv(64)).status is Status.OK
        status = parse_status(proc_status(proc.pid))
        assert status.seccomp == 2
        assert status.seccomp_filters == 2
    finally:
        ours.close()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()
