"""Mitigations from threat-model/threats.toml that no other test guards, each
checked against a real hardened helper. `make audit` removes each one in turn
and requires these tests to fail."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from privsock import auditjson
from privsock.client import SocketCreator
from privsock.errors import PolicyDenied
from privsock.helper.exitcodes import Exit
from privsock.helperprocess import HELPER_ENV, default_helper_argv
from tests.auditlines import Records

from .helper_proc import HelperChannel, gone
from .nonroot import AS_PRIVSOCK, NON_ROOT_START, readable_policy

pytestmark = pytest.mark.root

# Harden exactly as the helper does, then try one thing. Exit 3 means the call
# was made and failed with an error: the filter let it through. Only SIGSYS
# proves the filter stopped it (an uncaught exception would also end in SIGSYS,
# as interpreter shutdown makes forbidden calls, hence the os._exit).
HARDEN_THEN = """
import ctypes, mmap, os, socket, sys, threading, time
libc = ctypes.CDLL("libc.so.6", use_errno=True)
{before}
from privsock.helper import main
hardened = main.harden(sys.argv[1], os.getppid())
os.write(2, b"hardened\\n")
try:
    {action}
except BaseException as exc:
    os.write(2, repr(exc).encode() + b"\\n")
    os._exit(3)
os._exit(0)
"""

# Each action keeps what it creates in a variable: a socket object collected
# unclosed would call getsockname (forbidden) and die for the wrong reason.
FORBIDDEN_CALLS = {
    # M-SECCOMP-ARGS: socket() family, type and protocol
    "socket-packet": "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)",
    "socket-raw": "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
    "socket-unix": "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
    "socket-sctp": "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132)",
    # setsockopt() level and option
    "setsockopt-broadcast": (
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        " s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)"
    ),
    "setsockopt-ttl": (
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        " s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)"
    ),
    # write() and sendmsg() on any fd but their own
    "write-fd1": "os.write(1, b'x')",
    "sendmsg-fd2": "assert libc.sendmsg(2, None, 0) != -1, 'sendmsg failed'",
    # M-NO-EXEC-MEMORY
    "mmap-exec": "m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)",
    "mprotect": (
        "m = mmap.mmap(-1, 4096); a = ctypes.addressof(ctypes.c_char.from_buffer(m));"
        " assert libc.mprotect(ctypes.c_void_p(a), 4096, 5) == 0, 'mprotect failed'"
    ),
}
ALLOWED_CALLS = {
    "socket-udp6": "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.close()",
    "setsockopt-reuseport": (
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        " s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); s.close()"
    ),
    "write-fd2": "os.write(2, b'x\\n')",
    "mmap-rw": "m = mmap.mmap(-1, 4096); m.close()",
}


def _harden_then(
    policy: Path, action: str, before: str = "", timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    script = HARDEN_THEN.format(action=action, before=before)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        return subprocess.run(
            [sys.executable, "-I", "-c", script, str(policy)],
            stdin=theirs, capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip


@pytest.mark.parametrize("name", sorted(FORBIDDEN_CALLS))
def test_forbidden_call_kills(root: None, test_policy: Path, name: str) -> None:
    result = _harden_then(test_policy, FORBIDDEN_CALLS[name])
    assert result.stderr.startswith(b"hardened\n"), result.stderr
    assert result.returncode == -signal.SIGSYS, (result.returncode, result.stderr)


@pytest.mark.parametrize("name", sorted(ALLOWED_CALLS))
def test_allowed_call_works(root: None, test_policy: Path, name: str) -> None:
    # The control for the test above: the harness itself neither dies nor fails.
    result = _harden_then(test_policy, ALLOWED_CALLS[name])
    assert result.returncode == 0, result.stderr


def test_x32_syscall_kills_the_whole_process(root: None, test_policy: Path) -> None:
    # A thread started before the filter sleeps on; only KILL_PROCESS for a
    # foreign ABI takes it down with the caller. x32 getpid is 0x40000000 | 39.
    # The filter waits until the thread is inside clock_nanosleep (230): a thread
    # still starting up when the filter lands makes syscalls of its own that
    # the allowlist kills, before "hardened" is written.
    before = (
        "t = threading.Thread(target=time.sleep, args=(600,), daemon=True)\n"
        "t.start()\n"
        "while not open(f'/proc/self/task/{t.native_id}/syscall').read().startswith('230 '):\n"
        "    time.sleep(0.001)"
    )
    try:
        result = _harden_then(
            test_policy, "libc.syscall(0x40000000 | 39)", before=before, timeout=10
        )
    except subprocess.TimeoutExpired:
        pytest.fail("an x32 syscall killed only the calling thread; the process lived on")
    assert result.stderr.startswith(b"hardened\n"), result.stderr
    assert result.returncode == -signal.SIGSYS, (result.returncode, result.stderr)


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    found = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        m = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
        if m:
            found[m[1]] = (m[2], m[3])
    return found


def test_helper_resource_limits(creator: SocketCreator) -> None:
    assert creator.pid is not None
    limits = _limits(creator.pid)
    assert limits["Max open files"] == ("8", "8")
    assert limits["Max processes"] == ("0", "0")
    assert limits["Max core file size"] == ("0", "0")
    assert limits["Max locked memory"] == ("0", "0")


# Skips the step that sets the capability sets: after the uid switch the
# helper would still hold root's full permitted set. It must refuse to serve.
SKIP_CAP_STEP = (
    "from privsock.helper import drop, main\n"
    "assert callable(drop._set_only_bind_caps)\n"
    "drop._set_only_bind_caps = lambda: None\n"
    "main.main()\n"
)


def test_helper_refuses_to_serve_when_a_drop_step_fails(root: None, test_policy: Path) -> None:
    code, err = _refusal(test_policy, SKIP_CAP_STEP)
    assert code == Exit.OSERR, err
    assert b"not hardened as promised, refusing to serve" in err
    assert b"CapPrm" in err


# Loads a filter the way a container runtime's profile would, then skips the
# helper's own: Seccomp reads 2 either way, only the filter count tells.
SKIP_OWN_FILTER = (
    "from privsock.helper import main, seccomp_filter\n"
    "import pyseccomp as sc\n"
    "runtime = sc.SyscallFilter(sc.ALLOW)\n"
    "runtime.add_rule(sc.ERRNO(1), 'acct')\n"
    "runtime.load()\n"
    "assert callable(seccomp_filter.load)\n"
    "seccomp_filter.load = lambda: None\n"
    "main.main()\n"
)


def _refusal(test_policy: Path, script: str, starter: tuple[str, ...] = ()) -> tuple[int, bytes]:
    """Run a sabotaged helper (under ``starter``, e.g. NON_ROOT_START); a PING it
    would answer if it served, then EOF."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        proc = subprocess.Popen(
            [*starter, sys.executable, "-I", "-c", script, "--policy", str(test_policy)],
            stdin=theirs, stderr=subprocess.PIPE, env=HELPER_ENV,
        )  # fmt: skip
        theirs.close()
        ours.send(b"PS\x01\x02" + (1).to_bytes(4, "big") + bytes(24))
        ours.shutdown(socket.SHUT_WR)
        _, err = proc.communicate(timeout=30)
    return proc.returncode, err


