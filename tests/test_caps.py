"""privsock/helper/caps.py, the helper's own prctl and capset calls (it imports
no python-prctl): its constants are the kernel's uapi headers'; capset writes
the three sets exactly as asked, both 32-bit halves, as python-prctl's
set_caps (libcap's cap_set_proc) did for the helper before; and whatever the
kernel refuses is an OSError that changes nothing. That the helper then
refuses to serve is tests/test_mitigations.py."""

from __future__ import annotations

import ctypes
import errno
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import prctl
import pytest

from privsock.helper import caps

from .conftest import REPO

UAPI = Path("/usr/include/linux")


def _defines(header: str) -> dict[str, int]:
    text = (UAPI / header).read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^#\s*define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b",
                                                    text, re.M)}  # fmt: skip


def test_the_constants_are_the_kernels() -> None:
    prctl_h, capability_h = _defines("prctl.h"), _defines("capability.h")
    for name in ("PR_SET_PDEATHSIG", "PR_SET_DUMPABLE", "PR_SET_KEEPCAPS", "PR_CAPBSET_DROP",
                 "PR_SET_NO_NEW_PRIVS", "PR_CAP_AMBIENT", "PR_CAP_AMBIENT_CLEAR_ALL"):  # fmt: skip
        assert getattr(caps, name) == prctl_h[name], name
    for name in ("CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                 "_LINUX_CAPABILITY_VERSION_3", "_LINUX_CAPABILITY_U32S_3"):  # fmt: skip
        assert getattr(caps, name) == capability_h[name], name
    # python-prctl's numbers agree; the structs are __u32 + int and three __u32.
    for name in ("CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE"):
        assert getattr(caps, name) == getattr(prctl, name), name
    header, data = caps._CapHeader, caps._CapData
    assert (header.version.offset, header.pid.offset, ctypes.sizeof(header)) == (0, 4, 8)
    assert (data.effective.offset, data.permitted.offset, data.inheritable.offset,
            ctypes.sizeof(data)) == (0, 4, 8, 12)  # fmt: skip


def _run_as_root(script: str) -> Any:
    """``script`` in a fresh interpreter (its sets are for life): its last line, as JSON."""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                          timeout=30, check=False, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


SETS = """
import json
from privsock.helper.procstatus import parse_status

def sets():
    with open("/proc/self/status", encoding="ascii") as f:
        return parse_status(f.read()).caps
"""

# One capability in each 32-bit half (21: CAP_SYS_ADMIN, 38: CAP_PERFMON), and
# each set different.
CAPSET = SETS + """
from privsock.helper import caps
bounding = sets()["CapBnd"]
nbs, admin, perfmon = 1 << 10, 1 << 21, 1 << 38
caps.capset(effective=nbs | perfmon, permitted=nbs | admin | perfmon, inheritable=admin | perfmon)
first = sets()
caps.capset(effective=nbs, permitted=nbs, inheritable=0)  # the helper's call
print(json.dumps([bounding, first, sets()]))
"""

# The helper's drop as it was made with python-prctl (libcap's cap_set_proc).
PYTHON_PRCTL = SETS + """
import prctl
nbs = prctl.CAP_NET_BIND_SERVICE
others = [c for c in prctl.ALL_CAPS if c != nbs]
prctl.set_caps(
    (others, [prctl.CAP_PERMITTED, prctl.CAP_EFFECTIVE, prctl.CAP_INHERITABLE], False),
    ([nbs], [prctl.CAP_INHERITABLE], False),
    ([nbs], [prctl.CAP_PERMITTED, prctl.CAP_EFFECTIVE], True),
)
print(json.dumps(sets()))
"""


def test_capset_writes_the_three_sets_as_asked(root: None) -> None:
    bounding, first, helpers = _run_as_root(CAPSET)
    assert first == {
        "CapInh": 1 << 21 | 1 << 38,
        "CapPrm": 1 << 10 | 1 << 21 | 1 << 38,
        "CapEff": 1 << 10 | 1 << 38,
        "CapBnd": bounding,  # untouched: capset does not write it
        "CapAmb": 0,
    }
    assert helpers == {**first, "CapInh": 0, "CapPrm": 1 << 10, "CapEff": 1 << 10}
    # The same sets as the helper's former python-prctl drop left.
    assert helpers == _run_as_root(PYTHON_PRCTL)


# After the drop to CAP_NET_BIND_SERVICE, regaining CAP_SYS_ADMIN (EPERM) and a
# header version the kernel does not take (EINVAL); neither changes a set.
REFUSED = SETS + """
import errno
from privsock.helper import caps
nbs = 1 << 10
caps.capset(effective=nbs, permitted=nbs, inheritable=0)
before = sets()
found = []
for version, asked in ((caps._LINUX_CAPABILITY_VERSION_3, nbs | 1 << 21), (0, nbs)):
    caps._LINUX_CAPABILITY_VERSION_3 = version
    try:
        caps.capset(effective=asked, permitted=asked, inheritable=0)
        found.append("set")
    except OSError as exc:
        found.append([errno.errorcode[exc.errno], "capset(" in str(exc)])
print(json.dumps([found, sets() == before]))
"""


def test_a_capset_the_kernel_refuses_is_an_error(root: None) -> None:
    assert _run_as_root(REFUSED) == [[["EPERM", True], ["EINVAL", True]], True]


@pytest.mark.parametrize("sets", [(1 << 64, 0, 0), (0, -1, 0), (0, 0, 1 << 70)])
def test_a_set_beyond_64_bits_is_an_error(sets: tuple[int, int, int]) -> None:
    # Refused before the call: the two 32-bit halves would silently drop the rest.
    with pytest.raises(ValueError, match="not a 64-bit mask"):
        caps.capset(*sets)


def test_a_prctl_the_kernel_refuses_is_an_error() -> None:
    # A capability number no kernel knows: EINVAL (root) or EPERM, never a drop.
    with pytest.raises(OSError, match=r"prctl\(24, 63\)") as refused:
        caps.prctl(caps.PR_CAPBSET_DROP, 63)
    assert refused.value.errno in (errno.EINVAL, errno.EPERM)
