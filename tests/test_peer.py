"""Who asks: the peer's identity from the kernel, per-user and per-group rules,
check-policy's account of who gets what, and the helper judging real peers
(real users, real SO_PEERCRED, real helper)."""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from privsock.helper import peercred, protocol
from privsock.helper.exitcodes import Exit, Refusal
from privsock.helper.policy import Peer, Rule, decide
from privsock.helper.policy_file import load_policy
from privsock.helper.policyparse import PolicyError, parse_policy
from privsock.helper.protocol import Create, Option, Reason, Transport
from privsock.helperprocess import HELPER_ENV, default_helper_argv
from privsock.policyview import describe, explain, peer_of

from .helper_proc import FRESH_NETNS
from .test_cli import privsock

NONE = Option(0)
TCP, UDP = Transport.TCP, Transport.UDP
ANY4 = ipaddress.IPv4Address("0.0.0.0")
WEB = Create(1, Transport.TCP, ANY4, 80, Option(0))

# Two real users of every Debian system, neither root nor the helper's user.
A_USER, B_USER = "nobody", "daemon"
A = pwd.getpwnam(A_USER)
B = pwd.getpwnam(B_USER)

PER_USER = f"""
version = 1
[rate_limit]
rate = 100000.0
burst = 100000
[[allow]]
transports = ["tcp"]
ports = [80]
addresses = ["0.0.0.0/0"]
users = ["{A_USER}"]
[[allow]]
transports = ["udp", "tcp"]
ports = [53]
addresses = ["0.0.0.0/0"]
[[deny]]
ports = [53]
addresses = ["0.0.0.0/0"]
users = ["{B_USER}"]
"""


def peer(entry: pwd.struct_passwd, groups: frozenset[int] | None = frozenset()) -> Peer:
    return Peer(uid=entry.pw_uid, gid=entry.pw_gid, pid=1, groups=groups)


def invalid(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return caught.value


def rule_with(extra: str, kind: str = "allow") -> str:
    return f"""
version = 1
[[{kind}]]
transports = ["tcp"]
ports = [80]
addresses = ["0.0.0.0/0"]
{extra}
"""


# -- the parser ---------------------------------------------------------------


def test_users_and_groups_are_parsed_in_file_order() -> None:
    policy = parse_policy(rule_with('users = ["bob", "alice"]\ngroups = ["web"]'))
    (rule,) = policy.allow
    assert (rule.users, rule.groups) == (("bob", "alice"), ("web",))
    assert (rule.uids, rule.gids) == (None, None)  # resolved only when loaded
    deny = parse_policy(rule_with('groups = ["guests"]', "deny")).deny[0]
    assert (deny.users, deny.groups) == ((), ("guests",))


def test_a_rule_without_users_or_groups_is_for_everyone() -> None:
    (rule,) = parse_policy(rule_with("")).allow
    assert (rule.users, rule.groups) == ((), ())


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ("users = []", "allow[0].users", "must not be empty"),
        ('users = "alice"', "allow[0].users", "must be an array"),
        ("users = [1001]", "allow[0].users[0]", "must be a string, not an integer"),
        ('users = ["1001"]', "allow[0].users[0]", "not a valid user name"),
        ('users = ["a b"]', "allow[0].users[0]", "not a valid user name"),
        ('groups = ["-x"]', "allow[0].groups[0]", "not a valid group name"),
        ('users = ["alice", "alice"]', "allow[0].users[1]", 'duplicate "alice"'),
        ('groups = ["web", "web"]', "allow[0].groups[1]", "duplicate"),
        ('user = ["alice"]', "allow[0].user", 'did you mean "users"?'),
    ],
)
def test_bad_users_and_groups(extra: str, key: str, problem: str) -> None:
    err = invalid(rule_with(extra))
    assert err.key == key
    assert problem in err.problem


def test_a_deny_for_some_users_does_not_make_an_allow_for_everyone_useless() -> None:
    text = rule_with("") + '[[deny]]\nports = [80]\nusers = ["bob"]\n'
    assert parse_policy(text).deny[0].users == ("bob",)


