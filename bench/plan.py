"""What the bench measures and where: paths, ports, the kinds of round trip and
their labels. Each helper binds its own ports (see PORT)."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / "build"
RESULTS = BENCH / "results"
POLICY_SOURCE = REPO / "policy" / "examples" / "bench.toml"

USER = "privsock"  # the helper's user, and the one authbind lets bind
# Each helper binds its own ports: a helper closes its copy of a sent socket only
# after sendmsg, so another helper binding the same port at once could collide.
# All are in policy/examples/bench.toml's 900-929, which the tests do not use.
PORTS = range(900, 930)
PORT = {
    "privsock": 900, "authbind": 901, "in_process": 902, "raw_helper": 903,
    "to_c": 912, "c_helper": 913, "min_helper": 922,
}  # fmt: skip
PIPELINE_BASE = {"raw_helper": 904, "c_helper": 914}  # + up to 8 ports each
# `privsock exec --listen tcp:127.0.0.1:EXEC_PORT -- /bin/true`: the issue's
# tcp:127.0.0.1:80 on a port of the bench's own, so nothing else can hold it.
EXEC_PORT = 929
EXEC_USER = "nobody"  # exec refuses the helper's own user
AUTHBIND_FILE = Path("/etc/authbind/byport") / f"!{PORT['authbind']}"  # "!" for 512-1023

COMBOS = [("udp", 4), ("udp", 6), ("tcp", 4), ("tcp", 6)]
ADDRESS = {4: "127.0.0.1", 6: "::1"}
TRANSPORT = {"udp": 1, "tcp": 2}

# (key, label) of each round-trip kind, in table order.
KINDS = [
    ("privsock", "privsock: SocketCreator.create + privsock-helper"),
    ("c_to_helper", "C driver -> privsock-helper (helper alone)"),
    ("client_to_c", "SocketCreator -> C reference helper (client alone)"),
    ("min_helper", "C driver -> minimal Python helper (Python floor, helper side)"),
    ("raw_py_to_c", "minimal Python client -> C reference helper (Python floor, client side)"),
    ("c_limit", "C driver -> C reference helper (physical limit)"),
    ("inproc_py", "in-process socket+bind+close, Python, root"),
    ("inproc_c", "in-process socket+bind+close, C, root"),
    ("authbind", "authbind: socket+bind+close, Python as user privsock"),
]
PIPELINE_DEPTHS = (1, 4, 8)
# The helper serves a CREATE only once every earlier reply has been read (one
# socket in flight per boss: privsock/helper/PROTOCOL.md), so it is measured at depth 1.
PIPELINERS = [
    ("privsock_py", "privsock.helper.protocol in Python -> privsock-helper", (1,)),
    ("privsock_c", "C driver -> privsock-helper", (1,)),
    ("c_limit", "C driver -> C reference helper", PIPELINE_DEPTHS),
]


class BenchError(Exception):
    """A precondition or a measurement failed; one line for the user."""

