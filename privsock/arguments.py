"""The library's arguments, checked before anything is sent: each wrong type
or value is one InvalidArgument (a CreatorError, and a ValueError) that names
the argument, what it must be, and what it was.

Anything that passes here encodes to a request the helper accepts as well
formed, so a caller's mistake never reaches the helper (nor becomes a raw
TypeError or AttributeError deep inside).
"""

from __future__ import annotations

import functools
import ipaddress

from privsock.errors import InvalidArgument
from privsock.helper import protocol
from privsock.helper.protocol import Option, Transport


def _shown(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def parse_transport(value: str | Transport) -> Transport:
    if isinstance(value, Transport):
        return value
    if isinstance(value, str) and value.lower() in ("udp", "tcp"):
        return Transport[value.upper()]
    raise InvalidArgument(f"transport must be 'udp' or 'tcp', not {_shown(value)}")


def parse_address(value: str | protocol.IPAddress) -> protocol.IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return _unscoped(value)
    if isinstance(value, str):
        try:
            # str.__str__: a plain str, whatever a subclass's __hash__/__eq__ say.
            address = _address_text(str.__str__(value))
        except ValueError:
            pass
        else:
            return _unscoped(address)
        raise InvalidArgument(
            f"address must be a numeric IPv4 or IPv6 address, not {value!r} "
            "(privsock never resolves names)"
        )
    raise InvalidArgument(
        "address must be a str such as '127.0.0.1' or '::1', or an ipaddress "
        f"IPv4Address/IPv6Address, not {_shown(value)}"
    )


def _unscoped(address: protocol.IPAddress) -> protocol.IPAddress:
    # The request has no room for a scope (fe80::1%eth0): the helper would bind
    # the bare address. And its text is the caller's, anything at all.
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise InvalidArgument(
            f"address {str(address)!r} has a scope (%zone): the helper cannot be asked for "
            "one; give the address without it"
        )
    return address


@functools.lru_cache(maxsize=256)
def _address_text(text: str) -> protocol.IPAddress:
    # A boss asks for the same few addresses again and again; ipaddress objects
    # are immutable, so a parsed one can be handed out twice. Errors are not cached.
    return ipaddress.ip_address(text.strip("[]"))


def parse_port(value: int) -> int:
    # bool is an int to Python, and True would quietly mean port 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"port must be an int in 1-65535, not {_shown(value)}")
    if not 1 <= value <= 0xFFFF:
        raise InvalidArgument(f"port must be in 1-65535, not {value}")
    return value


def options(*, reuseaddr: bool, reuseport: bool, v6only: bool) -> Option:
    if reuseaddr is False and reuseport is False and v6only is False:
        return protocol.NO_OPTIONS  # the usual case, without IntFlag arithmetic
    result = Option(0)
    for name, flag, value in (
        ("reuseaddr", Option.REUSEADDR, reuseaddr),
        ("reuseport", Option.REUSEPORT, reuseport),
        ("v6only", Option.V6ONLY, v6only),
    ):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name} must be True or False, not {_shown(value)}")
        if value:
            result |= flag
    return result


def build_create(
    transport: str | Transport,
    address: str | protocol.IPAddress,
    port: int,
    *,
    reuseaddr: bool = False,
    reuseport: bool = False,
    v6only: bool = False,
) -> protocol.Create:
    """The one place a CREATE is built from a caller's values, checked as the
    helper will check it. Its request id is 0: SocketCreator.create_from gives
    it a fresh one when it is sent, and the allocator keys its cache on it."""
    tr, addr, number = parse_transport(transport), parse_address(address), parse_port(port)
    opts = options(reuseaddr=reuseaddr, reuseport=reuseport, v6only=v6only)
    if v6only and addr.version == 4:
        raise InvalidArgument(f"v6only=True needs an IPv6 address, not {addr}")
    create = protocol.Create(0, tr, addr, number, opts)
    protocol.encode_request(create)  # the codec's own rules, in case they ever grow
    return create


def spec(create: protocol.Create) -> str:
    """``udp:127.0.0.1:53``, ``tcp:[::1]:80``: the --listen form, for messages."""
    host = f"[{create.address}]" if create.address.version == 6 else str(create.address)
    return f"{create.transport.name.lower()}:{host}:{create.port}"
