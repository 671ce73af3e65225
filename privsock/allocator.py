"""SocketAllocator: the boss's cache of bound sockets, so a port is bound once
and shared (the design note's "mini-database of bound ports").

The cache keeps one original socket per request: the Create that
arguments.build_create makes of (transport, address, port, options). Every get
hands out a new dup, owned by one holder; a release closes that dup, and the
last release of a key closes the original too. So at any time this allocator
holds exactly one fd per cached key plus one per live reference, and nothing
else.

Share modes are BIND 10's: each reference says who else may hold the same
socket. A request is granted only if the newcomer accepts every current
holder and every current holder accepts the newcomer:

* ``Share.NO``: nobody else, not even the same application;
* ``Share.SAMEAPP``: only holders with the same application name;
* ``Share.ANY``: anybody (who accepts us in turn).

A refused request raises ShareError and changes nothing. The allocator is
thread-safe; it never closes the SocketCreator it was given.
"""

from __future__ import annotations

import enum
import socket
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from privsock import arguments
from privsock.client import SocketCreator
from privsock.errors import CreatorError, InvalidArgument
from privsock.helper import protocol
from privsock.helper.protocol import Transport


class Share(enum.Enum):
    NO = "no"
    SAMEAPP = "sameapp"
    ANY = "any"


class ShareError(CreatorError):
    """The socket is held under a share mode that refuses this request."""


class PairError(CreatorError):
    """get_bound_pair failed; ``cause`` is the error of the half that failed.
    Nothing of the pair is held any more."""

    def __init__(self, message: str, cause: CreatorError) -> None:
        super().__init__(message)
        self.cause = cause


# A cache key: the request itself, with request id 0 (build_create's).
Key = protocol.Create


@dataclass(frozen=True, slots=True)
class _Ref:
    holder: Hashable
    app: str
    share: Share

    def accepts(self, other: _Ref) -> bool:
        if self.share is Share.ANY:
            return True
        return self.share is Share.SAMEAPP and self.app == other.app


@dataclass(slots=True)
class _Entry:
    original: socket.socket
    refs: dict[int, tuple[socket.socket, _Ref]] = field(default_factory=dict)  # id(dup) ->


def _share(value: Share | str) -> Share:
    try:
        return Share(value)
    except ValueError:
        pass
    raise InvalidArgument(f"share must be Share.NO, Share.SAMEAPP or Share.ANY, not {value!r}")


def _app(value: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"app must be a str, not {value!r} ({type(value).__name__})")
    return value


def _what(key: Key) -> str:
    return arguments.spec(key)


