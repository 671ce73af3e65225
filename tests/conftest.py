"""Shared fixtures. End-to-end tests need root and the real kernel: they start
real helpers, which really drop privilege and load a real seccomp filter."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import pytest

from privsock.client import SocketCreator

from .helper_proc import HelperChannel

REPO = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = REPO / "policy" / "default.toml"

# Generous limits, loopback and the ports the tests use.
TEST_POLICY = """
version = 1
[helper]
user = "privsock"
group = "privsock"
[rate_limit]
rate = 100000.0
burst = 100000
# reuseaddr on TCP only: the parser refuses it for UDP (port hijack).
[[allow]]
transports = ["udp"]
ports = [53, 80, 443, "1000-1023"]
addresses = ["0.0.0.0/0", "::/0"]
options = ["reuseport", "v6only"]
[[allow]]
transports = ["tcp"]
ports = [53, 80, 443, "1000-1023"]
addresses = ["0.0.0.0/0", "::/0"]
options = ["reuseaddr", "reuseport", "v6only"]
[[deny]]
transports = ["udp", "tcp"]
ports = [22]
"""

# The same, for a kernel or container runtime without Landlock.
NO_LANDLOCK_POLICY = TEST_POLICY.replace("[helper]\n", "[helper]\nrequire_landlock = false\n")


def unavailable(message: str, env: Mapping[str, str] = os.environ) -> NoReturn:
    """Skip a test whose external need (a tool, a kernel feature) is missing,
    except in CI (CI=true), where it is a failure: `make test` bootstraps
    everything there, so a skip would hide a test that never ran."""
    if env.get("CI") == "true":
        pytest.fail(f"{message}. CI=true: this test must run", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it starts the real privileged helper")


@pytest.fixture
def policy_factory(tmp_path: Path) -> Callable[[str], Path]:
    """Write a policy the helper accepts: root-owned, 0644, in a 0700 root dir."""
    counter = iter(range(1000))

    def make(text: str) -> Path:
        path = tmp_path / f"policy-{next(counter)}.toml"
        path.write_text(textwrap.dedent(text))
        path.chmod(0o644)
        return path

    return make


@pytest.fixture
def test_policy(policy_factory: Callable[[str], Path]) -> Path:
    return policy_factory(TEST_POLICY)


@pytest.fixture
def creator(root: None, test_policy: Path) -> Iterator[SocketCreator]:
    with SocketCreator(str(test_policy), audit_sink=None) as c:
        yield c


@pytest.fixture
def raw(root: None, test_policy: Path) -> Iterator[HelperChannel]:
    """A serving helper (it answered PING) whose channel the test drives byte by byte."""
    helper = HelperChannel.for_policy(test_policy)
    helper.wait_ready()
    yield helper
    helper.close()