# A drop call the kernel refuses, for real: a capset header version it does not
# take (EINVAL), or a bounding-set drop of a capability number it does not know
# (EINVAL). Unchecked, the first would leave it to the self-check and the
# second would serve, every real capability dropped.
BAD_CAPSET = (
    "from privsock.helper import caps, main\n"
    "caps._LINUX_CAPABILITY_VERSION_3 = 0\n"
    "main.main()\n"
)
BAD_BOUNDING_DROP = (
    "from privsock.helper import drop, main\n"
    "assert callable(drop.cap_last)\n"
    "drop.cap_last = lambda: 63\n"
    "main.main()\n"
)


@pytest.mark.parametrize(
    ("start", "script", "error"),
    [
        ("root-start", BAD_CAPSET, b"capset(effective 0x400, permitted 0x400, inheritable 0x0): "
                                   b"Invalid argument"),
        ("non-root-start", BAD_CAPSET, b"capset(effective 0x400, permitted 0x400, "
                                       b"inheritable 0x0): Invalid argument"),
        ("root-start", BAD_BOUNDING_DROP, b"prctl(24, 41): Invalid argument"),
    ],
)  # fmt: skip
def test_helper_stops_at_a_drop_call_the_kernel_refuses(
    test_policy: Path, shared_policy: Path, start: str, script: str, error: bytes
) -> None:
    if start == "root-start":
        code, err = _refusal(test_policy, script)
    else:
        code, err = _refusal(shared_policy, script, tuple(NON_ROOT_START))
    assert code == Exit.OSERR, err
    assert error in err
    # Stopped at the call itself, not later by the self-check.
    assert b"not hardened as promised" not in err


