"""Runs inside a test container as the boss: starts a real helper, uses it,
and prints what it saw as one JSON line (after RESULT_MARK) on stdout. The
tests in this directory assert on that report, outside the container.

    python -I driver.py serve  --policy FILE --address ADDR
    python -I driver.py listen --policy FILE --address ADDR
    python -I driver.py attack --policy FILE

serve   start the helper, inspect it, drop the boss's own privilege, then ask
        for udp/tcp 53 (granted) and 22 (denied) on ADDR;
listen  get tcp+udp 53 on ADDR from the helper, print READY, answer one TCP
        connection and one UDP datagram from outside the container;
attack  a compromised boss: malformed requests, port 22, a flood past the
        rate limit; then check the helper is alive and still hardened.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # for tests.helper_proc; -I leaves it off sys.path

import prctl  # noqa: E402

from privsock.client import SocketCreator  # noqa: E402
from privsock.errors import (  # noqa: E402
    CreatorOSError,
    HelperStartError,
    PolicyDenied,
    RateLimited,
)
from privsock.helper import caps, protocol  # noqa: E402
from privsock.helper.procstatus import parse_status, verdict  # noqa: E402
from privsock.helper.protocol import Status, Transport  # noqa: E402
from tests.helper_proc import HelperChannel  # noqa: E402

RESULT_MARK = "PRIVSOCK-RESULT "
READY_MARK = "PRIVSOCK-READY "
NOBODY = 65534
WAIT = 30.0  # seconds for any one network wait; the harness bounds the whole run


def status_of(pid: int | str) -> dict[str, Any]:
    st = parse_status(Path(f"/proc/{pid}/status").read_text())
    facts: dict[str, Any] = st._asdict()
    facts["verdict"] = verdict(st)
    return facts


def own_facts() -> dict[str, Any]:
    """What the container gave this process, so a test can tell that an
    option really took effect."""
    try:
        fd = os.open("/etc/privsock-write-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink("/etc/privsock-write-probe")
        root_write = "ok"
    except OSError as exc:
        root_write = errno.errorcode.get(exc.errno or 0, str(exc))
    return {
        "status": status_of("self"),
        "unprivileged_port_start": int(
            Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()
        ),
        "uid_map": Path("/proc/self/uid_map").read_text().split(),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "root_write": root_write,
    }


def drop_boss() -> str:
    """Give up this process's own privilege, so that whatever it binds below
    1024 afterwards can only come from the helper. Returns CapEff after."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # clears every capability set
    else:
        caps.prctl(caps.PR_CAP_AMBIENT, caps.PR_CAP_AMBIENT_CLEAR_ALL)
        prctl.cap_effective.limit()
        prctl.cap_inheritable.limit()
        prctl.cap_permitted.limit()
    return f"{status_of('self')['caps']['CapEff']:016x}"


