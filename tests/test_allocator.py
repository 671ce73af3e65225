"""SocketAllocator against a real helper: reuse and reference counts, the share
matrix, pair atomicity, release by holder and application, and a stateful
property that nothing leaks."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from privsock.allocator import PairError, Share, ShareError, SocketAllocator
from privsock.client import SocketCreator
from privsock.errors import CreatorOSError, HelperDied, PolicyDenied
from tests.auditlines import parsed

from .conftest import TEST_POLICY

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def granted() -> list[dict[str, Any]]:
    """The boss's audit lines for sockets the helper created."""
    return []


@pytest.fixture(scope="module")
def module_creator(
    tmp_path_factory: pytest.TempPathFactory, granted: list[dict[str, Any]]
) -> Iterator[SocketCreator]:
    """One helper for the module: these tests are about the cache, not start-up."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it starts the real privileged helper")
    policy = tmp_path_factory.mktemp("allocator") / "policy.toml"
    policy.write_text(TEST_POLICY)
    policy.chmod(0o644)

    def sink(line: bytes) -> None:
        rec = parsed(line)
        if rec["side"] == "boss" and rec["decision"] == "granted":
            granted.append(rec)

    with SocketCreator(str(policy), audit_sink=sink) as creator:
        yield creator


@pytest.fixture
def alloc(module_creator: SocketCreator) -> Iterator[SocketAllocator]:
    with SocketAllocator(module_creator) as a:
        yield a


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def same_socket(a: socket.socket, b: socket.socket) -> bool:
    return os.fstat(a.fileno()).st_ino == os.fstat(b.fileno()).st_ino


# -- reuse and reference counts ---------------------------------------------------


def test_same_key_is_bound_once_and_each_holder_gets_its_own_dup(
    alloc: SocketAllocator, module_creator: SocketCreator, granted: list[dict[str, Any]]
) -> None:
    before, created = open_fds(), len(granted)
    a = alloc.get_bound_socket("tcp", "127.0.0.1", 1000, share=Share.ANY, holder="a")
    b = alloc.get_bound_socket("tcp", "127.0.0.1", 1000, share=Share.ANY, holder="b")
    assert len(granted) == created + 1  # the helper was asked once
    assert a.fileno() != b.fileno() and same_socket(a, b)
    assert a.getsockname() == ("127.0.0.1", 1000)
    assert alloc.refcount("tcp", "127.0.0.1", 1000) == 2
    assert open_fds() == before + 3  # the cached original and two dups
    alloc.release_bound_socket(a)
    assert a.fileno() == -1  # released means closed
    assert alloc.refcount("tcp", "127.0.0.1", 1000) == 1
    assert open_fds() == before + 2
    b.listen(1)  # the remaining holder's socket still works
    alloc.release_bound_socket(b)
    assert alloc.refcount("tcp", "127.0.0.1", 1000) == 0
    assert len(alloc) == 0
    assert open_fds() == before
    # The last release closed the original: the port is free for a new bind.
    with module_creator.create("tcp", "127.0.0.1", 1000) as again:
        again.listen(1)


def test_other_options_are_another_socket(alloc: SocketAllocator) -> None:
    # TCP: two bound (not listening) sockets with SO_REUSEADDR may share a port.
    a = alloc.get_bound_socket("tcp", "127.0.0.1", 1001, reuseaddr=True, share=Share.ANY)
    b = alloc.get_bound_socket("tcp", "127.0.0.1", 1001, reuseaddr=True, reuseport=True)
    assert not same_socket(a, b)
    assert len(alloc) == 2


def test_address_forms_name_the_same_key(alloc: SocketAllocator) -> None:
    a = alloc.get_bound_socket("udp", "::1", 1002, share=Share.ANY)
    b = alloc.get_bound_socket("UDP", "[0:0::1]", 1002, share=Share.ANY)
    assert same_socket(a, b)


def test_release_of_a_foreign_or_released_socket_is_refused(alloc: SocketAllocator) -> None:
    s = alloc.get_bound_socket("udp", "127.0.0.1", 1003)
    alloc.release_bound_socket(s)
    with pytest.raises(ValueError, match="already released"):
        alloc.release_bound_socket(s)
    with socket.socket() as foreign, pytest.raises(ValueError):
        alloc.release_bound_socket(foreign)


def test_helper_errors_leave_the_cache_unchanged(alloc: SocketAllocator) -> None:
    before = open_fds()
    with pytest.raises(PolicyDenied):
        alloc.get_bound_socket("tcp", "127.0.0.1", 22)
    with pytest.raises(ValueError, match="port"):
        alloc.get_bound_socket("tcp", "127.0.0.1", 0)
    assert len(alloc) == 0 and open_fds() == before


def test_cached_sockets_survive_a_helper_death(
    alloc: SocketAllocator, module_creator: SocketCreator
) -> None:
    held = alloc.get_bound_socket("udp", "127.0.0.1", 1004, share=Share.ANY)
    assert module_creator.pid is not None
    os.kill(module_creator.pid, signal.SIGKILL)
    # A cache hit does not need the helper at all.
    second = alloc.get_bound_socket("udp", "127.0.0.1", 1004, share=Share.ANY)
    assert same_socket(held, second)
    with pytest.raises(HelperDied):
        module_creator.ping()
    # A miss goes to a new helper.
    alloc.get_bound_socket("udp", "127.0.0.1", 1005).close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.sendto(b"ping", ("127.0.0.1", 1004))
        held.settimeout(5)
        assert held.recv(8) == b"ping"


# -- share modes ----------------------------------------------------------------

NO, SAME, ANY = Share.NO, Share.SAMEAPP, Share.ANY
MATRIX = [
    # first holder (mode, app), second (mode, app), shared?
    ((NO, "dns"), (NO, "dns"), False),
    ((NO, "dns"), (ANY, "dns"), False),
    ((ANY, "dns"), (NO, "dns"), False),
    ((SAME, "dns"), (SAME, "dns"), True),
    ((SAME, "dns"), (SAME, "web"), False),
    ((SAME, "dns"), (ANY, "dns"), True),
    ((SAME, "dns"), (ANY, "web"), False),
    ((ANY, "dns"), (SAME, "dns"), True),
    ((ANY, "dns"), (SAME, "web"), False),
    ((ANY, "dns"), (ANY, "web"), True),
    ((SAME, "dns"), (NO, "dns"), False),
    ((NO, "dns"), (SAME, "dns"), False),
]


@pytest.mark.parametrize(("first", "second", "shared"), MATRIX)
def test_share_matrix(
    alloc: SocketAllocator,
    first: tuple[Share, str],
    second: tuple[Share, str],
    shared: bool,
) -> None:
    a = alloc.get_bound_socket("tcp", "127.0.0.1", 1006, share=first[0], app=first[1], holder=1)
    before = open_fds()
    if shared:
        b = alloc.get_bound_socket(
            "tcp", "127.0.0.1", 1006, share=second[0], app=second[1], holder=2
        )
        assert same_socket(a, b)
        assert alloc.refcount("tcp", "127.0.0.1", 1006) == 2
    else:
        with pytest.raises(ShareError, match=r"tcp:127\.0\.0\.1:1006: held by application"):
            alloc.get_bound_socket(
                "tcp", "127.0.0.1", 1006, share=second[0], app=second[1], holder=2
            )
        # Refused means unchanged: same references, no fd gained or lost.
        assert alloc.refcount("tcp", "127.0.0.1", 1006) == 1
        assert open_fds() == before


def test_every_holder_must_accept_the_newcomer(alloc: SocketAllocator) -> None:
    alloc.get_bound_socket("udp", "127.0.0.1", 1007, share=ANY, app="dns")
    alloc.get_bound_socket("udp", "127.0.0.1", 1007, share=SAME, app="dns")
    # ANY from "web" would be accepted by the first holder, not by the second.
    with pytest.raises(ShareError):
        alloc.get_bound_socket("udp", "127.0.0.1", 1007, share=ANY, app="web")


# -- pairs ----------------------------------------------------------------------


def test_pair_binds_udp_and_tcp_on_one_port(alloc: SocketAllocator) -> None:
    udp, tcp = alloc.get_bound_pair("127.0.0.1", 1008)
    assert udp.type == socket.SOCK_DGRAM and tcp.type == socket.SOCK_STREAM
    assert udp.getsockname() == tcp.getsockname() == ("127.0.0.1", 1008)


def test_pair_releases_udp_when_tcp_fails(
    alloc: SocketAllocator, module_creator: SocketCreator
) -> None:
    with module_creator.create("tcp", "127.0.0.1", 1009) as squatter:
        squatter.listen(1)
        before = open_fds()
        with pytest.raises(PairError) as info:
            alloc.get_bound_pair("127.0.0.1", 1009)
        message = str(info.value)
        assert "udp:127.0.0.1:1009 + tcp:127.0.0.1:1009" in message
        assert "tcp failed, udp released" in message and "EADDRINUSE" in message
        assert isinstance(info.value.cause, CreatorOSError)
        assert len(alloc) == 0 and open_fds() == before
    # The UDP half was really closed: the port binds again without reuse options.
    module_creator.create("udp", "127.0.0.1", 1009).close()


def test_pair_does_not_try_tcp_when_udp_fails(alloc: SocketAllocator) -> None:
    with pytest.raises(PairError, match="udp failed, tcp not tried") as info:
        alloc.get_bound_pair("127.0.0.1", 22)
    assert isinstance(info.value.cause, PolicyDenied)
    assert len(alloc) == 0


def test_pair_refused_by_share_keeps_existing_references(alloc: SocketAllocator) -> None:
    udp = alloc.get_bound_socket("udp", "127.0.0.1", 1010, share=ANY, app="dns")
    tcp = alloc.get_bound_socket("tcp", "127.0.0.1", 1010, share=NO, app="dns")
    before = open_fds()
    with pytest.raises(PairError) as info:
        alloc.get_bound_pair("127.0.0.1", 1010, share=ANY, app="dns")
    assert isinstance(info.value.cause, ShareError)
    assert alloc.refcount("udp", "127.0.0.1", 1010) == 1
    assert alloc.refcount("tcp", "127.0.0.1", 1010) == 1
    assert open_fds() == before
    assert udp.fileno() >= 0 and tcp.fileno() >= 0


# -- release by holder and application -------------------------------------------


def test_release_holder_drops_all_its_references(alloc: SocketAllocator) -> None:
    before = open_fds()
    mine = [
        alloc.get_bound_socket("udp", "127.0.0.1", 1011, share=ANY, holder="child-1"),
        alloc.get_bound_socket("udp", "127.0.0.1", 1011, share=ANY, holder="child-1"),
        alloc.get_bound_socket("tcp", "127.0.0.1", 1011, holder="child-1"),
    ]
    other = alloc.get_bound_socket("udp", "127.0.0.1", 1011, share=ANY, holder="child-2")
    assert alloc.release_holder("child-1") == 3
    assert all(s.fileno() == -1 for s in mine)
    assert alloc.refcount("udp", "127.0.0.1", 1011) == 1
    assert alloc.refcount("tcp", "127.0.0.1", 1011) == 0
    assert open_fds() == before + 2  # child-2's dup and the udp original
    assert alloc.release_holder("child-1") == 0
    alloc.release_bound_socket(other)
    assert open_fds() == before


def test_release_app_drops_every_holder_of_that_app(alloc: SocketAllocator) -> None:
    before = open_fds()
    for holder in ("a", "b"):
        alloc.get_bound_socket("udp", "127.0.0.1", 1012, share=SAME, app="dns", holder=holder)
    alloc.get_bound_socket("tcp", "127.0.0.1", 1012, app="web")
    assert alloc.release_app("dns") == 2
    assert len(alloc) == 1
    alloc.close()
    assert open_fds() == before


# -- the stateful no-leak property ----------------------------------------------

KEYS = [(tr, port) for tr in ("udp", "tcp") for port in (1013, 1014)]
HOLDERS = ["h1", "h2", "h3"]
APPS = ["dns", "web"]


class AllocatorMachine(RuleBasedStateMachine):
    """The allocator against a model: which references are live, under which
    share mode and app. After every step the process's open fds must equal
    the baseline plus one per cached key plus one per live reference."""

    creator: SocketCreator  # set by the test below

    refs = Bundle("refs")

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SocketAllocator(self.creator)
        # model: key -> {id(sock): (sock, holder, app, share)}
        self.model: dict[tuple[str, int], dict[int, tuple[socket.socket, str, str, Share]]] = {}
        self.released: list[socket.socket] = []
        self.baseline = open_fds()

    def _compatible(self, key: tuple[str, int], app: str, share: Share) -> bool:
        def accepts(s: Share, a: str, other_app: str) -> bool:
            return s is Share.ANY or (s is Share.SAMEAPP and a == other_app)

        return all(
            accepts(s, a, app) and accepts(share, app, a)
            for _, _, a, s in self.model.get(key, {}).values()
        )

    @rule(
        target=refs,
        key=st.sampled_from(KEYS),
        holder=st.sampled_from(HOLDERS),
        app=st.sampled_from(APPS),
        share=st.sampled_from(list(Share)),
    )
    def get(self, key: tuple[str, int], holder: str, app: str, share: Share) -> Any:
        if not self._compatible(key, app, share):
            with pytest.raises(ShareError):
                self.alloc.get_bound_socket(
                    key[0], "127.0.0.1", key[1], share=share, app=app, holder=holder
                )
            return None  # a refusal holds nothing
        sock = self.alloc.get_bound_socket(
            key[0], "127.0.0.1", key[1], share=share, app=app, holder=holder
        )
        self.model.setdefault(key, {})[id(sock)] = (sock, holder, app, share)
        return (key, sock)

    @rule(ref=consumes(refs))
    def release(self, ref: Any) -> None:
        if ref is None:
            return
        key, sock = ref
        entries = self.model.get(key, {})
        if id(sock) not in entries:
            # Already dropped by release_holder/release_app: a second release is refused.
            with pytest.raises(ValueError):
                self.alloc.release_bound_socket(sock)
            return
        self.alloc.release_bound_socket(sock)
        self._forget(key, [id(sock)])

    @rule(holder=st.sampled_from(HOLDERS))
    def release_holder(self, holder: str) -> None:
        expected = self._forget_where(lambda h, a: h == holder)
        assert self.alloc.release_holder(holder) == expected

    @rule(app=st.sampled_from(APPS))
    def release_app(self, app: str) -> None:
        expected = self._forget_where(lambda h, a: a == app)
        assert self.alloc.release_app(app) == expected

    def _forget(self, key: tuple[str, int], ids: list[int]) -> None:
        for ident in ids:
            sock = self.model[key].pop(ident)[0]
            self.released.append(sock)  # keep it alive: ids must not be reused
        if not self.model[key]:
            del self.model[key]

    def _forget_where(self, match: Any) -> int:
        count = 0
        for key in list(self.model):
            ids = [i for i, (_, h, a, _) in self.model[key].items() if match(h, a)]
            count += len(ids)
            if ids:
                self._forget(key, ids)
        return count

    @invariant()
    def no_fd_leaks(self) -> None:
        live = sum(len(refs) for refs in self.model.values())
        assert open_fds() == self.baseline + len(self.model) + live
        assert len(self.alloc) == len(self.model)
        for key in KEYS:
            assert self.alloc.refcount(key[0], "127.0.0.1", key[1]) == len(self.model.get(key, {}))

    @invariant()
    def released_sockets_are_closed(self) -> None:
        assert all(s.fileno() == -1 for s in self.released)

    def teardown(self) -> None:
        self.alloc.close()
        assert open_fds() == self.baseline


def test_no_fd_leaks_after_any_sequence(module_creator: SocketCreator) -> None:
    AllocatorMachine.creator = module_creator
    machine = AllocatorMachine.TestCase
    machine.settings = settings(
        max_examples=40,
        stateful_step_count=25,
        deadline=None,
        database=None,  # writing the example database would open fds mid-run
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine().runTest()
