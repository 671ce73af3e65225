"""The live fuzzer's datagrams: random bytes, valid headers with random tails,
valid requests with a bit flipped or a field replaced, and well-formed requests
for allowed, denied and unbindable ports and addresses (fuzz/live.py says how
they are mixed)."""

from __future__ import annotations

import random

from fuzz import model
from fuzz.expected import MODEL_POLICY
from fuzz.model import CREATE, PING, TCP, UDP


def encode(op: int, rid: int, transport: int = 0, family: int = 0, port: int = 0,
           address: int = 0, options: int = 0, reserved: int = 0) -> bytes:  # fmt: skip
    """A request laid out by hand from the PROTOCOL.md table."""
    raw = address.to_bytes(4, "big") + bytes(12) if family == 4 else address.to_bytes(16, "big")
    return (b"PS\x01" + bytes([op]) + rid.to_bytes(4, "big") + bytes([transport, family])
            + port.to_bytes(2, "big") + raw + options.to_bytes(2, "big")
            + reserved.to_bytes(2, "big"))  # fmt: skip


# (0.0.0.0 is bound only inside the helper's own network namespace.)
ADDRESSES_4 = ["127.0.0.1", "127.0.0.53", "127.1.2.3", "0.0.0.0",  # noqa: S104
               "192.0.2.7", "10.0.0.1", "8.8.8.8", "224.0.0.1", "255.255.255.255"]  # fmt: skip
ADDRESSES_6 = ["::", "::1", "::2", "::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:192.0.2.7",
               "::ffff:10.0.0.1", "2001:db8::1", "fe80::1", "ff02::1"]  # fmt: skip
PORTS = [53, 80, 443, 1000, 1004, 1005, 1010, 1011, 22, 5353, 8080, 1, 65535]
# (offset, size) of each request field, for "set one field to a random value".
FIELDS = [(0, 2), (2, 1), (3, 1), (4, 4), (8, 1), (9, 1), (10, 2), (12, 16), (28, 2), (30, 2)]


class Datagrams:
    """The random stream; ``seed`` makes a run repeatable."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 (a repeatable stream, not a secret)
        self.bit = 0
        self.field = 0
        self.v4 = [model.parse_address(a)[1] for a in ADDRESSES_4]
        self.v6 = [model.parse_address(a)[1] for a in ADDRESSES_6]

    def valid(self) -> bytes:
        rng = self.rng
        rid = rng.getrandbits(32)
        if rng.random() < 0.05:
            return encode(PING, rid)
        if rng.random() < 0.4:
            return self.inside_allow_rule(rid)
        family = rng.choice((4, 6))
        pool = self.v4 if family == 4 else self.v6
        address = (
            rng.choice(pool) if rng.random() < 0.9 else rng.getrandbits(32 if family == 4 else 128)
        )
        port = rng.choice(PORTS) if rng.random() < 0.9 else rng.randint(1, 65535)
        options = rng.getrandbits(3) & (7 if family == 6 else 3)
        return encode(CREATE, rid, rng.choice((UDP, TCP)), family, port, address, options)

    def inside_allow_rule(self, rid: int) -> bytes:
        """A request inside one allow rule (a deny rule may still refuse it)."""
        rng = self.rng
        rule = rng.choice(MODEL_POLICY.allow)
        low, high = rng.choice(rule.ports)
        network = rng.choice(rule.nets)
        host_bits = (32 if network.version == 4 else 128) - network.prefix
        address = network.base | rng.getrandbits(host_bits) if host_bits else network.base
        options = rng.getrandbits(3) & rule.options & (7 if network.version == 6 else 3)
        transport = rng.choice(sorted(rule.transports))
        return encode(CREATE, rid, transport, network.version, rng.randint(low, high), address,
                      options)  # fmt: skip

    def mutated(self) -> bytes:
        rng = self.rng
        data = bytearray(self.valid())
        how = rng.random()
        if how < 0.5:  # every bit in turn
            data[self.bit // 8] ^= 0x80 >> self.bit % 8
            self.bit = (self.bit + 1) % 256
        elif how < 0.85:  # every field in turn, to a random value
            offset, size = FIELDS[self.field]
            data[offset : offset + size] = rng.randbytes(size)
            self.field = (self.field + 1) % len(FIELDS)
        elif how < 0.95:  # a few bits anywhere
            for _ in range(rng.randint(2, 6)):
                bit = rng.randrange(256)
                data[bit // 8] ^= 0x80 >> bit % 8
        else:  # cut or grown
            size = rng.choice((1, 8, 16, 31, 33, 64, 1000))
            data = data[:size] if size < 32 else data + rng.randbytes(size - 32)
        return bytes(data)

    def next(self) -> tuple[bytes, int, bool]:
        """(data, number of fds to attach, attach credentials)."""
        rng = self.rng
        kind = rng.random()
        if kind < 0.25:
            roll = rng.random()
            if roll < 0.4:
                size = rng.randint(1, 64)
            elif roll < 0.7:
                size = rng.randint(1, 4096)
            else:
                size = rng.choice((31, 32, 33))
            data = rng.randbytes(size)
        elif kind < 0.35:
            data = (
                b"PS\x01" + bytes([rng.choice((1, 2))]) + rng.randbytes(rng.choice((28, 28, 4, 60)))
            )
        elif kind < 0.65:
            data = self.mutated()
        else:
            data = self.valid()
        fds = rng.randint(1, 8) if rng.random() < 0.25 else 0
        if fds and rng.random() < 0.05:
            data = b""  # an empty message with fds is a request with ancillary data
        return data, fds, rng.random() < 0.1