def own_bind(address: str, port: int) -> str:
    """bind() in this process, without the helper: "ok" or the errno name."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, port))
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def attempt(creator: SocketCreator, transport: str, address: str, port: int) -> dict[str, Any]:
    try:
        sock = creator.create(transport, address, port)
    except PolicyDenied as exc:
        return {"denied": exc.reason.name}
    except RateLimited as exc:
        return {"rate_limited": exc.retry_after}
    except CreatorOSError as exc:
        return {"os_error": errno.errorcode[exc.errno], "stage": exc.stage.name}
    with sock:
        return {"ok": list(sock.getsockname()[:2]), "type": sock.type.name}


def inspect(pid: int) -> dict[str, Any]:
    cli = Path(sys.executable).parent / "privsock"
    done = subprocess.run(
        [str(cli), "inspect", str(pid)], capture_output=True, text=True, timeout=WAIT
    )
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def start(policy: str, out: dict[str, Any]) -> SocketCreator | None:
    out["self"] = own_facts()
    creator = SocketCreator(policy, audit_sink=None, start_timeout=WAIT, reply_timeout=WAIT)
    try:
        creator.start()
    except HelperStartError as exc:
        out["start_error"] = {"returncode": exc.returncode, "message": str(exc)}
        return None
    assert creator.pid is not None
    out["helper_pid"] = creator.pid
    out["helper_says"] = list(creator.helper_messages)
    out["helper"] = status_of(creator.pid)
    return creator


def cmd_serve(args: argparse.Namespace, out: dict[str, Any]) -> None:
    creator = start(args.policy, out)
    if creator is None:
        return
    try:
        out["boss_caps_after_drop"] = drop_boss()
        out["own_bind_53"] = own_bind(args.address, 53)
        out["inspect"] = inspect(creator.pid or 0)
        out["create"] = {
            f"{t}:{port}": attempt(creator, t, args.address, port)
            for t in ("udp", "tcp")
            for port in (53, 22)
        }
        out["helper_after"] = status_of(creator.pid or 0)
    finally:
        out["helper_exit"] = creator.close()


def cmd_listen(args: argparse.Namespace, out: dict[str, Any]) -> None:
    creator = start(args.policy, out)
    if creator is None:
        return
    try:
        tcp = creator.create("tcp", args.address, 53, reuseaddr=True)
        udp = creator.create("udp", args.address, 53)
    finally:
        out["helper_exit"] = creator.close()  # the boss needs no more sockets
    out["boss_caps_after_drop"] = drop_boss()
    with tcp, udp:
        tcp.listen(1)
        print(READY_MARK + json.dumps({"tcp": tcp.getsockname(), "udp": udp.getsockname()}),
              flush=True)  # fmt: skip
        tcp.settimeout(WAIT)
        conn, peer = tcp.accept()
        with conn:
            conn.settimeout(WAIT)
            data = conn.recv(512)
            conn.sendall(b"tcp-echo " + data)
        out["tcp_peer"] = list(peer[:2])
        udp.settimeout(WAIT)
        data, upeer = udp.recvfrom(512)
        udp.sendto(b"udp-echo " + data, upeer)
        out["udp_peer"] = list(upeer[:2])


def _request(rid: int, transport: Transport, port: int) -> bytes:
    req = protocol.Create(rid, transport, ipaddress.ip_address("127.0.0.1"), port)
    data: bytes = protocol.encode_request(req)
    return data


def _malformed() -> dict[str, bytes]:
    good = _request(1000, Transport.UDP, 53)

    def patched(offset: int, value: int) -> bytes:
        data = bytearray(good)
        data[offset] = value
        return bytes(data)

    return {
        "short": good[:31],
        "long": good + b"\0",
        "magic": patched(0, ord("X")),
        "version": patched(2, 9),
        "op": patched(3, 77),
        "transport": patched(8, 3),
        "family": patched(9, 5),
        "port0": good[:10] + b"\0\0" + good[12:],
        "option_bits": patched(29, 0x80),
        "reserved": patched(31, 1),
    }


def _status(data: bytes) -> str:
    return protocol.decode_reply(data).status.name


def _malformed_replies(raw: HelperChannel) -> dict[str, str]:
    seen = {name: _status(raw.exchange(data)[0]) for name, data in _malformed().items()}
    # A request carrying an fd: refused, and the helper closes its copy at once
    # (the pipe reads end-of-file once ours is closed too).
    r, w = os.pipe()
    data, _ = raw.exchange(_request(1001, Transport.UDP, 53), [w])
    os.close(w)
    seen["with_fd"] = _status(data)
    seen["pushed_fd_closed"] = "yes" if os.read(r, 1) == b"" else "no"
    os.close(r)
    return seen


def _flood(raw: HelperChannel, count: int) -> tuple[dict[str, int], int]:
    """CREATE requests back to back: replies by status, and the last retry-after."""
    counts: dict[str, int] = {}
    retry_ms = 0
    for rid in range(2000, 2000 + count):
        data, fds = raw.exchange(_request(rid, Transport.UDP, 53))
        for fd in fds:
            os.close(fd)
        reply = protocol.decode_reply(data)
        counts[reply.status.name] = counts.get(reply.status.name, 0) + 1
        if reply.status is Status.RATE_LIMITED:
            retry_ms = reply.detail
    return counts, retry_ms


def cmd_attack(args: argparse.Namespace, out: dict[str, Any]) -> None:
    out["self"] = own_facts()
    raw = HelperChannel.for_policy(Path(args.policy))
    try:
        raw.wait_ready()
        out["helper"] = status_of(raw.pid)
        out["malformed"] = _malformed_replies(raw)
        out["port_22"] = {}
        began = time.monotonic()  # the bucket can refill from here on
        for t in (Transport.TCP, Transport.UDP):
            reply = protocol.decode_reply(raw.exchange(_request(1002, t, 22))[0])
            out["port_22"][t.name] = [reply.status.name, protocol.Reason(reply.code).name]
        out["flood"], retry_ms = _flood(raw, args.flood)
        out["flood_window_s"] = time.monotonic() - began
        out["retry_after_ms"] = retry_ms
        out["alive_after_flood"] = raw.proc.poll() is None
        out["helper_after"] = status_of(raw.pid)
        raw.wait_ready()
        time.sleep(retry_ms / 1000.0)
        data, fds = raw.exchange(_request(3000, Transport.UDP, 53))
        out["after_waiting"] = [_status(data), len(fds)]
        for fd in fds:
            os.close(fd)
    finally:
        out["helper_exit"] = raw.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["serve", "listen", "attack"])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--flood", type=int, default=40)
    args = parser.parse_args()
    out: dict[str, Any] = {"scenario": args.scenario}
    try:
        {"serve": cmd_serve, "listen": cmd_listen, "attack": cmd_attack}[args.scenario](args, out)
    except Exception as exc:
        # Report what was seen so far; the test shows it with the failure.
        out["driver_error"] = f"{type(exc).__name__}: {exc}"
    print(RESULT_MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
