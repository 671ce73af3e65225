"""The container harness's own promises: fail (not skip) in CI without podman,
adapt ulimits to the host, and keep test networks off the host's interfaces."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from .harness import DEPLOY, WANT_ULIMIT, NetnsPair, Podman, require_tools, ulimit_options


def _none(tool: str) -> None:
    return None


def test_missing_podman_fails_in_ci() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"podman and runc not installed.*CI=true"):
        require_tools(which=_none, env={"CI": "true"})


def test_missing_podman_skips_outside_ci() -> None:
    with pytest.raises(pytest.skip.Exception, match="podman and runc not installed"):
        require_tools(which=_none, env={"CI": "false"})
    with pytest.raises(pytest.skip.Exception):
        require_tools(which=_none, env={})


def test_present_tools_pass() -> None:
    require_tools(which=lambda tool: f"/usr/bin/{tool}", env={"CI": "true"})


@pytest.mark.parametrize(
    ("hard", "want"),
    [(resource.RLIM_INFINITY, WANT_ULIMIT), (1 << 20, WANT_ULIMIT), (512, 512)],
)
def test_ulimits_never_exceed_the_hard_limit(hard: int, want: int) -> None:
    options = ulimit_options(getrlimit=lambda _: (min(hard, 256), hard))
    assert options == [f"--ulimit=nofile={want}:{want}", f"--ulimit=nproc={want}:{want}"]


def _recipe(mode: str, **env: str) -> list[str]:
    """The podman command line deploy/podman/run-privsock builds (podman replaced by echo)."""
    done = subprocess.run([str(DEPLOY), mode, "--rootfs", "/x", "true"],
                          env={"PATH": os.environ["PATH"], "PODMAN": "echo", **env},
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.split()


@pytest.mark.parametrize("mode", ["root", "user"])
def test_the_podman_recipe_sets_rlimits(mode: str) -> None:
    # Without them podman fails with "error setting rlimit type 7/6" where root
    # lacks CAP_SYS_RESOURCE: the recipe must carry them, not only the tests.
    args = _recipe(mode)
    assert args[0] == "run"
    assert "--ulimit=nofile=1024:1024" in args and "--ulimit=nproc=1024:1024" in args
    args = _recipe(mode, PRIVSOCK_NOFILE="512", PRIVSOCK_NPROC="256")
    assert "--ulimit=nofile=512:512" in args and "--ulimit=nproc=256:256" in args
    readme = " ".join((DEPLOY.parent / "README.md").read_text().split())
    assert "--ulimit=nofile=1024:1024 --ulimit=nproc=1024:1024" in readme
    assert "error setting rlimit type 7" in readme


def test_the_harness_leaves_the_rlimits_to_the_recipe() -> None:
    # A container run through the recipe gets the recipe's --ulimit options
    # (with this host's limits), and none from the harness.
    runner = Podman()
    _, cmd, env = runner.command(Path("/x"), [], ["true"], deploy="root")
    assert not [arg for arg in cmd if arg.startswith("--ulimit")]
    want = [opt.rsplit(":", 1)[1] for opt in ulimit_options()]
    assert [env["PRIVSOCK_NOFILE"], env["PRIVSOCK_NPROC"]] == want
    _, plain, _ = runner.command(Path("/x"), [], ["true"])
    assert [arg for arg in plain if arg.startswith("--ulimit")] == ulimit_options()


def _host_network() -> tuple[list[str], list[tuple[str, str, str]]]:
    """The host's interface names and addresses (not counters or lifetimes)."""

    def ip(*args: str) -> list[list[str]]:
        out = subprocess.run(["ip", "-o", *args], capture_output=True, text=True,
                             check=True, timeout=10).stdout  # fmt: skip
        return [line.split() for line in out.splitlines()]

    links = sorted(fields[1] for fields in ip("link", "show"))
    addrs = sorted((f[1], f[2], f[3]) for f in ip("addr", "show"))
    return links, addrs


@pytest.mark.root
def test_netns_pair_never_touches_the_host_network(root: None) -> None:
    before = _host_network()
    with NetnsPair() as net:
        assert _host_network() == before
        inside = subprocess.run(["ip", "-n", net.server_ns, "-o", "addr", "show", "veth0"],
                                capture_output=True, text=True, check=True, timeout=10)  # fmt: skip
        assert f"inet {net.SERVER}/{net.PREFIX}" in inside.stdout
        names = (net.server_ns, net.client_ns)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=True, timeout=10).stdout  # fmt: skip
    assert not any(name in listed for name in names)
    assert _host_network() == before
