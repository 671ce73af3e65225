"""privsock/helper/libseccomp.py, the helper's own ctypes binding of libseccomp:
the filter the helper loads is, byte for byte, the one pyseccomp 0.1.2 (which
the helper used before) builds from the same allowlist; its constants are
libseccomp's; and whatever libseccomp refuses is an error, never a filter that
loads without the rule. That the helper refuses to serve then is
tests/test_mitigations.py."""

from __future__ import annotations

import ctypes
import errno
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import IO

import pyseccomp as sc
import pytest

from privsock.helper import libseccomp as scmp
from privsock.helper import seccomp_filter

from .conftest import REPO

_lib = ctypes.CDLL("libseccomp.so.2")
_lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
_lib.seccomp_export_bpf.restype = ctypes.c_int

# pyseccomp's comparison operators, by the binding's name for each.
_OPS = {scmp.CMP_EQ: sc.EQ, scmp.CMP_MASKED_EQ: sc.MASKED_EQ}


def _exported(export: Callable[[IO[bytes]], None]) -> bytes:
    """The BPF program libseccomp generates for a filter, as seccomp_load hands it over."""
    with tempfile.TemporaryFile() as f:
        export(f)
        f.seek(0)
        return f.read()


def _pyseccomp_filter() -> sc.SyscallFilter:
    """The helper's filter as it was built before: pyseccomp's calls and constants."""
    flt = sc.SyscallFilter(sc.KILL_PROCESS)
    flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for entry in seccomp_filter.ALLOWLIST:
        for conditions in entry.args:
            args = [sc.Arg(c.arg, _OPS[c.op], c.datum_a, c.datum_b) for c in conditions]
            flt.add_rule(sc.ALLOW, entry.syscall, *args)
    return flt


def test_the_constants_are_libseccomps() -> None:
    # pyseccomp's values are seccomp.h's (libseccomp 2.5.4: checked by hand too).
    assert (scmp.ACT_KILL_PROCESS, scmp.ACT_ALLOW) == (sc.KILL_PROCESS, sc.ALLOW)
    assert scmp.FLTATR_ACT_BADARCH == sc.Attr.ACT_BADARCH
    assert list(_OPS) == list(_OPS.values()) == [4, 7]  # SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ
    assert ctypes.sizeof(scmp._ArgCmp) == 24  # unsigned int, enum, two uint64_t


def test_the_filter_is_byte_for_byte_the_one_pyseccomp_built() -> None:
    before = _exported(_pyseccomp_filter().export_bpf)
    with seccomp_filter.build() as flt:
        after = _exported(lambda f: _export(flt, f))
    assert len(after) % 8 == 0 and len(after) // 8 > 100  # struct sock_filter is 8 bytes
    assert after == before


def _export(flt: scmp.Filter, f: IO[bytes]) -> None:
    assert _lib.seccomp_export_bpf(flt._ctx, f.fileno()) == 0


def test_a_condition_changes_the_filter() -> None:
    # The comparison above can fail: one condition less is another program.
    with seccomp_filter.build() as flt:
        full = _exported(lambda f: _export(flt, f))
    with scmp.Filter(scmp.ACT_KILL_PROCESS) as flt:
        flt.set_attr(scmp.FLTATR_ACT_BADARCH, scmp.ACT_KILL_PROCESS)
        for entry in seccomp_filter.ALLOWLIST:
            for conditions in entry.args:
                flt.add_rule(scmp.ACT_ALLOW, entry.syscall, conditions[1:])
        assert _exported(lambda f: _export(flt, f)) != full


@pytest.mark.parametrize("name", ["no_such_syscall", "socketcall"])
def test_a_syscall_name_x86_64_lacks_is_an_error(name: str) -> None:
    # socketcall is i386's: libseccomp resolves it to a pseudo-syscall number
    # and accepts the rule, which then adds nothing to an x86_64 filter.
    with scmp.Filter(scmp.ACT_KILL_PROCESS) as flt, pytest.raises(OSError) as caught:
        flt.add_rule(scmp.ACT_ALLOW, name, ())
    assert caught.value.errno == errno.EINVAL
    assert f"no syscall {name!r}" in str(caught.value)


def test_a_rule_libseccomp_refuses_is_an_error() -> None:
    with scmp.Filter(scmp.ACT_KILL_PROCESS) as flt, pytest.raises(OSError) as caught:
        flt.add_rule(scmp.ACT_ALLOW, "write", (scmp.Arg(6, scmp.CMP_EQ, 0),))  # args are 0-5
    assert caught.value.errno == errno.EINVAL
    assert "seccomp_rule_add_array(write, " in str(caught.value)


@pytest.mark.parametrize("datum", [-1, 1 << 64])
def test_a_value_ctypes_would_wrap_is_an_error(datum: int) -> None:
    # -1 would become 0xffffffffffffffff and 2**64 would become 0: another rule.
    for arg in (scmp.Arg(0, scmp.CMP_EQ, datum), scmp.Arg(0, scmp.CMP_MASKED_EQ, 1, datum)):
        with scmp.Filter(scmp.ACT_KILL_PROCESS) as flt, pytest.raises(OSError) as caught:
            flt.add_rule(scmp.ACT_ALLOW, "write", (arg,))
        assert caught.value.errno == errno.EINVAL
        assert "is not 64-bit" in str(caught.value)


def test_an_attribute_libseccomp_refuses_is_an_error() -> None:
    with scmp.Filter(scmp.ACT_KILL_PROCESS) as flt, pytest.raises(OSError) as caught:
        flt.set_attr(scmp.FLTATR_ACT_BADARCH, 0x12340000)  # no such action
    assert caught.value.errno == errno.EINVAL
    assert "seccomp_attr_set(2, 0x12340000)" in str(caught.value)


def test_build_releases_the_context_when_a_rule_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[int | None] = []
    release = scmp.Filter.release

    def counted(self: scmp.Filter) -> None:
        released.append(self._ctx)
        release(self)

    monkeypatch.setattr(scmp.Filter, "release", counted)
    bad = seccomp_filter.Allowed("socketcall", "a syscall x86_64 does not have")
    monkeypatch.setattr(seccomp_filter, "ALLOWLIST", (*seccomp_filter.ALLOWLIST, bad))
    with pytest.raises(OSError, match="no syscall 'socketcall'"):
        seccomp_filter.build()
    assert len(released) == 1 and released[0]


# A filter that the kernel refuses: a user without CAP_SYS_ADMIN and with
# no_new_privs left off (libseccomp sets it unless told not to).
REFUSED_LOAD = """
from privsock.helper import libseccomp as scmp
with scmp.Filter(scmp.ACT_ALLOW) as flt:
    flt.set_attr(3, 0)  # SCMP_FLTATR_CTL_NNP
    try:
        flt.load()
    except OSError as exc:
        print("refused", exc.errno > 0)
with open("/proc/self/status") as f:
    print([line.split()[1] for line in f if line.startswith(("Seccomp:", "NoNewPrivs:"))])
"""


def test_a_load_the_kernel_refuses_is_an_error(root: None) -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=privsock", "--regid=privsock", "--clear-groups",
         "--inh-caps=-all", "--", sys.executable, "-I", "-c", REFUSED_LOAD],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["refused True", "['0', '0']"]
