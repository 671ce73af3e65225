"""A shared helper (fd 0 accepted from a listening socket, as systemd's
Accept=yes gives it) is fair between users: connection slots per user, a
bucket that starts empty, and the first malformed message ends the session.
Real helpers, real users, real flock; the systemd side is in
test_shared_helper.py."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from privsock.helper import protocol
from privsock.helper.exitcodes import Exit
from privsock.helper.policyparse import PolicyError, parse_policy
from privsock.helper.protocol import Status, Transport
from privsock.helper.ratelimit import TokenBucket
from privsock.helperprocess import HELPER_ENV, default_helper_argv

from .helper_proc import HelperChannel
from .test_peer import ANY4, _abstract_name, _connected_as

A = pwd.getpwnam("nobody")
B = pwd.getpwnam("daemon")
HELPER_USER = pwd.getpwnam("privsock")

SLOW = """
version = 1
[rate_limit]
rate = 2.0
burst = 20
[[allow]]
transports = ["udp"]
ports = [53]
addresses = ["0.0.0.0/0"]
"""


def with_connections(lock_dir: str, per_user: int = 1) -> str:
    return SLOW + f'[connections]\nper_user = {per_user}\nlock_dir = "{lock_dir}"\n'


# -- pure parts ---------------------------------------------------------------


def test_a_bucket_can_start_empty() -> None:
    bucket = TokenBucket(2.0, 20, now=100.0, tokens=0.0)
    assert bucket.take(100.0) == 500  # the first token comes after 1/rate
    assert bucket.take(100.5) == 0
    assert TokenBucket(2.0, 20, now=0.0).take(0.0) == 0  # the default: full


def test_connections_are_parsed() -> None:
    policy = parse_policy(with_connections("/run/privsock/users", 4))
    assert policy.connections is not None
    assert (policy.connections.per_user, policy.connections.lock_dir) == (4, "/run/privsock/users")
    default = parse_policy(SLOW + "[connections]\nper_user = 2\n").connections
    assert default is not None and default.lock_dir == "/run/privsock/users"
    assert parse_policy(SLOW).connections is None


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ("[connections]\n", "connections.per_user", "missing"),
        ("[connections]\nper_user = 0\n", "connections.per_user", "outside 1-1024"),
        ("[connections]\nper_user = 1025\n", "connections.per_user", "outside 1-1024"),
        ('[connections]\nper_user = "4"\n', "connections.per_user", "must be an integer"),
        ("[connections]\nper_user = true\n", "connections.per_user", "must be an integer"),
        ('[connections]\nper_user = 4\nlock_dir = "run/x"\n', "connections.lock_dir", "absolute"),
        ('[connections]\nper_user = 4\nlock_dir = "/a/../x"\n', "connections.lock_dir", "normal"),
        ('[connections]\nper_user = 4\nlock_dir = "/"\n', "connections.lock_dir", "absolute"),
        ("[connections]\nper_user = 4\nlock_dir = 1\n", "connections.lock_dir", "must be a string"),
        ("[connections]\nper_users = 4\n", "connections.per_users", 'did you mean "per_user"?'),
    ],
)
def test_bad_connections(table: str, key: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(SLOW + table)
    assert caught.value.key == key
    assert problem in caught.value.problem


# -- real helpers on accepted connections --------------------------------------


@pytest.fixture
def listener(root: None) -> Iterator[tuple[str, socket.socket]]:
    path = _abstract_name()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.bind(path)
        sock.listen(8)
        yield path, sock


@pytest.fixture
def lock_dir() -> Iterator[str]:
    """A directory of the helper's user, as systemd's RuntimeDirectory= makes it."""
    directory = tempfile.mkdtemp(prefix="privsock-test-slots-")
    os.chown(directory, HELPER_USER.pw_uid, HELPER_USER.pw_gid)
    os.chmod(directory, 0o700)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


class Served:
    """One connection as ``user``, with the helper systemd would start for it."""

    def __init__(self, listener: tuple[str, socket.socket], policy: Path,
                 user: pwd.struct_passwd) -> None:  # fmt: skip
        path, sock = listener
        self.client = _connected_as(path, user)
        self.client.settimeout(30)
        conn, _ = sock.accept()
        with conn:
            self.helper = subprocess.Popen(
                [*default_helper_argv(), "--policy", str(policy)],
                stdin=conn, stderr=subprocess.PIPE, env=HELPER_ENV,
            )  # fmt: skip

    def ask(self, rid: int = 2) -> tuple[Status, int]:
        req = protocol.Create(rid, Transport.UDP, ANY4, 53)
        self.client.send(protocol.encode_request(req))
        data, fds, _, _ = socket.recv_fds(self.client, 64, 1)
        for fd in fds:
            os.close(fd)
        reply = protocol.decode_reply(data)
        return reply.status, reply.detail

    def ping(self) -> bool:
        try:
            self.client.send(protocol.encode_request(protocol.Ping(1)))
            return self.client.recv(64) != b""
        except OSError:
            return False

    def close(self) -> tuple[int, str]:
        self.client.close()
        _, err = self.helper.communicate(timeout=30)
        return self.helper.returncode, err.decode()


def test_a_shared_helpers_bucket_starts_empty(
    listener: tuple[str, socket.socket], policy_factory: Callable[[str], Path]
) -> None:
    policy = policy_factory(SLOW)
    served = Served(listener, policy, A)
    status, retry_ms = served.ask()
    assert status is Status.RATE_LIMITED and 0 < retry_ms <= 500
    assert served.close()[0] == Exit.OK
    # A helper its boss started (socketpair) starts with the burst, as before.
    raw = HelperChannel.for_policy(policy)
    raw.wait_ready()
    reply, fds = raw.exchange(protocol.encode_request(protocol.Create(2, Transport.UDP, ANY4, 53)))
    for fd in fds:
        os.close(fd)
    assert protocol.decode_reply(reply).status is Status.OK
    raw.close()


def test_the_first_malformed_message_ends_a_shared_session(
    listener: tuple[str, socket.socket], policy_factory: Callable[[str], Path]
) -> None:
    served = Served(listener, policy_factory(SLOW), A)
    assert served.ping()
    served.client.send(b"\x00" * 5)
    assert protocol.decode_reply(served.client.recv(64)).status is Status.MALFORMED
    assert served.client.recv(64) == b""  # then end of file: the helper is gone
    code, err = served.close()
    assert code == Exit.OK, err
    assert err.count('"decision":"malformed"') == 1
    # A helper its boss started answers the next message as before.
    raw = HelperChannel.for_policy(policy_factory(SLOW))
    raw.wait_ready()
    for _ in range(3):
        reply, _ = raw.exchange(b"\x00" * 5)
        assert protocol.decode_reply(reply).status is Status.MALFORMED
    raw.wait_ready()
    raw.close()


def test_connection_slots_per_user(
    listener: tuple[str, socket.socket], policy_factory: Callable[[str], Path], lock_dir: str
) -> None:
    """per_user = 1: A's second helper refuses to serve (exit 75) while A's first
    lives; B is served meanwhile; once A's first is gone A is served again."""
    policy = policy_factory(with_connections(lock_dir, 1))
    first = Served(listener, policy, A)
    assert first.ping()
    second = Served(listener, policy, A)
    assert not second.ping()
    code, err = second.close()
    assert code == Exit.TEMPFAIL, err
    assert f"uid {A.pw_uid} already holds all 1 of its connections" in err
    other = Served(listener, policy, B)
    assert other.ping()
    assert other.close()[0] == Exit.OK
    assert first.close()[0] == Exit.OK
    again = Served(listener, policy, A)
    assert again.ping()
    assert again.close()[0] == Exit.OK
    assert sorted(os.listdir(lock_dir)) == sorted([f"{A.pw_uid}.0", f"{B.pw_uid}.0"])


