"""The helper's Landlock ruleset in the real kernel, and what code injected into a
serving helper can still do.

Injected code is real: gdb attaches to a serving helper and makes inferior
calls (socket, bind, ...) inside it. Those calls run in the helper's own
thread, under its seccomp filter and its Landlock domain, exactly like code an
attacker got to run there."""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from privsock.helper import landlock, protocol, seccomp_filter
from privsock.helper.exitcodes import Exit

from .conftest import NO_LANDLOCK_POLICY
from .helper_proc import HelperChannel, gone
from .test_mitigations import _refusal

pytestmark = pytest.mark.root

AF_UNIX, AF_INET, AF_INET6, SOCK_STREAM, SOCK_DGRAM = 1, 2, 10, 1, 2
SYS_BIND = 49


def _bytes_at(var: str, data: bytes) -> list[str]:
    return [f"set *(unsigned char *)({var} + {i}) = {b}" for i, b in enumerate(data)]


def _sockaddr(family: int, port: int = 0, path: bytes = b"") -> bytes:
    if family == AF_UNIX:
        return family.to_bytes(2, "little") + path + b"\0"
    if family == AF_INET:
        return family.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(12)
    return family.to_bytes(2, "little") + port.to_bytes(2, "big") + bytes(24)  # [::]


def inject(pid: int, *commands: str, pass_fds: tuple[int, ...] = ()) -> dict[str, int]:
    """Run gdb commands inside ``pid``; returns every ``printf "NAME=%d\\n"`` value.
    ``$sa`` is 128 zeroed bytes of the helper's own heap, for a socket address."""
    gdb = shutil.which("gdb")
    assert gdb, "gdb is missing: scripts/bootstrap installs it"
    script = [
        "set $sa = (char *)malloc(128)",
        "set $ignored = (void *)memset($sa, 0, 128)",
        *commands,
    ]
    args = [gdb, "-p", str(pid), "-batch", "-nx"]
    for line in script:
        args += ["-ex", line]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False,
                         pass_fds=pass_fds)  # fmt: skip
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)=(-?\d+)$", out.stdout, re.M)}


def _bind(fd: str, address: bytes, name: str) -> list[str]:
    return [
        *_bytes_at("$sa", address),
        f"set $r = (int)bind({fd}, $sa, {len(address)})",
        "set $e = *(int *)__errno_location()",
        f'printf "{name}=%d\\n{name}_errno=%d\\n", $r, $e',
    ]


def _alive(helper: HelperChannel) -> None:
    reply, fds = helper.exchange(protocol.encode_request(protocol.Ping(7)))
    assert not fds
    assert protocol.decode_reply(reply).status is protocol.Status.OK


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["ipv4", "ipv6"])
def test_injected_tcp_bind_to_a_denied_port_is_refused_by_the_kernel(
    raw: HelperChannel, family: int
) -> None:
    # The helper holds CAP_NET_BIND_SERVICE and seccomp allows socket+bind, so
    # without Landlock this bind of port 22 (which the policy denies) succeeds.
    got = inject(
        raw.pid,
        f"set $fd = (int)socket({family}, {SOCK_STREAM}, 0)",
        'printf "fd=%d\\n", $fd',
        *_bind("$fd", _sockaddr(family, 22), "denied"),
        # The control: the same code binds a port the policy grants.
        *_bind("$fd", _sockaddr(family, 1017), "granted"),
        "set $c = (int)close($fd)",
    )
    assert got["fd"] > 0, got
    assert (got["denied"], got["denied_errno"]) == (-1, errno.EACCES), got
    assert got["granted"] == 0, got
    _alive(raw)


def test_injected_udp_bind_to_a_denied_port_still_works(raw: HelperChannel) -> None:
    # The residual SECURITY.md states: Landlock (ABI 7) has no UDP rights, so
    # code in the helper can bind any UDP port. When the kernel closes this,
    # this test fails and SECURITY.md must change with it.
    got = inject(
        raw.pid,
        f"set $fd = (int)socket({AF_INET}, {SOCK_DGRAM}, 0)",
        *_bind("$fd", _sockaddr(AF_INET, 22), "udp"),
        "set $c = (int)close($fd)",
    )
    assert got["udp"] == 0, got
    _alive(raw)


@pytest.mark.parametrize(
    "fd", ["0", "2", "0x100000000"], ids=["channel", "log", "channel-high-bits"]
)
def test_injected_bind_of_the_channel_to_a_path_is_sigsys(
    raw: HelperChannel, tmp_path: Path, fd: str
) -> None:
    # Before: this created a socket file owned by privsock. The kernel reads the
    # fd as an int, so (1 << 32) | 0 is fd 0 too: seccomp must compare all 64 bits.
    path = tmp_path / "squat.sock"
    tmp_path.chmod(0o777)
    address = _sockaddr(AF_UNIX, path=bytes(path))
    inject(
        raw.pid,
        *_bytes_at("$sa", address),
        f"set $r = (long)syscall({SYS_BIND}, (long){fd}, $sa, {len(address)})",
        'printf "bound=%d\\n", $r',
    )
    assert raw.proc.wait(timeout=10) == -signal.SIGSYS
    assert not path.exists()


