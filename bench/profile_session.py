"""cProfile of the helper's request path, in-process: serve.Session.handle and the
reply's sendmsg for N granted CREATEs, over a real socketpair, real sockets bound.

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python bench/profile_session.py'

Needs root (ports 900-929 of policy/examples/bench.toml); run it in a network
namespace so that nothing else holds those ports. It uses only what every
version of serve.Session has had, so the same file run from an older checkout
profiles the older code. Prints the functions by their own time.
"""

from __future__ import annotations

import argparse
import array
import cProfile
import ipaddress
import os
import pstats
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privsock.helper import protocol
from privsock.helper.policy import Peer
from privsock.helper.policyparse import parse_policy
from privsock.helper.serve import ANCBUF, Session

REPO = Path(__file__).resolve().parent.parent
POLICY = "policy/examples/bench.toml"


def run(n: int) -> None:
    policy = parse_policy((REPO / POLICY).read_text(), POLICY)
    boss, chan = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lines: list[bytes] = []
    session = Session(chan, policy, os.getpid(), log=lines.append,
                      peer=Peer(os.getuid(), os.getgid(), os.getpid(), frozenset()))  # fmt: skip
    requests = [
        protocol.encode_request(protocol.Create(i, protocol.Transport.TCP,
                                                ipaddress.ip_address(address), 900 + i % 30))
        for i, address in enumerate(("127.0.0.1", "::1") * 2, start=1)
    ]  # fmt: skip
    fds = array.array("i")
    for i in range(n):
        boss.send(requests[i % len(requests)])
        data, ancdata, flags, _ = chan.recvmsg(protocol.REQUEST_SIZE + 1, ANCBUF)
        reply, sock = session.handle(data, ancdata, flags)
        assert sock is not None, reply
        fds = array.array("i", [sock.fileno()])
        chan.sendmsg([protocol.encode_reply(reply)],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])  # fmt: skip
        sock.close()
        _, anc, _, _ = boss.recvmsg(protocol.REPLY_SIZE, ANCBUF)
        for fd in protocol.received_fds(anc):
            os.close(fd)
        if len(lines) > 1000:
            lines.clear()
    boss.close()
    chan.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="requests (default 20000)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    run(200)  # warm
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.runcall(run, args.n)
    elapsed = time.perf_counter() - t0
    print(f"{args.n} requests, {elapsed / args.n * 1e6:.1f} µs each under the profiler")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
