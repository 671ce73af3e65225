"""deploy/debian/build-deb: the package holds what a Debian install needs, built
the same way twice, and lintian finds nothing. The install itself is
tests/containers/test_deb_install.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import privsock

from .conftest import REPO

BUILD = REPO / "deploy" / "debian" / "build-deb"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _build(out: Path) -> Path:
    done = subprocess.run([str(BUILD), str(out)], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    deb = Path(done.stdout.strip())
    assert deb == out / f"privsock_{VERSION}_all.deb"
    return deb


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("deb"))


def _contents(deb: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode, owner) of every entry."""
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    entries = {}
    for line in listing.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        entries[path.removeprefix(".").rstrip("/") or "/"] = (mode, owner)
    return entries


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip


def _extract(deb: Path, into: Path) -> Path:
    subprocess.run(["dpkg-deb", "--extract", str(deb), str(into)], check=True)
    return into


def test_versions_agree() -> None:
    changelog = (REPO / "deploy/debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"privsock ({VERSION}) ")
    assert privsock.__version__ == VERSION
    # The README's install commands name the file `make deb` writes.
    readme = (REPO / "README.md").read_text()
    assert f"apt install ./dist/privsock_{VERSION}_all.deb" in readme


def test_control_fields(deb: Path) -> None:
    assert _field(deb, "Package") == "privsock"
    assert _field(deb, "Version") == VERSION
    assert _field(deb, "Architecture") == "all"
    depends = [re.sub(r"\s*\(.*\)", "", d.strip()) for d in _field(deb, "Depends").split(",")]
    # Debian's python3 and python3-prctl; nothing compiled of our own.
    assert {"python3", "python3-prctl", "libseccomp2", "passwd"} == set(depends)


def test_what_is_installed_where(deb: Path) -> None:
    entries = _contents(deb)
    site = "/usr/lib/python3/dist-packages"
    tree = {f"{site}/{p.relative_to(REPO)}" for p in (REPO / "privsock").rglob("*.py")
            if "__pycache__" not in p.parts}  # fmt: skip
    shipped = {p for p in entries if p.startswith(f"{site}/privsock/") and p.endswith(".py")}
    assert shipped == tree
    # Only privsock itself: the helper calls libseccomp2 through its own binding.
    assert {p.split("/")[5] for p in entries if p.startswith(f"{site}/")} == {"privsock"}
    assert not [p for p in entries if "__pycache__" in p or p.endswith(".pyc")]
    expect = {
        "/usr/bin/privsock": "-rwxr-xr-x",
        "/usr/sbin/privsock-helper": "-rwxr-xr-x",
        "/etc/privsock/policy.toml": "-rw-r--r--",
        "/lib/systemd/system/privsock-helper.socket": "-rw-r--r--",
        "/lib/systemd/system/privsock-helper@.service": "-rw-r--r--",
        "/usr/share/doc/privsock/SECURITY.md": "-rw-r--r--",
        "/usr/share/doc/privsock/policy/README.md": "-rw-r--r--",
        "/usr/share/doc/privsock/copyright": "-rw-r--r--",
        "/usr/share/doc/privsock/changelog.gz": "-rw-r--r--",
        "/usr/share/man/man1/privsock.1.gz": "-rw-r--r--",
        "/usr/share/man/man8/privsock-helper.8.gz": "-rw-r--r--",
    }
    for path, mode in expect.items():
        assert path in entries, f"{path} is not in the package"
        assert entries[path] == (mode, "root/root"), f"{path}: {entries[path]}"
    assert all(owner == "root/root" for _, owner in entries.values())


def test_installed_files_are_the_trees(deb: Path, tmp_path: Path) -> None:
    root = _extract(deb, tmp_path / "root")
    assert (root / "etc/privsock/policy.toml").read_bytes() == (
        REPO / "policy/default.toml").read_bytes()  # fmt: skip
    for unit in ("privsock-helper.socket", "privsock-helper@.service"):
        assert (root / "lib/systemd/system" / unit).read_bytes() == (
            REPO / "deploy/systemd" / unit).read_bytes()  # fmt: skip
    service = (root / "lib/systemd/system/privsock-helper@.service").read_text()
    assert ("ExecStart=/usr/bin/python3 -I -S -c \"import sys; sys.path += "
            "['/usr/lib/python3/dist-packages']; from privsock.helper.main import main; "
            "main()\" --policy /etc/privsock/policy.toml") in service
    commands = (("usr/bin/privsock", "privsock.cli", "-I"),
                ("usr/sbin/privsock-helper", "privsock.helper.main", "-IS"))
    for cmd, module, flags in commands:
        text = (root / cmd).read_text()
        assert text.splitlines()[0] == f"#!/usr/bin/python3 {flags}"
        assert f"from {module} import main" in text
    conffiles = subprocess.run(["dpkg-deb", "--info", str(deb), "conffiles"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert conffiles.split() == ["/etc/privsock/policy.toml"]


def test_the_build_is_reproducible(deb: Path, tmp_path: Path) -> None:
    again = _build(tmp_path)
    assert again.read_bytes() == deb.read_bytes()


def test_lintian_is_clean(deb: Path) -> None:
    if shutil.which("lintian") is None:
        pytest.fail("lintian is missing: `scripts/bootstrap --deb` installs it")
    done = subprocess.run(["lintian", "--info", "--pedantic", str(deb)], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert tags == [], "\n".join(tags)


def test_the_packaged_helper_command_runs_without_site(deb: Path, tmp_path: Path) -> None:
    """/usr/sbin/privsock-helper starts as the service unit does: its
    interpreter line's flags load no site (no .pth hook, no sitecustomize), and
    its path is the standard library and the package's directory."""
    root = _extract(deb, tmp_path / "root")
    lines = (root / "usr/sbin/privsock-helper").read_text().splitlines()
    interpreter, flags = lines[0].removeprefix("#!").split(" ")
    probe = "import sys; print('site' in sys.modules, sys.flags.no_site, sys.flags.isolated)"
    done = subprocess.run([interpreter, flags, "-c", probe], capture_output=True, text=True,
                          check=True, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.stdout.split() == ["False", "1", "1"]
    assert 'sys.path.append("/usr/lib/python3/dist-packages")' in lines


def test_installed_commands_ignore_the_callers_python_environment(
    deb: Path, tmp_path: Path
) -> None:
    """Root runs /usr/bin/privsock and /usr/sbin/privsock-helper: an environment
    another user can shape (PYTHONPATH kept by sudo, a writable directory in
    it) must not put code of theirs into the process. Each command is run with
    a PYTHONPATH whose sitecustomize and privsock package would say so."""
    root = _extract(deb, tmp_path / "root")
    evil = tmp_path / "evil"
    (evil / "privsock" / "helper").mkdir(parents=True)
    marker = tmp_path / "marker"
    say = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (evil / "sitecustomize.py").write_text(say)
    (evil / "privsock" / "__init__.py").write_text(say)
    (evil / "privsock" / "cli.py").write_text(say + "def main(): pass\n")
    (evil / "privsock" / "helper" / "__init__.py").write_text(say)
    (evil / "privsock" / "helper" / "main.py").write_text(say + "def main(): pass\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "x.py"),
           "PYTHONINSPECT": "", "PYTHONUSERBASE": str(evil)}  # fmt: skip
    for cmd in ("usr/bin/privsock", "usr/sbin/privsock-helper"):
        subprocess.run([str(root / cmd), "--version"], env=env, cwd=evil, capture_output=True,
                       timeout=30, check=False)  # fmt: skip
        assert not marker.exists(), f"{cmd} ran {marker.read_text()!r} from PYTHONPATH"
