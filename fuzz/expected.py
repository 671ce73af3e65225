"""What the live fuzzer's helper must answer: its policy (as text for the
helper, and written out again for the independent model in fuzz/model.py), and
the reply, fd count and audit decision each datagram must get."""

from __future__ import annotations

from dataclasses import dataclass

from fuzz import model
from fuzz.model import CREATE, MALFORMED, OK, OS_ERROR, PING, RATE_LIMITED, STAGE_BIND, TCP, UDP

POLICY_TEXT = """\
version = 1
[helper]
user = "privsock"
group = "privsock"
[rate_limit]
rate = {rate}
burst = {burst}
# allow[0]: tcp on loopback and the wildcards, every option
[[allow]]
transports = ["tcp"]
ports = [53, 80, "1000-1010"]
addresses = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"]
options = ["reuseaddr", "reuseport", "v6only"]
# allow[1]: documentation networks: allowed, but no such address here (EADDRNOTAVAIL)
[[allow]]
transports = ["udp"]
ports = [443, 5353]
addresses = ["192.0.2.0/24", "2001:db8::/32"]
options = ["v6only"]
# allow[2]: one address, one transport, no options
[[allow]]
transports = ["tcp"]
ports = [8080]
addresses = ["127.0.0.1/32"]
# allow[3]: udp where allow[0] has tcp, every option UDP can be granted (never reuseaddr)
[[allow]]
transports = ["udp"]
ports = [53, 80, "1000-1010"]
addresses = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"]
options = ["reuseport", "v6only"]
# deny[0]: ssh, and a port inside allow[0]'s range
[[deny]]
ports = [22, 1005]
# deny[1]: one loopback address for tcp 53 (wildcard binds capture it too)
[[deny]]
transports = ["tcp"]
ports = [53]
addresses = ["127.0.0.53/32"]
"""


def policy_text(rate: float = 100000.0, burst: int = 100000) -> str:
    return POLICY_TEXT.format(rate=rate, burst=burst)


# The same policy, written out again for the model (not parsed from the text).
MODEL_POLICY = model.Policy(
    allow=(
        model.Rule("allow[0]", frozenset({TCP}), ((53, 53), (80, 80), (1000, 1010)),
                   tuple(map(model.net, ("127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"))),
                   model.REUSEADDR | model.REUSEPORT | model.V6ONLY),
        model.Rule("allow[1]", frozenset({UDP}), ((443, 443), (5353, 5353)),
                   (model.net("192.0.2.0/24"), model.net("2001:db8::/32")), model.V6ONLY),
        model.Rule("allow[2]", frozenset({TCP}), ((8080, 8080),), (model.net("127.0.0.1/32"),)),
        model.Rule("allow[3]", frozenset({UDP}), ((53, 53), (80, 80), (1000, 1010)),
                   tuple(map(model.net, ("127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"))),
                   model.REUSEPORT | model.V6ONLY),
    ),
    deny=(
        model.Rule("deny[0]", frozenset({UDP, TCP}), ((22, 22), (1005, 1005)),
                   (model.net("0.0.0.0/0"), model.net("::/0"))),
        model.Rule("deny[1]", frozenset({TCP}), ((53, 53),), (model.net("127.0.0.53/32"),)),
    ),
)  # fmt: skip
LOCAL = [(6, 1)]  # ::1; all of 127.0.0.0/8 is local too (model.bind_errno)


@dataclass(frozen=True, slots=True)
class Expected:
    status: int
    rid: int
    detail: int = 0
    code: int = 0
    request: model.Request | None = None  # for an OK to CREATE: what the socket must be

    @property
    def takes_token(self) -> bool:
        return self.request is not None and self.request.op == CREATE


def expect(data: bytes, with_fds: bool, unread: bool = False,
           policy: model.Policy = MODEL_POLICY) -> Expected:  # fmt: skip
    """The reply the helper owes ``data`` (bucket permitting); ``unread``: an
    earlier reply is still unread by the boss."""
    rid = model.request_id(data)
    if with_fds:
        return Expected(MALFORMED, rid)
    req = model.parse_request(data)
    if req is None:
        return Expected(MALFORMED, rid)
    if req.op == PING:
        return Expected(OK, rid)
    if unread:  # one socket in flight per boss: refused for 1 ms, no token taken
        return Expected(RATE_LIMITED, rid, 1, 0)
    verdict = model.decide(policy, req.transport, req.family, req.address, req.port, req.options)
    if not verdict.allowed:
        return Expected(model.DENIED, rid, 0, verdict.reason, req)
    err = model.bind_errno(req.family, req.address, req.options, LOCAL)
    if err:
        return Expected(OS_ERROR, rid, err, STAGE_BIND, req)
    return Expected(OK, rid, 0, 0, req)
