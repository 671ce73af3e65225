"""Binds privileged ports as an unprivileged user under authbind, timing each bind.

Started by bench/run.py as `runuser -u privsock -- authbind --deep python3 -I THIS`.
authbind's LD_PRELOAD library catches bind() on a port below 1024 and forks its
setuid helper for each one; that is the cost measured. Standard library only.

One command per line on stdin: "TRANSPORT FAMILY PORT COUNT" (udp|tcp, 4|6).
One JSON line per command on stdout: a list of nanoseconds per socket+bind+close,
or {"error": "..."}.
"""

from __future__ import annotations

import json
import socket
import sys
import time


def binds(transport: str, family: int, port: int, count: int) -> list[int]:
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    address = "::1" if family == 6 else "127.0.0.1"
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        with socket.socket(af, kind) as sock:
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
        samples.append(time.perf_counter_ns() - t0)
    return samples


def main() -> None:
    for line in sys.stdin:
        try:
            transport, family, port, count = line.split()
            answer: object = binds(transport, int(family), int(port), int(count))
        except (OSError, ValueError) as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