def test_a_deny_for_the_same_users_still_makes_the_allow_useless() -> None:
    text = rule_with('users = ["bob"]') + '[[deny]]\nports = [80]\nusers = ["bob", "carol"]\n'
    assert "allow[0] can never match: deny[0] covers it" in str(invalid(text))
    everyone = rule_with('users = ["bob"]') + "[[deny]]\nports = [80]\n"
    assert "can never match" in str(invalid(everyone))


def test_names_are_resolved_when_the_policy_is_loaded(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    text = rule_with(f'users = ["{A_USER}", "{B_USER}"]\ngroups = ["privsock"]')
    (rule,) = load_policy(str(policy_factory(text))).allow
    assert rule.uids == {A.pw_uid, B.pw_uid}
    assert rule.gids is not None and len(rule.gids) == 1


@pytest.mark.parametrize(
    ("extra", "key", "what"),
    [
        ('users = ["nobody", "no-such-user-x"]', "allow[0].users[1]", 'no user "no-such-user-x"'),
        ('groups = ["no-such-group-x"]', "allow[0].groups[0]", 'no group "no-such-group-x"'),
    ],
)
def test_an_unknown_name_is_a_policy_error_naming_the_key(
    root: None, policy_factory: Callable[[str], Path], extra: str, key: str, what: str
) -> None:
    path = policy_factory(rule_with(extra))
    with pytest.raises(Refusal) as caught:
        load_policy(str(path))
    assert caught.value.exit_code == Exit.NOUSER
    assert f": {key}: {what} on this system" in str(caught.value)


# -- the decision ---------------------------------------------------------------


def test_per_user_rules_decide(root: None, policy_factory: Callable[[str], Path]) -> None:
    policy = load_policy(str(policy_factory(PER_USER)))
    got_a = decide(policy, WEB, peer(A))
    assert (got_a.allowed, got_a.rule) == (True, "allow[0]")
    got_b = decide(policy, WEB, peer(B))
    assert (got_b.allowed, got_b.reason, got_b.rule) == (False, Reason.PORT, "default")
    # A rule for everyone, and a deny for B alone: deny wins, for B only.
    assert decide(policy, Create(1, UDP, ANY4, 53, NONE), peer(A)).rule == "allow[1]"
    assert decide(policy, Create(1, UDP, ANY4, 53, NONE), peer(B)).rule == "deny[0]"


def test_groups_match_the_primary_and_the_supplementary_groups() -> None:
    policy = parse_policy(rule_with('groups = ["web"]'))
    policy = type(policy)(policy.user, policy.group, policy.rate_limit,
                          (_with_ids(policy.allow[0], gids={500}),), ())  # fmt: skip
    assert decide(policy, WEB, Peer(7, 500, 1, frozenset())).allowed
    assert decide(policy, WEB, Peer(7, 7, 1, frozenset({9, 500}))).allowed
    assert not decide(policy, WEB, Peer(7, 7, 1, frozenset({9}))).allowed


def _with_ids(rule: Rule, uids: set[int] | None = None, gids: set[int] | None = None) -> Rule:
    return rule._replace(uids=frozenset(uids or ()), gids=frozenset(gids or ()))


def test_fail_closed_when_the_peer_cannot_be_seen() -> None:
    allow_for_7 = _with_ids(parse_policy(rule_with('users = ["u"]')).allow[0], uids={7})
    deny_web = _with_ids(parse_policy(rule_with('groups = ["web"]', "deny")).deny[0], gids={5})
    everyone = parse_policy(rule_with("")).allow[0]
    base = parse_policy(rule_with(""))
    policy = type(base)(base.user, base.group, base.rate_limit, (allow_for_7,), ())
    # No peer at all: a rule for some users never allows.
    assert not decide(policy, WEB, None).allowed
    assert decide(policy, WEB, Peer(7, 7, 1, frozenset())).allowed
    # Names never resolved (parse_policy alone): never allows, even the named uid.
    unresolved = parse_policy(rule_with('users = ["u"]'))
    assert not decide(unresolved, WEB, Peer(7, 7, 1, frozenset())).allowed
    # A deny rule for a group: applies when the peer's groups are unknown.
    policy = type(base)(base.user, base.group, base.rate_limit, (everyone,), (deny_web,))
    assert decide(policy, WEB, Peer(7, 7, 1, frozenset({9}))).allowed
    assert decide(policy, WEB, Peer(7, 7, 1, None)).rule == "deny[0]"
    assert decide(policy, WEB, None).rule == "deny[0]"


# -- check-policy: who gets what ------------------------------------------------


def test_check_policy_shows_who_gets_what(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = load_policy(str(policy_factory(PER_USER)))
    lines = describe(policy)
    assert lines[2].startswith(
        f"allow[0]: allows tcp port 80 on 0.0.0.0/0 only to user {A_USER}; options: none;"
    )
    assert lines[3].startswith("allow[1]: allows udp+tcp port 53 on 0.0.0.0/0 to everyone;")
    assert lines[4].startswith(
        f"deny[0]: denies udp+tcp port 53 on 0.0.0.0/0 only to user {B_USER},"
    )


def test_explain_names_the_deciding_rule(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = load_policy(str(policy_factory(PER_USER)))
    verdict, lines = explain(policy, peer_of(A_USER), A_USER, TCP, ANY4, 80, NONE)
    assert verdict.allowed
    assert lines[0].startswith(f"tcp:0.0.0.0:80 for {A_USER} (uid {A.pw_uid}")
    assert lines[0].endswith("GRANTED by allow[0]")
    verdict, lines = explain(policy, peer_of(B_USER), B_USER, TCP, ANY4, 80, NONE)
    assert not verdict.allowed
    assert lines[0].endswith(f"DENIED (port) by default (no allow rule for {B_USER} grants it)")
    assert lines[-1] == f"  not for {B_USER}: allow[0]"


def test_check_policy_as_user_exit_codes(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    path = str(policy_factory(PER_USER))
    granted = privsock("check-policy", path, "--as", A_USER, "tcp:0.0.0.0:80")
    assert granted.returncode == Exit.OK, granted.stderr
    assert "GRANTED by allow[0]" in granted.stdout
    denied = privsock("check-policy", path, "--as", B_USER, "udp:0.0.0.0:53")
    assert denied.returncode == Exit.NOPERM, denied.stderr
    assert "DENIED (port) by deny[0]" in denied.stdout
    assert f"deny[0]: denies udp+tcp port 53 on 0.0.0.0/0 only to user {B_USER}" in denied.stdout
    unknown = privsock("check-policy", path, "--as", "no-such-user-x", "tcp:0.0.0.0:80")
    assert (unknown.returncode, unknown.stderr) == (
        Exit.NOUSER, "privsock: check-policy: no user 'no-such-user-x' on this system\n",
    )  # fmt: skip
    bad = privsock("check-policy", path, "--as", A_USER, "tcp:example.org:80")
    assert bad.returncode == Exit.USAGE
    assert bad.stderr.startswith("privsock: check-policy: --as: ")


# -- the kernel's account of the peer -------------------------------------------


def _connected_as(listener_path: str, user: pwd.struct_passwd) -> socket.socket:
    """A connection made by a process running as ``user`` (a real fork and
    setresuid), handed back to us: the kernel recorded that user at connect()."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the child: become the user, connect, pass the socket back
        try:
            ours.close()
            os.setgroups([])
            os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
            os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(listener_path)
            socket.send_fds(theirs, [b"x"], [s.fileno()])
        except BaseException as exc:
            os.write(2, f"connect as {user.pw_name}: {exc!r}\n".encode())
        finally:
            os._exit(0)
    theirs.close()
    with ours:
        _, fds, _, _ = socket.recv_fds(ours, 8, 1)
    os.waitpid(pid, 0)
    assert fds, f"the child running as {user.pw_name} could not connect"
    return socket.socket(fileno=fds[0])


def test_read_peer_on_a_socketpair_is_the_process_that_made_it() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        got = peercred.read_peer(b)
        assert (got.uid, got.gid, got.pid) == (os.getuid(), os.getgid(), os.getpid())
        assert got.groups == frozenset(os.getgroups())
        assert not peercred.accepted(b)


def test_a_peer_in_more_groups_than_fit_has_unknown_groups(root: None) -> None:
    # 300 supplementary groups do not fit CPython's 1024-byte getsockopt: the
    # kernel answers ERANGE, and the peer's groups must be unknown (None, on
    # which decide() fails closed), never an empty set that a deny rule for
    # one of those groups would let through.
    script = (
        "import os, socket\n"
        "from privsock.helper import peercred\n"
        "os.setgroups(range(40000, 40300))\n"
        "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "print(peercred.read_peer(b).groups)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "None\n", "")


def _abstract_name() -> str:
    # An abstract address: no file permissions stand between other users and it.
    return f"\0privsock-test-peer-{os.getpid()}-{secrets.token_hex(4)}"


def test_read_peer_on_an_accepted_connection(root: None) -> None:
    path = _abstract_name()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(1)
        client = _connected_as(path, A)
        conn, _ = listener.accept()
    with client, conn:
        got = peercred.read_peer(conn)
        assert (got.uid, got.gid, got.groups) == (A.pw_uid, A.pw_gid, frozenset())
        assert peercred.accepted(conn)


@pytest.fixture
def shared_helper_path(root: None) -> Iterator[tuple[str, socket.socket]]:
    path = _abstract_name()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(path)
        listener.listen(4)
        yield path, listener


def _serve_one(policy: Path, conn: socket.socket) -> subprocess.Popen[bytes]:
    """What systemd does for an Accept=yes socket: the connection as fd 0."""
    with conn:
        return subprocess.Popen(
            [*FRESH_NETNS, *default_helper_argv(), "--policy", str(policy)],
            stdin=conn, stderr=subprocess.PIPE, env=HELPER_ENV,
        )  # fmt: skip


def _ask(chan: socket.socket, rid: int, transport: Transport, port: int) -> str:
    req = protocol.Create(rid, transport, ANY4, port)
    chan.send(protocol.encode_request(req))
    data, fds, _, _ = socket.recv_fds(chan, 64, 1)
    for fd in fds:
        os.close(fd)
    return protocol.decode_reply(data).status.name


def _audit(err: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]


def test_the_helper_judges_each_peer_by_its_own_rules(
    shared_helper_path: tuple[str, socket.socket], policy_factory: Callable[[str], Path]
) -> None:
    """User A gets port 80, user B does not, through the same helper program and
    policy; each audit line names the peer the kernel saw."""
    path, listener = shared_helper_path
    policy = policy_factory(PER_USER)
    results = {}
    for entry in (A, B):
        client = _connected_as(path, entry)
        conn, _ = listener.accept()
        helper = _serve_one(policy, conn)
        with client:
            client.settimeout(30)
            results[entry.pw_name] = _ask(client, 1, TCP, 80)
        _, err = helper.communicate(timeout=30)
        assert helper.returncode == Exit.OK, err
        (line,) = [r for r in _audit(err) if r["id"] == 1]
        assert (line["peer_uid"], line["port"]) == (entry.pw_uid, 80)
        assert isinstance(line["peer_pid"], int) and line["peer_pid"] > 1
        results[entry.pw_name + " audit"] = line["decision"]
        print(f"{entry.pw_name} (uid {entry.pw_uid}): tcp:0.0.0.0:80 -> {line['decision']} "
              f"by {line['rule']}")  # fmt: skip
    assert results == {
        A_USER: "OK", f"{A_USER} audit": "granted",
        B_USER: "DENIED", f"{B_USER} audit": "denied",
    }  # fmt: skip


def test_a_helper_started_by_its_boss_sees_the_boss_as_its_peer(
    root: None, test_policy: Path
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        proc = subprocess.Popen(
            [*default_helper_argv(), "--policy", str(test_policy)],
            stdin=theirs, stderr=subprocess.PIPE, env=HELPER_ENV,
        )  # fmt: skip
        theirs.close()
        ours.settimeout(30)
        ours.send(protocol.encode_request(protocol.Ping(5)))
        assert protocol.decode_reply(ours.recv(64)).status is protocol.Status.OK
    _, err = proc.communicate(timeout=30)
    (pong,) = _audit(err)
    # The process that made the socketpair: this test, the helper's boss.
    assert (pong["peer_uid"], pong["peer_pid"]) == (os.getuid(), os.getpid())
