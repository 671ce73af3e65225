"""Run privsock inside real containers: podman with the runc runtime, a root
directory built from local files, never an image pull.

Host limits are detected and adapted to here, never in the product:

* runc, not crun (crun refuses hosts with cgroups in hybrid mode), with the
  cgroupfs manager, which works for root with or without systemd;
* explicit ``--ulimit nofile/nproc`` no higher than this process's hard limits:
  podman's defaults need CAP_SYS_RESOURCE to apply, which a VM's root may lack
  (through deploy/podman/run-privsock, the recipe's own options, given these
  values in PRIVSOCK_NOFILE/PRIVSOCK_NPROC);
* a root directory of our own (``--rootfs /`` fails on the cgroup mount): empty
  etc proc sys dev tmp run usr, the host's ``/bin``-style links into usr, copies
  of /etc/passwd and /etc/group (they hold the ``privsock`` user), the policies,
  and the host's /usr and this checkout bind-mounted read-only. The venv and the
  editable install hold absolute paths, so the checkout is mounted at its own path.

Every podman and ip call is bounded by a timeout. Containers, root
directories and network namespaces carry this process's pid in their label or
name: a session removes its own at the end, even after a failure, and the next
session removes those of sessions that were killed before they could.
"""

from __future__ import annotations

import grp
import itertools
import json
import os
import pwd
import queue
import resource
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..conftest import NO_LANDLOCK_POLICY, TEST_POLICY, unavailable
from .driver import READY_MARK, RESULT_MARK

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
DRIVER = HERE / "driver.py"
PEER = HERE / "peer.py"
DEPLOY = REPO / "deploy" / "podman" / "run-privsock"

POLICY = "/etc/privsock/policy.toml"  # paths inside the containers
STRICT_POLICY = "/etc/privsock/strict.toml"
OPTIONAL_LANDLOCK_POLICY = "/etc/privsock/no-landlock.toml"

ROOTFS_PREFIX = "privsock-rootfs-"
NETNS_PREFIX = "privsock-"
LABEL = "privsock-test"

RUN_TIMEOUT = 90.0  # one whole container run; a normal one takes about 2 s
CLEANUP_TIMEOUT = 30.0
IP_TIMEOUT = 10.0
WANT_ULIMIT = 1024
USERNS_SIZE = 65536

PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs")
TOOLS = ("podman", "runc")
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

STRICT_RATE, STRICT_BURST = 2.0, 5

POLICIES = {
    # Generous (the suite's own test policy): the rows about capabilities and networks.
    "policy.toml": TEST_POLICY,
    # The same, for a kernel or runtime without Landlock.
    "no-landlock.toml": NO_LANDLOCK_POLICY,
    # Tight: the compromised boss floods past it.
    "strict.toml": f"""\
version = 1
[rate_limit]
rate = {STRICT_RATE}
burst = {STRICT_BURST}
[[allow]]
transports = ["udp"]
ports = [53]
addresses = ["127.0.0.0/8"]
[[deny]]
ports = [22]
""",
}


class HarnessError(AssertionError):
    """The container machinery failed, not the product; the message says how."""


def _which(tool: str) -> str | None:
    # podman finds runc in the sbin directories too, which a PATH may lack.
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def require_tools(
    which: Callable[[str], str | None] = _which,
    env: Mapping[str, str] = os.environ,
) -> None:
    """Skip without podman/runc, except in CI (CI=true), where it is a failure:
    a CI run that skipped every container test would prove nothing."""
    missing = [tool for tool in TOOLS if which(tool) is None]
    if not missing:
        return
    message = (
        f"{' and '.join(missing)} not installed; `scripts/bootstrap --containers` "
        "(or `make test-containers`) installs them"
    )
    unavailable(message, env)


def ulimit_options(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
) -> list[str]:
    """Limits podman can apply without CAP_SYS_RESOURCE: never above our hard limit."""
    options = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = getrlimit(which)[1]
        value = WANT_ULIMIT if hard in (resource.RLIM_INFINITY, -1) else min(WANT_ULIMIT, hard)
        options.append(f"--ulimit={name}={value}:{value}")
    return options


def _host_layout() -> tuple[dict[str, str], list[str]]:
    """The host's top-level links into /usr (merged /usr), and top-level system
    directories that are real directories instead (to bind-mount read-only)."""
    links, dirs = {}, []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/", name)
        if path.is_symlink():
            links[name] = os.readlink(path)
        elif path.is_dir():
            dirs.append(name)
    return links, dirs


