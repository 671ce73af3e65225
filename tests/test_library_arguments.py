"""The library used wrongly: each wrong type or value is one InvalidArgument
(a CreatorError, documented) naming the argument, raised before anything is
sent; the public names are exported; audit lines go through ``logging``."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import privsock
from privsock import InvalidArgument, SocketAllocator, SocketCreator
from privsock.auditsink import AUDIT_LOGGER
from privsock.helper.protocol import Transport

# (transport, address, port, options) -> the words the one error must say.
BAD_CREATES: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
    (("udp", "127.0.0.1", "53"), {}, "port must be an int in 1-65535, not '53' (str)"),
    (("udp", "127.0.0.1", 53.0), {}, "port must be an int in 1-65535, not 53.0 (float)"),
    (("udp", "127.0.0.1", True), {}, "port must be an int in 1-65535, not True (bool)"),
    (("udp", "127.0.0.1", None), {}, "port must be an int in 1-65535, not None"),
    (("udp", "127.0.0.1", 0), {}, "port must be in 1-65535, not 0"),
    (("udp", "127.0.0.1", 65536), {}, "port must be in 1-65535, not 65536"),
    (("udp", "127.0.0.1", -1), {}, "port must be in 1-65535, not -1"),
    (("udp", 2130706433, 53), {}, "address must be a str such as '127.0.0.1'"),
    (("udp", b"127.0.0.1", 53), {}, "not b'127.0.0.1' (bytes)"),
    (("udp", "localhost", 53), {}, "not 'localhost' (privsock never resolves names)"),
    (("udp", "10.0.0.0/8", 53), {}, "numeric IPv4 or IPv6 address, not '10.0.0.0/8'"),
    (("udp", "fe80::1%eth0", 53), {}, "address 'fe80::1%eth0' has a scope (%zone)"),
    (("udp", ipaddress.IPv6Address("fe80::1%2"), 53), {}, "address 'fe80::1%2' has a scope"),
    # The scope is the caller's text: it must not reach an audit line raw.
    (("udp", 'fe80::1%x"}\n{"side":"helper"', 53), {}, "has a scope (%zone)"),
    (("sctp", "127.0.0.1", 53), {}, "transport must be 'udp' or 'tcp', not 'sctp' (str)"),
    ((17, "127.0.0.1", 53), {}, "transport must be 'udp' or 'tcp', not 17 (int)"),
    (("udp", "127.0.0.1", 53), {"reuseaddr": "yes"}, "reuseaddr must be True or False"),
    (("udp", "127.0.0.1", 53), {"reuseport": 1}, "reuseport must be True or False, not 1"),
    (("udp", "127.0.0.1", 53), {"v6only": True}, "v6only=True needs an IPv6 address"),
]


@pytest.fixture
def unstarted(tmp_path: Path) -> SocketCreator:
    # Never started: any request that got past the checks would fail with
    # "never started", so an InvalidArgument proves nothing was sent.
    return SocketCreator(str(tmp_path / "policy.toml"), audit_sink=None)


def _one_clear_error(exc: BaseException, words: str) -> None:
    assert type(exc) is InvalidArgument
    assert isinstance(exc, privsock.CreatorError) and isinstance(exc, ValueError)
    assert words in str(exc) and "\n" not in str(exc)
    # One exception, not a chain ending in a TypeError or AttributeError.
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


@pytest.mark.parametrize(("args", "options", "words"), BAD_CREATES)
def test_create_refuses_each_wrong_argument_in_one_error(
    unstarted: SocketCreator, args: tuple[Any, ...], options: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        unstarted.create(*args, **options)
    _one_clear_error(caught.value, words)


@pytest.mark.parametrize(("args", "options", "words"), BAD_CREATES)
def test_the_allocator_refuses_the_same_before_the_cache(
    unstarted: SocketCreator, args: tuple[Any, ...], options: dict[str, Any], words: str
) -> None:
    sockets = SocketAllocator(unstarted)
    with pytest.raises(InvalidArgument) as caught:
        sockets.get_bound_socket(*args, **options)
    _one_clear_error(caught.value, words)
    if args[0] == "udp":  # a pair has no transport argument
        with pytest.raises(InvalidArgument) as caught:
            sockets.get_bound_pair(*args[1:], **options)
        _one_clear_error(caught.value, words)
    assert len(sockets) == 0


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"share": "sometimes"}, "share must be Share.NO, Share.SAMEAPP or Share.ANY"),
        ({"app": 7}, "app must be a str, not 7 (int)"),
    ],
)
def test_the_allocator_refuses_wrong_share_arguments(
    unstarted: SocketCreator, options: dict[str, Any], words: str
) -> None:
    sockets = SocketAllocator(unstarted)
    for call in (
        lambda: sockets.get_bound_socket("udp", "127.0.0.1", 53, **options),
        lambda: sockets.get_bound_pair("127.0.0.1", 53, **options),
    ):
        with pytest.raises(InvalidArgument) as caught:
            call()
        _one_clear_error(caught.value, words)


def test_right_arguments_of_every_accepted_type_pass_the_checks(
    unstarted: SocketCreator,
) -> None:
    # They reach the helper check: this creator was never started.
    for args in [
        ("udp", "127.0.0.1", 53),
        ("TCP", "[::1]", 443),
        (Transport.UDP, ipaddress.ip_address("::"), 65535),
    ]:
        with pytest.raises(privsock.CreatorError, match="never started"):
            unstarted.create(*args, v6only=False, reuseaddr=True)


def test_creator_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="either a policy file"):
        SocketCreator()
    with pytest.raises(InvalidArgument, match="policy must be a path, not 3"):
        SocketCreator(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="connect must be a path"):
        SocketCreator(connect=b"x")  # type: ignore[arg-type]


def test_the_public_names_are_exported_and_documented() -> None:
    for name in privsock.__all__:
        assert getattr(privsock, name) is not None, name
    assert issubclass(privsock.PairError, privsock.CreatorError)
    assert issubclass(privsock.HelperRestartLimit, privsock.HelperDied)
    assert issubclass(privsock.HelperCannotRestart, privsock.HelperDied)
    assert issubclass(privsock.InvalidArgument, privsock.CreatorError)
    doc = SocketAllocator.__doc__ or ""
    for word in ("Share.NO", "get_bound_pair", "release_holder", "ShareError", "InvalidArgument"):
        assert word in doc, word


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def audit_log() -> Iterator[_Records]:
    logger = logging.getLogger(AUDIT_LOGGER)
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_default_audit_sink_is_the_privsock_audit_logger(
    root: None, test_policy: Path, audit_log: _Records, capfd: pytest.CaptureFixture[str]
) -> None:
    with SocketCreator(str(test_policy)) as creator:
        creator.create("udp", "127.0.0.1", 53).close()
        with pytest.raises(privsock.PolicyDenied):
            creator.create("tcp", "127.0.0.1", 22)
    seen = [(r.levelno, r.audit["side"], r.audit["decision"]) for r in audit_log.records]  # type: ignore[attr-defined]
    assert seen == [
        (logging.INFO, "helper", "pong"),
        (logging.INFO, "helper", "granted"),
        (logging.INFO, "boss", "granted"),
        (logging.WARNING, "helper", "denied"),
        (logging.WARNING, "boss", "denied"),
    ]
    assert all(r.name == AUDIT_LOGGER for r in audit_log.records)
    assert audit_log.records[1].getMessage().startswith('{"time":')
    out, err = capfd.readouterr()
    assert out == "" and err == "", "audit lines went to a raw stream, not through logging"
