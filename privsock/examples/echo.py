"""An echo service on sockets passed by socket activation (``privsock exec``,
systemd): ``python -m privsock.examples.echo``.

Each reply first says who is answering (user, group, pid) and what privilege
the process holds, read from its own /proc status; then it echoes. UDP: one
datagram back per datagram. TCP: that line on connect, then every byte back.
SIGINT or SIGTERM stops it: exit 0.
"""

from __future__ import annotations

import grp
import os
import pwd
import selectors
import signal
import socket
import sys
from collections.abc import Mapping

from privsock.helper.procstatus import parse_status

SD_LISTEN_FDS_START = 3
MAX_DATAGRAM = 65535
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Stop signals seen so far. The handler is installed first thing, so a Ctrl-C
# during start-up stops the service quietly too, not with a traceback.
_stop: list[int] = []


def _note_stop(signum: int, frame: object) -> None:
    _stop.append(signum)


class ActivationError(Exception):
    """The environment does not describe sockets meant for this process."""


def listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """(fd, name) for each passed socket, by sd_listen_fds(3)'s rules."""
    fds, for_pid = environ.get("LISTEN_FDS"), environ.get("LISTEN_PID")
    if fds is None or for_pid is None:
        raise ActivationError("no LISTEN_FDS/LISTEN_PID: start me with privsock exec or systemd")
    if for_pid != str(pid):
        raise ActivationError(f"LISTEN_PID is {for_pid!r}, not my pid {pid}: not my sockets")
    if not (fds.isascii() and fds.isdigit()) or not 1 <= int(fds) <= 1024:
        raise ActivationError(f"LISTEN_FDS is {fds!r}, not a number of sockets in 1-1024")
    count = int(fds)
    names = environ.get("LISTEN_FDNAMES")
    labels = names.split(":") if names is not None else [f"fd{i}" for i in range(count)]
    if len(labels) != count:
        raise ActivationError(f"LISTEN_FDNAMES has {len(labels)} names for {count} sockets")
    return [(SD_LISTEN_FDS_START + i, label) for i, label in enumerate(labels)]


def adopt(fd: int, name: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"fd {fd} ({name}) is not a socket: {exc.strerror}") from None
    if sock.type not in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock.detach()
        raise ActivationError(f"fd {fd} ({name}) is neither a datagram nor a stream socket")
    if sock.type == socket.SOCK_STREAM and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise ActivationError(f"fd {fd} ({name}) is a stream socket that is not listening")
    sock.set_inheritable(False)  # as sd_listen_fds does: ours, not our children's
    sock.setblocking(False)
    return sock


def identity(status_text: str) -> str:
    """Who this process is and what privilege it holds, truthfully."""
    st = parse_status(status_text)
    uid, gid = st.uids[1], st.gids[1]
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = "?"
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = "?"
    caps = st.caps
    sets = f"CapEff={caps['CapEff']:x} CapPrm={caps['CapPrm']:x} CapBnd={caps['CapBnd']:x}"
    sets += f" NoNewPrivs={st.no_new_privs}"
    unprivileged = (
        0 not in st.uids
        and caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == caps["CapAmb"] == 0
        and st.no_new_privs == 1
    )
    verdict = "I hold no privilege" if unprivileged else "WARNING: I hold privilege"
    return (
        f"privsock echo: I am pid {os.getpid()}, user {user} (uid {uid}), "
        f"group {group} (gid {gid}). {verdict}: {sets}.\n"
    )


class EchoServer:
    def __init__(self, socks: list[tuple[socket.socket, str]], banner: bytes) -> None:
        self.banner = banner
        self.sel = selectors.DefaultSelector()
        self.socks = socks
        for sock, _ in socks:
            self.sel.register(sock, selectors.EVENT_READ, self._on_listener)
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)

    def serve(self) -> int:
        """Serve until a stop signal (see _note_stop); returns its number."""
        # The signal's byte on this socket wakes select(); the handler records it.
        old = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        try:
            while not _stop:
                for key, _ in self.sel.select():
                    if key.data is None:
                        self._wake_r.recv(64)
                    elif not _stop:
                        key.data(key.fileobj)
            return _stop[0]
        finally:
            signal.set_wakeup_fd(old)

    def _on_listener(self, sock: socket.socket) -> None:
        if sock.type == socket.SOCK_DGRAM:
            try:
                data, peer = sock.recvfrom(MAX_DATAGRAM)
                sock.sendto(self.banner + data, peer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # one bad peer (ICMP error, oversize reply) does not stop the service
            return
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        conn.setblocking(False)
        try:
            conn.send(self.banner)
        except OSError:
            conn.close()
            return
        self.sel.register(conn, selectors.EVENT_READ, self._on_client)

    def _on_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(4096)
            if data:
                conn.sendall(data)  # small echoes fit the send buffer
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.sel.unregister(conn)
        conn.close()

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            obj = key.fileobj
            if isinstance(obj, socket.socket):
                obj.close()
        self._wake_w.close()
        self.sel.close()


def main() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _note_stop)
    try:
        passed = listen_fds(os.environ, os.getpid())
        socks = [(adopt(fd, name), name) for fd, name in passed]
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
            banner = identity(f.read())
    except (ActivationError, OSError, ValueError) as exc:
        print(f"privsock echo: {exc}", file=sys.stderr)
        sys.exit(64)  # EX_USAGE: wrongly started
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # not for our children
    server = EchoServer(socks, banner.encode())
    where = ", ".join(f"{name} {_sockname(sock)}" for sock, name in socks)
    print(f"privsock echo: serving {where}", file=sys.stderr)
    print(banner.rstrip("\n"), file=sys.stderr, flush=True)
    try:
        signum = server.serve()
    finally:
        server.close()
    print(f"privsock echo: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    sys.exit(0)


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


if __name__ == "__main__":
    main()