class SocketAllocator:
    """A cache of bound sockets in front of one SocketCreator: each key
    (transport, family, address, port, options) is bound once by the helper,
    and every get hands out a dup owned by one holder.

    ``get_bound_socket`` and ``get_bound_pair`` (UDP and TCP, both or
    neither) take a share mode (``Share.NO``, ``Share.SAMEAPP``,
    ``Share.ANY``), an application name and a holder; a request the current
    holders' modes refuse raises ShareError and changes nothing.
    ``release_bound_socket``, ``release_holder`` and ``release_app`` give
    references back; the last one of a key closes the cached socket, and
    ``close()`` (or leaving a ``with`` block) closes everything. Wrong
    arguments raise InvalidArgument; the helper's refusals raise the
    CreatorError subclasses of SocketCreator.create. Thread-safe; it never
    closes the creator."""

    def __init__(self, creator: SocketCreator) -> None:
        self.creator = creator
        self._entries: dict[Key, _Entry] = {}
        self._lock = threading.RLock()

    def __enter__(self) -> SocketAllocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_bound_socket(
        self,
        transport: str | Transport,
        address: str | protocol.IPAddress,
        port: int,
        *,
        reuseaddr: bool = False,
        reuseport: bool = False,
        v6only: bool = False,
        share: Share = Share.NO,
        app: str = "",
        holder: Hashable = None,
    ) -> socket.socket:
        """A dup of the cached socket for this key, or of a new one from the
        helper. ``holder`` (default: ``app``) names who holds the reference,
        for release_holder. Release it with release_bound_socket."""
        key = arguments.build_create(transport, address, port, reuseaddr=reuseaddr,
                                     reuseport=reuseport, v6only=v6only)  # fmt: skip
        ref = _Ref(app if holder is None else holder, _app(app), _share(share))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._check_share(key, entry, ref)
                return self._hand_out(key, entry, ref)
            original = self.creator.create_from(key)
            entry = _Entry(original)
            self._entries[key] = entry
            try:
                return self._hand_out(key, entry, ref)
            except BaseException:
                del self._entries[key]
                original.close()
                raise

    def get_bound_pair(
        self,
        address: str | protocol.IPAddress,
        port: int,
        *,
        reuseaddr: bool = False,
        reuseport: bool = False,
        v6only: bool = False,
        share: Share = Share.NO,
        app: str = "",
        holder: Hashable = None,
    ) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP on the same address and port, both or neither: if the TCP
        half fails, the UDP half is released and PairError names both."""
        opts = {"reuseaddr": reuseaddr, "reuseport": reuseport, "v6only": v6only}
        udp_key = arguments.build_create("udp", address, port, **opts)  # a caller's bug
        _share(share), _app(app)
        pair = f"{_what(udp_key)} + {_what(udp_key._replace(transport=Transport.TCP))}"
        with self._lock:
            try:
                udp = self.get_bound_socket(
                    "udp", address, port, share=share, app=app, holder=holder, **opts
                )
            except CreatorError as exc:
                raise PairError(f"{pair}: udp failed, tcp not tried: {exc}", exc) from exc
            try:
                tcp = self.get_bound_socket(
                    "tcp", address, port, share=share, app=app, holder=holder, **opts
                )
            except CreatorError as exc:
                self.release_bound_socket(udp)
                raise PairError(f"{pair}: tcp failed, udp released: {exc}", exc) from exc
        return udp, tcp

    def release_bound_socket(self, sock: socket.socket) -> None:
        """Drop the reference ``sock`` (a socket this allocator handed out):
        close it, and close the cached socket when it was the last reference."""
        with self._lock:
            for key, entry in self._entries.items():
                if id(sock) in entry.refs and entry.refs[id(sock)][0] is sock:
                    self._drop(key, entry, [id(sock)])
                    return
        raise ValueError("not a socket this allocator handed out, or already released")

    def release_holder(self, holder: Hashable) -> int:
        """Drop every reference of ``holder`` (e.g. a child server that died).
        Returns how many were dropped."""
        return self._release_where(lambda ref: ref.holder == holder)

    def release_app(self, app: str) -> int:
        """Drop every reference taken under application name ``app``."""
        return self._release_where(lambda ref: ref.app == app)

    def close(self) -> None:
        """Close every reference still held and every cached socket."""
        self._release_where(lambda ref: True)

    def refcount(
        self,
        transport: str | Transport,
        address: str | protocol.IPAddress,
        port: int,
        *,
        reuseaddr: bool = False,
        reuseport: bool = False,
        v6only: bool = False,
    ) -> int:
        """Live references to the cached socket for this key (0: not cached)."""
        key = arguments.build_create(transport, address, port, reuseaddr=reuseaddr,
                                     reuseport=reuseport, v6only=v6only)  # fmt: skip
        with self._lock:
            entry = self._entries.get(key)
            return len(entry.refs) if entry else 0

    def __len__(self) -> int:
        """The number of cached (original) sockets."""
        with self._lock:
            return len(self._entries)

    # -- internals ----------------------------------------------------------

    def _check_share(self, key: Key, entry: _Entry, ref: _Ref) -> None:
        for _, held in entry.refs.values():
            if not (held.accepts(ref) and ref.accepts(held)):
                by = f"application {held.app!r}" if held.app else "another holder"
                raise ShareError(
                    f"{_what(key)}: held by {by} with share={held.share.value}; "
                    f"refused for application {ref.app!r} with share={ref.share.value}"
                )

    @staticmethod
    def _hand_out(key: Key, entry: _Entry, ref: _Ref) -> socket.socket:
        dup = entry.original.dup()
        entry.refs[id(dup)] = (dup, ref)
        return dup

    def _drop(self, key: Key, entry: _Entry, ids: list[int]) -> None:
        for ident in ids:
            dup, _ = entry.refs.pop(ident)
            dup.close()
        if not entry.refs:
            del self._entries[key]
            entry.original.close()

    def _release_where(self, match: Callable[[_Ref], bool]) -> int:
        dropped = 0
        with self._lock:
            for key, entry in list(self._entries.items()):
                ids = [ident for ident, (_, ref) in entry.refs.items() if match(ref)]
                if ids:
                    self._drop(key, entry, ids)
                    dropped += len(ids)
        return dropped