def test_an_unsafe_lock_dir_is_refused(
    listener: tuple[str, socket.socket], policy_factory: Callable[[str], Path], lock_dir: str
) -> None:
    os.chmod(lock_dir, 0o777)
    served = Served(listener, policy_factory(with_connections(lock_dir, 1)), A)
    assert not served.ping()
    code, err = served.close()
    assert code == Exit.CONFIG, err
    assert "must belong to the helper's user or root and be writable by nobody else" in err


def test_a_create_before_the_given_wait_ends_a_shared_session(
    listener: tuple[str, socket.socket], policy_factory: Callable[[str], Path]
) -> None:
    """A boss that ignores retry_ms only floods the log: the second early CREATE
    ends the session. One that waits as told is served."""
    policy = policy_factory(SLOW)
    hasty = Served(listener, policy, A)
    assert hasty.ask()[0] is Status.RATE_LIMITED
    assert hasty.ask()[0] is Status.RATE_LIMITED
    assert hasty.client.recv(64) == b""
    code, err = hasty.close()
    assert code == Exit.OK, err
    assert err.count('"decision":"rate_limited"') == 2
    patient = Served(listener, policy, A)
    status, retry_ms = patient.ask()
    assert status is Status.RATE_LIMITED
    time.sleep(retry_ms / 1000)
    assert patient.ask(3)[0] is Status.OK
    assert patient.close()[0] == Exit.OK
