"""The client outside the container, for the network row of the matrix: runs in a
network namespace the test made, reaches the server inside the container over
TCP and UDP, and prints what came back as one JSON line.

    python -I peer.py ADDRESS PORT NONCE
"""

from __future__ import annotations

import json
import socket
import sys

WAIT = 30.0


def main() -> None:
    address, port, nonce = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    out: dict[str, object] = {}
    with socket.create_connection((address, port), timeout=WAIT) as conn:
        conn.sendall(nonce)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(512):
            chunks.append(chunk)
        out["tcp"] = b"".join(chunks).decode()
        out["tcp_local"] = conn.getsockname()[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(WAIT)
        udp.sendto(nonce, (address, port))
        data, source = udp.recvfrom(512)
        out["udp"] = data.decode()
        out["udp_from"] = list(source)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