def test_helper_refuses_to_serve_without_its_own_filter_under_a_runtimes(
    root: None, test_policy: Path
) -> None:
    code, err = _refusal(test_policy, SKIP_OWN_FILTER)
    assert code == Exit.OSERR, err
    assert b"not hardened as promised, refusing to serve" in err
    assert b"Seccomp_filters is 1, expected 2" in err


# One rule more in the allowlist, which libseccomp cannot add as asked: a
# syscall x86_64 lacks (libseccomp would accept it and add nothing), or a
# condition on a seventh argument. The filter must not load without it.
BAD_RULE = (
    "from privsock.helper import main, seccomp_filter\n"
    "from privsock.helper.libseccomp import CMP_EQ, Arg\n"
    "seccomp_filter.ALLOWLIST += (seccomp_filter.Allowed({}),)\n"
    "main.main()\n"
)


@pytest.mark.parametrize(
    "rule",
    [
        "'socketcall', 'i386 only'",
        "'write', 'a seventh argument', ((Arg(6, CMP_EQ, 2),),)",
    ],
    ids=["foreign-syscall", "refused-rule"],
)
def test_helper_refuses_to_serve_when_a_rule_cannot_be_added(
    root: None, test_policy: Path, rule: str
) -> None:
    code, err = _refusal(test_policy, BAD_RULE.format(rule))
    assert code == Exit.OSERR, err
    assert b"loading the seccomp filter failed: " in err
    assert err.count(b"\n") == 1, err  # the one line, no traceback


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["stream", "dgram"])
def test_helper_refuses_a_non_seqpacket_socket(
    root: None, test_policy: Path, kind: socket.SocketKind
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    with ours, theirs:
        proc = subprocess.Popen(
            [*default_helper_argv(), "--policy", str(test_policy)],
            stdin=theirs, stderr=subprocess.PIPE, env=HELPER_ENV,
        )  # fmt: skip
        theirs.close()
        ours.shutdown(socket.SHUT_WR)  # a helper that served would see EOF and exit 0
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == Exit.PROTOCOL, err
    assert b"fd 0 must be an AF_UNIX SOCK_SEQPACKET socket" in err


def test_helper_keeps_no_socket_it_handed_out(creator: SocketCreator) -> None:
    assert creator.pid is not None
    # More sockets than the helper's RLIMIT_NOFILE: it must hold none of them.
    socks = [creator.create("udp", "127.0.0.1", port) for port in range(1000, 1012)]
    try:
        creator.ping()  # the helper has finished with the last CREATE
        assert sorted(map(int, os.listdir(f"/proc/{creator.pid}/fd"))) == [0, 2]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            for s in socks:
                peer.sendto(b"ping", s.getsockname())
                s.settimeout(5)
                assert s.recv(16) == b"ping"
    finally:
        for s in socks:
            s.close()


def test_helper_logs_every_decision(root: None, test_policy: Path) -> None:
    records = Records()
    with SocketCreator(str(test_policy), audit_sink=records) as c:
        helper_pid = c.pid
        c.create("udp", "127.0.0.1", 53).close()
        with pytest.raises(PolicyDenied):
            c.create("tcp", "0.0.0.0", 22)
    helper = [r for r in records if r["side"] == "helper"]
    assert [(r["op"], r["decision"], r["rule"]) for r in helper] == [
        ("PING", "pong", None), ("CREATE", "granted", "allow[0]"), ("CREATE", "denied", "deny[0]"),
    ]  # fmt: skip
    assert {r["pid"] for r in helper} == {helper_pid}
    denied = helper[2]
    assert (denied["transport"], denied["address"], denied["port"]) == ("tcp", "0.0.0.0", 22)


def _audit_records_after(policy: Path, message: bytes) -> list[dict[str, Any]]:
    """The audit records of a helper's whole session (its start-up PING, then
    ``message``), read from its stderr once the session has ended."""
    raw = HelperChannel.for_policy(policy)
    try:
        raw.wait_ready()
        raw.exchange(message)
        raw.chan.close()  # end of session: the helper exits, its stderr ends
        assert raw.proc.stderr is not None
        lines = raw.proc.stderr.read().splitlines()
    finally:
        raw.close()
    return [auditjson.parse(line) for line in lines if line.startswith(b"{")]


def test_helper_logs_malformed_requests(root: None, test_policy: Path) -> None:
    records = _audit_records_after(test_policy, b"PS\x01\x01\x00\x00\x00\x09garbage")
    assert [(r["id"], r["decision"]) for r in records] == [(424242, "pong"), (9, "malformed")]
    assert "not 32" in records[1]["reason"]


@pytest.mark.parametrize("magic", [b'"\\', b'",', b"\n{"])
def test_a_boss_cannot_break_or_forge_an_audit_line(
    root: None, test_policy: Path, magic: bytes
) -> None:
    """The reason of a bad magic quotes the boss's two bytes: a quote or a backslash
    among them must neither break the helper's JSON line nor add a field to it."""
    records = _audit_records_after(test_policy, magic + b"\x01\x02\x00\x00\x00\x4d" + bytes(24))
    assert [(r["id"], r["decision"], r["reason"]) for r in records[1:]] == [
        (77, "malformed", f"bad magic {magic!r}")
    ]


def test_inherited_fds_are_closed(root: None, test_policy: Path) -> None:
    r, w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        proc = subprocess.Popen(
            [*default_helper_argv(), "--policy", str(test_policy)],
            stdin=theirs, stderr=subprocess.DEVNULL, env=HELPER_ENV, pass_fds=(w,),
        )  # fmt: skip
        theirs.close()
        os.close(w)
        ours.settimeout(30)
        ours.send(b"PS\x01\x02" + (1).to_bytes(4, "big") + bytes(24))
        assert ours.recv(64)[3] == 0  # PING answered: hardened and serving
        assert sorted(map(int, os.listdir(f"/proc/{proc.pid}/fd"))) == [0, 2]
        # The helper closed its copy of the write end: the pipe reads as ended.
        assert os.read(r, 1) == b""
    finally:
        ours.close()
        os.close(r)
    assert proc.wait(timeout=10) == Exit.OK


BOSS_WITH_KEEPER = """
import subprocess, sys, time
from privsock.client import SocketCreator
c = SocketCreator(sys.argv[1], audit_sink=None)
c.start()
# A child that holds the channel: the helper sees no EOF when the boss dies.
keeper = subprocess.Popen(["sleep", "120"], pass_fds=[c.process.chan.fileno()])
print(c.pid, keeper.pid, flush=True)
time.sleep(120)
"""


def test_helper_dies_with_its_boss_even_if_the_channel_lives(root: None, test_policy: Path) -> None:
    boss = subprocess.Popen(
        [sys.executable, "-c", BOSS_WITH_KEEPER, str(test_policy)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    keeper_pid = None
    try:
        assert boss.stdout is not None
        helper_pid, keeper_pid = map(int, boss.stdout.readline().split())
        assert not gone(helper_pid, 0)
        boss.kill()
        boss.wait()
        assert gone(helper_pid, 2.0), "the helper outlived its boss"
    finally:
        boss.kill()
        boss.wait()
        if keeper_pid is not None:
            os.kill(keeper_pid, signal.SIGKILL)


# A process running as privsock and holding CAP_NET_BIND_SERVICE itself (so
# that the capability check alone would not stop it) tries to read the target.
PROBE = """
import ctypes, sys
pid = int(sys.argv[1])
try:
    open(f"/proc/{pid}/environ", "rb").read()
    environ = "read"
except PermissionError:
    environ = "denied"
libc = ctypes.CDLL("libc.so.6", use_errno=True)
if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
    attach = "attached"
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
else:
    attach = "denied"
print(environ, attach)
"""


@pytest.fixture
def shared_policy(root: None) -> Iterator[Path]:
    with readable_policy() as path:
        yield path


def _probe(pid: int) -> str:
    return subprocess.run(
        [*AS_PRIVSOCK, "--", sys.executable, "-I", "-c", PROBE, str(pid)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip


@pytest.mark.parametrize("start", ["root-start", "non-root-start"])
def test_same_uid_process_cannot_read_the_helper(
    test_policy: Path, shared_policy: Path, start: str
) -> None:
    # A non-root start changes no uid, so the kernel leaves the process
    # dumpable: only the helper's own PR_SET_DUMPABLE protects it there.
    if start == "root-start":
        raw = HelperChannel.for_policy(test_policy)
    else:
        raw = HelperChannel.for_policy(
            shared_policy, argv=[*NON_ROOT_START, *default_helper_argv()]
        )
    try:
        raw.wait_ready()
        assert _probe(raw.pid) == "denied denied"
        raw.wait_ready()  # not stopped: still serving
    finally:
        raw.close()


def test_same_uid_probe_reads_an_ordinary_process(root: None) -> None:
    # The control for the test above: the probe can succeed.
    sleeper = subprocess.Popen([*AS_PRIVSOCK, "--", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{sleeper.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "setpriv did not exec sleep"
            time.sleep(0.01)
        assert _probe(sleeper.pid) == "read attached"
    finally:
        sleeper.kill()
        sleeper.wait()
