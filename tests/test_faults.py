"""Fault injection with real processes: a real hardened helper (in a network
namespace of its own, so its ports are its own), a real boss, real signals,
real fd limits. Each fault must end in the documented error, with every wait
bounded, nothing lost and nothing left behind.

A helper SIGKILLed mid-request is tests/test_supervision.py; the boss dying by
SIGTERM/SIGINT is tests/test_shutdown.py. docs/reliability.md lists them all.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fuzz import datagrams, expected, live, livehelper, model
from privsock.client import SocketCreator
from privsock.errors import (
    CreatorOSError,
    HelperDied,
    HelperStartError,
    PolicyDenied,
    ProtocolViolation,
)
from privsock.helper.exitcodes import Exit
from privsock.helper.protocol import Stage
from privsock.helperprocess import HELPER_ENV
from tests.auditlines import Records

from .helper_proc import gone
from .test_supervision import SYS_POLL, SYS_RECVMSG, wait_in_syscall

pytestmark = pytest.mark.root

BOUND = 30.0  # no wait in these tests is longer; each is a bound, not a timing


@pytest.fixture
def policy(root: None, policy_factory: Callable[[str], Path]) -> Iterator[Path]:
    path = policy_factory(expected.policy_text())
    yield path
    # Whatever the test did, no process naming its policy is left afterwards.
    assert gone_by_policy(path, BOUND), processes_naming(path)


def creator_for(policy: Path, **kw: Any) -> SocketCreator:
    kw.setdefault("audit_sink", None)
    return SocketCreator(str(policy), helper_argv=livehelper.netns_argv(), **kw)


@pytest.fixture
def creator(policy: Path) -> Iterator[SocketCreator]:
    with creator_for(policy, reply_timeout=1.0) as c:
        yield c


def granted(c: SocketCreator, *args: Any) -> tuple[socket.socket, int]:
    """c.create(*args), asked again while the kernel refuses to pass the fd: the
    helper user's budget of fds in flight is shared with every helper on the
    machine, so another boss can use it up for a moment (PROTOCOL.md, stage
    send). Returns the socket and how many tries it took."""
    for tries in range(1, 101):
        try:
            return c.create(*args), tries
        except CreatorOSError as exc:
            if exc.stage is not Stage.SEND or tries == 100:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


def still_works(sock: socket.socket) -> bool:
    """A UDP socket from a helper's namespace: a datagram to itself comes back."""
    sock.settimeout(BOUND)
    sock.sendto(b"still here", sock.getsockname())
    return sock.recv(64) == b"still here"