def test_injected_abstract_bind_of_the_channel_is_sigsys(raw: HelperChannel) -> None:
    name = b"\0privsock-squat-%d" % raw.pid
    address = _sockaddr(AF_UNIX, path=name)[:-1]
    inject(
        raw.pid,
        *_bytes_at("$sa", address),
        f"set $r = (int)bind(0, $sa, {len(address)})",
        'printf "bound=%d\\n", $r',
    )
    assert raw.proc.wait(timeout=10) == -signal.SIGSYS
    assert b"@" + name[1:] not in Path("/proc/net/unix").read_bytes()


# Run by gdb's `shell` while the helper is stopped under gdb: the boss sends one
# message carrying a fresh AF_UNIX socket on the channel (fd argv[1], inherited).
SEND_A_SOCKET = (
    "import array, socket, sys; chan = socket.socket(fileno=int(sys.argv[1])); "
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
    "chan.sendmsg([bytes(32)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, "
    "array.array('i', [s.fileno()]).tobytes())]); chan.detach()"
)


def test_injected_abstract_bind_of_a_socket_the_boss_sent_still_works(raw: HelperChannel) -> None:
    # The residual SECURITY.md states: a socket the boss passes lands on one of
    # the fds bind() is allowed on, and Landlock scopes connecting to abstract
    # sockets, not binding them. The message is sent while gdb holds the helper,
    # so that the injected recvmsg, not the helper's loop (which closes passed
    # fds at once), receives it.
    name = b"\0privsock-passed-%d" % raw.pid
    address = _sockaddr(AF_UNIX, path=name)[:-1]
    chan = raw.chan.fileno()
    got = inject(
        raw.pid,
        f'shell {sys.executable} -I -c "{SEND_A_SOCKET}" {chan}',
        # struct msghdr (56 bytes) with one iovec and a control buffer
        "set $m = (char *)malloc(56)", "set $iov = (char *)malloc(16)",
        "set $buf = (char *)malloc(64)", "set $ctl = (char *)malloc(64)",
        "set $ignored = (void *)memset($m, 0, 56)",
        "set $ignored = (void *)memset($ctl, 0, 64)",
        "set *(long *)$iov = (long)$buf", "set *(long *)($iov + 8) = 64",
        "set *(long *)($m + 16) = (long)$iov", "set *(long *)($m + 24) = 1",
        "set *(long *)($m + 32) = (long)$ctl", "set *(long *)($m + 40) = 64",
        "set $n = (long)recvmsg(0, $m, 0)",
        "set $fd = *(int *)($ctl + 16)",
        'printf "received=%d\nfd=%d\n", $n, $fd',
        *_bind("$fd", address, "bound"),
        pass_fds=(chan,),
    )
    assert got["received"] == 32 and got["fd"] in seccomp_filter.BIND_FDS, got
    assert got["bound"] == 0, got
    assert b"@" + name[1:] in Path("/proc/net/unix").read_bytes()
    _alive(raw)


def test_injected_af_unix_socket_is_sigsys(raw: HelperChannel) -> None:
    got = inject(
        raw.pid,
        f"set $fd = (int)socket({AF_UNIX}, {SOCK_STREAM}, 0)",
        'printf "fd=%d\\n", $fd',
    )
    assert "fd" not in got, got
    assert raw.proc.wait(timeout=10) == -signal.SIGSYS


# ---------------------------------------------------------------------------
# The ruleset alone (landlock.apply, no seccomp filter), layer by layer: seccomp
# would kill most of these calls before Landlock saw them.

APPLY_THEN = textwrap.dedent("""
    import errno, json, os, socket, sys, tempfile
    import prctl
    from privsock.helper import landlock
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    outside = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    outside.bind(b"\\0privsock-landlock-test-%d" % os.getpid())
    outside.listen()
    scratch = tempfile.mkdtemp()
    prctl.set_no_new_privs(1)
    applied = landlock.apply([1017])
    results = {}
    def attempt(name, action):
        try:
            action()
            results[name] = "ok"
        except OSError as exc:
            results[name] = errno.errorcode[exc.errno]
    def bind(family, kind, address):
        with socket.socket(family, kind) as s:
            s.bind(address)
    def tcp4(port):
        bind(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", port))
    def tcp6(port):
        bind(socket.AF_INET6, socket.SOCK_STREAM, ("::1", port))
    def connect(family, address):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.connect(address)
    attempt("open-read", lambda: open("/etc/hostname").close())
    attempt("open-proc", lambda: open("/proc/self/status").close())
    attempt("create-file", lambda: open(scratch + "/new", "w").close())
    attempt("unix-path-bind", lambda: bind(socket.AF_UNIX, socket.SOCK_STREAM, scratch + "/s"))
    attempt("tcp-bind-listed", lambda: tcp4(1017))
    attempt("tcp6-bind-listed", lambda: tcp6(1017))
    attempt("tcp-bind-other", lambda: tcp4(1018))
    attempt("tcp6-bind-other", lambda: tcp6(22))
    attempt("tcp-bind-0", lambda: tcp4(0))
    attempt("tcp-connect", lambda: connect(socket.AF_INET, listener.getsockname()))
    attempt("udp-bind", lambda: bind(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 1018)))
    attempt("abstract-connect", lambda: connect(socket.AF_UNIX, outside.getsockname()))
    attempt("signal-parent", lambda: os.kill(os.getppid(), 0))
    print(json.dumps({"abi": applied.abi, "ports": applied.tcp_ports, "results": results}))
""")


