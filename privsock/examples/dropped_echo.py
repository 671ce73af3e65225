"""The library's pattern for a server that starts as root and must not stay
root: get the sockets from a helper, stop the helper, drop every thread of the
process to an ordinary user with ``privsock.drop_privileges``, then serve.

    python -m privsock.examples.dropped_echo --policy FILE --user USER [--port 53]

It serves the echo service of ``privsock.examples.echo`` on 127.0.0.1, UDP and
TCP; each reply starts with what the process holds, read from its own /proc
status after the drop. SIGINT or SIGTERM stops it. Run it as root.
"""

from __future__ import annotations

import argparse
import signal
import sys

import privsock
from privsock.examples import echo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dropped_echo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="the helper's policy file")
    parser.add_argument("--user", required=True, help="the user to drop to")
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args(argv)
    for sig in echo.STOP_SIGNALS:
        signal.signal(sig, echo._note_stop)
    try:
        # 1. Sockets from a helper, while this process is still root. Leaving the
        #    block stops the helper: nothing privileged is left running.
        with privsock.SocketCreator(args.policy, audit_sink=None) as creator:
            udp = creator.create("udp", "127.0.0.1", args.port)
            tcp = creator.create("tcp", "127.0.0.1", args.port, reuseaddr=True)
        tcp.listen(64)
        # 2. Every thread of this process to USER: no capability in any set,
        #    no_new_privs, verified in /proc/self/task/*/status.
        target = privsock.drop_privileges(args.user)
    except (privsock.CreatorError, privsock.Refusal) as exc:
        print(f"dropped_echo: {exc}", file=sys.stderr)
        sys.exit(1)
    # 3. Serve, unprivileged.
    for sock in (udp, tcp):
        sock.setblocking(False)
    with open("/proc/self/status", encoding="ascii") as f:
        banner = echo.identity(f.read())
    print(f"dropped_echo: serving 127.0.0.1:{args.port} as {target.user}", file=sys.stderr)
    print(banner.rstrip("\n"), file=sys.stderr, flush=True)
    server = echo.EchoServer([(udp, "udp"), (tcp, "tcp")], banner.encode())
    try:
        server.serve()
    finally:
        server.close()


if __name__ == "__main__":
    main()
