"""The helper under a real OCI runtime (podman + runc): each test is one row of
the container matrix, and asserts what the helper and the boss saw inside.

The boss (driver.py) drops its own privilege before asking for sockets, and
each run checks that the container's network namespace keeps ports below 1024
privileged, so port 53 can only have come from the helper.
"""

from __future__ import annotations

import json
import math
import pwd
import secrets
from pathlib import Path
from typing import Any

import pytest

from privsock.helper.caps import CAP_SETGID, CAP_SETPCAP, CAP_SETUID, NET_BIND_SERVICE_MASK
from privsock.helper.exitcodes import Exit

from .conftest import UserNamespace
from .harness import (
    OPTIONAL_LANDLOCK_POLICY,
    PEER,
    POLICY,
    PYTHON,
    STRICT_BURST,
    STRICT_POLICY,
    STRICT_RATE,
    NetnsPair,
    Podman,
    driver,
)

pytestmark = pytest.mark.containers

PRIVSOCK = pwd.getpwnam("privsock")  # the rootfs has a copy of this /etc/passwd
NOBODY_CAPS = f"{0:016x}"
# SETGID SETUID SETPCAP NET_BIND_SERVICE: what a root start needs (deploy/podman/run-privsock).
MINIMUM_ROOT_CAPS = (
    (1 << CAP_SETGID) | (1 << CAP_SETUID) | (1 << CAP_SETPCAP) | NET_BIND_SERVICE_MASK
)
NONE = ["--network=none"]


def serve(address: str = "127.0.0.1", policy: str = POLICY) -> list[str]:
    return driver("serve", "--policy", policy, "--address", address)


def assert_hardened(status: dict[str, Any], boss: dict[str, Any]) -> None:
    """The promise, and a seccomp filter of the helper's own: in a container
    Seccomp is 2 already through the runtime's profile, so only one filter more
    than the boss has shows that the helper loaded its allowlist."""
    assert status["verdict"] == [], status
    assert status["seccomp_filters"] == boss["status"]["seccomp_filters"] + 1
    assert status["uids"] == [PRIVSOCK.pw_uid] * 4
    assert status["gids"] == [PRIVSOCK.pw_gid] * 4
    assert status["caps"] == {"CapInh": 0, "CapPrm": NET_BIND_SERVICE_MASK,
                              "CapEff": NET_BIND_SERVICE_MASK, "CapBnd": NET_BIND_SERVICE_MASK,
                              "CapAmb": 0}  # fmt: skip
    assert status["no_new_privs"] == 1
    assert status["seccomp"] == 2


def assert_served(
    report: dict[str, Any], address: str = "127.0.0.1", landlock: bool = True
) -> None:
    """The helper started hardened (with its Landlock ruleset, as podman's
    default seccomp profile allows the Landlock syscalls), the boss without
    privilege of its own got UDP and TCP 53 and was refused 22, and the helper
    exited cleanly."""
    assert "start_error" not in report, report.get("start_error")
    started = report["helper_says"][0]
    assert "hardened, serving" in started, report["helper_says"]
    if landlock:
        assert "; Landlock: ABI " in started, started
        assert "TCP bind to 27 port(s) only" in started, started
    else:
        assert "; Landlock: unavailable (" in started, started
    # Otherwise binding 53 would need no capability and prove nothing.
    assert report["self"]["unprivileged_port_start"] > 53
    assert_hardened(report["helper"], report["self"])
    assert report["boss_caps_after_drop"] == NOBODY_CAPS
    assert report["own_bind_53"] == "EACCES"
    assert report["create"] == {
        "udp:53": {"ok": [address, 53], "type": "SOCK_DGRAM"},
        "tcp:53": {"ok": [address, 53], "type": "SOCK_STREAM"},
        "udp:22": {"denied": "PORT"},
        "tcp:22": {"denied": "PORT"},
    }
    assert_hardened(report["helper_after"], report["self"])
    assert report["helper_exit"] == Exit.OK


def test_1_root_with_podmans_default_capabilities(podman: Podman, rootfs: Path) -> None:
    report = podman.run(rootfs, NONE, serve()).report()
    boss = report["self"]["status"]
    assert boss["uids"] == [0] * 4
    # podman's default set: more than the minimum (e.g. CAP_CHOWN), all given up.
    assert boss["caps"]["CapEff"] & MINIMUM_ROOT_CAPS == MINIMUM_ROOT_CAPS
    assert boss["caps"]["CapEff"] & 1
    assert_served(report)