def in_flight(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``call`` in a thread; return once it waits for the helper's reply."""
    outcome: list[object] = []
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + BOUND
    while not tid:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    wait_in_syscall(tid[0], {SYS_POLL, SYS_RECVMSG})
    return worker, outcome


def gone_by_policy(path: Path, within: float) -> bool:
    """True once no process names ``path``, polled up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while processes_naming(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line mentions ``path`` (a policy file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass  # gone meanwhile
    return found


# -- the helper fails mid-request ---------------------------------------------------


def test_sigstopped_helper_times_out_is_killed_and_replaced(
    creator: SocketCreator,
) -> None:
    kept = creator.create("udp", "127.0.0.1", 1000)
    first = creator.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    worker, outcome = in_flight(lambda: creator.create("udp", "127.0.0.1", 1001))
    worker.join(BOUND)
    assert not worker.is_alive()
    assert isinstance(outcome[0], ProtocolViolation), outcome
    assert "no reply within 1s" in str(outcome[0])
    assert gone(first, 0)  # killed, although stopped, and reaped
    with creator.create("udp", "127.0.0.1", 1001) as fresh:  # a new helper
        assert fresh.getsockname() == ("127.0.0.1", 1001)
    assert creator.pid not in (None, first)
    with kept:
        assert still_works(kept)


def test_boss_closing_the_channel_mid_reply_ends_the_helper_cleanly(policy: Path) -> None:
    figures = live.Figures()
    helper = live.start(policy, livehelper.netns_argv(), figures)
    os.kill(helper.pid, signal.SIGSTOP)
    helper.send(datagrams.encode(model.CREATE, 5, model.UDP, 4, 53, 0x7F000001), [], False)
    helper.chan.close()  # the boss goes away before the reply is written
    os.kill(helper.pid, signal.SIGCONT)
    # It made the socket, the reply failed (EPIPE), it closed the socket and left.
    assert helper.proc.wait(BOUND) == Exit.OK
    helper.reader.join(BOUND)
    assert helper.decisions == {"pong": 1, "granted": 1}


def test_audit_pipe_closed_mid_request_ends_the_helper_cleanly(policy: Path) -> None:
    # Regression: a granted socket whose audit line could not be written was
    # left to the garbage collector, whose ResourceWarning calls getsockname():
    # the filter killed the helper with SIGSYS, and the boss then refused to
    # restart it (a seccomp kill). Now it closes the socket and exits 0.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [*livehelper.netns_argv(), "--policy", str(policy)], stdin=theirs,
        stderr=subprocess.PIPE, env=HELPER_ENV,
    )  # fmt: skip
    theirs.close()
    with ours:
        ours.settimeout(BOUND)
        ours.send(datagrams.encode(model.PING, 1))
        assert model.parse_reply(ours.recv(64)) == model.Reply(model.OK, 1, 0, 0)
        assert proc.stderr is not None
        proc.stderr.close()  # nobody reads the audit log any more
        ours.send(datagrams.encode(model.CREATE, 2, model.UDP, 4, 53, 0x7F000001))
        assert ours.recv(64) == b""  # no reply: it left
    assert proc.wait(BOUND) == Exit.OK


def test_helper_started_by_a_short_lived_thread_outlives_the_thread(policy: Path) -> None:
    c = creator_for(policy)
    try:
        starter = threading.Thread(target=c.start)
        starter.start()
        starter.join(BOUND)
        pid = c.pid
        assert pid is not None
        # join() returns a moment before the thread has left the kernel; a
        # parent-death signal would land by then.
        assert not gone(pid, 2.0)
        c.ping()
        assert c.pid == pid
    finally:
        c.close()


# -- the boss dies --------------------------------------------------------------------

BUSY_BOSS = """
import json, sys
from privsock.client import SocketCreator
c = SocketCreator(sys.argv[1], helper_argv=json.loads(sys.argv[2]), audit_sink=None)
c.start()
print(c.pid, flush=True)
n = 0
while True:
    c.create("udp", "127.0.0.1", 1000 + n % 5).close()
    n += 1
    if n == 300:
        print("busy", flush=True)
        if sys.argv[3] == "exception":
            raise RuntimeError("a bug in the boss")
"""


@pytest.mark.parametrize("how", ["sigkill", "exception"])
def test_boss_death_mid_work_leaves_no_process(policy: Path, how: str) -> None:
    boss = subprocess.Popen(
        [sys.executable, "-c", BUSY_BOSS, str(policy), json.dumps(livehelper.netns_argv()), how],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert boss.stdout is not None
        helper = int(boss.stdout.readline())
        assert boss.stdout.readline() == "busy\n"
        if how == "sigkill":
            boss.kill()
        _, err = boss.communicate(timeout=BOUND)
        assert boss.returncode == (-signal.SIGKILL if how == "sigkill" else 1)
        if how == "exception":
            assert "RuntimeError: a bug in the boss" in err
        assert gone(helper, 1.0)  # the bound: exits within 1 s of the boss
        assert processes_naming(policy) == []  # nothing else either (the wrapper execs)
    finally:
        boss.kill()
        boss.wait()


# -- EINTR storms ----------------------------------------------------------------------

STORM_REQUESTS = 2_000


def _sig_caught(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigCgt line")


def test_eintr_storms_on_both_sides_lose_and_duplicate_nothing(policy: Path) -> None:
    records = Records()
    handled = [0]
    sent_to_helper = [0]
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        handled[0] += 1

    with creator_for(policy, audit_sink=records, reply_timeout=BOUND) as c:
        helper = c.pid
        assert helper is not None
        # The helper catches no signal, so none can interrupt its recvmsg/sendmsg
        # with EINTR: a stop/continue restarts the call in the kernel, an ignored
        # signal is dropped, any other one kills it. We send the first two kinds.
        assert _sig_caught(helper) == 0
        main = threading.main_thread().ident
        assert main is not None

        def boss_storm() -> None:
            while not stop.is_set():
                signal.pthread_kill(main, signal.SIGUSR1)
                time.sleep(0.0001)

        def helper_storm() -> None:
            while not stop.is_set():
                for sig in (signal.SIGSTOP, signal.SIGCONT, signal.SIGWINCH, signal.SIGURG,
                            signal.SIGCHLD):  # fmt: skip
                    os.kill(helper, sig)
                    sent_to_helper[0] += 1
                time.sleep(0.0001)
            os.kill(helper, signal.SIGCONT)

        saved = {s: signal.signal(s, on_signal) for s in (signal.SIGALRM, signal.SIGUSR1)}
        storms = [threading.Thread(target=boss_storm), threading.Thread(target=helper_storm)]
        expected = []
        signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
        try:
            for storm in storms:
                storm.start()
            for i in range(STORM_REQUESTS):
                transport = ("udp", "tcp")[i % 2]
                address = f"127.0.{i // 250}.{i % 250 + 1}"
                port = (1000, 1001, 1002, 1003, 1004, 1006, 1007, 1008, 1009, 1010)[i % 10]
                sock, tries = granted(c, transport, address, port)
                with sock:
                    assert sock.getsockname() == (address, port)
                expected += [(transport, address, port)] * tries
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            stop.set()
            for storm in storms:
                storm.join(BOUND)
            for s, handler in saved.items():
                signal.signal(s, handler)
        assert c.pid == helper  # it never died
    # close() read the helper's stderr to the end: every line it wrote is in.
    helper_lines = [r for r in records if r["side"] == "helper" and r["op"] == "CREATE"]
    boss_lines = [r for r in records if r["side"] == "boss"]
    assert [(r["transport"], r["address"], r["port"]) for r in helper_lines] == expected
    assert len({r["id"] for r in helper_lines}) == len(expected) >= STORM_REQUESTS  # no repeat
    assert {r["decision"] for r in helper_lines} == {"granted"}
    assert [r["id"] for r in boss_lines] == [r["id"] for r in helper_lines]
    print(f"{handled[0]} signals handled in the boss, {sent_to_helper[0]} sent to the helper "
          f"during {STORM_REQUESTS} requests")  # fmt: skip
    assert handled[0] > STORM_REQUESTS and sent_to_helper[0] > STORM_REQUESTS


# -- fd exhaustion in the boss ------------------------------------------------------------

FD_BOSS = """
import errno, fcntl, json, os, resource, sys
from privsock.client import SocketCreator
from privsock.errors import FdNotReceived

def open_fds():
    out = []
    for fd in range(4096):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
            out.append(fd)
        except OSError:
            pass
    return out

c = SocketCreator(sys.argv[1], helper_argv=json.loads(sys.argv[2]), audit_sink=None)
c.start()
kept = c.create("udp", "127.0.0.1", 1000)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 4, hard))
fillers = []
while True:  # take every fd that is left: none can be installed now
    try:
        fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE
        break
