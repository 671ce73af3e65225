"""Session fixtures for the container tests: the podman runner and the root
directories, built once and removed at the end even after a failure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import USERNS_SIZE, Podman, build_rootfs, require_tools, userns_base


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    if os.geteuid() != 0:
        pytest.fail("the container tests need root: they run rootful podman with runc")
    require_tools()
    runner = Podman()
    runner.sweep_stale()
    try:
        yield runner
    finally:
        runner.cleanup()


@pytest.fixture(scope="session")
def rootfs(podman: Podman) -> Iterator[Path]:
    path = build_rootfs(owner=0)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class UserNamespace:
    base: int  # the host uid (and gid) that is root inside
    rootfs: Path

    @property
    def options(self) -> list[str]:
        return [f"--uidmap=0:{self.base}:{USERNS_SIZE}", f"--gidmap=0:{self.base}:{USERNS_SIZE}"]


@pytest.fixture(scope="session")
def userns(podman: Podman) -> Iterator[UserNamespace]:
    """A root directory owned by the uid that is root inside the namespace:
    owned by anyone else, it and the policies would look like nobody's."""
    base = userns_base()
    path = build_rootfs(owner=base)
    try:
        yield UserNamespace(base, path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