def test_2_minimum_capabilities_for_a_root_start(podman: Podman, rootfs: Path) -> None:
    report = podman.run(rootfs, NONE, serve(), deploy="root").report()
    boss = report["self"]["status"]
    assert boss["uids"] == [0] * 4
    assert boss["caps"]["CapBnd"] == MINIMUM_ROOT_CAPS
    assert_served(report)
    # `privsock inspect PID`, run inside by the boss (no privilege left), agrees.
    inspect = report["inspect"]
    assert inspect["returncode"] == Exit.OK, inspect
    out = inspect["stdout"]
    assert f"uid       {PRIVSOCK.pw_uid} {PRIVSOCK.pw_uid}" in out
    for name in ("CapPrm", "CapEff", "CapBnd"):
        assert f"{name:<9} {NET_BIND_SERVICE_MASK:016x} cap_net_bind_service" in out
    for name in ("CapInh", "CapAmb"):
        assert f"{name:<9} {0:016x} -" in out
    assert "NoNewPrivs 1" in out
    assert "verdict   hardened" in out


@pytest.mark.parametrize(
    ("caps", "missing", "present"),
    [
        ("NET_BIND_SERVICE", ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"], []),
        ("NET_BIND_SERVICE,SETUID,SETGID", ["CAP_SETPCAP"], ["CAP_SETUID", "CAP_SETGID"]),
    ],
    ids=["no-setuid-setgid", "no-setpcap"],
)
def test_3_root_without_what_the_drop_needs_refuses(
    podman: Podman, rootfs: Path, caps: str, missing: list[str], present: list[str]
) -> None:
    options = [*NONE, "--cap-drop=ALL", f"--cap-add={caps}"]
    report = podman.run(rootfs, options, serve()).report()
    error = report["start_error"]
    assert error["returncode"] == Exit.NOPERM
    message = error["message"]
    assert "started as root without " + ", ".join(missing) in message
    for name in present:
        assert name not in message
    assert "helper" not in report  # it never answered: never served unhardened


def test_4_non_root_start_with_an_ambient_capability(podman: Podman, rootfs: Path) -> None:
    report = podman.run(rootfs, NONE, serve(), deploy="user").report()
    boss = report["self"]["status"]
    assert boss["uids"] == [PRIVSOCK.pw_uid] * 4
    # What the runtime handed in: the capability as ambient, bounding set shrunk.
    assert boss["caps"]["CapAmb"] == NET_BIND_SERVICE_MASK
    assert boss["caps"]["CapBnd"] == NET_BIND_SERVICE_MASK
    assert boss["no_new_privs"] == 1  # run-privsock adds no-new-privileges
    assert_served(report)


def test_4_non_root_start_without_cap_drop_all_refuses(podman: Podman, rootfs: Path) -> None:
    """Without CAP_SETPCAP the helper cannot shrink the bounding set that podman
    left full, so it refuses instead of serving with more than it promises."""
    options = [*NONE, "--user=privsock", "--cap-add=NET_BIND_SERVICE"]
    report = podman.run(rootfs, options, serve()).report()
    assert report["self"]["status"]["caps"]["CapBnd"] & ~NET_BIND_SERVICE_MASK
    error = report["start_error"]
    assert error["returncode"] == Exit.OSERR
    assert "bounding set holds more than CAP_NET_BIND_SERVICE" in error["message"]
    assert "--cap-drop=ALL --cap-add=NET_BIND_SERVICE" in error["message"]


def test_4_non_root_start_as_another_user_refuses(podman: Podman, rootfs: Path) -> None:
    """Without CAP_SETUID the helper cannot become the policy's user, so it
    refuses to serve as whoever it was started as."""
    options = [*NONE, "--user=nobody", "--cap-drop=ALL", "--cap-add=NET_BIND_SERVICE"]
    report = podman.run(rootfs, options, serve()).report()
    error = report["start_error"]
    assert error["returncode"] == Exit.CONFIG
    assert f"the policy names uid {PRIVSOCK.pw_uid}" in error["message"]
    assert "start it as that user" in error["message"]


def test_5_user_namespace_binds_in_its_own_network_namespace(
    podman: Podman, userns: UserNamespace
) -> None:
    # --network=none: runc creates the network namespace inside the user
    # namespace, so the namespace's root capabilities count there.
    report = podman.run(userns.rootfs, [*NONE, *userns.options], serve()).report()
    assert report["self"]["uid_map"] == ["0", str(userns.base), "65536"]
    assert report["self"]["status"]["uids"] == [0] * 4  # root inside only
    assert_served(report)


def test_5_user_namespace_cannot_bind_in_a_host_network_namespace(
    podman: Podman, userns: UserNamespace, tmp_path: Path
) -> None:
    """The same container joined to a network namespace that the host's user
    namespace owns: the capability does not count there, so the policy allows
    port 53 and the kernel still refuses the bind."""
    # podman's default sysctls (ping_group_range) cannot be set in such a
    # namespace either; this run goes without them.
    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_sysctls = []\n")
    with NetnsPair() as net:
        options = [f"--network=ns:{net.server_path}", *userns.options]
        run = podman.run(userns.rootfs, options, serve(net.SERVER),
                         extra_env={"CONTAINERS_CONF": str(conf)})  # fmt: skip
    report = run.report()
    assert_hardened(report["helper"], report["self"])
    assert report["create"]["udp:53"] == {"os_error": "EACCES", "stage": "BIND"}
    assert report["create"]["tcp:53"] == {"os_error": "EACCES", "stage": "BIND"}
    assert report["create"]["tcp:22"] == {"denied": "PORT"}


def test_6_no_new_privileges_read_only_no_network_and_stacked_seccomp(
    podman: Podman, rootfs: Path
) -> None:
    options = ["--security-opt=no-new-privileges", "--read-only", "--network=none"]
    report = podman.run(rootfs, options, serve()).report()
    boss = report["self"]
    assert boss["status"]["no_new_privs"] == 1
    assert boss["root_write"] == "EROFS"
    assert boss["interfaces"] == ["lo"]
    assert_served(report)
    # podman's own profile is on the boss; the helper's filter comes on top.
    runtime_filters = boss["status"]["seccomp_filters"]
    assert boss["status"]["seccomp"] == 2
    assert runtime_filters >= 1
    assert report["helper"]["seccomp_filters"] == runtime_filters + 1 >= 2


def test_7_client_outside_reaches_a_server_on_its_own_address(podman: Podman, rootfs: Path) -> None:
    nonce = secrets.token_hex(8)
    with NetnsPair() as net:
        options = [f"--network=ns:{net.server_path}"]
        argv = driver("listen", "--policy", POLICY, "--address", net.SERVER)
        server = podman.start(rootfs, options, argv, deploy="root")
        try:
            ready = server.wait_ready()
            client = net.in_client([str(PYTHON), "-I", str(PEER), net.SERVER, "53", nonce])
        finally:
            run = server.finish()
    assert ready == {"tcp": [net.SERVER, 53], "udp": [net.SERVER, 53]}
    assert client.returncode == 0, client.explain()
    assert client.stdout.strip() != "", client.explain()
    seen = client.stdout.strip().splitlines()[-1]
    assert f'"tcp": "tcp-echo {nonce}"' in seen
    assert f'"udp": "udp-echo {nonce}"' in seen
    assert f'"udp_from": ["{net.SERVER}", 53]' in seen
    report = run.report()
    assert_hardened(report["helper"], report["self"])
    assert report["boss_caps_after_drop"] == NOBODY_CAPS
    assert report["tcp_peer"][0] == report["udp_peer"][0] == net.CLIENT


def test_8_compromised_boss_is_answered_per_policy(podman: Podman, rootfs: Path) -> None:
    argv = driver("attack", "--policy", STRICT_POLICY, "--flood", "40")
    report = podman.run(rootfs, NONE, argv, deploy="root").report()
    assert_hardened(report["helper"], report["self"])
    malformed = report["malformed"]
    assert malformed.pop("pushed_fd_closed") == "yes"
    assert len(malformed) == 11
    assert set(malformed.values()) == {"MALFORMED"}, malformed
    assert report["port_22"] == {"TCP": ["DENIED", "PORT"], "UDP": ["DENIED", "PORT"]}
    # The bucket starts full, the two denials took two tokens, and it refills
    # at the policy's rate over the time the driver measured.
    flood = report["flood"]
    assert set(flood) == {"OK", "RATE_LIMITED"}, flood
    refilled = math.floor(STRICT_RATE * report["flood_window_s"])
    assert STRICT_BURST - 2 <= flood["OK"] <= STRICT_BURST - 2 + refilled
    assert flood["RATE_LIMITED"] == 40 - flood["OK"]
    assert 0 < report["retry_after_ms"] <= 1000 / STRICT_RATE
    assert report["alive_after_flood"] is True
    assert_hardened(report["helper_after"], report["self"])
    assert report["after_waiting"] == ["OK", 1]  # one socket, once the bucket refilled
    assert report["helper_exit"] == Exit.OK


RUN_PROBE = """
import errno, json, socket
out = {}
for kind, port in (("tcp", 80), ("udp", 53), ("tcp", 22)):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", port))
        out[f"{kind}:{port}"] = list(s.getsockname())
    except OSError as exc:
        out[f"{kind}:{port}"] = errno.errorcode[exc.errno]
    s.close()
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
out["status"] = {k: status[k].strip() for k in
                 ("Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp", "Seccomp_filters")}
with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
    out["unprivileged_port_start"] = int(f.read())
print("RUN-RESULT" + json.dumps(out))
"""


def test_9_privsock_run_under_podmans_default_seccomp_profile(
    podman: Podman, rootfs: Path
) -> None:
    """podman's default profile allows seccomp() with a listener, pidfd_open,
    pidfd_getfd, process_vm_readv and the notification ioctls: an unmodified
    program's own bind() to 80 and 53 is served inside the container."""
    privsock = str(PYTHON.with_name("privsock"))
    argv = [privsock, "run", "--policy", POLICY, "--user", "nobody", "--",
            "/usr/bin/python3", "-I", "-c", RUN_PROBE]  # fmt: skip
    run = podman.run(rootfs, NONE, argv)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RUN-RESULT")]
    assert run.returncode == 0 and len(lines) == 1, run.explain()
    out = json.loads(lines[0][len("RUN-RESULT"):])
    assert out["unprivileged_port_start"] > 80  # so 80 and 53 can only come from the helper
    assert out["tcp:80"] == ["127.0.0.1", 80]
    assert out["udp:53"] == ["127.0.0.1", 53]
    assert out["tcp:22"] == "EACCES"
    status = out["status"]
    nobody = pwd.getpwnam("nobody").pw_uid
    assert status["Uid"].split() == [str(nobody)] * 4
    assert (status["CapEff"], status["CapBnd"], status["NoNewPrivs"]) == (
        NOBODY_CAPS, NOBODY_CAPS, "1")
    # podman's profile, then the run's bind filter.
    assert status["Seccomp"] == "2" and int(status["Seccomp_filters"]) >= 2


def _profile_without_landlock(directory: Path) -> Path:
    """podman's default seccomp profile less the Landlock syscalls: what a
    profile written before Landlock does (its default answer is ENOSYS)."""
    default = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    assert default["defaultErrnoRet"] == 38  # ENOSYS
    listed = [name for entry in default["syscalls"] for name in entry["names"]]
    assert "landlock_create_ruleset" in listed  # the default allows them
    for entry in default["syscalls"]:
        entry["names"] = [n for n in entry["names"] if not n.startswith("landlock_")]
    path = directory / "no-landlock.json"
    path.write_text(json.dumps(default))
    return path


def test_10_seccomp_profile_without_landlock_refuses_by_default(
    podman: Podman, rootfs: Path, tmp_path: Path
) -> None:
    profile = _profile_without_landlock(tmp_path)
    options = [*NONE, f"--security-opt=seccomp={profile}"]
    report = podman.run(rootfs, options, serve()).report()
    error = report["start_error"]
    assert error["returncode"] == Exit.NOLANDLOCK, error
    assert "the policy requires Landlock (helper.require_landlock)" in error["message"]
    assert "(ENOSYS)" in error["message"]
    assert "helper" not in report  # it never answered


def test_10_seccomp_profile_without_landlock_serves_when_the_policy_allows(
    podman: Podman, rootfs: Path, tmp_path: Path
) -> None:
    profile = _profile_without_landlock(tmp_path)
    options = [*NONE, f"--security-opt=seccomp={profile}"]
    report = podman.run(rootfs, options, serve(policy=OPTIONAL_LANDLOCK_POLICY)).report()
    assert_served(report, landlock=False)