def build_rootfs(owner: int, policies: Mapping[str, str] = POLICIES) -> Path:
    """A root directory owned by ``owner`` (the host uid that is root inside the
    container), with root-owned, 0644 policies under /etc/privsock, so the
    helper's ownership checks pass inside the container."""
    root = Path(tempfile.mkdtemp(prefix=f"{ROOTFS_PREFIX}{os.getpid()}-"))
    try:
        _check_traversable(root.parent)
        root.chmod(0o755)
        for sub in ("etc/privsock", "proc", "sys", "dev", "tmp", "run", "usr", "var/tmp"):
            (root / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
        (root / "tmp").chmod(0o1777)
        (root / "var/tmp").chmod(0o1777)
        links, dirs = _host_layout()
        for name, target in links.items():
            (root / name).symlink_to(target)
        for name in dirs:
            (root / name).mkdir(mode=0o755)
        for name in ("passwd", "group"):
            shutil.copyfile(Path("/etc", name), root / "etc" / name)
            (root / "etc" / name).chmod(0o644)
        # Mount points podman fills; made now so a --read-only run needs none.
        for name in ("hosts", "hostname", "resolv.conf"):
            (root / "etc" / name).touch(mode=0o644)
        (root / REPO.relative_to("/")).mkdir(mode=0o755, parents=True)
        for name, text in policies.items():
            (root / "etc/privsock" / name).write_text(text)
            (root / "etc/privsock" / name).chmod(0o644)
        if owner != 0:
            for path in [root, *root.rglob("*")]:
                os.lchown(path, owner, owner)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _check_traversable(directory: Path) -> None:
    # The container's users (and a user namespace's root) reach the root
    # directory through its parents on the host.
    for path in [directory, *directory.parents]:
        if not path.stat().st_mode & stat.S_IXOTH:
            raise HarnessError(
                f"{path} is not searchable by other users; point TMPDIR at a directory "
                "that is (the container's users must reach the root directory)"
            )


def userns_base(size: int = USERNS_SIZE) -> int:
    """A host uid/gid range for --uidmap/--gidmap that no host account uses."""
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    base = 100000
    while any(base <= uid < base + size for uid in used):
        base += size
    return base


def _dead(pid: str) -> bool:
    """True if ``pid`` names no running process (a session that is gone)."""
    return pid.isdigit() and not Path("/proc", pid).exists()


@dataclass
class Run:
    """One finished container run."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode}\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )

    def report(self) -> dict[str, Any]:
        """The driver's JSON report; fails the test with everything seen if the
        container or the driver broke."""
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if self.returncode != 0 or len(lines) != 1:
            raise HarnessError("the container run did not produce a report\n" + self.explain())
        report: dict[str, Any] = json.loads(lines[0][len(RESULT_MARK) :])
        if "driver_error" in report:
            raise HarnessError(f"the driver failed: {report['driver_error']}\n{self.explain()}")
        return report


@dataclass
class Podman:
    """podman run, bounded and labelled, with the session's host adaptations."""

    session: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(3)}")
    env: dict[str, str] = field(default_factory=lambda: {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C",
    })  # fmt: skip
    _names: itertools.count[int] = field(default_factory=itertools.count)

    def common_options(self, *, ulimits: bool = True) -> list[str]:
        mounts = ["--volume=/usr:/usr:ro", f"--volume={REPO}:{REPO}:ro"]
        mounts += [f"--volume=/{name}:/{name}:ro" for name in _host_layout()[1]]
        return [
            "--rm", "--pull=never", f"--label={LABEL}={self.session}",
            *(ulimit_options() if ulimits else []), *mounts,
        ]  # fmt: skip

    def command(
        self,
        rootfs: Path,
        options: Sequence[str],
        argv: Sequence[str],
        *,
        deploy: str | None = None,
    ) -> tuple[str, list[str], dict[str, str]]:
        """(container name, command line, environment) for one run. ``deploy``
        ("root" or "user") runs it through deploy/podman/run-privsock, so the
        capability options are exactly the documented ones."""
        name = f"privsock-test-{self.session}-{next(self._names)}"
        # Through the recipe, its own --ulimit options are the ones in force
        # (given this host's hard limits, as a user would give them).
        run = [f"--name={name}", *self.common_options(ulimits=deploy is None), *options,
               "--rootfs", str(rootfs), *argv]  # fmt: skip
        env = dict(self.env)
        if deploy is None:
            return name, [*PODMAN, "run", *run], env
        env["PODMAN"] = " ".join(PODMAN)
        nofile, nproc = (opt.rsplit(":", 1)[1] for opt in ulimit_options())
        env |= {"PRIVSOCK_NOFILE": nofile, "PRIVSOCK_NPROC": nproc}
        return name, [str(DEPLOY), deploy, *run], env

    def run(
        self,
        rootfs: Path,
        options: Sequence[str],
        argv: Sequence[str],
        *,
        deploy: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> Run:
        name, cmd, env = self.command(rootfs, options, argv, deploy=deploy)
        env.update(extra_env or {})
        try:
            done = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=timeout, env=env,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"container {name} ran longer than {timeout:g}s: {cmd}") from exc
        finally:
            self.remove(name)
        return Run(cmd, done.returncode, done.stdout, done.stderr)

    def start(
        self,
        rootfs: Path,
        options: Sequence[str],
        argv: Sequence[str],
        *,
        deploy: str | None = None,
    ) -> Background:
        name, cmd, env = self.command(rootfs, options, argv, deploy=deploy)
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        return Background(self, name, cmd, proc)

    def remove(self, name: str) -> None:
        """Force-remove one container (a no-op once --rm has removed it)."""
        self._quiet([*PODMAN, "rm", "--force", "--time=0", "--ignore", name])

    def cleanup(self) -> None:
        """Remove every container of this session that a failure left behind."""
        listed = self._quiet([*PODMAN, "ps", "--all", "--quiet",
                              f"--filter=label={LABEL}={self.session}"])  # fmt: skip
        for cid in listed.split():
            self._quiet([*PODMAN, "rm", "--force", "--time=0", "--ignore", cid])

    def sweep_stale(self) -> None:
        """Remove what sessions killed mid-run left: containers, root
        directories and network namespaces whose session's pid is gone."""
        template = '{{.ID}} {{index .Labels "' + LABEL + '"}}'
        listed = self._quiet(
            [*PODMAN, "ps", "--all", f"--filter=label={LABEL}", "--format", template]
        )
        for line in listed.splitlines():
            cid, _, session = line.partition(" ")
            if _dead(session.partition("-")[0]):
                self._quiet([*PODMAN, "rm", "--force", "--time=0", "--ignore", cid])
        for path in Path(tempfile.gettempdir()).glob(f"{ROOTFS_PREFIX}*-*"):
            if _dead(path.name.removeprefix(ROOTFS_PREFIX).partition("-")[0]):
                shutil.rmtree(path, ignore_errors=True)
        netns = Path("/run/netns")
        for name in os.listdir(netns) if netns.is_dir() else []:
            if name.startswith(NETNS_PREFIX) and _dead(name.split("-")[1]):
                self._quiet(["ip", "netns", "delete", name])

    def _quiet(self, cmd: list[str]) -> str:
        try:
            done = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=CLEANUP_TIMEOUT, env=self.env,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout


class Background:
    """A container running in the background, whose stdout the test reads."""

    def __init__(self, podman: Podman, name: str, cmd: list[str],
                 proc: subprocess.Popen[str]) -> None:  # fmt: skip
        self.podman, self.name, self.cmd, self.proc = podman, name, cmd, proc
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._out: list[str] = []
        self._err: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(proc.stdout, self._out, True), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, self._err, False), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()
        self._run: Run | None = None

    def _pump(self, stream: IO[str] | None, into: list[str], announce: bool) -> None:
        assert stream is not None
        with stream:
            for line in stream:
                into.append(line)
                if announce:
                    self._lines.put(line)
        if announce:
            self._lines.put(None)

    def wait_for(self, mark: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        """The JSON after ``mark`` on a line of stdout; fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise HarnessError(f"no {mark.strip()} line within {timeout:g}s") from None
            if line is None:
                raise HarnessError(f"exited before {mark.strip()}\n" + self.finish().explain())
            if line.startswith(mark):
                parsed: dict[str, Any] = json.loads(line[len(mark) :])
                return parsed

    def wait_ready(self) -> dict[str, Any]:
        return self.wait_for(READY_MARK)

    def finish(self, timeout: float = RUN_TIMEOUT) -> Run:
        """Wait for the container to exit (killing it after ``timeout``); the
        container is removed either way."""
        if self._run is None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=CLEANUP_TIMEOUT)
            finally:
                self.podman.remove(self.name)
            for pump in self._pumps:
                pump.join(timeout=CLEANUP_TIMEOUT)
            self._run = Run(self.cmd, self.proc.returncode, "".join(self._out), "".join(self._err))
        return self._run


def driver(scenario: str, *args: str) -> list[str]:
    """The command line that runs the driver inside a container."""
    return [str(PYTHON), "-I", str(DRIVER), scenario, *args]


class NetnsPair:
    """Two network namespaces joined by a veth pair, made and removed by the test:
    the server's side (for podman --network=ns:PATH) and the client's side.
    Addresses come from TEST-NET-1 and live only on these two veths; nothing
    touches the host's own interfaces or routes."""

    SERVER, CLIENT, PREFIX = "192.0.2.1", "192.0.2.2", 24

    def __init__(self) -> None:
        tag = f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.server_ns, self.client_ns = f"{tag}-s", f"{tag}-c"

    @property
    def server_path(self) -> str:
        return f"/run/netns/{self.server_ns}"

    def __enter__(self) -> NetnsPair:
        try:
            for ns in (self.server_ns, self.client_ns):
                _ip("netns", "add", ns)
            # Created inside the server namespace, its peer inside the client's:
            # the veth never exists in the host's namespace.
            _ip("-n", self.server_ns, "link", "add", "name", "veth0", "type", "veth",
                "peer", "name", "veth0", "netns", self.client_ns)  # fmt: skip
            for ns, addr in ((self.server_ns, self.SERVER), (self.client_ns, self.CLIENT)):
                _ip("-n", ns, "addr", "add", f"{addr}/{self.PREFIX}", "dev", "veth0")
                _ip("-n", ns, "link", "set", "veth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.server_ns, self.client_ns):
            try:
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True,
                               timeout=IP_TIMEOUT)  # fmt: skip
            except subprocess.TimeoutExpired:
                pass

    def in_client(self, argv: Sequence[str], timeout: float = RUN_TIMEOUT) -> Run:
        cmd = ["ip", "netns", "exec", self.client_ns, *argv]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        return Run(cmd, done.returncode, done.stdout, done.stderr)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if done.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {done.stderr.strip()}")
