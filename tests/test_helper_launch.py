"""How the boss starts the helper: `python -I -S` with an explicit sys.path, so
no site code (.pth files, sitecustomize, setuptools' hooks) runs as root before
the helper's first line, and the helper imports only the standard library and
helperprocess.HELPER_PACKAGES."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsock.client import SocketCreator
from privsock.helperprocess import (
    HELPER_ENV,
    HELPER_PACKAGES,
    boot_line,
    default_helper_argv,
    helper_path,
)

from .test_deploy import INSTALLED_PATH, INSTALLED_PYTHON, SERVICE_UNIT

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


@pytest.fixture
def planted_pth(tmp_path: Path) -> Iterator[Path]:
    """A .pth file in this venv's site-packages that leaves a file named after
    the pid of every interpreter that runs it, into ``tmp_path/ran``."""
    ran = tmp_path / "ran"
    ran.mkdir()
    pth = SITE_PACKAGES / f"zz-privsock-test-{os.getpid()}.pth"
    pth.write_text(f"import os; open(os.path.join({str(ran)!r}, str(os.getpid())), 'w').close()\n")
    try:
        yield ran
    finally:
        pth.unlink()


@pytest.mark.root
def test_no_pth_file_runs_in_the_helper(planted_pth: Path, test_policy: Path) -> None:
    # The control: an interpreter of this venv started as before (-I, with site) runs it.
    control = subprocess.run(
        [sys.executable, "-I", "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True, env=HELPER_ENV,
    )  # fmt: skip
    assert (planted_pth / control.stdout.strip()).exists(), "the planted .pth file is not live"
    with SocketCreator(str(test_policy), audit_sink=None) as creator:
        creator.create("udp", "127.0.0.1", 1000).close()
        helper_pid = creator.pid
    assert helper_pid is not None
    assert not (planted_pth / str(helper_pid)).exists(), "site code ran as root in the helper"


def _unit_argv() -> list[str]:
    """The service unit's ExecStart, pointed at this checkout's venv as
    tests/test_deploy.py installs it."""
    lines = [ln for ln in SERVICE_UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1
    text = lines[0].removeprefix("ExecStart=")
    text = text.replace(INSTALLED_PYTHON, sys.executable, 1)
    return shlex.split(text.replace(INSTALLED_PATH, repr(list(helper_path()))))


def test_no_pth_file_runs_in_the_units_helper(planted_pth: Path) -> None:
    argv = _unit_argv()
    at = argv.index("-c") + 1
    assert argv[at].endswith("; main()")
    # The unit's own interpreter, options and path; the helper's imports, then its pid.
    argv[at] = argv[at].removesuffix("main()") + "import os; print(os.getpid())"
    done = subprocess.run(argv[: at + 1], capture_output=True, text=True, check=True,
                          env=HELPER_ENV, cwd="/")  # fmt: skip
    assert not (planted_pth / done.stdout.strip()).exists(), "site code ran in the unit's helper"
    control = subprocess.run(
        [sys.executable, "-I", "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True, env=HELPER_ENV,
    )  # fmt: skip
    assert (planted_pth / control.stdout.strip()).exists(), "the planted .pth file is not live"


def _loaded_files(argv: list[str]) -> dict[str, str]:
    # The helper's own boot line, with main() replaced by a report of its modules.
    boot = argv[-1].replace(
        "main()",
        "import json; print(json.dumps({n: getattr(m, '__file__', None) or '' "
        "for n, m in sys.modules.items()}))",
    )
    assert boot != argv[-1]
    done = subprocess.run([*argv[:-1], boot], capture_output=True, text=True, check=True,
                          env=HELPER_ENV, cwd="/")  # fmt: skip
    loaded: dict[str, str] = json.loads(done.stdout)
    return loaded


def test_the_helper_imports_only_the_standard_library_and_its_packages() -> None:
    argv = default_helper_argv()
    assert argv[1:4] == ["-I", "-S", "-c"]
    loaded = _loaded_files(argv)
    assert "site" not in loaded and "sitecustomize" not in loaded
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    outside = {}
    for name, file in loaded.items():
        if name == "json" or name.startswith("json."):  # the report's own
            continue
        top = name.split(".")[0]
        if not file or Path(file).resolve().is_relative_to(stdlib):
            continue
        if top in HELPER_PACKAGES and any(file.startswith(d + os.sep) for d in helper_path()):
            continue
        outside[name] = file
    assert outside == {}, f"the helper imports from outside the standard library: {outside}"
    # Every package it is given is one it imports.
    assert {n.split(".")[0] for n in loaded} >= set(HELPER_PACKAGES)


PLANTED = """import os
open(os.path.join(os.path.dirname(__file__), "ran-as-%d" % os.getuid()), "w").close()
raise ImportError("planted")
"""


@pytest.mark.root
def test_a_module_in_the_bosss_directory_does_not_reach_the_helper(
    tmp_path: Path, test_policy: Path
) -> None:
    # A root boss run as `python -c` has its working directory first on sys.path.
    # It imports privsock from the install, then changes into a directory where
    # another user planted a privsock package: the helper must get the privsock
    # the boss runs, not the first one its sys.path would find now.
    cwd = tmp_path / "cwd"
    (cwd / "privsock" / "helper").mkdir(parents=True)
    for name in ("__init__.py", "helper/__init__.py", "helper/main.py"):
        (cwd / "privsock" / name).write_text(PLANTED)
    nobody = 65534
    for path in (cwd, *cwd.rglob("*")):
        os.chown(path, nobody, nobody)
    boss = (
        "import os, sys\n"
        "from privsock.client import SocketCreator\n"
        "assert sys.path[0] == ''\n"
        "os.chdir(sys.argv[2])\n"
        "with SocketCreator(sys.argv[1], audit_sink=None) as c:\n"
        "    c.create('udp', '127.0.0.1', 1000).close()\n"
        "print('served')\n"
    )
    done = subprocess.run([sys.executable, "-c", boss, str(test_policy), str(cwd)], cwd="/",
                          capture_output=True, text=True, env=HELPER_ENV)  # fmt: skip
    assert sorted(p.name for p in cwd.rglob("ran-as-*")) == [], "a planted module ran"
    assert done.returncode == 0 and done.stdout == "served\n", done.stderr
    assert str(cwd) not in " ".join(default_helper_argv())


def test_the_boot_line_carries_a_directorys_bytes_in_any_locale() -> None:
    # A root boss in a Latin-1 locale once wrote a path's U+00A0 into the line as
    # '\xa0', which the helper (UTF-8) turned into the bytes C2 A0: another
    # directory. ASCII source and bytes literals give the same bytes whatever
    # either side's encoding.
    raw = b"/nonexistent/caf\xc3\xa9 \xa0 \"q\" '\n\\"
    line = boot_line([os.fsdecode(raw)])
    assert line.isascii() and "\n" not in line
    report = line.removesuffix("from privsock.helper.main import main; main()")
    assert report != line
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", report + "print(os.fsencode(sys.path[-1]).hex())"],
        capture_output=True, text=True, check=True, env=HELPER_ENV,
    )  # fmt: skip
    assert bytes.fromhex(done.stdout.strip()) == raw

