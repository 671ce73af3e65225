"""A clean Debian 12 root directory for installing the .deb, built once with
mmdebstrap and cached in /var/cache/privsock-tests (building needs the Debian
mirror; every run after that is offline).

What it holds: minbase (no compiler, no python3) plus systemd to boot as PID 1,
and a local apt repository (file:/var/local/debs, not yet in apt's lists) with
the .debs that the package's Depends pull in and nothing else. So
`apt install ./privsock_*.deb` works with no network only if the Depends line
names everything privsock needs.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTROL = REPO / "deploy" / "debian" / "control.in"
CACHE = Path("/var/cache/privsock-tests")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE = ("systemd",)  # in the root directory itself: the PID 1 of the systemd test
LOCAL_REPO = "/var/local/debs"
BUILD_TIMEOUT = 900.0


class RootfsError(RuntimeError):
    """The cache could not be built; the message says why."""


def depends() -> list[str]:
    """The package names of the Depends line of deploy/debian/control.in."""
    match = re.search(r"^Depends: (.*)$", CONTROL.read_text(), re.MULTILINE)
    if match is None:
        raise RootfsError(f"{CONTROL} has no Depends line")
    return sorted(re.sub(r"\(.*?\)", "", item).strip() for item in match.group(1).split(","))


def cache_path() -> Path:
    key = hashlib.sha256(repr((SUITE, BASE, depends(), 2)).encode()).hexdigest()[:16]
    return CACHE / f"debian12-deb-{key}"


def _customize() -> list[str]:
    """mmdebstrap hooks: download (not install) the Depends closure into a flat
    local repository, then make it the only apt source."""
    deps = " ".join(depends())
    repo = LOCAL_REPO
    return [
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        f'--customize-hook=chroot "$1" apt-get install --download-only -y -q {deps}',
        f'--customize-hook=mkdir -p "$1{repo}" && mv "$1"/var/cache/apt/archives/*.deb "$1{repo}/"',
        f'--customize-hook=cd "$1{repo}" && dpkg-scanpackages --multiversion . /dev/null '
        '> Packages 2>/dev/null',
        f'--customize-hook=echo "deb [trusted=yes] file:{repo} ./" > "$1/etc/apt/sources.list"',
        '--customize-hook=rm -f "$1"/etc/apt/sources.list.d/*',
        '--customize-hook=echo privsock-test > "$1/etc/hostname"',
        '--customize-hook=: > "$1/etc/machine-id"',
    ]


def build(dest: Path) -> None:
    for tool in ("mmdebstrap", "dpkg-scanpackages"):
        if shutil.which(tool) is None:
            raise RootfsError(f"{tool} is missing: `scripts/bootstrap --deb` installs it")
    cmd = [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
        f"--include={','.join(BASE)}", *_customize(), SUITE, str(dest), MIRROR,
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RootfsError(f"mmdebstrap ran longer than {BUILD_TIMEOUT:g}s") from exc
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-15:])
        raise RootfsError(f"mmdebstrap failed (it needs {MIRROR}):\n{tail}")


def cached_rootfs() -> Path:
    """The cached root directory, built first if missing (under a lock, so two
    test runs at once build it once)."""
    path = cache_path()
    if path.is_dir():
        return path
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_dir():
            return path
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=CACHE))
        try:
            work.rmdir()  # mmdebstrap wants to create it (or find it empty)
            build(work)
            os.rename(work, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return path


if __name__ == "__main__":
    try:
        print(cached_rootfs())
    except RootfsError as exc:
        sys.exit(f"debian_rootfs: {exc}")