before = open_fds()
out = {"pid": c.pid}
try:
    c.create("tcp", "127.0.0.1", 1001)
    out["full"] = "got a socket"
except FdNotReceived as e:
    out["full"] = "FdNotReceived: " + str(e)
out["new_fds"] = sorted(set(open_fds()) - set(before))
out["gone_fds"] = sorted(set(before) - set(open_fds()))
os.close(fillers.pop())  # one fd free again
s = c.create("tcp", "127.0.0.1", 1001)  # the same port: the dropped socket is gone
out["after"] = list(s.getsockname())
out["same_helper"] = c.pid == out["pid"]
s.close()
for fd in fillers:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
c.ping()  # once it answers, it has closed its copy of the last socket
out["helper_fds"] = sorted(map(int, os.listdir(f"/proc/{c.pid}/fd")))
kept.sendto(b"x", kept.getsockname())
out["kept"] = kept.recv(8).decode()
c.close()
print(json.dumps(out))
"""


def test_boss_out_of_fds_gets_fd_not_received_and_recovers(policy: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FD_BOSS, str(policy), json.dumps(livehelper.netns_argv())],
        capture_output=True, text=True, timeout=BOUND * 2, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["full"].startswith("FdNotReceived: the helper sent a socket but this process "
                                  "could not receive it (MSG_CTRUNC")  # fmt: skip
    assert out["new_fds"] == [] and out["gone_fds"] == []  # nothing leaked or half-received
    assert out["after"] == ["127.0.0.1", 1001]  # recovered; the port was free again
    assert out["same_helper"] is True  # the exchange stayed in step
    assert out["helper_fds"] == [0, 2]
    assert out["kept"] == "x"


# -- OS errors reach the caller intact ----------------------------------------------------

# Runs the real helper in a user namespace of its own (identity-mapped, so the
# policy's owner and user are the same numbers) but in the host's network
# namespace: there it holds CAP_NET_BIND_SERVICE only over its own namespace,
# and the kernel checks the capability against the owner of the network
# namespace, so a port below 1024 fails with EACCES. This is a rootless
# container with host networking. The launcher writes the maps from outside
# and passes the exit status on.
USERNS_LAUNCHER = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: go with the boss
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        os._exit(71)
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    os.execv(sys.argv[1], sys.argv[1:])
os.close(0)  # only the helper holds the channel
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 65536\\n")
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
os._exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("case", ["EADDRINUSE", "EACCES"])
def test_os_errors_reach_the_caller_with_errno_and_stage(policy: Path, case: str) -> None:
    records = Records()
    if case == "EACCES":
        argv = [sys.executable, "-I", "-c", USERNS_LAUNCHER, *livehelper.HELPER]
    else:
        argv = livehelper.netns_argv()
    with SocketCreator(str(policy), helper_argv=argv, audit_sink=records) as c:
        held = None
        if case == "EADDRINUSE":
            held = c.create("udp", "127.0.0.1", 1002)  # no SO_REUSEADDR/PORT
        with pytest.raises(CreatorOSError) as info:
            c.create("udp", "127.0.0.1", 1002)
        c.ping()  # the helper goes on serving
        if held is not None:
            held.close()
    code = getattr(errno, case)
    assert (info.value.errno, info.value.stage) == (code, Stage.BIND)
    assert str(info.value) == (f"udp:127.0.0.1:1002: bind failed: {case} ({os.strerror(code)})")
    # Both audit lines carry the errno and the stage too.
    failed = [r for r in records if r["decision"] == "os_error"]
    assert sorted((r["side"], r["reason"], r["errno"]) for r in failed) == [
        ("boss", "bind", code), ("helper", "bind", code),
    ]  # fmt: skip


# -- the policy file changes under a running helper ----------------------------------------

ONLY_1003 = expected.policy_text().replace('ports = [53, 80, "1000-1010"]', "ports = [1003]")


def _swap(path: Path, text: str) -> None:
    """Replace the file the way an editor or a config manager does: write, rename."""
    new = path.with_suffix(".new")
    new.write_text(text)
    new.chmod(0o644)
    new.rename(path)


def test_policy_replaced_or_deleted_while_the_helper_runs(policy: Path) -> None:
    with creator_for(policy) as c:
        kept = c.create("udp", "127.0.0.1", 1000)
        first = c.pid
        assert first is not None

        # Replaced, then deleted: the running helper keeps the policy it checked.
        _swap(policy, ONLY_1003)
        c.create("udp", "127.0.0.1", 1001).close()
        with pytest.raises(PolicyDenied):
            c.create("udp", "127.0.0.1", 1011)
        policy.unlink()
        c.create("udp", "127.0.0.1", 1004).close()
        assert c.pid == first

        # A restart with the file gone is refused, and says why.
        os.kill(first, signal.SIGKILL)
        with pytest.raises(HelperDied):
            c.ping()
        with pytest.raises(HelperStartError) as info:
            c.ping()
        assert info.value.returncode == Exit.NOINPUT
        assert "cannot open" in str(info.value)

        # A bad replacement is refused too; an insecure one as well.
        _swap(policy, ONLY_1003.replace("ports = [1003]", "ports = [1003, 1003]"))
        with pytest.raises(HelperStartError) as info:
            c.ping()
        assert info.value.returncode == Exit.DATAERR and "duplicates" in str(info.value)
        _swap(policy, ONLY_1003)
        policy.chmod(0o666)
        with pytest.raises(HelperStartError) as info:
            c.ping()
        assert info.value.returncode == Exit.CONFIG

        # A good one: the next start takes it.
        policy.chmod(0o644)
        with c.create("udp", "127.0.0.1", 1003) as s:
            assert s.getsockname() == ("127.0.0.1", 1003)
        with pytest.raises(PolicyDenied):
            c.create("udp", "127.0.0.1", 1000)
        assert c.pid not in (None, first)

        # The socket from the first helper outlived all of it.
        with kept:
            assert still_works(kept)
