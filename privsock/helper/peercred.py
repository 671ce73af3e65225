"""Who is on the other end of fd 0: the kernel's record, read before the filter.

SO_PEERCRED gives the uid, gid and pid that the peer had when it called
connect() (for a systemd ``Accept=yes`` connection) or socketpair() (for a helper
started by its boss: the peer is the boss process itself). SO_PEERGROUPS gives the
supplementary groups of that same moment. The groups come from the kernel, not
from the user database, on purpose:

* they are what the peer process really holds (a unit's ``SupplementaryGroups=``,
  a ``newgrp``), taken at the same instant as its uid, the same view that let it
  through the socket file's group permission;
* no name service is consulted in the privileged process for each connection (no
  NSS module, LDAP or sssd client loaded into it, no file opened);
* the peer cannot change them afterwards: they are a copy made at connect time.

Python's getsockopt reads at most 1024 bytes, 256 groups. A peer in more groups
gets ``groups=None``, and policy.decide fails closed on it.
"""

from __future__ import annotations

import array
import socket
import struct

from privsock.helper.policy import Peer

_UCRED = struct.Struct("=iII")  # pid, uid, gid
_GROUPS_BUF = 1024  # CPython's getsockopt limit
_SO_PEERGROUPS = 59  # <asm-generic/socket.h>; Python 3.11 does not name it


def read_peer(chan: socket.socket) -> Peer:
    """The peer of ``chan``; OSError if the kernel will not say."""
    pid, uid, gid = _UCRED.unpack(
        chan.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups: frozenset[int] | None
    try:
        raw = chan.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GROUPS_BUF)
    except OSError:
        groups = None  # ERANGE: more groups than fit; decide() fails closed
    else:
        ids = array.array("I")
        ids.frombytes(raw[: len(raw) - len(raw) % ids.itemsize])
        groups = frozenset(ids)
    return Peer(uid=uid, gid=gid, pid=pid, groups=groups)


def accepted(chan: socket.socket) -> bool:
    """Whether ``chan`` came out of accept() on a listening socket (it then has the
    listener's address) rather than from socketpair() (unnamed)."""
    return chan.getsockname() not in ("", b"")
