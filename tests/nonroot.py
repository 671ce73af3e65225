"""Starting the helper the way systemd (User=, AmbientCapabilities=,
CapabilityBoundingSet=) and podman (--user, --cap-drop=ALL
--cap-add=NET_BIND_SERVICE) do: already the policy's user, holding
CAP_NET_BIND_SERVICE as an ambient capability and nothing else."""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import TEST_POLICY

# A process running as privsock that holds CAP_NET_BIND_SERVICE.
AS_PRIVSOCK = [
    "setpriv", "--reuid=privsock", "--regid=privsock", "--clear-groups",
    "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service",
]  # fmt: skip
# ...with a bounding set of only that capability, as the helper requires.
NON_ROOT_START = [*AS_PRIVSOCK, "--bounding-set=-all,+net_bind_service", "--"]


@contextmanager
def readable_policy() -> Iterator[Path]:
    """The test policy where the privsock user can read it: pytest's tmp_path
    is root's alone, and the helper checks every directory above the file."""
    directory = Path(tempfile.mkdtemp(prefix="privsock-test-"))
    try:
        directory.chmod(0o755)
        policy = directory / "policy.toml"
        policy.write_text(textwrap.dedent(TEST_POLICY))
        policy.chmod(0o644)
        yield policy
    finally:
        shutil.rmtree(directory)