def test_ruleset_in_the_kernel(root: None) -> None:
    out = subprocess.run([sys.executable, "-I", "-c", APPLY_THEN], capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["abi"] >= landlock.SCOPE_ABI, "this kernel lacks what the tests below need"
    assert got["ports"] == 1
    assert got["results"] == {
        # no filesystem: nothing opened or created by path, /proc included
        "open-read": "EACCES", "open-proc": "EACCES", "create-file": "EACCES",
        "unix-path-bind": "EACCES",
        # TCP: bind only the listed port, on either family; connect nowhere
        "tcp-bind-listed": "ok", "tcp6-bind-listed": "ok",
        "tcp-bind-other": "EACCES", "tcp6-bind-other": "EACCES", "tcp-bind-0": "EACCES",
        "tcp-connect": "EACCES",
        # UDP: not covered by Landlock (ABI 7)
        "udp-bind": "ok",
        # scopes: no abstract socket or signal outside the domain
        "abstract-connect": "EPERM", "signal-parent": "EPERM",
    }  # fmt: skip


def test_abi_version_matches_the_kernel() -> None:
    assert landlock.abi_version() >= landlock.NET_ABI
    assert landlock.fs_rights(1) == (1 << 13) - 1
    assert landlock.fs_rights(landlock.KNOWN_ABI) == (1 << 16) - 1
    assert landlock.net_rights(3) == 0 and landlock.scopes(5) == 0


# ---------------------------------------------------------------------------
# Start-up: the line that says it, the self-check probe, a kernel without Landlock.


def _startup_line(helper: HelperChannel) -> str:
    assert helper.proc.stderr is not None
    return helper.proc.stderr.readline().decode()


def test_startup_line_states_the_ruleset(raw: HelperChannel) -> None:
    line = _startup_line(raw)
    assert "hardened, serving" in line, line
    # TEST_POLICY: TCP 53, 80, 443 and 1000-1023, less 22 which is not in them
    assert "; Landlock: ABI " in line and "TCP bind to 27 port(s) only, no TCP connect" in line


# A kernel whose Landlock syscalls say they do nothing: the ruleset "applies" and
# restricts nothing. Only the probe after the filters can tell.
FAKE_APPLY = (
    "from privsock.helper import landlock, main\n"
    "def fake(ports):\n"
    "    ports = list(ports)\n"
    "    return landlock.Applied(7, landlock.fs_rights(7), landlock.net_rights(7),\n"
    "                            landlock.scopes(7), len(ports))\n"
    "assert callable(landlock.apply)\n"
    "landlock.apply = fake\n"
    "main.main()\n"
)

# A container runtime's seccomp profile that answers ENOSYS for the Landlock
# syscalls, as profiles that predate Landlock do.
HIDE_LANDLOCK = (
    "import errno\n"
    "from privsock.helper import main\n"
    "import pyseccomp as sc\n"
    "runtime = sc.SyscallFilter(sc.ALLOW)\n"
    "for name in ('landlock_create_ruleset', 'landlock_add_rule', 'landlock_restrict_self'):\n"
    "    runtime.add_rule(sc.ERRNO(errno.ENOSYS), name)\n"
    "runtime.load()\n"
    "main.main()\n"
)


def test_helper_refuses_to_serve_when_the_probe_bind_succeeds(
    root: None, test_policy: Path
) -> None:
    code, err = _refusal(test_policy, FAKE_APPLY)
    assert code == Exit.OSERR, err
    assert b"Landlock self-check: TCP port 0, outside the ruleset, could be bound" in err


def test_helper_refuses_to_start_without_landlock_by_default(
    root: None, test_policy: Path
) -> None:
    code, err = _refusal(test_policy, HIDE_LANDLOCK)
    assert code == Exit.NOLANDLOCK, err
    assert err.count(b"\n") == 1, err
    assert b"the policy requires Landlock (helper.require_landlock)" in err
    assert b"(ENOSYS)" in err


def test_helper_without_landlock_serves_when_the_policy_allows_it(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = policy_factory(NO_LANDLOCK_POLICY)
    code, err = _refusal(policy, HIDE_LANDLOCK)
    assert code == Exit.OK, err
    assert b"hardened, serving" in err
    assert b"; Landlock: unavailable (the kernel has no Landlock, or a seccomp filter" in err


def test_injection_harness_leaves_the_helper_serving(raw: HelperChannel) -> None:
    # The harness's own check: gdb detaches cleanly and leaves a serving helper.
    inject(raw.pid, 'printf "x=%d\\n", 1')
    assert not gone(raw.pid, 0.2)
    _alive(raw)
